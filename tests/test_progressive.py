"""The ``progressive`` video compressor (docs/methods/progressive.md): reasoning on synthetic videos, hand-computed
folds, exact budgets, image mode, signals and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import Signal, SignalKind, VisualTokens, create_compressor, run_compressor
from vtc.compressors.progressive import Progressive, weighted_maxmin
from vtc.video import VideoTokens, run_video_compressor
from helpers import CLIP_L, QWEN25


def frame(features: torch.Tensor, rows: int | None = None, signals=None) -> VisualTokens:
    n = features.shape[0]
    rows = rows or 1
    return VisualTokens(features=features, grid=(rows, n // rows), signals=signals or {})


def unit(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def assert_weights_exact(selection, x: torch.Tensor, atol: float = 1e-5):
    """``features[i] == weights[i] @ x[groups[i]]`` for every output (``x``: the original ``[N, D]`` features), and
    every merge is an affine combination (coefficients sum to 1)."""
    assert selection.weights is not None and len(selection.weights) == selection.num_kept
    for feature, group, weight in zip(selection.features, selection.groups, selection.weights):
        assert weight.dtype == torch.float32 and weight.shape == group.shape
        torch.testing.assert_close(weight @ x[group].float(), feature.float(), rtol=1e-5, atol=atol)
        assert float(weight.sum()) == pytest.approx(1.0, abs=1e-5)


def assert_video_weights_exact(result, video: VideoTokens):
    """Per frame where the frame states its merge (weights present), and the whole video through ``flat()``."""
    for record, fr in zip(result.frames, video.frames):
        sel = record.selection
        if sel.weights is not None:
            assert_weights_exact(sel, fr.features)
        else:  # only a frame whose outputs absorbed tokens of later frames lacks per-frame weights
            assert int(record.extra["absorbed_later"].sum()) > 0
    flat = result.flat(video)
    assert_weights_exact(flat, torch.cat([f.features for f in video.frames]))
    # the flat groups partition the tokens that were not dropped: each in exactly one output
    members = torch.cat(list(flat.groups)).tolist() if flat.groups else []
    dropped = {o + i for o, r in zip(video.offsets(), result.frames) for i in r.extra["dropped"]}
    assert sorted(members) == sorted(set(range(video.num_tokens)) - dropped)
    for index, group in zip(flat.indices.tolist(), flat.groups):
        assert index in group.tolist()


# ------------------------------------------------------------------------------------------------- reasoning
def moving_object_video(num_frames=6, side=5, dim=128, seed=0):
    """Static background (one random vector per cell, the same in every frame, plus a shared component) and an
    object that moves one cell per frame along row 1; an object token mixes the object vector with its cell."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    common = 0.5 * unit(g, dim)
    background = unit(g, n, dim) + common
    obj = 1.5 * unit(g, dim)
    path = [side + 1 + t for t in range(num_frames)]
    frames = []
    for t in range(num_frames):
        x = background.clone()
        x[path[t]] = x[path[t]] + obj
        frames.append(frame(x, rows=side))
    return VideoTokens(frames), path, n


def test_moving_object_keeps_first_frame_then_only_what_changed():
    video, path, n = moving_object_video()
    budget = n + 2 * (video.num_frames - 1)  # one frame plus two tokens per later frame
    result = run_video_compressor(create_compressor("progressive"), video, budget)
    assert result.num_kept == budget
    first = result.frames[0]
    assert first.keyframe and first.selection.indices.tolist() == list(range(n))  # the keyframe is kept whole
    assert [r.keyframe for r in result.frames] == [True] + [False] * (video.num_frames - 1)
    for t in range(1, video.num_frames):
        record = result.frames[t]
        # the object's new cell and the cell it uncovered (its background differs from what frame t-1 showed)
        assert record.selection.indices.tolist() == sorted([path[t - 1], path[t]])
        assert record.extra["novel"] == 2 and record.extra["folded"] == n - 2
        background = set(range(n)) - {path[t - 1], path[t]}
        assert set(record.extra["folded_into"]) == background
        for i in background:  # static background folds into the first output that showed that cell's background:
            # the keyframe's, or for a cell the object crossed, the frame that uncovered it
            uncovered_at = path.index(i) + 1 if i in path[:t] else 0
            assert record.extra["folded_into"][i] == (uncovered_at, i)
    # the keyframe's background absorbed one copy per later frame and did not move (identical copies)
    corner = 0
    assert int(first.extra["absorbed_later"][corner]) == video.num_frames - 1
    torch.testing.assert_close(first.selection.features[corner], video.frames[0].features[corner])
    # the leftover of the P-frames (base 5, spent 2) was handed back to the keyframe's merged tokens
    assert first.extra["handed_back"] == n - first.extra["spent"]


