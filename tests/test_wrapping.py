"""Wrapping composes with what is already on the instance (accelerate's hooks: ``add_hook_to_module``,
``cpu_offload``, ``dispatch_model`` with offloaded layers, ``from_pretrained(device_map=...)``), and copies of a
wrapped model (``copy.deepcopy``, pickle / ``torch.save``) are wrapped models of their own weights.

Each scenario checks the two things that matter: the compressed output equals the hand-built shortened prompt run
through the same (hooked) model, and after ``vtc.remove`` the instance has exactly what it had before ``apply`` --
the hook object itself, the outputs, the hooks census and the weights, bit for bit.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

import vtc
from helpers import QUESTIONS, greedy, hand_built, hook_census, make_inputs
from vtc import testing as tiny
from vtc.integrations.transformers.cut import WrappedMethod, offloaded_weights_loaded

MAX_NEW = 6


class CountingHook(AlignDevicesHook):
    """accelerate's top-level hook (``io_same_device``, as ``dispatch_model`` installs it), counting its calls."""

    def __init__(self):
        super().__init__(io_same_device=True)
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return super().pre_forward(module, *args, **kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    """Every weight's value: on the module, or, for offloaded ones (meta on the module), in accelerate's store."""
    out = {f"module:{k}": v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    for name, module in model.named_modules():
        store = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if store is not None:
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            out.update({f"offloaded:{name}.{k}": store[k].clone() for k, v in own if v.device.type == "meta"})
    return out


def snapshot(model, inputs, with_generate: bool = True):
    """Everything `remove` must restore: outputs (generate, logits), hooks census, weights, instance methods."""
    with torch.no_grad():
        logits = model(**inputs).logits
    return {
        "generate": greedy(model, inputs, MAX_NEW).tolist() if with_generate else None,
        "logits": logits,
        "census": hook_census(model),
        "weights": weights(model),
        "instance": {name: model.__dict__.get(name) for name in ("forward", "generate")},
    }


def assert_restored(model, inputs, before):
    after = snapshot(model, inputs, with_generate=before["generate"] is not None)
    assert after["generate"] == before["generate"]
    assert torch.equal(after["logits"], before["logits"])
    assert after["census"] == before["census"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(v, before["weights"][k]) for k, v in after["weights"].items())
    for name, value in before["instance"].items():  # the very same objects (accelerate's hooked forward), or none
        assert model.__dict__.get(name) is value, name


def assert_equals_hand_built(model, inputs, family, compressor="cls_attention", budget=5):
    """Compressed generate == the shortened prompt built by hand, run through the same model unwrapped."""
    vtc.apply(model, compressor, budget=budget)
    out = greedy(model, inputs, MAX_NEW)
    length = inputs["input_ids"].shape[1]
    with offloaded_weights_loaded(model):  # the reference calls get_image_features outside the model's forward
        short, short_len = hand_built(model, inputs, family)
    assert [r.num_kept_visual for r in vtc.last_selection(model)] == [budget]
    vtc.remove(model)
    reference = greedy(model, short, MAX_NEW)
    assert out[:, length:].tolist() == reference[:, short_len:].tolist()


# -- accelerate ------------------------------------------------------------------------------------------------------


def test_add_hook_to_module_goes_through_the_hook_and_is_restored(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    hook = CountingHook()
    add_hook_to_module(model, hook)
    hooked_forward = model.__dict__["forward"]
    greedy(model, inputs, 1)  # transformers installs its own lazy hooks on the first call
    before = snapshot(model, inputs)

    vtc.apply(model, "fastervlm", budget=5)
    assert model.__dict__["forward"] is not hooked_forward  # vtc wraps the hooked forward ...
    assert model.forward.original is hooked_forward  # ... and calls exactly it
    for path in ("generate", "forward", "labels"):
        calls = hook.calls
        with torch.no_grad():
            if path == "generate":
                greedy(model, inputs, 2)
            elif path == "forward":
                model(**inputs)
            else:  # the loss / loglikelihood path
                model(**inputs, labels=inputs["input_ids"].clone())
        assert hook.calls > calls, f"the {path} path must go through accelerate's hook"
        assert [r.num_kept_visual for r in vtc.last_selection(model)] == [5]

    vtc.remove(model)
    assert model.__dict__["forward"] is hooked_forward and model._hf_hook is hook
    assert_restored(model, inputs, before)
    remove_hook_from_module(model)  # accelerate's own removal still works after vtc came and went
    assert not hasattr(model, "_hf_hook") and model.forward == type(model).forward.__get__(model)


def test_add_hook_to_module_compressed_equals_hand_built(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True))
    assert_equals_hand_built(model, inputs, family)


def test_hook_added_after_apply_survives_remove(loaded, family):
    """accelerate wraps vtc's forward; removing vtc leaves accelerate's hook working and vtc passing through."""
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    greedy(model, inputs, 1)
    before = snapshot(model, inputs)
    vtc.apply(model, "pool", budget=4)
    hook = CountingHook()
    add_hook_to_module(model, hook)
    hooked_forward = model.__dict__["forward"]
    greedy(model, inputs, 2)
    assert [r.num_kept_visual for r in vtc.last_selection(model)] == [4]
    vtc.remove(model)
    assert model.__dict__["forward"] is hooked_forward and not vtc.is_applied(model)
    calls = hook.calls
    after = snapshot(model, inputs)
    assert hook.calls > calls
    assert after["generate"] == before["generate"] and torch.equal(after["logits"], before["logits"])
    remove_hook_from_module(model)  # accelerate puts back its _old_forward: vtc's, now a pass-through
    assert not hasattr(model, "_hf_hook") and isinstance(model.__dict__["forward"], WrappedMethod)
    before["instance"]["forward"] = model.__dict__["forward"]
    assert_restored(model, inputs, before)


# OneVision is left out: its SigLIP pooling head is a torch nn.MultiheadAttention, which reads out_proj.weight
# without calling out_proj, so under cpu_offload the plain model's forward already fails (weight on meta). Its
# offloaded case is covered by the dispatch_model test below (tower on the CPU, LLM layers on disk).
@pytest.mark.parametrize("family_name", [f for f in tiny.FAMILIES if f != "llava_onevision"])
def test_cpu_offload(tiny_dirs, family_name):
    """Every weight lives off the module (meta) and is loaded by accelerate's hooks at each submodule call.

    On LLaVA-NeXT transformers' own generate fails under ``cpu_offload`` (it calls
    ``get_image_features`` outside the model's forward, where ``image_newline`` is still on the meta device); vtc's
    wrapped generate loads such weights for its encoder call (``offloaded_weights_loaded``) and works. The
    restore check then compares logits (the forward path) instead of generate."""
    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, QUESTIONS[:1], [1])
    reference = greedy(model, inputs).tolist()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    plain_generate_works = family_name != "llava_next"
    if plain_generate_works:
        assert greedy(model, inputs).tolist() == reference
    else:
        with pytest.raises((NotImplementedError, RuntimeError)):  # transformers' limit, not vtc's
            greedy(model, inputs)
    before = snapshot(model, inputs, with_generate=plain_generate_works)
    vtc.apply(model, "cls_attention", budget=1.0)  # keep-all through the offloaded model == the unwrapped model
    assert greedy(model, inputs).tolist() == reference
    vtc.remove(model)
    assert_equals_hand_built(model, inputs, family_name)
    assert_restored(model, inputs, before)


def _offloading_device_map(model) -> dict[str, str]:
    """Every module named explicitly (transformers refuses a ``""`` entry beside disk ones): the LLM's decoder
    layers alternate disk / CPU, everything else on the CPU (an offloaded ``image_newline`` is covered by the
    ``cpu_offload`` test)."""
    device_map = {}

    def place(module, prefix):
        for name, _ in module.named_parameters(recurse=False):  # e.g. LLaVA-NeXT's image_newline
            device_map[f"{prefix}{name}"] = "cpu"  # (dispatch_model cannot offload a parameter of its own)
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if name == "language_model" or full.endswith("language_model.layers"):
                place(child, f"{full}.")
            elif ".language_model.layers." in f"{full}" or full.startswith("language_model.layers."):
                device_map[full] = "disk" if int(name) % 2 == 0 else "cpu"
            else:
                device_map[full] = "cpu"

    for name, child in model.named_children():
        if name == "model":
            place(child, "model.")
        else:
            device_map[name] = "cpu"
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    return device_map


@pytest.mark.parametrize("family_name", tiny.FAMILIES)
def test_dispatch_model_with_disk_offload(tiny_dirs, family_name, tmp_path):
    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, QUESTIONS[:1], [1])
    reference = greedy(model, inputs).tolist()
    dispatch_model(model, device_map=_offloading_device_map(model), main_device="cpu", offload_dir=str(tmp_path))
    assert isinstance(model.__dict__.get("forward"), object) and "forward" in model.__dict__  # the top-level hook
    assert any(p.device.type == "meta" for p in model.parameters())
    assert greedy(model, inputs).tolist() == reference
    before = snapshot(model, inputs)
    assert_equals_hand_built(model, inputs, family_name, compressor="hiprune", budget=6)
    assert_restored(model, inputs, before)


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("device_map", ["explicit", "auto"])
def test_from_pretrained_with_a_device_map(tiny_dirs, family_name, device_map, tmp_path):
    """The user's path: ``from_pretrained(..., device_map=...)`` offloading LLM layers to disk; ``"auto"`` with a
    memory cap below the model's size offloads everything to disk (on this CPU-only machine)."""
    from transformers import AutoModelForImageTextToText

    plain, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, QUESTIONS[:1], [1])
    reference = greedy(plain, inputs).tolist()
    options = {"device_map": _offloading_device_map(plain)} if device_map == "explicit" else {
        "device_map": "auto", "max_memory": {"cpu": "100KB"}}
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_dirs[family_name], offload_folder=str(tmp_path), dtype=torch.float32, **options).eval()
    assert "disk" in model.hf_device_map.values()
    assert getattr(model, "hf_device_map", None)
    assert greedy(model, inputs).tolist() == reference
    before = snapshot(model, inputs)
    assert_equals_hand_built(model, inputs, family_name)
    assert_restored(model, inputs, before)


