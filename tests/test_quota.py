"""QuoTA (hardened) video compressor: golden budgets, the resize rule, scorers, smoothing, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc
from vtc import Signal, SignalKind, VisualTokens, create_compressor, run_compressor
from vtc.compressors.quota import Quota, quota_shape, reduce_grid, similarity_scores, smooth_scores
from vtc.video import VideoTokens, run_video_compressor
from helpers import CLIP_L

D = 8


def frame(rows: int, cols: int, seed: int = 0, prefix: int = 0, signals=None) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols + prefix
    return VisualTokens(features=torch.randn(n, D, generator=g), grid=(rows, cols), signals=signals or {},
                        num_prefix_tokens=prefix)


def video(num_frames: int, rows: int = 6, cols: int = 6, scores=None, query=None) -> VideoTokens:
    frame_scores = None if scores is None else torch.tensor(scores, dtype=torch.float32)
    return VideoTokens([frame(rows, cols, seed=t) for t in range(num_frames)], query=query, frame_scores=frame_scores)


def budgets(selection) -> list[int]:
    return [r.budget for r in selection.frames]


def grid_of(tokens: VisualTokens) -> torch.Tensor:
    rows, cols = tokens.grid
    return tokens.features[tokens.num_prefix_tokens:].reshape(rows, cols, -1).permute(2, 0, 1)[None]


def assert_weights_exact(selection, x: torch.Tensor, atol: float = 1e-5):
    """``features[i] == weights[i] @ x[groups[i]]`` for every output (``x``: the original ``[N, D]`` features); a
    bilinear / pooled / kept token is an affine combination of its group (coefficients sum to 1)."""
    assert selection.weights is not None and len(selection.weights) == selection.num_kept
    for feature, group, weight in zip(selection.features, selection.groups, selection.weights):
        assert weight.dtype == torch.float32 and weight.shape == group.shape and bool((weight > 0).all())
        torch.testing.assert_close(weight @ x[group].float(), feature.float(), rtol=1e-5, atol=atol)
        assert float(weight.sum()) == pytest.approx(1.0, abs=1e-6)


def dense_weights(selection, n: int) -> torch.Tensor:
    """``[K, n]``: each output's coefficients over all ``n`` tokens."""
    out = torch.zeros(selection.num_kept, n)
    for i, (group, weight) in enumerate(zip(selection.groups, selection.weights)):
        out[i, group] = weight
    return out


# ---------------------------------------------------------------------------------------------- registry
def test_registered_and_declares_query_use():
    assert "quota" in vtc.list_compressors()
    q = create_compressor("quota")
    assert isinstance(q, Quota) and q.uses_query and q.handles_video
    assert q.options() == {"scorer": "similarity", "gamma": 2.0, "smooth_window": 0, "smooth_lambda": 0.5,
                           "floor": 0, "within": "resize", "within_options": None, "temperature": 0.05}
    assert q.signals(CLIP_L) == ()


# ---------------------------------------------------------------------------------------------- budgets
def test_water_filling_golden_gamma_2():
    """scores [1, 0, 0.5], gamma 2 -> weights [1, 0, 0.25] / 1.25 = [0.8, 0, 0.2].

    budget 20, caps 36: [16, 0, 4]. budget 50: frame 0 wants 40 > cap 36, so it gets 36 and frame 2 the other 14.
    floor 3, budget 20: frame 1 gets its floor 3, 0.8k + 0.2k = 17 -> 13.6 / 3.4 -> floors 13 + 3 + 3 = 19, the
    last token to the largest remainder (frame 0): [14, 3, 3].
    """
    v = video(3, scores=[1.0, 0.0, 0.5])
    sel = run_video_compressor(Quota(scorer="self"), v, 20)
    assert budgets(sel) == [16, 0, 4]
    assert [r.weight for r in sel.frames] == pytest.approx([0.8, 0.0, 0.2])
    assert [r.score for r in sel.frames] == pytest.approx([1.0, 0.0, 0.5])
    assert budgets(run_video_compressor(Quota(scorer="self"), v, 50)) == [36, 0, 14]
    assert budgets(run_video_compressor(Quota(scorer="self", floor=3), v, 20)) == [14, 3, 3]
    # gamma 1: weights [1, 0, .5] / 1.5 -> 20 * [2/3, 0, 1/3] = 13.33 / 6.67 -> [13, 0, 7]
    assert budgets(run_video_compressor(Quota(scorer="self", gamma=1.0), v, 20)) == [13, 0, 7]
    # the whole video: every frame at its cap, kept as it is
    full = run_video_compressor(Quota(scorer="self"), v, 1.0)
    assert budgets(full) == [36, 36, 36]
    assert all(r.selection.indices.tolist() == list(range(36)) and r.selection.features is None for r in full.frames)