def test_longer_window_recognises_the_uncovered_background():
    video, path, n = moving_object_video()
    result = run_video_compressor(create_compressor("progressive", window=2), video, n + 5)
    for t in range(2, video.num_frames):  # frame t-2 still shows the cell the object just left
        assert result.frames[t].extra["novel"] == 1
        assert path[t] in result.frames[t].selection.indices.tolist()


def two_scene_video(dim=32, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    a, b = unit(g, n, dim) + unit(g, dim), unit(g, n, dim) - unit(g, dim)
    frames = [frame(a + 0.01 * torch.randn(n, dim, generator=g), rows=4) for _ in range(4)]
    frames += [frame(b + 0.01 * torch.randn(n, dim, generator=g), rows=4) for _ in range(4)]
    return VideoTokens(frames)


def test_scene_cut_is_a_boosted_keyframe():
    video = two_scene_video()
    result = run_video_compressor(create_compressor("progressive"), video, 40)
    assert [r.keyframe for r in result.frames] == [True, False, False, False, True, False, False, False]
    base = [r.extra["base_budget"] for r in result.frames]
    assert base == [8, 4, 4, 4, 8, 4, 4, 4]  # weights 2:1, 40 tokens
    assert result.frames[4].extra["novel"] == 16  # memory reset at the cut: nothing folded into the old scene
    assert result.frames[4].extra["folded"] == 0
    assert result.frames[4].budget == 16  # its base plus what frames 1-3 (all redundant) carried forward
    assert result.frames[4].extra["carried_in"] == 12
    assert result.num_kept == 40
    # nothing of scene 2 points into scene 1
    for record in result.frames[4:]:
        assert all(f >= 4 for f, _ in record.extra["folded_into"].values())
    boosted = run_video_compressor(create_compressor("progressive", keyframe_boost=3.0), video, 48)
    assert [r.extra["base_budget"] for r in boosted.frames] == [12, 4, 4, 4, 12, 4, 4, 4]


def test_all_identical_video_keeps_the_first_frame_and_nothing_else():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 16, generator=g)
    video = VideoTokens([frame(x, rows=3) for _ in range(5)])
    result = run_video_compressor(create_compressor("progressive"), video, 12)
    assert [r.budget for r in result.frames] == [12, 0, 0, 0, 0]
    assert result.frames[0].extra["base_budget"] == 4  # 12 * 2/6; the rest was carried and handed back
    assert result.frames[0].extra["handed_back"] == 8
    assert [r.extra["carried_in"] for r in result.frames] == [0, 0, 2, 4, 6]
    for t in range(1, 5):
        assert result.frames[t].selection.num_kept == 0
        assert result.frames[t].extra["folded_into"] == {i: (0, i) for i in range(12)}
    torch.testing.assert_close(result.frames[0].selection.features, x)
    # more budget than distinct content: the exact total still holds, the surplus goes to frame 1 in index order
    more = run_video_compressor(create_compressor("progressive"), video, 15)
    assert [r.budget for r in more.frames] == [12, 3, 0, 0, 0]
    assert more.frames[1].selection.indices.tolist() == [0, 1, 2]
    assert more.frames[2].extra["folded_into"][0] == (1, 0)  # now folds into the newer output of that content
    assert more.frames[2].extra["folded_into"][5] == (0, 5)


