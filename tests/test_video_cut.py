"""Equality tests of the encoder -> LLM cut on videos (``pixel_values_videos``) with tiny real-class models
(LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

A video's budget (``video_budget``; default: the image budget) counts its visual tokens over all frames; OneVision's
one trailing newline per video is layout and always reaches the LLM. The reference for a compressed call is the
shortened prompt built by hand from ``vtc.last_video_selection`` and the unwrapped model's own
``get_video_features``; the wrapped ``generate`` must give exactly its token ids.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from helpers import QUESTIONS, greedy, video_inputs, video_reference, video_token_id, skip_if_resized
from vtc import testing as tiny

VIDEO_FAMILIES = tiny.VIDEO_FAMILIES
#: the compressors of the batch test: a pruning one, a merging one, and the two video compressors
BATCH_COMPRESSORS = ["fastervlm", "pool", "quota", "progressive"]


def prompt_kwargs(args, kwargs) -> dict:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of a call to ``model.model``."""
    ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    return {"input_ids": ids.clone(), "attention_mask": None if mask is None else mask.clone(),
            "position_ids": None if positions is None else positions.clone()}


def prefill_seen(model, inputs, max_new_tokens: int = 2) -> tuple[torch.Tensor, dict]:
    """Generate, recording what the inner model receives at prefill (``input_ids``, ``position_ids``)."""
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(prompt_kwargs(args, kwargs)), with_kwargs=True
    )
    try:
        out = greedy(model, inputs, max_new_tokens=max_new_tokens)
    finally:
        hook.remove()
    return out, seen[0]


def original_mrope(model, inputs) -> torch.Tensor:
    """M-RoPE ids ``[3, B, L]`` of the original (uncompressed) prompt."""
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"],
    )
    return pos


def hand_built_video(model, inputs, family: str):
    """The shortened prompt of a one-video prompt, built by hand from the recorded video selection."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[0] == 1 and inputs.get("pixel_values") is None, "hand-built reference is for one video prompt"
    keep = torch.ones_like(ids, dtype=torch.bool)
    video = video_reference(model, inputs, keep, family)
    short = {"input_ids": ids[:, keep[0]], "attention_mask": mask[:, keep[0]], "mm_encoder_outputs": {"video": video}}
    if family in tiny.QWEN_FAMILIES:  # [text row arange; original M-RoPE ids at the kept positions]
        mrope = original_mrope(model, inputs)[:, :, keep[0]]
        short["position_ids"] = torch.cat([torch.arange(mrope.shape[-1])[None, None], mrope], dim=0)
        short["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, keep[0]]
    return short, int(keep.sum())


@pytest.fixture(params=VIDEO_FAMILIES)
def video_family(request):
    return request.param


@pytest.fixture
def loaded_video(tiny_dirs, video_family):
    """A fresh (model, processor) pair of a video family, loaded from the session's saved tiny checkpoint."""
    return tiny.load_tiny(tiny_dirs[video_family])


# -- 1. keep-all is the unwrapped model ----------------------------------------------------------------------------

@pytest.mark.support("video")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_keep_all_video_generate_equals_unwrapped(loaded_video, video_family, compressor):
    model, processor = loaded_video
    inputs = video_inputs(processor, video_family, QUESTIONS[:1])
    baseline = greedy(model, inputs)
    vtc.apply(model, compressor, budget=1.0, video_budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    records = vtc.last_video_selection(model)
    assert len(records) == 1 and records[0].num_kept == records[0].num_tokens == records[0].budget
    assert vtc.last_selection(model) == []


# -- 2. a compressed video is the hand-built shortened prompt ------------------------------------------------------

@pytest.mark.support("video")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_compressed_video_generate_equals_hand_built_prompt(loaded_video, video_family, compressor):
    model, processor = loaded_video
    skip_if_resized(model, compressor)
    inputs = video_inputs(processor, video_family, QUESTIONS[:1])
    vtc.apply(model, compressor, budget=3, video_budget=7)
    out = greedy(model, inputs, max_new_tokens=8)
    length = inputs["input_ids"].shape[1]
    assert out[:, :length].tolist() == inputs["input_ids"].tolist(), "generate must return the caller's prompt"
    record, = vtc.last_video_selection(model)
    assert record.budget == record.num_kept == 7 and record.compressor == compressor
    if video_family == "qwen2_5_vl":  # seconds of each temporal step, from second_per_grid_ts
        assert record.timestamps == [0.0, 1.0, 2.0]
    short, short_len = hand_built_video(model, inputs, video_family)
    assert short_len == length - record.num_tokens + 7
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=8)
    assert out[:, length:].tolist() == reference[:, short_len:].tolist()


# -- 3. a batch of two prompts is the two single runs --------------------------------------------------------------

