"""The ``evs`` video compressor (docs/methods/evs.md): hand-chosen static-patch masks, budgets below one frame,
frames of different grids, properties, bad input -- and, on tiny Qwen2.5-VL / Qwen3-VL models, the per-frame kept
counts reaching the prompt (vLLM bug #30847: Qwen3-VL interleaves timestamp text between the frames)."""

from __future__ import annotations

import pytest
import torch
from helpers import QUESTIONS, greedy, video_inputs, video_token_id
from hypothesis import given, settings
from hypothesis import strategies as st
from test_video_cut import hand_built_video, original_mrope, prefill_seen

import vtc
from vtc import VisualTokens, create_compressor, run_compressor
from vtc import testing as tiny
from vtc.compressors.evs import (
    EVS,
    EVSDetails,
    EVSFrameDetails,
    dissimilarities,
    spread_indices,
)
from vtc.video import VideoTokens, run_video_compressor
from helpers import CLIP_L

INF = float("inf")


def frame(rows_of_features, grid=(2, 2), prefix: int = 0) -> VisualTokens:
    return VisualTokens(features=torch.as_tensor(rows_of_features, dtype=torch.float32), grid=grid,
                        num_prefix_tokens=prefix)


def kept(result) -> list[list[int]]:
    return [r.selection.indices.tolist() for r in result.frames]


# ------------------------------------------------------------------------------------------------- golden tests
# A 3-frame 2x2 video in 2-d (positions p0..p3 in raster order). Cosines of axis-aligned vectors are exact.
#   frame 0: (1, 0) (0, 1) (1, 0) (0, 1)                      anchor: dissimilarity +inf everywhere
#   frame 1: (2, 0) (0, 1) (0, 1) (0, -1)   vs frame 0: cos 1, 1, 0, -1       -> 1 - cos = 0, 0, 1, 2
#   frame 2: (0, 1) (0, 5) (3, 4) (0, -1)   vs frame 1: cos 0, 1, 4/5, 1      -> 1 - cos = 1, 0, .2, 0
# Flat order (frame-major): tokens 0-3 frame 0, 4-7 frame 1, 8-11 frame 2. The global ranking, ties to the earlier
# token: 0, 1, 2, 3 (inf), 7 (2), 6 (1; before token 8, also 1), 8 (1), 10 (.2), then the zeros 4, 5, 9, 11.
VIDEO = [
    [[1, 0], [0, 1], [1, 0], [0, 1]],
    [[2, 0], [0, 1], [0, 1], [0, -1]],
    [[0, 1], [0, 5], [3, 4], [0, -1]],
]
GOLDEN = {
    4: [[0, 1, 2, 3], [], []],
    5: [[0, 1, 2, 3], [3], []],
    6: [[0, 1, 2, 3], [2, 3], []],          # the tie at 1: frame 1's p2 is earlier than frame 2's p0
    7: [[0, 1, 2, 3], [2, 3], [0]],
    8: [[0, 1, 2, 3], [2, 3], [0, 2]],
    9: [[0, 1, 2, 3], [0, 2, 3], [0, 2]],   # the static patches: earliest first
    10: [[0, 1, 2, 3], [0, 1, 2, 3], [0, 2]],
    11: [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2]],
    12: [[0, 1, 2, 3]] * 3,
    # K < 4 (below the first frame, where vLLM floors K at one frame): a spatially uniform subsample of frame 0.
    # spread_indices on 2x2: h = clip(round(sqrt(K * 2 / 2)), ceil(K / 2), 2) rows at floor((2i + 1) 2 / 2h), K split
    # evenly over them (remainder to the upper rows), columns at floor((2j + 1) 2 / 2share):
    #   K = 1: h = 1, row 1, column 1 -> token 3;  K = 2: h = round(1.41) = 1, row 1, columns 0, 1 -> 2, 3;
    #   K = 3: h = max(ceil(1.5), round(1.73)) = 2, rows 0, 1, shares (2, 1): row 0 cols 0, 1; row 1 col 1 -> 0, 1, 3.
    1: [[3], [], []],
    2: [[2, 3], [], []],
    3: [[0, 1, 3], [], []],
}


def golden_video() -> VideoTokens:
    return VideoTokens([frame(f) for f in VIDEO])