def test_zero_score_frames_are_dropped_cleanly():
    v = video(4, scores=[0.0, 0.9, 0.0, 0.3])
    sel = run_video_compressor(Quota(scorer="self"), v, 30)
    assert sel.num_kept == 30
    for t in (0, 2):
        record = sel.frames[t]
        assert record.budget == 0 and record.num_kept == 0 and record.selection.indices.numel() == 0
        assert record.extra["shape"] == (0, 0)
    assert sel.flat(v).num_kept == 30


def test_budget_smaller_than_frame_count_drops_frames():
    v = video(6)
    sel = run_video_compressor(Quota(scorer="uniform"), v, 4)
    assert budgets(sel) == [1, 1, 1, 1, 0, 0]  # even shares 2/3 each, remainders to the lower frames
    assert sel.num_kept == 4


def test_all_zero_scores_share_evenly():
    sel = run_video_compressor(Quota(scorer="self"), video(3, scores=[0.0, 0.0, 0.0]), 12)
    assert budgets(sel) == [4, 4, 4]
    assert [r.weight for r in sel.frames] == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------------------------------------- resize rule
def test_quota_shape_golden():
    assert quota_shape(16) == (4, 4)
    assert quota_shape(12) == (4, 3)  # h (rows) grows first: (3 + 1) * 3 <= 12
    assert quota_shape(10) == (3, 3)  # (4, 3) and (3, 4) are both 12 > 10: one leftover token
    assert quota_shape(20) == (5, 4)
    assert quota_shape(14) == (4, 3)  # (4, 3) = 12 <= 14: two leftover tokens
    assert quota_shape(1) == (1, 1) and quota_shape(2) == (2, 1) and quota_shape(0) == (0, 0)
    assert quota_shape(196) == (14, 14) and quota_shape(729) == (27, 27)
    # clamped to the frame's grid: no axis is up-sampled
    assert quota_shape(16, (2, 50)) == (2, 8)
    assert quota_shape(4, (1, 5)) == (1, 4)
    assert quota_shape(9, (10, 2)) == (4, 2)
    for b in range(1, 200):
        h, w = quota_shape(b)
        assert h * w <= b and b - h * w < h


def test_resize_equals_bilinear_interpolate_and_slots_are_cell_centres():
    """4x6 grid, b = 12 -> (4, 3): every output is a cell of F.interpolate(bilinear, align_corners=False).

    Slots: rows floor((i + .5) * 4 / 4) = 0..3, cols floor((j + .5) * 6 / 3) = 1, 3, 5 -> row-major cells are
    already in index order. Groups: rows map 1:1, column j reads source columns 2j, 2j + 1 (source coordinate
    (j + .5) * 2 - .5 = 2j + .5).
    """
    tokens = frame(4, 6, seed=3)
    selection, shape = reduce_grid(tokens, 12, "resize")
    assert shape == (4, 3)
    expected = F.interpolate(grid_of(tokens), size=(4, 3), mode="bilinear", align_corners=False)
    expected = expected[0].permute(1, 2, 0).reshape(12, D)
    assert selection.indices.tolist() == [r * 6 + c for r in range(4) for c in (1, 3, 5)]
    torch.testing.assert_close(selection.features, expected, rtol=0, atol=0)
    assert selection.groups[0].tolist() == [0, 1]
    assert selection.groups[4].tolist() == [8, 9]  # cell (1, 1): row 1, columns 2, 3
    selection.validate(24, expected=12)