@pytest.mark.parametrize("compressor", BATCH_COMPRESSORS)
def test_video_batch_of_two_equals_single_runs(loaded_video, video_family, compressor):
    model, processor = loaded_video
    vtc.apply(model, compressor, budget=3, video_budget=0.3)
    batch = video_inputs(processor, video_family, QUESTIONS)
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different length must be left-padded"
    batch_out = greedy(model, batch)
    batch_records = vtc.last_video_selection(model)
    assert [r.batch_index for r in batch_records] == [0, 1] and [r.video_index for r in batch_records] == [0, 1]
    length = batch["input_ids"].shape[1]
    for row in range(2):
        single = video_inputs(processor, video_family, [QUESTIONS[row]], first_video=row)
        single_out = greedy(model, single)
        new = single_out[0, single["input_ids"].shape[1]:].tolist()
        rest = batch_out[row, length + len(new):].tolist()  # after an early EOS the batch row is padded
        assert batch_out[row, length:length + len(new)].tolist() == new
        assert all(token == model.generation_config.pad_token_id for token in rest)
        single_record, = vtc.last_video_selection(model)
        assert single_record.batch_index == 0
        assert single_record.frame_budgets == batch_records[row].frame_budgets
        assert [f.selection.indices.tolist() for f in single_record.selection.frames] == [
            f.selection.indices.tolist() for f in batch_records[row].selection.frames]


# -- 4. an image and a video in one prompt: each its own budget ----------------------------------------------------

@pytest.mark.support("video")
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_image_and_video_each_get_their_own_budget(loaded_video, video_family, compressor):
    model, processor = loaded_video
    skip_if_resized(model, compressor)
    inputs = video_inputs(processor, video_family, QUESTIONS[:1], image=True)
    vtc.apply(model, compressor, budget=4, video_budget=6)
    out, seen = prefill_seen(model, inputs, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    image, = vtc.last_selection(model)
    video, = vtc.last_video_selection(model)
    assert image.budget == image.num_kept_visual == 4
    assert video.budget == video.num_kept == 6 and sum(video.frame_budgets) == 6
    assert image.batch_index == video.batch_index == 0
    ids = seen["input_ids"]
    assert int((ids == int(model.config.image_token_id)).sum()) == image.num_kept  # + AnyRes newlines of kept rows
    assert int((ids == video_token_id(model)).sum()) == 6 + video.num_suffix_tokens


# -- 5. budgets resolve as documented, exactly ---------------------------------------------------------------------

@pytest.mark.support("video")
@pytest.mark.parametrize("video_budget", [7, 0.3, 10_000])
@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_video_budget_resolves_and_reaches_the_llm_exactly(loaded_video, video_family, compressor, video_budget):
    model, processor = loaded_video
    skip_if_resized(model, compressor)
    inputs = video_inputs(processor, video_family, QUESTIONS)
    vtc.apply(model, compressor, budget=2, video_budget=video_budget)
    _, seen = prefill_seen(model, inputs)
    records = vtc.last_video_selection(model)
    assert [r.batch_index for r in records] == [0, 1]
    for record in records:
        n = record.num_tokens  # the video's visual tokens over all frames (OneVision's newline excluded)
        expected = {7: 7, 0.3: max(1, round(0.3 * n)), 10_000: n}[video_budget]  # int: tokens, clamped; float: ratio
        assert expected == vtc.resolve_budget(video_budget, n)
        assert (expected == n) if video_budget == 10_000 else (expected < n)
        assert record.budget == expected == record.num_kept
        assert sum(record.frame_budgets) == expected
        assert [f.num_kept for f in record.selection.frames] == record.frame_budgets
        assert record.num_suffix_tokens == (1 if video_family == "llava_onevision" else 0)
    video_id = video_token_id(model)
    assert (seen["input_ids"] == video_id).sum(dim=1).tolist() == [r.num_kept + r.num_suffix_tokens for r in records]
    original = (inputs["input_ids"] == video_id).sum(dim=1).tolist()
    assert original == [r.num_tokens + r.num_suffix_tokens for r in records]
    # every text token and nothing else reaches the LLM: the batch's old padding goes too (rows are re-padded to
    # the longest kept prompt)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != video_id)).sum(dim=1)
    kept = torch.tensor([r.num_kept + r.num_suffix_tokens for r in records])
    assert seen["attention_mask"].sum(dim=1).tolist() == (text + kept).tolist()
    assert seen["input_ids"].shape[1] == int((text + kept).max())


def test_video_budget_defaults_to_the_image_budget(loaded_video, video_family):
    model, processor = loaded_video
    inputs = video_inputs(processor, video_family, QUESTIONS[:1])
    vtc.apply(model, "fastervlm", budget=5)
    _, seen = prefill_seen(model, inputs)
    record, = vtc.last_video_selection(model)
    assert record.budget == record.num_kept == 5 < record.num_tokens
    assert int((seen["input_ids"] == video_token_id(model)).sum()) == 5 + record.num_suffix_tokens


# -- 6. Qwen: kept video tokens keep their original M-RoPE ids -----------------------------------------------------

@pytest.mark.parametrize("video_budget", [1, 7])
@pytest.mark.parametrize("compressor", BATCH_COMPRESSORS)
@pytest.mark.parametrize("family_name", tiny.QWEN_FAMILIES)
def test_qwen_kept_video_tokens_keep_their_mrope_ids(tiny_dirs, family_name, compressor, video_budget):
    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = video_inputs(processor, family_name, QUESTIONS[:1])
    original = original_mrope(model, inputs)[:, 0]  # [3, L]
    video_id = video_token_id(model)
    slots = (inputs["input_ids"][0] == video_id).nonzero().squeeze(-1)
    vtc.apply(model, compressor, budget=2, video_budget=video_budget)
    _, seen = prefill_seen(model, inputs)
    record, = vtc.last_video_selection(model)
    sizes = [rows * cols for rows, cols in record.grids]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    flat, frame_of = [], []  # kept tokens: flat index in the video, and their frame
    for k, (frame, start) in enumerate(zip(record.selection.frames, starts)):
        flat += (frame.selection.indices + start).tolist()
        frame_of += [k] * frame.num_kept
    assert len(flat) == video_budget
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[slots] = False
    keep[slots[flat]] = True
    positions = seen["position_ids"]
    assert positions is not None and positions.shape[0] == 4  # [text row; t, h, w]
    assert positions[1:, 0].tolist() == original[:, keep].tolist()  # nothing renumbered, the text after it included
    assert positions[0, 0].tolist() == list(range(int(keep.sum())))  # the text row is contiguous
    # the temporal id of a kept token of frame k is frame k's original one (one id per frame)
    frame_t = [original[0, slots[s:s + n]] for s, n in zip(starts, sizes)]
    assert all(bool((t == t[0]).all()) for t in frame_t)
    assert len({int(t[0]) for t in frame_t}) == len(frame_t), "frames must have distinct temporal ids"
    kept_video = seen["input_ids"][0] == video_id
    assert positions[1, 0, kept_video].tolist() == [int(frame_t[k][0]) for k in frame_of]
    after = int(slots[-1]) + 1  # the first text token after the video keeps its original ids too
    assert positions[1:, 0, int(keep[:after].sum())].tolist() == original[:, after].tolist()


# -- 7. a text-only call after a video call passes through ---------------------------------------------------------

def test_text_only_call_after_a_video_call_passes_through(loaded_video, video_family):
    model, processor = loaded_video
    text_inputs = processor(text=[QUESTIONS[0]], return_tensors="pt")
    baseline = greedy(model, text_inputs)
    vtc.apply(model, "pool", budget=3, video_budget=4)
    greedy(model, video_inputs(processor, video_family, QUESTIONS[:1]), max_new_tokens=2)
    assert [r.num_kept for r in vtc.last_video_selection(model)] == [4]
    assert greedy(model, text_inputs).tolist() == baseline.tolist()
    assert vtc.last_selection(model) == [] and vtc.last_video_selection(model) == []


# -- 9. bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), ("abc", TypeError), (1.5, ValueError),
                                        (True, TypeError)])
