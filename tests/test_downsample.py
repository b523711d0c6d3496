"""``downsample`` (VTC-Bench's baseline, spec more_compressors.md §7): the grid rule derived by hand, the pooling
fallback, the pre-encoder resize on the Qwen families (== the prompt the processor builds for the smaller picture),
its pixels (== the processor's own resize, up to 8-bit rounding), FLOPs at the resized size, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vtc
from vtc import VisualTokens, create_compressor, run_compressor
from vtc import testing as tiny
from vtc.compressors.baselines import Pool
from vtc.compressors.downsample import DownsampleDetails, input_grid
from vtc.integrations.transformers.adapter import adapter_for
from vtc.integrations.transformers.flops import request_flops

QWEN = list(tiny.QWEN_FAMILIES)


# ==================================================================================================== the grid rule
@pytest.mark.parametrize("rows, cols, k, expected", [
    # The processor grid floors both sides scaled by s = sqrt(k / (rows * cols)); the answer is the grid of most
    # tokens <= k whose aspect distortion is at most max(0.1, the processor grid's).
    # square 24 x 24, 64 tokens: s = 1/3, processor grid 8 x 8 = 64 exactly (distortion 0)
    (24, 24, 64, (8, 8)),
    # 128: s = 0.471, processor grid 11 x 11 = 121 (distortion 0, so the limit is 0.1); 8 x 16 = 128 is 2:1 off,
    # 10 x 12 = 120 is 0.2 off, 11 x 12 = 132 > 128: 11 x 11
    (24, 24, 128, (11, 11)),
    # 192: s = 0.577, processor grid 13 x 13 = 169; 13 x 14 = 182 is 14/13 - 1 = 0.077 off (within 0.1),
    # 12 x 16 = 192 is 0.33 off, 14 x 14 = 196 > 192: 13 x 14
    (24, 24, 192, (13, 14)),
    # 18 x 32 (aspect 0.5625), 64: s = 1/3, processor grid 6 x 10 = 60 (a = 0.6 / 0.5625 = 1.067, 0.067 off);
    # 6 x 11 = 66 > 64; 7 x 9 = 63 is 1.38 off; 5 x 12 = 60 is 0.35 off: 6 x 10
    (18, 32, 64, (6, 10)),
    # 6 x 9 (aspect 2/3), 20: s = 0.609, processor grid 3 x 5 = 15 (a = 0.6 / 0.667 = 0.9, 0.111 off: the limit
    # becomes 0.111); 4 x 5 = 20 is 0.2 off, 3 x 6 = 18 is 0.33 off, 2 x 9 / 3 x 4 / 2 x 8 are further off or
    # smaller: 3 x 5
    (6, 9, 20, (3, 5)),
    # a budget covering the grid keeps it
    (24, 24, 576, (24, 24)),
    (5, 7, 1000, (5, 7)),
    # one token: 1 x 1; two tokens of a square: s = 0.059, processor grid 1 x 1, 1 x 2 is 2:1 off: 1 x 1
    (24, 24, 1, (1, 1)),
    (24, 24, 2, (1, 1)),
    # a 1 x 40 strip at 5 tokens: processor grid floor(0.35) -> raised to 1 row, 14 columns capped at 5: 1 x 5
    # (distortion 7, the limit): 1 x 5; the transposed strip alike
    (1, 40, 5, (1, 5)),
    (40, 1, 3, (3, 1)),
])
def test_input_grid_by_hand(rows, cols, k, expected):
    assert input_grid(rows, cols, k) == expected


def test_input_grid_tolerance_zero_keeps_the_aspect_exactly():
    # 24 x 24 at 128 with no distortion allowed: squares only, 11 x 11; 6 x 9 at 27 tokens: 4 x 6 = 24 keeps 2:3
    assert input_grid(24, 24, 128, tolerance=0.0) == (11, 11)
    # 6 x 9 at 27: processor grid floor(4.24) x floor(6.36) = 4 x 6 = 24, exactly 2:3
    assert input_grid(6, 9, 27, tolerance=0.0) == (4, 6)
    # a large tolerance reaches k exactly when some h * w = k fits: 8 x 16 = 128
    assert input_grid(24, 24, 128, tolerance=10.0)[0] * input_grid(24, 24, 128, tolerance=10.0)[1] == 128


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 2000))
def test_input_grid_properties(rows, cols, k):
    h, w = input_grid(rows, cols, k)
    assert 1 <= h <= rows and 1 <= w <= cols
    assert h * w <= max(k, 1)
    if k >= rows * cols:
        assert (h, w) == (rows, cols)


@pytest.mark.parametrize("bad", [(0, 4, 2), (4, 4, 0)])
def test_input_grid_rejects_empty_grids_and_budgets(bad):
    with pytest.raises(ValueError):
        input_grid(*bad)


@pytest.mark.parametrize("options, error", [({"mode": "shrink"}, ValueError), ({"aspect_tolerance": -0.1}, ValueError),
                                            ({"aspect_tolerance": float("nan")}, ValueError),
                                            ({"aspect_tolerance": "a"}, TypeError), ({"mode": 3}, ValueError)])
def test_bad_options_name_the_option(options, error):
    with pytest.raises(error, match=next(iter(options))):
        create_compressor("downsample", **options)


# ==================================================================================================== after the encoder
def _tokens(rows=6, cols=8, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return VisualTokens(features=torch.randn(rows * cols, dim, generator=g), grid=(rows, cols))


@pytest.mark.parametrize("k", [1, 7, 12, 47])
def test_pool_fallback_is_the_pool_rule_with_stated_weights(k):
    tokens = _tokens()
    got = run_compressor(create_compressor("downsample", mode="pool"), tokens, k)
    ref = Pool(mode="mean").select(tokens, k)
    assert torch.equal(got.indices, ref.indices)
    assert torch.allclose(got.features, ref.features)
    for g, w, f in zip(got.groups, got.weights, got.features):
        assert torch.allclose(w @ tokens.features[g], f, atol=1e-6)
    assert got.details == DownsampleDetails(signals=(), mode="pool", grid=ref.details.shape)


def test_every_token_kept_when_the_budget_covers_the_image():
    tokens = _tokens()
    got = run_compressor(create_compressor("downsample"), tokens, tokens.num_tokens)
    assert torch.equal(got.indices, torch.arange(tokens.num_tokens)) and got.features is None
    assert got.details.mode == "all"


def test_input_grid_method_follows_the_mode():
    assert create_compressor("downsample").input_grid((24, 24), 64) == (8, 8)
    assert create_compressor("downsample", mode="resize").input_grid((24, 24), 64) == (8, 8)
    assert create_compressor("downsample", mode="pool").input_grid((24, 24), 64) is None
    assert create_compressor("random").input_grid((24, 24), 64) is None  # the default: no pre-encoder stage


# ==================================================================================================== pixels
def smooth_image(width: int, height: int) -> Image.Image:
    """A smooth picture (low frequencies only), so bicubic resizes of it barely overshoot the 8-bit range."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 90 * np.sin(x / width * 3.1 + c) * np.cos(y / height * 2.3 - c) for c in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def resized_8bit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized as the adapter resizes (bicubic, antialiased), rounded to 8 bits as a picture is."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].double()
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return Image.fromarray(y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("family", QWEN)
def test_resized_pixels_are_the_processor_pixels_of_the_smaller_picture(family):
    model, processor = tiny.build_tiny(family)
    adapter = adapter_for(model)
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size  # pixels per LLM token
    big = smooth_image(8 * unit, 6 * unit)  # 6 x 8 tokens, a size the processor keeps
    text = tiny.build_prompt(processor, "what is this ?")
    full = processor(text=[text], images=[big], return_tensors="pt")
    assert full["image_grid_thw"].tolist() == [[1, 12, 16]]
    out = adapter.resize_inputs(full, [(3, 4)], None)
    small = processor(text=[text], images=[resized_8bit(big, 4 * unit, 3 * unit)], return_tensors="pt")
    assert torch.equal(out["image_grid_thw"], small["image_grid_thw"])
    diff = (out["pixel_values"] - small["pixel_values"]).abs()
    # 8-bit rounding is at most 0.5 / 255 per value, / the processor's std (>= 0.26): < 0.008; a wrong patch order
    # would move values by the picture's own contrast (~1)
    assert diff.max() < 0.01, diff.max()


# ==================================================================================================== the cut
def _small_prompt(model, processor, family, images, questions, grids):
    """The processor's own prompt for the smaller pictures (ids, grid, mm types), with vtc's resized pixels."""
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size
    texts = [tiny.build_prompt(processor, q) for q in questions]
    full = processor(text=texts, images=images, return_tensors="pt", padding=True)
    smaller = [img.resize((c * unit, r * unit)) for img, (r, c) in zip(images, grids)]
    small = processor(text=texts, images=smaller, return_tensors="pt", padding=True)
    small.update(adapter_for(model).resize_inputs(full, grids, None))
    return full, small


def _images(family):
    unit = 16
    return [tiny.random_image(9 * unit, 6 * unit, seed=1), tiny.random_image(6 * unit, 8 * unit, seed=2)]


@pytest.mark.support("image")
@pytest.mark.parametrize("compressor", ["downsample"])
@pytest.mark.parametrize("family", QWEN)
def test_resize_equals_the_prompt_of_the_smaller_picture(family, compressor):
    model, processor = tiny.build_tiny(family)
    images = _images(family)[:1]
    # 6 x 9 = 54 tokens at half the budget, 27: 4 x 6 = 24 (3 x 9 = 27 is 3x off in aspect, 5 x 5 = 25 is 1.5x)
    full, small = _small_prompt(model, processor, family, images, ["what is this ?"], [(4, 6)])
    with torch.no_grad():
        expected_logits = model(**small).logits
        expected = model.generate(**small, max_new_tokens=5, do_sample=False)
    vtc.apply(model, "downsample", budget=0.5)
    with torch.no_grad():
        logits = model(**full).logits
        got = model.generate(**full, max_new_tokens=5, do_sample=False)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert torch.equal(got[:, full["input_ids"].shape[1]:], expected[:, small["input_ids"].shape[1]:])
    assert torch.equal(got[:, :full["input_ids"].shape[1]], full["input_ids"])  # the caller's own prompt ids back
    record, = vtc.last_selection(model)
    assert record.grid == (4, 6) and record.num_kept == 24 and record.extra["resized_from"] == (6, 9)
    had, received = vtc.last_prompt_lengths(model)[0]
    assert had == int(full["attention_mask"].sum()) and received == int(small["attention_mask"].sum())
    assert had - received == 54 - 24
    dry = vtc.select(model, **full)
    assert [r.grid for r in dry.images] == [(4, 6)] and dry.prompt_lengths == [(had, received)]


@pytest.mark.parametrize("family", QWEN)
def test_batch_of_differently_sized_pictures_equals_single_runs(family):
    model, processor = tiny.build_tiny(family)
    images = _images(family)
    questions = ["what is this ?", "how many red circle are there ?"]
    vtc.apply(model, "downsample", budget=20)
    texts = [tiny.build_prompt(processor, q) for q in questions]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        grids = [r.grid for r in vtc.last_selection(model)]
        for i in range(2):
            one = processor(text=[texts[i]], images=[images[i]], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=4, do_sample=False)[:, one["input_ids"].shape[1]:]
            assert torch.equal(alone[0], together[i])
    # 6 x 9 at 20 tokens: 3 x 5 (test_input_grid_by_hand); 8 x 6 at 20: s = 0.645, processor grid 5 x 3 = 15
    # (a = 1.667 / 1.333 = 1.25: limit 0.25); 5 x 4 = 20 has a = 0.9375 (0.067 off): 5 x 4
    assert grids == [(3, 5), (5, 4)]


@pytest.mark.parametrize("family", QWEN)
def test_labels_follow_the_rewritten_prompt(family):
    model, processor = tiny.build_tiny(family)
    full, small = _small_prompt(model, processor, family, _images(family)[:1], ["what is this ?"], [(4, 6)])
    full["labels"], small["labels"] = full["input_ids"].clone(), small["input_ids"].clone()
    with torch.no_grad():
        expected = model(**small).loss
        vtc.apply(model, "downsample", budget=0.5)
        got = model(**full).loss
    assert torch.isfinite(got) and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_flops_count_the_tower_at_the_resized_size(family):
    model, processor = tiny.build_tiny(family)
    full, small = _small_prompt(model, processor, family, _images(family)[:1], ["what is this ?"], [(4, 6)])
    before = request_flops(model, full)[0]
    reference = request_flops(model, small)[0]  # unwrapped: the smaller picture as the processor gives it
    vtc.apply(model, "downsample", budget=0.5)
    with torch.no_grad():
        model.generate(**full, max_new_tokens=1, do_sample=False)
    received = [n for _, n in vtc.last_prompt_lengths(model)]
    after = request_flops(model, full, received)[0]
    assert after.vision == reference.vision < before.vision
    assert after.projector == reference.projector < before.projector
    assert after.llm == reference.llm < before.llm


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_videos_are_resized_frame_by_frame(family):
    from helpers import video_inputs

    model, processor = tiny.build_tiny(family)
    inputs = video_inputs(processor, family, ["what happens ?"])
    steps, rows, cols = adapter_for(model).token_grids(inputs, "video")[0]
    total = steps * rows * cols
    vtc.apply(model, "downsample", budget=64, video_budget=0.5)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    video, = vtc.last_video_selection(model)
    grid = input_grid(rows, cols, max(1, (total // 2) // steps))
    assert video.grids == [grid] * steps and video.num_kept == steps * grid[0] * grid[1]
    had, received = vtc.last_prompt_lengths(model)[0]
    assert had - received == total - video.num_kept


def test_llava_pools_in_auto_mode_and_refuses_resize():
    model, processor = tiny.build_tiny("llava")
    with pytest.raises(ValueError, match="fixed input size"):
        vtc.apply(model, "downsample", budget=64, mode="resize")
    vtc.apply(model, "downsample", budget=9)
    inputs = processor(text=[tiny.build_prompt(processor, "what is this ?")],
                       images=[tiny.random_image(64, 64)], return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    record, = vtc.last_selection(model)
    assert record.num_kept == 9 and record.details.mode == "pool" and "resized_from" not in record.extra


def test_resize_mode_refuses_images_as_video():
    model, _ = tiny.build_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="images_as_video"):
        vtc.apply(model, "downsample", budget=64, mode="resize", images_as_video=True)


@pytest.mark.support("multi-image")
@pytest.mark.parametrize("compressor", ["downsample"])
@pytest.mark.parametrize("family", QWEN)
def test_multi_image_prompt_each_image_resized_to_its_own_budget(family, compressor):
    model, processor = tiny.build_tiny(family)
    images = _images(family)  # 6 x 9 and 8 x 6 tokens; at 20 tokens each: 3 x 5 and 5 x 4 (by hand above)
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size
    text = tiny.build_prompt(processor, "compare them", num_images=2)
    full = processor(text=[text], images=[images], return_tensors="pt")
    small = processor(text=[text], images=[[images[0].resize((5 * unit, 3 * unit)),
                                            images[1].resize((4 * unit, 5 * unit))]], return_tensors="pt")
    small.update(adapter_for(model).resize_inputs(full, [(3, 5), (5, 4)], None))
    with torch.no_grad():
        expected = model(**small).logits
        vtc.apply(model, "downsample", budget=20)
        got = model(**full).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert [r.grid for r in vtc.last_selection(model)] == [(3, 5), (5, 4)]


@pytest.mark.support("video")
@pytest.mark.parametrize("compressor", ["downsample"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_equals_the_prompt_of_the_smaller_frames(family, compressor):
    from helpers import make_video

    model, processor = tiny.build_tiny(family)
    frames = make_video(family, 0)
    unit = processor.image_processor.patch_size * processor.image_processor.merge_size

    def prompt(video):
        content = [{"type": "video"}, {"type": "text", "text": "what happens ?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        kwargs = {"do_sample_frames": False} if family == "qwen3_vl" else {}
        inputs = processor(text=[text], videos=[video], return_tensors="pt", **kwargs)
        if family == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.ones_like(inputs["second_per_grid_ts"])
        return inputs

    full = prompt(frames)
    steps, rows, cols = adapter_for(model).token_grids(full, "video")[0]
    grid = input_grid(rows, cols, max(1, (steps * rows * cols // 2) // steps))
    assert grid != (rows, cols)
    smaller = np.stack([np.array(Image.fromarray(f).resize((grid[1] * unit, grid[0] * unit))) for f in frames])
    small = prompt(smaller)
    small.update(adapter_for(model).resize_inputs(full, None, [grid]))
    with torch.no_grad():
        expected = model(**small).logits
        vtc.apply(model, "downsample", budget=64, video_budget=0.5)
        got = model(**full).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert int(small["attention_mask"].sum()) == vtc.last_prompt_lengths(model)[0][1]