def test_resize_groups_are_the_bilinear_taps():
    tokens = frame(6, 6, seed=1)
    selection, shape = reduce_grid(tokens, 9, "resize")  # 6 -> 3 on both axes: taps {2i, 2i + 1}
    assert shape == (3, 3)
    assert selection.indices.tolist() == [r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)]
    assert sorted(selection.groups[0].tolist()) == [0, 1, 6, 7]
    assert sorted(selection.groups[8].tolist()) == [28, 29, 34, 35]


def test_resize_leftover_is_the_worst_reconstructed_original_token():
    """b = 10 on a 6x6 grid: (3, 3) cells + 1 original token, the one with the largest bilinear residual."""
    tokens = frame(6, 6, seed=2)
    selection, shape = reduce_grid(tokens, 10, "resize")
    assert shape == (3, 3) and selection.num_kept == 10
    grid = grid_of(tokens)
    small = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False)
    recon = F.interpolate(small, size=(6, 6), mode="bilinear", align_corners=False)
    residual = (grid - recon)[0].permute(1, 2, 0).reshape(36, D).norm(dim=-1)
    slots = [r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)]
    residual[slots] = -1
    leftover = int(residual.argmax())
    assert selection.indices.tolist() == sorted(slots + [leftover])
    position = selection.indices.tolist().index(leftover)
    torch.testing.assert_close(selection.features[position], tokens.features[leftover], rtol=0, atol=0)
    assert selection.groups[position].tolist() == [leftover]
    cells = [i for i in range(10) if i != position]
    torch.testing.assert_close(selection.features[cells], small[0].permute(1, 2, 0).reshape(9, D), rtol=0, atol=0)


def test_pool_equals_adaptive_avg_pool():
    tokens = frame(5, 7, seed=4)
    selection, shape = reduce_grid(tokens, 12, "pool")
    assert shape == (4, 3)
    expected = F.adaptive_avg_pool2d(grid_of(tokens), (4, 3))[0].permute(1, 2, 0).reshape(12, D)
    torch.testing.assert_close(selection.features, expected, rtol=0, atol=0)
    # cell (0, 0): rows [0, ceil(5/4)) = 0..1, cols [0, ceil(7/3)) = 0..2; its slot (row 0, col 1) is inside
    assert sorted(selection.groups[0].tolist()) == [0, 1, 2, 7, 8, 9]
    assert int(selection.indices[0]) == 1
    for index, group in zip(selection.indices.tolist(), selection.groups):
        assert index in group.tolist()
        torch.testing.assert_close(selection.features[selection.indices.tolist().index(index)],
                                   tokens.features[group].mean(0), rtol=1e-6, atol=1e-6)


def test_prefix_tokens_kept_first_and_dtype_kept():
    tokens = frame(4, 4, seed=5, prefix=1)
    tokens = VisualTokens(tokens.features.to(torch.bfloat16), grid=(4, 4), num_prefix_tokens=1)
    selection, shape = reduce_grid(tokens, 5, "resize")
    assert shape == (2, 2) and selection.num_kept == 5
    assert int(selection.indices[0]) == 0 and selection.groups[0].tolist() == [0]
    assert selection.features.dtype == torch.bfloat16
    assert torch.equal(selection.features[0], tokens.features[0])
    assert reduce_grid(tokens, 1, "resize")[0].indices.tolist() == [0]