def test_dissimilarities_by_hand():
    dissim, anchors = dissimilarities(golden_video().frames)
    assert anchors == [True, False, False]
    assert dissim[0].tolist() == [INF] * 4
    torch.testing.assert_close(dissim[1], torch.tensor([0.0, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(dissim[2], torch.tensor([1.0, 0.0, 0.2, 0.0]))


@pytest.mark.parametrize("budget", sorted(GOLDEN))
def test_static_patch_masks_by_hand(budget):
    result = run_video_compressor(create_compressor("evs"), golden_video(), budget)
    assert kept(result) == GOLDEN[budget]
    d = result.details
    assert isinstance(d, EVSDetails) and d.signals == () and d.anchors == (True, False, False)
    assert d.anchor_tokens == 4 and d.subsampled == (budget < 4)
    assert list(d.kept) == [len(k) for k in GOLDEN[budget]] == [r.budget for r in result.frames]
    assert [r.keyframe for r in result.frames] == [True, False, False]
    first = result.frames[0].selection.details
    assert isinstance(first, EVSFrameDetails) and first.anchor and first.subsampled == (budget < 4)
    # the threshold: the lowest dissimilarity among the compared tokens kept
    expected = {4: None, 5: 2.0, 6: 1.0, 7: 1.0, 8: 0.2}.get(budget, None if budget < 4 else 0.0)
    assert d.threshold == (None if expected is None else pytest.approx(expected))
    torch.testing.assert_close(result.frames[2].selection.scores, torch.tensor([1.0, 0.0, 0.2, 0.0]))


def test_scaling_a_token_changes_nothing_and_identical_tokens_tie_exactly():
    """1 - cos ignores each token's length; fp32 1 - cos of (-1, 1) with itself is ~6e-8, snapped to 0 so the tie
    with an exact 0 goes to the earlier token, not to the rounding."""
    video = VideoTokens([frame([[1, 0], [-1, 1], [1, 0], [-1, 1]]), frame([[7, 0], [-1, 1], [1, 0], [-2, 2]])])
    dissim, _ = dissimilarities(video.frames)
    assert dissim[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert kept(run_video_compressor(EVS(), video, 6)) == [[0, 1, 2, 3], [0, 1]]


def test_spread_indices():
    assert spread_indices((14, 14), 1) == [7 * 14 + 7]  # the centre cell
    assert spread_indices((14, 14), 4) == [3 * 14 + 3, 3 * 14 + 10, 10 * 14 + 3, 10 * 14 + 10]  # a 2x2 lattice
    assert spread_indices((2, 8), 4) == [9, 11, 13, 15]  # h = round(sqrt(4 * 2 / 8)) = 1: row 1, columns 1 3 5 7
    assert spread_indices((3, 3), 9) == list(range(9))
    assert spread_indices((2, 2), 2, num_prefix_tokens=1) == [0, 4]  # the prefix first, then row 1 column 1 (+1)
    assert spread_indices((2, 2), 0) == []
    for rows, cols in [(1, 7), (5, 3), (14, 14), (4, 9)]:
        for k in range(rows * cols + 1):
            picks = spread_indices((rows, cols), k)
            assert len(picks) == k == len(set(picks)) and picks == sorted(picks)
            assert all(0 <= i < rows * cols for i in picks)
            if 0 < k < rows * cols // 2:
                assert picks != list(range(k))  # never the first k in raster order
    with pytest.raises(ValueError, match="cannot spread"):
        spread_indices((2, 2), 5)


def test_image_is_a_uniform_subsample():
    """One frame (an image): no previous frame, nothing compared; k < N keeps a uniform subsample of the grid."""
    g = torch.Generator().manual_seed(0)
    image = VisualTokens(features=torch.randn(24 * 24, 8, generator=g), grid=(24, 24))
    selection = run_compressor(EVS(), image, 64)
    assert selection.indices.tolist() == spread_indices((24, 24), 64)
    assert selection.details.anchor and selection.details.subsampled
    rows, cols = selection.indices // 24, selection.indices % 24
    assert set(rows.tolist()) == {1, 4, 7, 10, 13, 16, 19, 22} == set(cols.tolist())  # an 8x8 lattice
    with_cls = VisualTokens(features=torch.randn(1 + 9, 4, generator=g), grid=(3, 3), num_prefix_tokens=1)
    assert run_compressor(EVS(), with_cls, 2).indices.tolist() == [0, 1 + 4]  # the CLS, then the centre cell


def test_frames_of_different_grids_are_anchors():
    """A frame whose grid differs from the previous frame's has no positions to compare: it is an anchor (+inf)
    like the first frame. Frames: 2x2, 2x2, 1x4 (anchor), 1x4. A = 8 anchor tokens."""
    f0 = frame([[1, 0], [0, 1], [1, 0], [0, 1]])
    f1 = frame([[1, 0], [1, 0], [1, 0], [0, 1]])  # vs f0: 0, 1, 0, 0
    f2 = frame([[1, 0]] * 4, grid=(1, 4))
    f3 = frame([[1, 0], [0, 1], [1, 0], [-1, 0]], grid=(1, 4))  # vs f2: 0, 1, 0, 2
    video = VideoTokens([f0, f1, f2, f3])
    _, anchors = dissimilarities(video.frames)
    assert anchors == [True, False, True, False]
    # K = 10 >= A: both anchors whole, then frame 3's p3 (2) and frame 1's p1 (1; earlier than frame 3's p1)
    result = run_video_compressor(EVS(), video, 10)
    assert kept(result) == [[0, 1, 2, 3], [1], [0, 1, 2, 3], [3]]
    # K = 4 < A: the anchors share K evenly (2 + 2), each a uniform subsample: 2x2 -> row 1 (tokens 2, 3); 1x4 ->
    # h = 1, row 0, columns floor(4/4) = 1 and floor(12/4) = 3
    result = run_video_compressor(EVS(), video, 4)
    assert kept(result) == [[2, 3], [], [1, 3], []] and result.details.subsampled
    assert [r.selection.details.subsampled for r in result.frames] == [True, False, True, False]
    # K = 5: the remainder to the earlier anchor
    assert kept(run_video_compressor(EVS(), video, 5)) == [[0, 1, 3], [], [1, 3], []]


# ------------------------------------------------------------------------------------------------- properties
@st.composite
def video_case(draw):
    num_frames = draw(st.integers(1, 6))
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    static = draw(st.floats(0.0, 1.0))  # chance a position repeats the previous frame's token
    dim = draw(st.sampled_from([2, 5]))
    seed = draw(st.integers(0, 2**16))
    budget = draw(st.integers(1, num_frames * rows * cols))
    return num_frames, rows, cols, static, dim, seed, budget


@settings(max_examples=60, deadline=None)
@given(case=video_case())
def test_exact_budgets_first_frame_and_nesting(case):
    num_frames, rows, cols, static, dim, seed, budget = case
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    x = torch.randn(n, dim, generator=g)
    frames = []
    for _ in range(num_frames):
        fresh = torch.randn(n, dim, generator=g)
        keep = torch.rand(n, generator=g) < static
        x = torch.where(keep[:, None], x, fresh)
        frames.append(VisualTokens(features=x.clone(), grid=(rows, cols)))
    video = VideoTokens(frames)
    result = run_video_compressor(EVS(), video, budget)  # validates sorted unique indices and the sum
    assert result.num_kept == budget
    if budget >= n:
        assert kept(result)[0] == list(range(n))  # the first frame is always kept whole
        # nested: one more token keeps everything kept before
        if budget < video.num_tokens:
            bigger = run_video_compressor(EVS(), video, budget + 1)
            for small, big in zip(kept(result), kept(bigger)):
                assert set(small) <= set(big)
        # every compared token kept is at least as dissimilar as every compared token dropped
        kept_d, dropped_d = [], []
        for record in result.frames[1:]:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[record.selection.indices] = True
            kept_d += record.selection.scores[mask].tolist()
            dropped_d += record.selection.scores[~mask].tolist()
        if kept_d and dropped_d:
            assert min(kept_d) >= max(dropped_d)
        # a fully static position never beats a changed one: static tokens have dissimilarity 0
    else:
        assert kept(result)[0] == spread_indices((rows, cols), budget) and all(not k for k in kept(result)[1:])
    # rescaling each token by a positive factor changes nothing (cosine)
    factors = torch.rand(num_frames, n, 1, generator=g) + 0.5
    scaled = VideoTokens([VisualTokens(features=f.features * s, grid=f.grid) for f, s in zip(frames, factors)])
    assert kept(run_video_compressor(EVS(), scaled, budget)) == kept(result)
    assert kept(run_video_compressor(EVS(), video, 1.0)) == [list(range(n))] * num_frames


def test_flags_signals_and_no_options():
    assert EVS.video_only and EVS.handles_video and not EVS.uses_query
    assert create_compressor("evs").signals(CLIP_L) == () and create_compressor("evs").options() == {}
    with pytest.raises(TypeError, match="unknown option.*valid options: none"):
        create_compressor("evs", q=0.75)


def test_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        EVS().select_video(golden_video(), -1)
    with pytest.raises(ValueError, match="budget"):
        EVS().select_video(golden_video(), 2.5)
    with pytest.raises(ValueError, match="budget"):
        run_video_compressor(EVS(), golden_video(), 0)


# ------------------------------------------------------------------------------------------------- integration
def frame_blocks(ids: torch.Tensor, model) -> list[int]:
    """Video placeholders per frame block of one prompt: for every ``<|vision_start|>`` that opens a frame (directly
    followed by a placeholder or by ``<|vision_end|>``), the placeholders up to its ``<|vision_end|>``. Qwen3-VL has
    one block per temporal step (timestamp text between them), Qwen2.5-VL one block per video."""
    video_id = video_token_id(model)
    start, end = int(model.config.vision_start_token_id), int(model.config.vision_end_token_id)
    ids = ids.tolist()
    blocks = []
    for i, token in enumerate(ids[:-1]):
        if token == start and ids[i + 1] in (video_id, end):
            j = i + 1
            while ids[j] == video_id:
                j += 1
            assert ids[j] == end
            blocks.append(j - i - 1)
    return blocks


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_per_frame_counts_reach_the_prompt_and_generate_equals_hand_built(tiny_dirs, family_name):
    """vLLM #30847: on Qwen3-VL the prompt's per-timestamp placeholder counts must be EVS's per-frame counts.

    Video 0 of the test helpers is the temporal steps A, A, B (frames 0 0 | 0 0 | 1 1): step 1 repeats step 0
    exactly (its tokens have dissimilarity 0: the ViT attends within a step and encodes no time), step 2 is a new
    image. With K = n + n // 2 (n tokens per step) EVS keeps step 0 whole, nothing of the static step 1 and n // 2
    tokens of step 2 -- non-uniform per-frame counts, one of them 0 (an empty timestamp block on Qwen3-VL).
    """
    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = video_inputs(processor, family_name, QUESTIONS[:1])
    steps, h, w = inputs["video_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    n = (h // merge) * (w // merge)
    assert steps == 3 and n >= 2
    budget = n + n // 2
    video_id = video_token_id(model)
    original_blocks = frame_blocks(inputs["input_ids"][0], model)
    assert original_blocks == ([n] * 3 if family_name == "qwen3_vl" else [3 * n])
    original = original_mrope(model, inputs)[:, 0]
    slots = (inputs["input_ids"][0] == video_id).nonzero().squeeze(-1)

    vtc.apply(model, "evs", budget=2, video_budget=budget)
    out, seen = prefill_seen(model, inputs, max_new_tokens=8)
    record, = vtc.last_video_selection(model)
    assert record.compressor == "evs" and record.budget == record.num_kept == budget
    assert record.frame_budgets == [n, 0, n // 2]  # non-uniform per-frame counts
    scores = [f.selection.scores for f in record.selection.frames]
    assert bool(torch.isinf(scores[0]).all()) and scores[1].tolist() == [0.0] * n and bool((scores[2] > 0).all())
    # the prompt the LLM receives: exactly the kept placeholders, per frame block where the prompt has them
    ids = seen["input_ids"][0]
    assert int((ids == video_id).sum()) == budget
    assert frame_blocks(ids, model) == (record.frame_budgets if family_name == "qwen3_vl" else [budget])
    # the kept tokens keep their original M-RoPE ids, the text after the video too
    flat = torch.cat([f.selection.indices + s for f, s in
                      zip(record.selection.frames, [0, n, 2 * n])])
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[slots] = False
    keep[slots[flat]] = True
    assert seen["position_ids"][1:, 0].tolist() == original[:, keep].tolist()
    # and the output is the hand-built shortened prompt's (unwrapped model, its own video features gathered)
    length = inputs["input_ids"].shape[1]
    short, short_len = hand_built_video(model, inputs, family_name)
    assert short_len == length - 3 * n + budget
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=8)
    assert out[:, :length].tolist() == inputs["input_ids"].tolist()
    assert out[:, length:].tolist() == reference[:, short_len:].tolist()