# ----------------------------------------------------------------------------------------------- golden fold
@pytest.mark.parametrize("beta, expected", [(0.6, 0.28), (0.5, 0.3), (0.9, 0.087), (0.0, 0.3)])
def test_fold_rule_with_beta_floor(beta, expected):
    """Frame t shows a_t (a drifting copy of a) and one new token. a0 = e0, a1 = e0 + 0.3 e4, a2 = e0 + 0.6 e4.

    Frame 1: a1 folds into a0, c = 1: w = max(1/2, beta); m = w a0 + (1 - w) a1.
    Frame 2: a2 matches a1 (frame 1), whose output is a0: c = 2: w = max(2/3, beta); m = w m + (1 - w) a2.
    beta = 0.6: m1 = e0 + 0.12 e4, m2 = e0 + (2/3 * 0.12 + 0.2) e4 = e0 + 0.28 e4 (the plain mean would be 0.3).
    """
    e = torch.eye(5)
    a = [e[0], e[0] + 0.3 * e[4], e[0] + 0.6 * e[4]]
    others = [e[1], e[2], e[3]]
    video = VideoTokens([frame(torch.stack([a[t], others[t]])) for t in range(3)])
    compressor = create_compressor("progressive", beta=beta, cut_threshold=0.05)
    result = run_video_compressor(compressor, video, 4)  # base budgets 2:1:1 -> [2, 1, 1]
    assert [r.selection.indices.tolist() for r in result.frames] == [[0, 1], [1], [1]]
    assert result.frames[1].extra["folded_into"] == {0: (0, 0)}
    assert result.frames[2].extra["folded_into"] == {0: (0, 0)}
    assert result.frames[0].extra["absorbed_later"].tolist() == [2, 0]
    torch.testing.assert_close(result.frames[0].selection.features[0], e[0] + expected * e[4])
    torch.testing.assert_close(result.frames[0].selection.features[1], e[1])
    # the same fold as coefficients over a0, a1, a2 (flat tokens 0, 2, 4): w1 = max(1/2, beta), w2 = max(2/3, beta)
    w1, w2 = max(0.5, beta), max(2 / 3, beta)
    flat = result.flat(video)
    assert [g.tolist() for g in flat.groups] == [[0, 2, 4], [1], [3], [5]]
    torch.testing.assert_close(flat.weights[0], torch.tensor([w1 * w2, (1 - w1) * w2, 1 - w2]))
    assert [w.tolist() for w in flat.weights[1:]] == [[1.0], [1.0], [1.0]]
    assert_video_weights_exact(result, video)
    # frame 0's output absorbed later frames: its per-frame groups cannot state the merge, so no per-frame weights
    assert result.frames[0].selection.weights is None
    assert [w.tolist() for w in result.frames[1].selection.weights] == [[1.0]]


def test_same_frame_merge_is_the_mean_and_groups_are_per_frame():
    e = torch.eye(4)
    x = torch.stack([e[0], e[0] + 0.1 * e[1], e[2], e[3]])  # token 1 is nearest to token 0
    sel = run_compressor(create_compressor("progressive"), frame(x, rows=2), 3)
    assert sel.indices.tolist() in ([0, 2, 3], [1, 2, 3])  # one of the near-duplicates, and both others
    assert [g.tolist() for g in sel.groups] == [[0, 1], [2], [3]]
    torch.testing.assert_close(sel.features[0], (x[0] + x[1]) / 2)
    torch.testing.assert_close(sel.features[1:], x[2:])
    assert [w.tolist() for w in sel.weights] == [[0.5, 0.5], [1.0], [1.0]]  # an image: uniform group means
    assert_weights_exact(sel, x)


# --------------------------------------------------------------------------------------------- exact budgets
@st.composite
def video_case(draw):
    num_frames = draw(st.integers(1, 6))
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dim = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    repeat = draw(st.floats(0.0, 1.0))  # chance a frame repeats (a noisy copy of) the previous one
    ratio = draw(st.booleans())
    budget = draw(st.floats(0.01, 1.0)) if ratio else draw(st.integers(1, num_frames * rows * cols + 5))
    window = draw(st.integers(1, 3))
    with_signal = draw(st.booleans())
    return num_frames, rows, cols, dim, seed, repeat, budget, window, with_signal