@pytest.mark.parametrize("mode", ["resize", "pool"])
@pytest.mark.parametrize("rows, cols, prefix", [(4, 6, 0), (5, 7, 1), (6, 6, 0), (3, 9, 1), (7, 2, 0), (1, 5, 0)])
def test_merge_weights_are_the_resampling_coefficients(mode, rows, cols, prefix):
    """The weights are the coefficients of F.interpolate (bilinear taps) / F.adaptive_avg_pool2d (uniform region):
    resampling the identity (token j = the one-hot e_j) gives each output's coefficient row directly. Leftover and
    prefix tokens have the single coefficient 1."""
    n = rows * cols + prefix
    identity = VisualTokens(torch.eye(n, dtype=torch.float64), grid=(rows, cols), num_prefix_tokens=prefix)
    for budget in range(1, n):
        selection, (h, w) = reduce_grid(identity, budget, mode)
        dense = dense_weights(selection, n).double()
        torch.testing.assert_close(dense, selection.features, rtol=0, atol=1e-7)
        grid = grid_of(identity)
        if h * w:
            if mode == "resize":
                cells = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            else:
                cells = F.adaptive_avg_pool2d(grid, (h, w))
            cells = cells[0].permute(1, 2, 0).reshape(h * w, n)
            # every resampled cell is one output row (its slot), the rest are kept tokens with weight 1
            rows_of = {tuple(r.tolist()) for r in dense.float()}
            assert all(tuple(c.float().tolist()) in rows_of for c in cells)
        single = [wt for wt in selection.weights if wt.numel() == 1]
        assert all(wt.tolist() == [1.0] for wt in single)
        # on random features, too (float32)
        tokens = frame(rows, cols, seed=budget, prefix=prefix)
        sel, _ = reduce_grid(tokens, budget, mode)
        assert_weights_exact(sel, tokens.features)