# -- copies ----------------------------------------------------------------------------------------------------------


def _zero_llm(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                param.zero_()


def _roundtrip_pickle(model):
    return pickle.loads(pickle.dumps(model))


def _roundtrip_torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_is_a_wrapped_model_of_its_own_weights(loaded, family, how):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    other = make_inputs(processor, family, QUESTIONS[1:], [1], first_image=1)
    vtc.apply(model, "cls_attention", budget=5)
    if how == "deepcopy":  # a deep copy also takes the last selection along
        wrapped_out = greedy(model, inputs).tolist()
        clone = copy.deepcopy(model)
    else:  # pickled before the first call: transformers' own lazily installed hooks are local functions that
        # cannot be pickled, wrapped or not
        clone = (_roundtrip_pickle if how == "pickle" else _roundtrip_torch_save)(model)
        wrapped_out = greedy(model, inputs).tolist()
    wrapped_records = [r.indices.tolist() for r in vtc.last_selection(model)]
    assert vtc.is_applied(clone)
    for name in ("forward", "generate"):
        method = clone.__dict__[name]
        assert isinstance(method, WrappedMethod) and method.model is clone and method.active
    assert greedy(clone, inputs).tolist() == wrapped_out
    assert [r.indices.tolist() for r in vtc.last_selection(clone)] == wrapped_records

    # the copy records its own calls: the original's last selection stays what it was
    greedy(clone, other)
    other_records = [r.indices.tolist() for r in vtc.last_selection(clone)]
    assert [r.indices.tolist() for r in vtc.last_selection(model)] == wrapped_records
    greedy(model, inputs)
    assert [r.indices.tolist() for r in vtc.last_selection(clone)] == other_records

    # the copy runs its own weights: a zeroed LLM answers differently, the original is untouched
    _zero_llm(clone)
    with torch.no_grad():
        zero_logits = clone(**inputs).logits
        model_logits = model(**inputs).logits
    assert float(zero_logits.abs().max()) == 0.0
    assert float(model_logits.abs().max()) > 0.0
    assert greedy(model, inputs).tolist() == wrapped_out

    # removing vtc from the copy leaves the original wrapped, and vice versa
    vtc.remove(clone)
    assert not vtc.is_applied(clone) and "forward" not in clone.__dict__ and "generate" not in clone.__dict__
    assert vtc.is_applied(model) and greedy(model, inputs).tolist() == wrapped_out


def test_copy_of_a_hooked_wrapped_model_keeps_the_hook_on_the_copy(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    add_hook_to_module(model, CountingHook())
    vtc.apply(model, "random", budget=4, seed=3)
    out = greedy(model, inputs).tolist()
    clone = copy.deepcopy(model)
    hook = clone._hf_hook
    assert hook is not model._hf_hook
    calls = hook.calls
    assert greedy(clone, inputs).tolist() == out
    assert hook.calls > calls  # the copy's own hook, bound to the copy
    vtc.remove(clone)
    assert clone.__dict__["forward"].args[0] is clone  # accelerate's hooked forward of the copy, bound to the copy
