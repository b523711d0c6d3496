"""The LLM-side cut (FastV, PyramidDrop, SparseVLM, DART) on every family, against an independent oracle.

The oracle ("plan B", the FastV paper's mask mode): every token stays in the sequence and the cache, and from each
stage's layer on the dropped visual tokens are masked *as keys* (a 4-D mask built here by hand, per layer and per
decode step). Under causal attention the kept tokens' hidden states, the logits and greedy decoding are then
mathematically those of the real cut, which shortens the sequence, gathers the rotary tables, rebuilds masks per
stage and keeps a shorter cache in later layers -- so equality checks all of that at once, at batch 2 with left
padding and different kept counts per row.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from helpers import hook_census, make_inputs, video_inputs
from vtc.integrations.transformers.adapter import adapter_for
from vtc.testing import FAMILIES, VIDEO_FAMILIES, build_tiny

LLM = vtc.list_compressors("llm")
LAYERS = 6
#: budgets that drop tokens on the tiny models (36 tokens per LLaVA image; PyramidDrop: 45 % of the tokens per layer
#: on average, reachable at every image size; SparseVLM names its table's row)
BUDGET = {"fastv": 8, "pdrop": 0.45, "sparsevlm": 128, "dart": 9}
QUESTIONS = ["what is this?", "describe the picture in a few words please?"]


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    return build_tiny(family, text_layers=LAYERS)


class MaskedKeys:
    """Plan B for ``records`` (``vtc.last_llm_selection`` of the real cut): hooks that give every decoder layer a
    4-D mask -- causal, padding, and the visual tokens dropped before that layer masked as keys."""

    def __init__(self, model, records):
        self.lm = adapter_for(model).language_model()
        self.records = records
        self.handles = []

    def __enter__(self):
        self.handles.append(self.lm.register_forward_pre_hook(self._lm_hook, with_kwargs=True))
        for j, layer in enumerate(self.lm.layers):
            self.handles.append(layer.register_forward_pre_hook(functools.partial(self._layer_hook, j),
                                                                with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _lm_hook(self, module, args, kwargs):
        self.mask2d = kwargs["attention_mask"].bool()

    def _layer_hook(self, j, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(j) if cache is not None else 0
        kv = past + q
        keys_ok = self.mask2d[:, :kv].clone()
        for record in self.records:
            dropped = torch.ones(record.num_tokens, dtype=torch.bool)
            for stage in record.stages:
                if stage.layer <= j:
                    dropped = torch.ones(record.num_tokens, dtype=torch.bool)
                    dropped[stage.kept] = False
            if any(stage.layer <= j for stage in record.stages):
                keys_ok[record.batch_index, record.positions[dropped]] = False
        qpos = torch.arange(past, kv)
        kpos = torch.arange(kv)
        ok = (kpos[None, :] <= qpos[:, None])[None] & keys_ok[:, None, :]
        ok |= (kpos[None, :] == qpos[:, None])[None]  # a masked-out query still sees itself (no all-masked row)
        mask = torch.zeros(ok.shape, dtype=hidden.dtype).masked_fill(~ok, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask[:, None]
        return args, kwargs


def generate(model, inputs, **extra):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, **extra)


def assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def dropped_something(records) -> bool:
    return any(int(s.kept.numel()) < r.num_tokens for r in records for s in r.stages)


def check_against_oracle(model, inputs, compressor) -> list:
    vtc.apply(model, compressor, budget=BUDGET[compressor])
    try:
        out = generate(model, inputs)
        records = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    assert dropped_something(records)
    with MaskedKeys(model, records):
        ref = generate(model, inputs)
    assert_same_generation(out, ref)
    return records


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", LLM)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_the_masked_keys_oracle(family, compressor):
    model, processor = tiny(family)
    records = check_against_oracle(model, make_inputs(processor, family, QUESTIONS, [1, 1]), compressor)
    assert [r.batch_index for r in records] == [0, 1]


@pytest.mark.support("multi-image")
@pytest.mark.parametrize("compressor", LLM)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_the_masked_keys_oracle_multi_image(family, compressor):
    model, processor = tiny(family)
    # row 0: two images, row 1: one -> different lengths after the drop: left re-padding, per-row masks
    records = check_against_oracle(model, make_inputs(processor, family, QUESTIONS, [2, 1]), compressor)
    assert [(r.batch_index, r.kind) for r in records] == [(0, "image"), (0, "image"), (1, "image")]


@pytest.mark.support("video")
@pytest.mark.parametrize("compressor", LLM)
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_generate_equals_the_masked_keys_oracle_video(family, compressor):
    """An image and a video in each prompt: the image and the prompt's video are budgeted apart."""
    model, processor = tiny(family)
    records = check_against_oracle(model, video_inputs(processor, family, QUESTIONS, image=True), compressor)
    assert [(r.batch_index, r.kind) for r in records] == [(0, "image"), (0, "video"), (1, "image"), (1, "video")]


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_scores_are_the_eager_attention_row(family):
    """The signal computed from q/k projections equals the row of the eager attention map (head mean, last
    token, the image's columns) of layer K-1, on every family (RoPE, M-RoPE, GQA, Qwen3's q/k norms)."""
    model, processor = tiny(family)
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    vtc.apply(model, "fastv", budget=8)
    try:
        with torch.no_grad():
            model(**inputs)
        records = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(implementation)
    k = records[0].stages[0].layer
    for record in records:
        row = attentions[k - 1][record.batch_index].float().mean(0)[-1]
        torch.testing.assert_close(record.stages[0].scores, row[record.positions], atol=1e-5, rtol=1e-4)


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", ["fastv", "pdrop", "dart"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_unwrapped_model(family, compressor):
    model, processor = tiny(family)
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    before = generate(model, inputs)
    census = hook_census(model)
    vtc.apply(model, compressor, budget=1.0)
    try:
        out = generate(model, inputs)
        assert hook_census(model) == census  # the call's hooks are gone with it
    finally:
        vtc.remove(model)
    assert torch.equal(out.sequences, before.sequences)
    for a, b in zip(out.scores, before.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_remove_restores_bit_identical_outputs_and_hooks(family):
    model, processor = tiny(family)
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    census = hook_census(model)
    with torch.no_grad():
        before = model(**inputs).logits
    vtc.apply(model, "pdrop", budget=BUDGET["pdrop"])
    generate(model, inputs)
    vtc.remove(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert hook_census(model) == census


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single_runs(family):
    model, processor = tiny(family)
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    vtc.apply(model, "fastv", budget=8)
    try:
        batch = generate(model, inputs)
        batch_records = vtc.last_llm_selection(model)
        for row, question in enumerate(QUESTIONS):
            single_inputs = make_inputs(processor, family, [question], [1], first_image=row)
            single = generate(model, single_inputs)
            (record,) = vtc.last_llm_selection(model)
            assert torch.equal(record.kept, batch_records[row].kept)
            new = single.sequences[0, single_inputs["input_ids"].shape[1]:]
            assert torch.equal(new, batch.sequences[row, inputs["input_ids"].shape[1]:])
    finally:
        vtc.remove(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_forward_logits_line_up_with_the_prompt(family):
    """A forward (the loss / loglikelihood path) returns logits for every prompt position: kept positions as the
    oracle's, a dropped one as the last kept position before it; labels give a loss."""
    model, processor = tiny(family)
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    vtc.apply(model, "fastv", budget=8)
    try:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        records = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    with MaskedKeys(model, records), torch.no_grad():
        ref = model(**inputs).logits
    assert out.logits.shape == ref.shape and torch.isfinite(out.loss)
    length = inputs["input_ids"].shape[1]
    for b in range(2):
        visual = torch.zeros(length, dtype=torch.bool)
        kept = torch.zeros(length, dtype=torch.bool)
        for r in records:
            if r.batch_index == b:
                visual[r.positions] = True
                kept[r.positions[r.kept]] = True
        present = ~visual | kept
        real = inputs["attention_mask"][b].bool()
        torch.testing.assert_close(out.logits[b, present & real], ref[b, present & real], atol=2e-4, rtol=1e-4)
        for p in (visual & ~kept).nonzero().squeeze(-1).tolist():
            source = max(i for i in range(p) if present[i])
            assert torch.equal(out.logits[b, p], out.logits[b, source])


def test_stacked_encoder_and_llm_compressors():
    """VisionZip-style stacking: an encoder-side compressor first (here random to 16 of 36), then FastV to 4 in
    the LLM; equal to the encoder-only model with the FastV drop applied as masked keys."""
    model, processor = tiny("llava")
    inputs = make_inputs(processor, "llava", QUESTIONS, [1, 1])
    vtc.apply(model, "fastv", budget=4, encoder=("random", 16))
    try:
        out = generate(model, inputs)
        encoder_records = vtc.last_selection(model)
        records = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    assert [int(r.indices.numel()) for r in encoder_records] == [16, 16]
    assert [r.num_tokens for r in records] == [16, 16] and [int(r.kept.numel()) for r in records] == [4, 4]
    vtc.apply(model, "random", budget=16)
    try:
        with MaskedKeys(model, records):
            ref = generate(model, inputs)
        assert all(torch.equal(a.indices, b.indices) for a, b in zip(vtc.last_selection(model), encoder_records))
    finally:
        vtc.remove(model)
    assert_same_generation(out, ref)


def test_records_per_stage_and_the_average_budget():
    model, processor = tiny("llava")
    inputs = make_inputs(processor, "llava", QUESTIONS[:1], [1])
    vtc.apply(model, "pdrop", budget=20)
    try:
        generate(model, inputs)
        (record,) = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    counts = [int(s.kept.numel()) for s in record.stages]
    assert counts == sorted(counts, reverse=True) and len(counts) == 3
    for earlier, later in zip(record.stages, record.stages[1:]):  # a stage chooses among the previous survivors
        assert set(later.kept.tolist()) <= set(earlier.kept.tolist())
    assert record.average_tokens == pytest.approx(20, abs=1.0)
    assert record.tokens_at(0) == 36 and record.tokens_at(LAYERS - 1) == counts[-1]
    ids = inputs["input_ids"][0]
    assert bool((ids[record.positions] == model.config.image_token_id).all())


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_requests_fail_at_apply():
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="beyond this 6-layer LLM"):
        vtc.apply(model, "fastv", budget=8, layer=9)
    with pytest.raises(ValueError, match="more than the 36 visual tokens"):
        vtc.apply(model, "dart", budget=100)
    with pytest.raises(ValueError, match="SparseVLM defines schedules for budgets 192, 128, 96, 64"):
        vtc.apply(model, "sparsevlm", budget=300)
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        vtc.apply(model, "pdrop", budget=8, budget_mode="flops")
    with pytest.raises(ValueError, match="must be an encoder-side compressor"):
        vtc.apply(model, "fastv", budget=8, encoder=("dart", 16))
    with pytest.raises(ValueError, match="stacks an encoder-side compressor under an LLM-side one"):
        vtc.apply(model, "random", budget=8, encoder=("random", 16))
    with pytest.raises(TypeError, match=r"encoder must be a \(compressor, budget\) pair"):
        vtc.apply(model, "fastv", budget=8, encoder="random")
    assert not vtc.is_applied(model)
    qwen3, _ = tiny("qwen3_vl")
    with pytest.raises(ValueError, match="comes before layer 2"):  # the tiny model's two deepstack levels
        vtc.apply(qwen3, "fastv", budget=8, layer=1)


def test_unsupported_generation_setups_fail_with_a_message():
    model, processor = tiny("llava")
    inputs = make_inputs(processor, "llava", QUESTIONS[:1], [1])
    vtc.apply(model, "fastv", budget=8)
    try:
        with pytest.raises(ValueError, match="use_cache=True"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
        with pytest.raises(ValueError, match="DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
            with pytest.raises(ValueError, match="already holds tokens"):
                model(**inputs, past_key_values=cache)
    finally:
        vtc.remove(model)


def test_generate_equals_a_hand_built_per_layer_run():
    """FastV on LLaVA, batch 1, decoded by hand: layers < K on the whole prompt, layers >= K on the kept tokens
    (original rotary positions), a cache whose later layers hold only the kept tokens, greedy steps by hand."""
    from transformers import DynamicCache

    model, processor = tiny("llava")
    inputs = make_inputs(processor, "llava", QUESTIONS[:1], [1])
    vtc.apply(model, "fastv", budget=8)
    try:
        out = generate(model, inputs)
        (record,) = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    lm = adapter_for(model).language_model()
    captured = {}
    handle = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]),
                                          with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    k = record.stages[0].layer
    length = inputs["input_ids"].shape[1]
    keep = torch.ones(length, dtype=torch.bool)
    keep[record.positions] = False
    keep[record.positions[record.kept]] = True
    keep = keep.nonzero().squeeze(-1)

    def causal(q, kv):
        allowed = torch.arange(kv)[None, :] <= torch.arange(kv - q, kv)[:, None]
        return torch.zeros(q, kv).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    cache, tokens = DynamicCache(config=lm.config), []
    hidden, positions = captured["embeds"], torch.arange(length)[None]
    with torch.no_grad():
        for step in range(6):
            cos, sin = lm.rotary_emb(hidden, positions)
            for j, layer in enumerate(lm.layers):
                if step == 0 and j == k:  # the drop: kept rows, their own rotary rows
                    hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
                q = hidden.shape[1]
                hidden = layer(hidden, attention_mask=causal(q, cache.get_seq_length(j) + q),
                               position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)
            logits = model.lm_head(lm.norm(hidden[:, -1]))
            tokens.append(int(logits.argmax(-1)))
            hidden = lm.embed_tokens(torch.tensor([[tokens[-1]]]))
            positions = torch.tensor([[length + step]])
    assert [cache.get_seq_length(j) for j in (0, k)] == [length + 5, len(keep) + 5]
    assert out.sequences[0, length:].tolist() == tokens


def test_flops_count_each_llm_layer_at_its_own_length():
    from vtc.flops import layered_flops, transformer_flops
    from vtc.integrations.transformers.flops import llm_dims, llm_layer_lengths, request_flops

    model, processor = tiny("llava")
    inputs = make_inputs(processor, "llava", QUESTIONS, [1, 1])
    vtc.apply(model, "fastv", budget=8)
    try:
        generate(model, inputs)
        lengths = llm_layer_lengths(model)
        received = [n for _, n in vtc.last_prompt_lengths(model)]
        flops = request_flops(model, inputs, lengths)
    finally:
        vtc.remove(model)
    # K = 2: two layers at the whole prompt, four with 36 - 8 = 28 visual tokens fewer
    assert lengths == [[n, n] + [n - 28] * 4 for n in received]
    dims = llm_dims(model)
    for b, n in enumerate(received):
        by_hand = (2 * transformer_flops(dims, n) + 4 * transformer_flops(dims, n - 28)) // dims.num_layers
        assert flops[b].llm == layered_flops(dims, lengths[b]) == by_hand
        assert flops[b].llm < request_flops(model, inputs, received)[b].llm
    with pytest.raises(ValueError, match="one per layer"):
        layered_flops(dims, [10, 10])


def test_dry_run_and_attention_implementation():
    """``vtc.select`` cannot stand in for an LLM-side selection (it never runs the LLM): it says so; the model's
    attention implementation is what the user chose, before and after a call."""
    model, processor = tiny("qwen2_vl")
    inputs = make_inputs(processor, "qwen2_vl", QUESTIONS[:1], [1])
    before = (model.config._attn_implementation, model.config.text_config._attn_implementation)
    vtc.apply(model, "fastv", budget=8)
    try:
        with pytest.raises(ValueError, match="drops tokens inside the LLM"):
            vtc.select(model, **inputs)
        generate(model, inputs)
        assert (model.config._attn_implementation, model.config.text_config._attn_implementation) == before
    finally:
        vtc.remove(model)
    vtc.apply(model, "fastv", budget=8, encoder=("pool", 16))  # stacked: the encoder stage has records
    try:
        records = vtc.select(model, **inputs)
        assert [int(r.indices.numel()) for r in records.images] == [16]
    finally:
        vtc.remove(model)


def test_video_budget_and_encoder_only_options():
    model, processor = tiny("qwen2_vl")
    inputs = video_inputs(processor, "qwen2_vl", QUESTIONS[:1], image=True)
    vtc.apply(model, "fastv", budget=4, video_budget=10)
    try:
        generate(model, inputs)
        image, video = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    assert (image.kind, int(image.kept.numel()), video.kind, int(video.kept.numel())) == ("image", 4, "video", 10)
    with pytest.raises(ValueError, match="configures the cut between encoder and LLM"):
        vtc.apply(model, "fastv", budget=4, images_as_video=True)
    llava, _ = tiny("llava")  # LLaVA offers reindex between encoder and LLM, not inside it
    with pytest.raises(ValueError, match="configures the cut between encoder and LLM"):
        vtc.apply(llava, "fastv", budget=4, positions="reindex")
    vtc.apply(llava, "fastv", budget=4, positions="keep")  # what the LLM-side cut does anyway
    vtc.remove(llava)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_touching_images_are_two_images(family):
    """Two images whose placeholders touch (no text between them: LLaVA's raw "<image><image>") get a budget each,
    not one shared budget: images are told apart by their token counts, not by runs of placeholders. (Qwen wraps
    every image in vision start / end tokens, so its images never touch.)"""
    from vtc.testing import random_image

    model, processor = tiny(family)
    text = "<image><image> what is this?"
    images = [random_image(48, 48, seed=0), random_image(48, 48, seed=1)]
    inputs = processor(images=[images], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0]
    image_id = model.config.image_token_id
    positions = (ids == image_id).nonzero().squeeze(-1)
    assert bool((positions[1:] - positions[:-1] == 1).all())  # one run of placeholders
    vtc.apply(model, "fastv", budget=4)
    try:
        generate(model, inputs)
        records = vtc.last_llm_selection(model)
    finally:
        vtc.remove(model)
    assert len(records) == 2 and [int(r.kept.numel()) for r in records] == [4, 4]
    assert records[0].num_tokens + records[1].num_tokens == positions.numel()