def test_merge_weights_golden():
    """4x6 grid, b = 12 -> (4, 3): rows map 1:1, column j reads source columns 2j, 2j + 1 with weights 1/2, 1/2.
    b = 6 -> (3, 2): source row coordinate (i + .5) * 4/3 - .5 = 1/6, 3/2, 17/6 -> taps (0, 1) with (5/6, 1/6),
    (1, 2) with (1/2, 1/2), (2, 3) with (1/6, 5/6); columns 6 -> 2: coordinate (j + .5) * 3 - .5 = 1, 4 falls on a
    source column, a single tap."""
    tokens = frame(4, 6, seed=3)
    selection, _ = reduce_grid(tokens, 12, "resize")
    assert all(wt.tolist() == [0.5, 0.5] for wt in selection.weights)
    selection, shape = reduce_grid(tokens, 6, "resize")
    assert shape == (3, 2)
    assert [g.tolist() for g in selection.groups] == [[1, 7], [4, 10], [7, 13], [10, 16], [13, 19], [16, 22]]
    torch.testing.assert_close(selection.weights[0], torch.tensor([5, 1]) / 6)
    torch.testing.assert_close(selection.weights[2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(selection.weights[5], torch.tensor([1, 5]) / 6)
    pooled, _ = reduce_grid(frame(5, 7, seed=4), 12, "pool")
    torch.testing.assert_close(pooled.weights[0], torch.full((6,), 1 / 6))  # rows 0..1 x cols 0..2


def test_bf16_frames_keep_fp32_weights():
    tokens = frame(4, 4, seed=5, prefix=1)
    tokens = VisualTokens(tokens.features.to(torch.bfloat16), grid=(4, 4), num_prefix_tokens=1)
    selection, _ = reduce_grid(tokens, 7, "resize")
    assert selection.weights[0].tolist() == [1.0]  # the prefix token
    assert_weights_exact(selection, tokens.features, atol=2e-2)  # features rounded to bf16


def test_flat_weights_across_frames():
    """A video whose frames are resized, kept whole and dropped: flat() states every merge over the video's tokens."""
    v = video(3, rows=4, cols=4, scores=[1.0, 0.0, 0.2])
    sel = run_video_compressor(Quota(scorer="self", gamma=1.0), v, 24)
    assert budgets(sel) == [16, 0, 8]  # frame 0 kept whole (gathered), frame 1 dropped, frame 2 resized
    assert sel.frames[0].selection.features is None and sel.frames[0].selection.weights is None
    assert_weights_exact(sel.frames[2].selection, v.frames[2].features)
    flat = sel.flat(v)
    assert_weights_exact(flat, torch.cat([f.features for f in v.frames]))
    assert [g.tolist() for g in flat.groups[:16]] == [[i] for i in range(16)]
    assert all(int(g.min()) >= 32 for g in flat.groups[16:])  # frame 2's tokens start at 32


# ---------------------------------------------------------------------------------------------- within
def test_within_random_selects_inside_each_frame():
    v = video(3, scores=[1.0, 0.5, 0.0])
    sel = run_video_compressor(Quota(scorer="self", within="random", within_options={"seed": 3}), v, 20)
    assert budgets(sel) == [16, 4, 0]
    for record, f, b in zip(sel.frames, v.frames, [16, 4, 0]):
        if b:
            assert record.selection.indices.tolist() == run_compressor(create_compressor("random", seed=3), f,
                                                                       b).indices.tolist()
        assert record.selection.features is None and "shape" not in record.extra


def test_within_hiprune_declares_and_uses_its_signals():
    quota = Quota(scorer="uniform", within="hiprune", within_options={"alpha": 0.5})
    declared = quota.signals(CLIP_L)
    assert declared == create_compressor("hiprune").signals(CLIP_L)
    assert declared == (Signal(SignalKind.RECEIVED_ATTENTION, 8), Signal(SignalKind.RECEIVED_ATTENTION, 22))
    g = torch.Generator().manual_seed(0)
    frames = [frame(6, 6, seed=t, signals={s: torch.rand(36, generator=g) for s in declared}) for t in range(3)]
    sel = run_video_compressor(quota, VideoTokens(frames), 30)
    assert budgets(sel) == [10, 10, 10]
    for record, f in zip(sel.frames, frames):
        expected = run_compressor(create_compressor("hiprune", alpha=0.5), f, 10)
        assert record.selection.indices.tolist() == expected.indices.tolist()


# ---------------------------------------------------------------------------------------------- scorers
def test_similarity_ranks_the_frame_containing_the_query_first():
    v = video(4)
    query = v.frames[2].features[17:18].clone() * 3.0  # cosine 1 with token 17 of frame 2 (scale-free)
    v = VideoTokens(v.frames, query=query)
    raw = similarity_scores([f.features for f in v.frames], query)
    assert int(raw.argmax()) == 2 and float(raw[2]) == pytest.approx(1.0)
    assert all(0 < float(s) <= 1 for s in raw)
    sel = run_video_compressor(Quota(), v, 40)
    assert max(range(4), key=lambda t: sel.frames[t].budget) == 2
    assert sel.frames[2].score == pytest.approx(1.0)


def test_similarity_definition_golden():
    """Two query tokens; frame maxima of the cosines are averaged over query tokens, then exp((r - max r) / tau)."""
    e = torch.eye(4)
    frames = [torch.stack([e[0], e[1]]), torch.stack([e[0], e[2]]), torch.stack([e[3], e[3]])]
    query = torch.stack([e[0], e[1]])
    # r = [(1 + 1) / 2, (1 + 0) / 2, 0] = [1, .5, 0]
    scores = similarity_scores(frames, query, temperature=0.5)
    assert scores.tolist() == pytest.approx([1.0, math.exp(-1.0), math.exp(-2.0)])


def test_self_scorer_uses_frame_scores_and_needs_them():
    v = video(3, scores=[0.2, 0.9, 0.4])
    sel = run_video_compressor(Quota(scorer="self"), v, 30)
    assert [r.extra["raw_score"] for r in sel.frames] == pytest.approx([0.2, 0.9, 0.4])
    # 30 * [.04, .81, .16] / 1.01 = 1.19, 24.06, 4.75 -> floors 1 + 24 + 4 = 29, the last token to frame 2 (.75)
    assert budgets(sel) == [1, 24, 5]
    with pytest.raises(ValueError, match="integration must supply"):
        run_video_compressor(Quota(scorer="self"), video(3), 30)


def test_uniform_scorer_ignores_query_and_scores():
    sel = run_video_compressor(Quota(scorer="uniform"), video(3, scores=[1.0, 0.0, 0.0]), 30)
    assert budgets(sel) == [10, 10, 10]


def test_smoothing_golden():
    """s = [0, 1, 0, 0, .2], w = 1, lambda = .5: neighbourhood max [1, 1, 1, .2, .2] -> [.5, 1, .5, .1, .2]."""
    s = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.2])
    assert smooth_scores(s, 1, 0.5).tolist() == pytest.approx([0.5, 1.0, 0.5, 0.1, 0.2])
    assert smooth_scores(s, 2, 0.5).tolist() == pytest.approx([0.5, 1.0, 0.5, 0.5, 0.2])
    assert smooth_scores(s, 0, 0.5).tolist() == pytest.approx(s.tolist())
    v = video(5, scores=s.tolist())
    sel = run_video_compressor(Quota(scorer="self", smooth_window=1), v, 54)
    assert [r.score for r in sel.frames] == pytest.approx([0.5, 1.0, 0.5, 0.1, 0.2])
    assert [r.extra["raw_score"] for r in sel.frames] == pytest.approx(s.tolist())
    # s~^2 = .25, 1, .25, .01, .04 (sum 1.55): 54 * w = 8.71, 34.84, 8.71, .35, 1.39 -> floors 8 + 34 + 8 + 0 + 1 = 51;
    # the 3 tokens left go to the largest remainders: frame 1 (.84), then frames 0 and 2 (.71, ties to the lower)
    assert budgets(sel) == [9, 35, 9, 0, 1]
    # without smoothing frame 0 (score 0) would be dropped
    assert budgets(run_video_compressor(Quota(scorer="self"), v, 54))[0] == 0