def test_bad_video_budget_fails_at_apply(tiny_dirs, bad, error):
    model, _ = tiny.load_tiny(tiny_dirs["qwen2_vl"])
    with pytest.raises(error, match="budget must be an int >= 1"):
        vtc.apply(model, "fastervlm", budget=4, video_budget=bad)
    assert not vtc.is_applied(model)


def test_video_with_a_wrong_shape_fails_with_the_adapter_message(loaded_video, video_family):
    model, processor = loaded_video
    inputs = dict(video_inputs(processor, video_family, QUESTIONS[:1]))
    vtc.apply(model, "fastervlm", budget=3, video_budget=4)
    pixels = inputs["pixel_values_videos"]
    if video_family == "llava_onevision":
        inputs["pixel_values_videos"] = pixels[0]  # [frames, 3, H, W]: the video axis is missing
        message = r"expects pixel_values_videos of shape \[num_videos, frames, 3, H, W\], got \(6, 3, 32, 32\)"
    else:
        inputs["pixel_values_videos"] = pixels[None]  # not the flattened patches
        message = r"expects pixel_values_videos as flattened patches \[num_patches, C\*T\*P\*P\]"
    with pytest.raises(ValueError, match=message):
        greedy(model, inputs)
    if video_family != "llava_onevision":
        inputs["pixel_values_videos"] = pixels[:-4]  # rows that do not match video_grid_thw
        with pytest.raises(ValueError, match="video_grid_thw describes .* patches but pixel_values_videos has"):
            greedy(model, inputs)
