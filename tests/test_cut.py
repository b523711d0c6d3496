"""Equality tests of the encoder -> LLM cut on tiny real-class models (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Budgets count visual tokens: on the AnyRes families the LLM also receives the newline tokens of the kept rows, so
the helpers compare ``num_kept_visual`` with the budget and ``num_kept`` (newlines included) with what the LLM sees.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from helpers import (QUESTIONS, greedy, hand_built, hook_census, image_token_id, make_inputs, prompt_ids,
                     skip_if_refused, skip_if_resized)
from vtc.integrations.transformers.adapter import adapter_for
from vtc.integrations.transformers.cut import declared_signals
from vtc.testing import LLAVA_FAMILIES, QWEN_FAMILIES


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_keep_all_generate_equals_unwrapped(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    baseline = greedy(model, inputs)
    vtc.apply(model, compressor, budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    assert all(r.num_kept == r.num_tokens for r in vtc.last_selection(model))


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_compressed_generate_equals_hand_built_prompt(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    skip_if_resized(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    vtc.apply(model, compressor, budget=5)
    out = greedy(model, inputs, max_new_tokens=8)
    length = inputs["input_ids"].shape[1]
    assert out[:, :length].tolist() == inputs["input_ids"].tolist(), "generate must return the caller's prompt"
    short, short_len = hand_built(model, inputs, family)
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=8)
    assert out[:, length:].tolist() == reference[:, short_len:].tolist()


@pytest.mark.parametrize("family_name", LLAVA_FAMILIES)
def test_llava_keep_positions_equal_hand_built(tiny_dirs, family_name):
    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, QUESTIONS[:1], [1])
    vtc.apply(model, "fastervlm", budget=4, positions="keep")
    out = greedy(model, inputs)
    short, short_len = hand_built(model, inputs, family_name, positions="keep")
    reindexed = dict(short)
    reindexed.pop("position_ids")
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()
    with torch.no_grad():  # the gapped positions really reach the LLM: logits differ from re-indexed ones
        assert not torch.allclose(model(**short).logits, model(**reindexed).logits)


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_batch_of_two_equals_single_runs(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    vtc.apply(model, compressor, budget=5)
    batch = make_inputs(processor, family, QUESTIONS, [1, 1])
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different length must be left-padded"
    batch_out = greedy(model, batch)
    batch_records = vtc.last_selection(model)
    assert [r.batch_index for r in batch_records] == [0, 1]
    length = batch["input_ids"].shape[1]
    for row in range(2):
        single = make_inputs(processor, family, [QUESTIONS[row]], [1], first_image=row)
        single_out = greedy(model, single)
        new = single_out[0, single["input_ids"].shape[1]:].tolist()
        rest = batch_out[row, length + len(new):].tolist()  # after an early EOS the batch row is padded
        assert batch_out[row, length:length + len(new)].tolist() == new
        assert all(token == model.generation_config.pad_token_id for token in rest)
        assert vtc.last_selection(model)[0].indices.tolist() == batch_records[row].indices.tolist()


def test_llm_receives_exactly_the_budget(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(prompt_ids(args, kwargs)), with_kwargs=True
    )
    vtc.apply(model, "cls_attention", budget=7)
    greedy(model, inputs, max_new_tokens=3)
    hook.remove()
    records = vtc.last_selection(model)
    assert [r.budget for r in records] == [7, 7] and [r.num_kept_visual for r in records] == [7, 7]
    # AnyRes: plus the newlines of the kept rows (none on single-view families)
    expected = [sum(r.num_kept for r in records if r.batch_index == row) for row in range(2)]
    assert expected == [7 + sum(r.num_kept_newlines for r in records if r.batch_index == row) for row in range(2)]
    prefill = seen[0]
    per_row = (prefill == image_token_id(model)).sum(dim=1).tolist()
    assert per_row == expected
    # every text token, nothing else: the batch's old padding goes too (rows re-padded to the longest kept prompt)
    original_text = ((inputs["input_ids"] != image_token_id(model)) & inputs["attention_mask"].bool()).sum(dim=1)
    assert prefill.shape[1] == int((original_text + torch.tensor(expected)).max())


@pytest.mark.support("multi-image")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_multi_image_prompt_each_image_gets_its_budget(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    skip_if_resized(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS, [2, 1])
    vtc.apply(model, compressor, budget=0.25)
    out = greedy(model, inputs, max_new_tokens=3)
    records = vtc.last_selection(model)
    assert [r.batch_index for r in records] == [0, 0, 1]
    assert [r.budget for r in records] == [round(r.num_visual_tokens * 0.25) for r in records]
    assert [r.num_kept_visual for r in records] == [r.budget for r in records]
    assert [r.num_kept - r.num_kept_visual for r in records] == [r.num_kept_newlines for r in records]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family_name", QWEN_FAMILIES)
@pytest.mark.parametrize("compressor", ["fastervlm", "pool", "visionzip"])
def test_qwen_video_in_the_same_call_is_compressed(tiny_dirs, family_name, compressor):
    """An image and a video in one prompt: the image gets ``budget``, the video ``video_budget`` -- compressed below
    1.0, untouched at 1.0; either way the call equals the hand-built shortened prompt."""
    import numpy as np

    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    video = np.random.RandomState(7).randint(0, 256, size=(4, 48, 64, 3), dtype=np.uint8)
    inputs = processor(text=[text], images=[tiny.random_image(96, 64, seed=0)], videos=[video], return_tensors="pt")
    video_id = model.config.video_token_id
    num_video = int((inputs["input_ids"] == video_id).sum())
    assert num_video > 6
    baseline = greedy(model, inputs)
    vtc.apply(model, compressor, budget=1.0, video_budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()

    length = inputs["input_ids"].shape[1]
    for video_budget, video_kept in [(1.0, num_video), (6, 6)]:
        vtc.apply(model, compressor, budget=4, video_budget=video_budget)
        seen = []
        hook = model.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(prompt_ids(args, kwargs)), with_kwargs=True
        )
        out = greedy(model, inputs)
        hook.remove()
        assert int((seen[0] == image_token_id(model)).sum()) == 4
        assert int((seen[0] == video_id).sum()) == video_kept
        image, = vtc.last_selection(model)
        record, = vtc.last_video_selection(model)
        assert image.budget == image.num_kept == 4
        assert record.num_tokens == num_video and record.budget == record.num_kept == video_kept
        short, short_len = hand_built(model, inputs, family_name)
        assert short_len == length - (image.num_tokens - 4) - (num_video - video_kept)
        vtc.remove(model)
        assert out[:, length:].tolist() == greedy(model, short)[:, short_len:].tolist()


def test_text_only_prompt_passes_through(loaded, family):
    model, processor = loaded
    inputs = processor(text=["what is the color ?"], return_tensors="pt")
    baseline = greedy(model, inputs)
    vtc.apply(model, "cls_attention", budget=4)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    assert vtc.last_selection(model) == []


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_forward_path_equals_hand_built_and_shrinks_labels(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    skip_if_resized(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id(model), -100)
    vtc.apply(model, compressor, budget=6)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    short, short_len = hand_built(model, inputs, family)
    short.pop("mm_token_type_ids", None) if family in LLAVA_FAMILIES else None
    keep_labels = short["input_ids"].masked_fill(short["input_ids"] == image_token_id(model), -100)
    vtc.remove(model)
    with torch.no_grad():
        ref = model(**short, labels=keep_labels)
    assert out.logits.shape[1] == short_len
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    # the first generated token is the argmax of the last prefill logit
    vtc.apply(model, compressor, budget=6)
    first = greedy(model, inputs, max_new_tokens=1)[0, -1]
    assert int(out.logits[0, -1].argmax()) == int(first)


def test_remove_restores_bit_identical_behaviour(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    with torch.no_grad():
        base_logits = model(**inputs).logits
    baseline = greedy(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = hook_census(model)
    vtc.apply(model, "cls_attention", budget=3)
    with torch.no_grad():
        assert model(**inputs).logits.shape != base_logits.shape
    vtc.remove(model)
    assert not vtc.is_applied(model)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert greedy(model, inputs).tolist() == baseline.tolist()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_logits)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_census(model) == hooks_before
    vtc.remove(model)  # removing twice is a no-op


@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_attention_implementation_untouched(loaded, family, compressor):
    model, processor = loaded
    skip_if_refused(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    greedy(model, inputs, max_new_tokens=2)  # transformers installs its own output-recording hooks lazily
    hooks_before = hook_census(model)
    before = (model.config._attn_implementation, model.config.vision_config._attn_implementation,
              model.config.text_config._attn_implementation)
    assert before[1] == "sdpa"
    vtc.apply(model, compressor, budget=4)
    greedy(model, inputs, max_new_tokens=2)
    after = (model.config._attn_implementation, model.config.vision_config._attn_implementation,
             model.config.text_config._attn_implementation)
    assert after == before
    assert hook_census(model) == hooks_before, "vtc's hooks must not outlive a call"


def test_apply_twice_replaces_configuration(loaded, family):
    model, processor = loaded
    original_generate = model.generate
    vtc.apply(model, "cls_attention", budget=3)
    vtc.apply(model, "random", budget=6, seed=1)
    assert model.generate.__wrapped__ == original_generate
    greedy(model, make_inputs(processor, family, QUESTIONS[:1], [1]), max_new_tokens=2)
    assert [r.num_kept_visual for r in vtc.last_selection(model)] == [6]
    assert vtc.last_selection(model)[0].compressor == "random"


def test_generate_with_return_dict_keeps_the_prompt(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    vtc.apply(model, "pool", budget=4)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert out.sequences[:, : inputs["input_ids"].shape[1]].tolist() == inputs["input_ids"].tolist()
    assert len(out.scores) == 3


def test_positional_input_ids_and_beam_search(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    ids = inputs.pop("input_ids")
    vtc.apply(model, "fastervlm", budget=4)
    with torch.no_grad():
        out = model.generate(ids, **inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 4
    assert out[:, : ids.shape[1]].tolist() == ids.repeat_interleave(2, dim=0).tolist()
    assert [r.num_kept_visual for r in vtc.last_selection(model)] == [4, 4]


@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_hooks_only_on_the_declared_layers_and_selection_is_deterministic(loaded, family, compressor):
    """While the tower runs, exactly the layers the compressor declares carry vtc's hooks (never all layers)."""
    from vtc.integrations.transformers import get_state

    model, processor = loaded
    skip_if_refused(model, compressor)
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    greedy(model, inputs, max_new_tokens=1)  # let transformers install its own lazy hooks first
    vtc.apply(model, compressor, budget=5)
    state = get_state(model)
    declared = {signal.layer for signal in declared_signals(state, state.adapter.tower_info())}
    tower = model.model.vision_tower if family in LLAVA_FAMILIES else model.model.visual
    layers = list(adapter_for(model).layers) if family in LLAVA_FAMILIES else list(tower.blocks)
    before = [sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer.modules()) for layer in layers]
    seen = []

    def census(module, args):
        now = [sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer.modules()) for layer in layers]
        seen.append({i for i, (a, b) in enumerate(zip(before, now)) if b > a})

    handle = tower.register_forward_pre_hook(census)
    first = greedy(model, inputs, max_new_tokens=3)
    first_sel = [r.indices.tolist() for r in vtc.last_selection(model)]
    second = greedy(model, inputs, max_new_tokens=3)
    handle.remove()
    assert seen and all(layers_hooked == declared for layers_hooked in seen)
    assert first.tolist() == second.tolist()
    assert [r.indices.tolist() for r in vtc.last_selection(model)] == first_sel