def test_single_image_needs_no_query_and_takes_the_budget():
    for within in ("resize", "pool", "random"):
        quota = create_compressor("quota", within=within)
        tokens = frame(6, 6, seed=7)
        assert tokens.query is None
        selection = run_compressor(quota, tokens, 16)
        assert selection.num_kept == 16
        assert run_compressor(quota, tokens, 1.0).indices.tolist() == list(range(36))
    record = Quota().select_video(VideoTokens([frame(4, 4)]), 5).frames[0]
    assert record.budget == 5 and record.weight == 1.0 and record.score is None
    assert record.extra["shape"] == (2, 2) and record.extra["leftover"] == 1


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def video_case(draw):
    num_frames = draw(st.integers(1, 6))
    grids = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(num_frames)]
    prefix = draw(st.integers(0, 1))
    seed = draw(st.integers(0, 2**16))
    total = sum(r * c + prefix for r, c in grids)
    budget = draw(st.one_of(st.integers(1, total + 5), st.sampled_from([0.25, 0.5, 1.0])))
    scorer = draw(st.sampled_from(["similarity", "self", "uniform"]))
    within = draw(st.sampled_from(["resize", "pool", "random"]))
    floor = draw(st.integers(0, 3))
    window = draw(st.integers(0, 2))
    gamma = draw(st.sampled_from([1.0, 2.0, 3.0]))
    zeros = draw(st.booleans())
    return grids, prefix, seed, budget, scorer, within, floor, window, gamma, zeros