@settings(max_examples=40, deadline=None)
@given(case=video_case())
def test_budgets_sum_exactly_for_random_videos(case):
    num_frames, rows, cols, dim, seed, repeat, budget, window, with_signal = case
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    frames, x = [], torch.randn(n, dim, generator=g)
    for _ in range(num_frames):
        if float(torch.rand(1, generator=g)) >= repeat:
            x = torch.randn(n, dim, generator=g)
        else:
            x = x + 0.05 * torch.randn(n, dim, generator=g)
        signals = {Signal(SignalKind.CLS_ATTENTION, 22): torch.rand(n, generator=g)} if with_signal else {}
        frames.append(frame(x.clone(), rows=rows, signals=signals))
    video = VideoTokens(frames)
    compressor = create_compressor("progressive", window=window)
    result = run_video_compressor(compressor, video, budget)  # validates per frame and in total
    expected = min(video.num_tokens, budget if isinstance(budget, int) else max(1, round(budget * video.num_tokens)))
    assert result.budget == expected == result.num_kept
    assert sum(r.extra["base_budget"] for r in result.frames) == expected
    for record, fr in zip(result.frames, video.frames):
        assert record.budget == record.num_kept == record.extra["spent"] + record.extra["handed_back"]
        sel = record.selection
        assert sel.features.shape == (sel.num_kept, dim) and sel.scores.shape == (n,)
        # every token of the frame is accounted for exactly once: kept/merged here, folded earlier, or dropped
        in_groups = torch.cat(list(sel.groups)).tolist() if sel.groups else []
        assert len(in_groups) == len(set(in_groups))
        accounted = set(in_groups) | set(record.extra["folded_into"]) | set(record.extra["dropped"])
        assert accounted == set(range(n))
        assert len(in_groups) + record.extra["folded"] + len(record.extra["dropped"]) == n
        assert record.extra["dropped"] == []  # budget >= 1 keeps frame 0, so every later frame has a memory
    again = run_video_compressor(compressor, video, budget)
    assert [r.selection.indices.tolist() for r in again.frames] == [r.selection.indices.tolist() for r in result.frames]
    flat = result.flat(video)
    assert flat.num_kept == expected
    assert_video_weights_exact(result, video)


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_merge_weights_replay_the_features_on_random_videos(beta):
    """Seeded videos that repeat themselves (so tokens fold across frames, into outputs that are themselves
    group means), with scene cuts and tight budgets (forced folds): weights reproduce the features exactly."""
    folded = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        num_frames, rows, cols, dim = 2 + seed % 5, 1 + seed % 3, 2 + seed % 4, 8
        n = rows * cols
        x, frames = torch.randn(n, dim, generator=g), []
        for _ in range(num_frames):
            if float(torch.rand(1, generator=g)) < 0.2:
                x = torch.randn(n, dim, generator=g)  # a cut
            else:
                x = x + 0.1 * torch.randn(n, dim, generator=g)
            frames.append(frame(x.clone(), rows=rows))
        video = VideoTokens(frames)
        for budget in (1, num_frames, n + 1, (num_frames * n) // 2):
            compressor = create_compressor("progressive", beta=beta, window=1 + seed % 2, merge_threshold=0.9)
            result = run_video_compressor(compressor, video, budget)
            assert_video_weights_exact(result, video)
            folded += sum(int(r.extra["absorbed_later"].sum()) for r in result.frames)
            # what the integration does with another feature set of the same tokens (Qwen3-VL deepstack)
            flat = result.flat(video)
            level = torch.randn(video.num_tokens, 3, generator=g)
            replay = torch.stack([w @ level[grp] for grp, w in zip(flat.groups, flat.weights)])
            assert replay.shape == (flat.num_kept, 3)
    assert folded > 0  # the seeds exercise cross-frame folds


def test_image_weights_are_uniform_group_means():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 8, generator=g)
    for k in (1, 5, 19, 20):
        sel = run_compressor(create_compressor("progressive"), frame(x, rows=4), k)
        assert_weights_exact(sel, x)
        for group, weight in zip(sel.groups, sel.weights):
            torch.testing.assert_close(weight, torch.full((group.numel(),), 1.0 / group.numel()))


def test_tiny_budget_forces_folds_instead_of_losing_tokens():
    g = torch.Generator().manual_seed(3)
    video = VideoTokens([frame(torch.randn(4, 8, generator=g)) for _ in range(5)])  # every frame a cut
    result = run_video_compressor(create_compressor("progressive"), video, 2)
    assert [r.budget for r in result.frames] == [1, 1, 0, 0, 0]
    for record in result.frames[2:]:
        assert record.extra["forced"] == 4 and len(record.extra["folded_into"]) == 4
        assert record.extra["dropped"] == []