@settings(deadline=None, max_examples=120)
@given(case=video_case())
def test_budgets_sum_exactly_and_selections_are_valid(case):
    grids, prefix, seed, budget, scorer, within, floor, window, gamma, zeros = case
    g = torch.Generator().manual_seed(seed)
    frames = [VisualTokens(torch.randn(r * c + prefix, D, generator=g), grid=(r, c), num_prefix_tokens=prefix)
              for r, c in grids]
    scores = torch.rand(len(frames), generator=g)
    if zeros:
        scores = (scores * 3).floor() / 2  # 0, .5, 1: some frames score 0
    v = VideoTokens(frames, query=torch.randn(3, D, generator=g), frame_scores=scores)
    quota = Quota(scorer=scorer, within=within, floor=floor, smooth_window=window, gamma=gamma)
    sel = run_video_compressor(quota, v, budget)  # validates: per-frame counts == budgets, sum == video budget
    expected = vtc.resolve_budget(budget, v.num_tokens)
    assert sel.budget == sel.num_kept == expected == sum(budgets(sel))
    assert all(0 <= r.budget <= f.num_tokens for r, f in zip(sel.frames, frames))
    assert sum(r.weight for r in sel.frames) == pytest.approx(1.0)
    for record in sel.frames:
        if record.selection.groups is not None:
            for index, group in zip(record.selection.indices.tolist(), record.selection.groups):
                assert index in group.tolist()  # every output sits on one of the tokens it summarises
    flat = sel.flat(v)
    assert flat.num_kept == expected
    for record, f in zip(sel.frames, frames):
        if record.selection.features is not None and record.selection.weights is not None:
            assert_weights_exact(record.selection, f.features)
    if flat.features is not None and within != "random":  # resize / pool: every merge is stated as weights
        assert_weights_exact(flat, torch.cat([f.features for f in frames]))
    # deterministic
    assert run_video_compressor(quota, v, budget).flat(v).indices.tolist() == flat.indices.tolist()


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), prefix=st.integers(0, 1), seed=st.integers(0, 2**16),
       data=st.data(), within=st.sampled_from(["resize", "pool"]))
def test_image_selection_is_valid(rows, cols, prefix, seed, data, within):
    """An image (one-frame video, no query): the contract every compressor meets on images."""
    n = rows * cols + prefix
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    tokens = VisualTokens(torch.randn(n, 6, generator=g), grid=(rows, cols), num_prefix_tokens=prefix)
    quota = create_compressor("quota", within=within)
    selection = run_compressor(quota, tokens, k)
    assert selection.num_kept == k
    assert selection.indices.tolist() == sorted(set(selection.indices.tolist()))
    if selection.features is not None:
        assert selection.features.shape == (k, 6)
    assert run_compressor(quota, tokens, k).indices.tolist() == selection.indices.tolist()
    assert run_compressor(quota, tokens, 1.0).indices.tolist() == list(range(n))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, error, match", [
    ({"scorer": "clip"}, ValueError, "scorer must be one of"),
    ({"within": "bilinear"}, ValueError, "within must be 'resize', 'pool' or a registered image compressor"),
    ({"within": "quota"}, ValueError, "is a video compressor"),
    ({"within": 3}, TypeError, "within must be"),
    ({"within_options": {"seed": 1}}, ValueError, "within_options only apply"),
    ({"within": "random", "within_options": {"sed": 1}}, TypeError, "valid options"),
    ({"within": "random", "within_options": [1]}, TypeError, "within_options must be a dict"),
    ({"gamma": 0}, ValueError, "gamma must be a finite number > 0"),
    ({"gamma": -1.0}, ValueError, "gamma must be"),
    ({"gamma": float("nan")}, ValueError, "gamma must be"),
    ({"gamma": True}, ValueError, "gamma must be"),
    ({"floor": -1}, ValueError, "floor must be an int >= 0"),
    ({"floor": 1.5}, ValueError, "floor must be an int >= 0"),
    ({"smooth_window": -1}, ValueError, "smooth_window must be an int >= 0"),
    ({"smooth_lambda": 1.5}, ValueError, "smooth_lambda must be a number in \\[0, 1\\]"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        create_compressor("quota", **options)


@pytest.mark.parametrize("scores", [[0.5, float("nan"), 0.1], [0.5, 1.5, 0.1], [-0.1, 0.5, 0.5]])
def test_bad_frame_scores(scores):
    with pytest.raises(ValueError, match="frame_scores must be probabilities in \\[0, 1\\] without NaN"):
        run_video_compressor(Quota(scorer="self"), video(3, scores=scores), 10)


def test_similarity_needs_a_matching_query():
    with pytest.raises(ValueError, match="needs the prompt's text embeddings.*integration must embed the prompt"):
        run_video_compressor(Quota(), video(2), 10)
    with pytest.raises(ValueError, match=f"query must be \\[Q, {D}\\]"):
        run_video_compressor(Quota(), video(2, query=torch.randn(3, D + 1)), 10)