# ------------------------------------------------------------------------------------------------ query term
def test_query_weight_moves_budget_to_relevant_frames():
    g = torch.Generator().manual_seed(4)
    dim, n = 32, 9
    frames = [frame(unit(g, n, dim) + 3 * unit(g, dim), rows=3) for _ in range(4)]  # every frame a scene of its own
    query = frames[2].features[:2] + 0.01 * torch.randn(2, dim, generator=g)
    agnostic = run_video_compressor(create_compressor("progressive"), VideoTokens(frames, query=query), 16)
    assert [r.extra["base_budget"] for r in agnostic.frames] == [4, 4, 4, 4]  # query ignored at weight 0
    aware = run_video_compressor(create_compressor("progressive", query_weight=1.0), VideoTokens(frames, query=query),
                                 16)
    base = [r.extra["base_budget"] for r in aware.frames]
    assert sum(base) == 16 and base[2] == max(base) and base[2] > 4
    scored = run_video_compressor(create_compressor("progressive", query_weight=1.0),
                                  VideoTokens(frames, frame_scores=torch.tensor([0.0, 0.0, 1.0, 1.0])), 16)
    assert [r.extra["base_budget"] for r in scored.frames] == [0, 0, 8, 8]
    assert create_compressor("progressive", query_weight=0.5).uses_query
    assert not create_compressor("progressive").uses_query


# ------------------------------------------------------------------------------------------ image, signals, input
def test_single_image_is_saliency_times_diversity():
    g = torch.Generator().manual_seed(5)
    n, dim = 16, 8
    x = torch.randn(n, dim, generator=g)
    x[1] = x[0]  # a duplicate: diversity never keeps both while other tokens remain
    saliency = torch.full((n,), 0.01)
    saliency[[0, 1, 7]] = 1.0
    tokens = VisualTokens(features=x, grid=(4, 4), signals={Signal(SignalKind.CLS_ATTENTION, 22): saliency})
    compressor = create_compressor("progressive")
    for k in (1, 3, 8, n):
        sel = run_compressor(compressor, tokens, k)
        assert sel.num_kept == k and sel.features.shape == (k, dim)
    top3 = run_compressor(compressor, tokens, 3).indices.tolist()
    assert 7 in top3 and len({0, 1} & set(top3)) == 1
    assert run_compressor(compressor, tokens, 1.0).indices.tolist() == list(range(n))
    torch.testing.assert_close(run_compressor(compressor, tokens, 1.0).features, x)


def test_weighted_maxmin_prefers_weight_and_spreads():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.99, 0.1], [0, 1.0], [-1.0, 0.05]]), dim=-1)
    order = weighted_maxmin(x, torch.tensor([1.0, 1.0, 0.1, 0.5]), 2).tolist()
    assert order == [3, 0] or order == [0, 3]
    assert weighted_maxmin(x, torch.ones(4), 4).tolist() == [0, 1, 2, 3]
    assert weighted_maxmin(x, torch.ones(4), 0).numel() == 0


def test_signals_declared():
    assert Progressive().signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 22),)
    assert Progressive().signals(QWEN25) == (Signal(SignalKind.RECEIVED_ATTENTION, 31),)


@pytest.mark.parametrize("options", [
    {"cut_threshold": 0.0}, {"cut_threshold": 1.5}, {"merge_threshold": -0.1}, {"merge_threshold": float("nan")},
    {"window": 0}, {"window": 1.5}, {"window": True}, {"keyframe_boost": 0.5}, {"gamma": -1.0}, {"eta": -0.5},
    {"eps": -0.1}, {"beta": 1.2}, {"query_weight": 2.0}, {"merge_threshold": "0.8"},
])
def test_bad_options(options):
    with pytest.raises(ValueError, match="progressive"):
        create_compressor("progressive", **options)


def test_bad_budget_and_signal():
    video = VideoTokens([frame(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="budget"):
        Progressive().select_video(video, -1)
    with pytest.raises(ValueError, match="budget"):
        run_video_compressor(Progressive(), video, 0)
    bad = VisualTokens(features=torch.randn(4, 3), grid=(2, 2),
                       signals={Signal(SignalKind.CLS_ATTENTION, 22): torch.rand(5)})
    with pytest.raises(ValueError, match="saliency"):
        run_compressor(Progressive(), bad, 2)
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("progressive", windows=2)
