"""The ``fastvid`` video compressor (docs/methods/fastvid.md): DySeg cuts, STPrune quotas, DPC-kNN and DTM merge
weights derived by hand; exact budgets, stated merges and determinism as properties; signals and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import (
    Signal,
    SignalKind,
    VisualTokens,
    create_compressor,
    run_compressor,
)
from vtc.compressors.fastvid import (
    FastVID,
    FastVIDDetails,
    FastVIDFrameDetails,
    allocate_segment,
    anchor_frames,
    dpc_knn,
    dtm_weight,
    dyseg_cuts,
    quota_frames,
    segment_bounds,
)
from vtc.video import VideoTokens, run_video_compressor
from helpers import CLIP_L, QWEN25

SIGNAL = Signal(SignalKind.RECEIVED_ATTENTION, 31)


def frame(features, attention=None, rows: int = 1) -> VisualTokens:
    features = torch.as_tensor(features, dtype=torch.float32)
    n = features.shape[0]
    if attention is None:
        attention = torch.zeros(n)
    return VisualTokens(features=features, grid=(rows, n // rows),
                        signals={SIGNAL: torch.as_tensor(attention, dtype=torch.float32)})


def assert_stated_merges(result, video: VideoTokens):
    """Every output's feature is ``weights @ X[groups]`` (flat, and per frame where stated), coefficients sum to 1,
    and every output's group contains the output itself."""
    flat = result.flat(video)
    x = torch.cat([f.features for f in video.frames])
    features = flat.features if flat.features is not None else x[flat.indices]
    groups = flat.groups
    weights = flat.weights if flat.weights is not None else tuple(torch.ones(1) for _ in groups)
    for index, feature, group, weight in zip(flat.indices.tolist(), features, groups, weights):
        assert index in group.tolist() and group.tolist() == sorted(set(group.tolist()))
        torch.testing.assert_close(weight @ x[group], feature, rtol=1e-5, atol=1e-5)
        assert float(weight.sum()) == pytest.approx(1.0, abs=1e-5)
    for record, fr in zip(result.frames, video.frames):
        sel = record.selection
        if sel.weights is not None:
            for feature, group, weight in zip(sel.features, sel.groups, sel.weights):
                torch.testing.assert_close(weight @ fr.features[group], feature, rtol=1e-5, atol=1e-5)


# ================================================================================================ DySeg (golden)
def six_frame_video() -> VideoTokens:
    """Six frames of two tokens ``g + e`` and ``g - e``: the frame means are exactly the hand-chosen ``g_t``
    (the tokens themselves point elsewhere, so only the mean can give the cosines below)."""
    means = [(1, 0), (1, 0), (3, 4), (4, 3), (4, 3), (0, 1)]
    frames = []
    for gx, gy in means:
        e = (5.0, -7.0)
        frames.append(frame([[gx + e[0], gy + e[1]], [gx - e[0], gy - e[1]]], attention=[0.6, 0.4]))
    return VideoTokens(frames)


# cos(g_t, g_{t+1}) by hand: (1,0).(1,0) = 1; (1,0).(3,4)/5 = 0.6; (3,4).(4,3)/25 = 24/25 = 0.96; 1; (4,3).(0,1)/5 = 0.6
SIX_SIMILARITIES = [1.0, 0.6, 0.96, 1.0, 0.6]


@pytest.mark.parametrize("min_segments, threshold, cuts, segments", [
    # tau = 0.9 alone: the steps below it are 1 and 4 (0.6 each) -> [0,2) [2,5) [5,6)
    (1, 0.9, [1, 4], [(0, 2), (2, 5), (5, 6)]),
    # c = 3: the 2 smallest (steps 1 and 4) are cuts anyway -> the same
    (3, 0.9, [1, 4], [(0, 2), (2, 5), (5, 6)]),
    # c = 4: the 3rd smallest (0.96, step 2) joins -> [0,2) [2,3) [3,5) [5,6)
    (4, 0.9, [1, 2, 4], [(0, 2), (2, 3), (3, 5), (5, 6)]),
    # tau = 0.97 > 0.96: step 2 is below it
    (1, 0.97, [1, 2, 4], [(0, 2), (2, 3), (3, 5), (5, 6)]),
    # tau = 0.5 and c = 1: nothing is below 0.5, no forced cut -> one segment
    (1, 0.5, [], [(0, 6)]),
    # c = 8 > T: every one of the 5 steps is a forced cut -> one frame per segment (the reference's topk would fail)
    (8, -1.0, [0, 1, 2, 3, 4], [(t, t + 1) for t in range(6)]),
])
def test_dyseg_boundaries_on_six_hand_chosen_frame_means(min_segments, threshold, cuts, segments):
    video = six_frame_video()
    c = create_compressor("fastvid", min_segments=min_segments, cut_threshold=threshold)
    result = run_video_compressor(c, video, 6)
    details = result.details
    assert isinstance(details, FastVIDDetails)
    assert details.similarities.tolist() == pytest.approx(SIX_SIMILARITIES, abs=1e-12)
    assert list(details.cuts) == cuts
    assert list(details.segments) == segments
    assert [r.keyframe for r in result.frames] == [any(a == t for a, _ in segments) for t in range(6)]
    assert [r.extra["segment"] for r in result.frames] == [i for i, (a, b) in enumerate(segments) for _ in range(a, b)]


def test_dyseg_cuts_ties_go_to_the_earlier_step():
    # steps 1 and 3 tie at 0.5: with one forced cut (c = 2) and tau below both, the earlier step wins
    assert dyseg_cuts(torch.tensor([0.9, 0.5, 0.8, 0.5]), 2, 0.0) == [1]
    assert dyseg_cuts(torch.tensor([0.9, 0.5, 0.8, 0.5]), 3, 0.0) == [1, 3]
    assert dyseg_cuts(torch.tensor([0.9, 0.5, 0.8, 0.5]), 4, 0.0) == [1, 2, 3]
    assert dyseg_cuts(torch.zeros(0), 8, 0.9) == []  # one frame: no step
    assert segment_bounds(1, []) == [(0, 1)]
    assert segment_bounds(5, [0, 3]) == [(0, 1), (1, 4), (4, 5)]


def test_segment_ignore_collapses_runs_and_only_their_last_frame_has_a_quota():
    # segment [2, 5) of the six-frame video: steps 2 (0.96) and 3 (1.0)
    inside = torch.tensor([0.96, 1.0], dtype=torch.float64)
    assert quota_frames(inside, None) == [True, True, True]
    assert quota_frames(inside, 0.95) == [False, False, True]  # both steps >= 0.95: one run, its last frame
    assert quota_frames(inside, 0.99) == [True, False, True]  # 0.96 < 0.99 ends the first run
    # anchors: among the quota frames v_0..v_{V-1}, (V - 1 - j) % p == 0 (from the end)
    assert anchor_frames([True] * 5, 4) == [True, False, False, False, True]
    assert anchor_frames([True] * 3, 4) == [False, False, True]
    assert anchor_frames([True] * 3, 2) == [True, False, True]
    assert anchor_frames([True, False, True], 4) == [False, False, True]
    assert anchor_frames([True] * 3, 1) == [True, True, True]


# ================================================================================================ STPrune (golden)
def test_salient_context_split_per_segment():
    # R = 10 over 2 quota frames of 10 tokens, p = 4: C = floor(10 * 0.4) = 4 -> the anchor (the last frame,
    # (2 - 1 - 1) % 4 == 0), S = 6 -> 3 + 3
    assert allocate_segment(10, [10, 10], [True, True], [False, True], 0.4) == ([3, 3], [0, 4], [0, 0])
    # R = 15, 3 frames, one anchor (the last): C = 6 but at most 10 // 2 = 5; S = 9 -> 3 each (caps 10, 10, 5);
    # the 1 token the cap left over goes to the first quota frame with room as overflow
    assert allocate_segment(15, [10] * 3, [True] * 3, [False, False, True], 0.4) == ([3, 3, 3], [0, 0, 5], [1, 0, 0])
    # p = 2 (anchors: frames 0 and 2): R = 18 -> C = floor(7.2) = 7 = 4 (latest anchor) + 3; S = 11 -> 4 + 4 + 3
    assert allocate_segment(18, [10] * 3, [True] * 3, [True, False, True], 0.4) == ([4, 4, 3], [3, 0, 4], [0, 0, 0])
    # segment_ignore left frames 0 and 2 with a quota (anchor: frame 2): C = 6 -> 5 (cap); S = 9 -> 5 + 4
    # (remainder to the earliest); 1 left -> frame 0 (room 5) before frame 2 (room 1)
    assert allocate_segment(15, [10] * 3, [True, False, True], [False, False, True], 0.4) == \
        ([5, 0, 4], [0, 0, 5], [1, 0, 0])
    # the quota frames cannot hold the budget: only frame 2 has a quota, R = 24 = C 9 -> 5 (cap) + S 15 -> 5
    # (cap 10 - 5); the 14 left go to the collapsed frames 0 and 1, 7 each
    assert allocate_segment(24, [10] * 3, [False, False, True], [False, False, True], 0.4) == \
        ([0, 0, 5], [0, 0, 5], [7, 7, 0])
    # d = 0: no context at all; d = 1: everything to the anchor up to its cap, the rest as overflow
    assert allocate_segment(6, [4, 4], [True, True], [False, True], 0.0) == ([3, 3], [0, 0], [0, 0])
    # (d = 1: C = 6 -> 2 (cap 4 // 2); the 4 left are overflow, evenly over the frames with room: 2 + 2)
    assert allocate_segment(6, [4, 4], [True, True], [False, True], 1.0) == ([0, 0], [0, 2], [2, 2])
    # floor(R * d) on decimal ratios: 100 * 0.57 = 56.99999999999999 in floating point, but C = 57
    assert allocate_segment(100, [200, 200], [True, True], [False, True], 0.57)[1] == [0, 57]


def test_segment_budgets_follow_the_token_counts_and_frames_get_their_quotas():
    # six frames of 10 tokens, segments [0,2) [2,5) [5,6) (c = 1, tau = 0.9): budget 30 -> 10 / 15 / 5
    means = [(1, 0), (1, 0), (3, 4), (4, 3), (4, 3), (0, 1)]
    g = torch.Generator().manual_seed(0)
    frames = []
    for gx, gy in means:
        noise = 0.01 * torch.randn(10, 2, generator=g)
        frames.append(frame(torch.tensor([gx, gy], dtype=torch.float32) + noise - noise.mean(0),
                            attention=torch.rand(10, generator=g), rows=2))
    video = VideoTokens(frames)
    result = run_video_compressor(create_compressor("fastvid", min_segments=1), video, 30)
    d = result.details
    assert d.segment_budgets == (10, 15, 5)
    # [0,2): C = 4 on frame 1, S = 3 + 3; [2,5): as test_salient_context_split_per_segment (5 + overflow 1 on
    # frame 2); [5,6): C = floor(5 * 0.4) = 2, S = 3
    assert d.salient_budgets == (3, 3, 3, 3, 3, 3)
    assert d.context_budgets == (0, 4, 0, 0, 5, 2)
    assert d.overflow == (0, 0, 1, 0, 0, 0)
    assert d.anchors == (False, True, False, False, True, True)
    assert [r.budget for r in result.frames] == [3, 7, 4, 3, 8, 5]
    for record, fr in zip(result.frames, video.frames):
        det = record.selection.details
        assert isinstance(det, FastVIDFrameDetails)
        # salient = the top attention of the frame (overflow included)
        top = torch.sort(fr.signals[SIGNAL], descending=True, stable=True).indices[:det.salient.numel()]
        assert det.salient.tolist() == sorted(top.tolist())
        assert det.context.numel() == d.context_budgets[record.frame]
        assert set(det.salient.tolist()).isdisjoint(det.context.tolist())
    # Qwen's DySeg_ignore: the segment [2,5) has steps 0.96 and 1.0 -> only frame 4 has a quota
    ignored = run_video_compressor(create_compressor("fastvid", min_segments=1, segment_ignore=0.95), video, 30)
    d = ignored.details
    assert d.quota == (False, True, False, False, True, True)  # [0,2): step 0 has cosine 1 >= 0.95 as well
    # [2,5): R = 15 on frame 4 alone: C = 6 -> 5 (cap), S = 9 -> 10 - 5 = 5; 5 left -> frames 2 and 3 (3 + 2)
    assert d.salient_budgets[2:5] == (0, 0, 5) and d.context_budgets[2:5] == (0, 0, 5)
    assert d.overflow[2:5] == (3, 2, 0)
    assert ignored.num_kept == 30


# ================================================================================================ DPC-kNN (golden)
def test_dpc_knn_on_five_points_by_hand():
    # five points on the x axis at 0, 1, 3, 7, 8 (D = 2): d_ij^2 = dx^2 / 2
    #   P0: [0, .5, 4.5, 24.5, 32]   4 nearest incl. itself: 0 .5 4.5 24.5 -> mean 7.375
    #   P1: [.5, 0, 2, 18, 24.5]                             0 .5 2 18      -> 5.125
    #   P2: [4.5, 2, 0, 8, 12.5]                             0 2 4.5 8      -> 3.625
    #   P3: [24.5, 18, 8, 0, .5]                             0 .5 8 18      -> 6.625
    #   P4: [32, 24.5, 12.5, .5, 0]                          0 .5 12.5 24.5 -> 9.375
    # density order P2 > P1 > P3 > P0 > P4; delta: P2 (densest) = max d = sqrt(32); P1 -> P2: sqrt(2);
    # P3 -> {P2, P1}: sqrt(8); P0 -> {P2, P1, P3}: sqrt(.5) (to P1); P4 -> everyone: sqrt(.5) (to P3)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0], [8.0, 0.0]])
    rho, delta, score = dpc_knn(x)
    expected_rho = [math.exp(-v) for v in (7.375, 5.125, 3.625, 6.625, 9.375)]
    expected_delta = [math.sqrt(v) for v in (0.5, 2.0, 32.0, 8.0, 0.5)]
    assert rho.tolist() == pytest.approx(expected_rho, rel=1e-5)
    assert delta.tolist() == pytest.approx(expected_delta, rel=1e-5)
    assert score.tolist() == pytest.approx([r * d for r, d in zip(expected_rho, expected_delta)], rel=1e-5)
    # scores: P2 0.1507 > P1 0.00841 > P3 0.00375 > P0 0.00044 > P4 0.00006
    assert torch.argsort(score, descending=True).tolist() == [2, 1, 3, 0, 4]
    # batched: the same per item
    rho_b, delta_b, _ = dpc_knn(torch.stack([x, x.flip(0)]))
    assert rho_b[0].tolist() == pytest.approx(expected_rho, rel=1e-5)
    assert rho_b[1].tolist() == pytest.approx(expected_rho[::-1], rel=1e-5)
    assert delta_b[0].tolist() == pytest.approx(expected_delta, rel=1e-5)


def test_dpc_knn_equal_densities_rank_by_index():
    # a 2 x 2 square (0,0) (2,0) (0,2) (2,2) and a far point (6,0): d^2 = |dx|^2 / 2
    #   corners: 4 nearest incl. itself = 0, 2, 2, 4 -> rho = e^-2 each (an exact tie); far point: 0, 8, 10, 18 -> e^-9
    # the tie is broken by index: corner 0 is the densest (delta = max d = sqrt(20), corner 2 to the far point);
    # corner 1 -> corner 0: sqrt(2); corner 2 -> {0, 1}: sqrt(2); corner 3 -> {0, 1, 2}: sqrt(2); far -> sqrt(8)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [6.0, 0.0]])
    rho, delta, score = dpc_knn(x)
    assert rho.tolist() == pytest.approx([math.exp(-2)] * 4 + [math.exp(-9)], rel=1e-6)
    assert delta.tolist() == pytest.approx([math.sqrt(20), math.sqrt(2), math.sqrt(2), math.sqrt(2), math.sqrt(8)],
                                           rel=1e-6)
    assert score[1] == score[2] == score[3]  # exact ties, resolved towards the lower index by the top-k
    assert dpc_knn(torch.zeros(1, 3))[2].tolist() == [0.0]  # one candidate: no distance at all
    assert dpc_knn(torch.zeros(0, 3))[0].numel() == 0


# ================================================================================================ DTM (golden)
def two_frame_segment():
    """Frame 0 (no anchor): u0 = (5,0), u1 = (1,.2) salient (attention), u2 = (.2,1), u3 = (1,.1).
    Frame 1 (the anchor): v0 = (0,5) salient; candidates v1 = (1,0), v2 = (0,1), v3 = (1,1)."""
    f0 = frame([[5.0, 0.0], [1.0, 0.2], [0.2, 1.0], [1.0, 0.1]], attention=[0.5, 0.4, 0.05, 0.05])
    f1 = frame([[0.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], attention=[0.7, 0.1, 0.1, 0.1])
    return VideoTokens([f0, f1])


def test_dtm_merge_weights_by_hand():
    # one segment (c = 1, tau = -1), budget 5: C = floor(5 * .4) = 2 on the anchor (frame 1, cap 4 // 2 = 2),
    # S = 3 -> 2 (frame 0: u0, u1) + 1 (frame 1: v0)
    # DPC on v1, v2, v3 (3 candidates, 3 "nearest" incl. itself): d^2 v1v2 = 1, v1v3 = v2v3 = .5
    #   rho: v1 = v2 = e^-(0+.5+1)/3 = e^-.5, v3 = e^-(0+.5+.5)/3 = e^-1/3 (densest)
    #   delta: v3 = max d = 1; v1 -> v3: sqrt(.5); v2 -> {v3, v1}: sqrt(.5)
    #   score: v3 .7165, v1 = v2 = .4289 (tie -> v1) => context v1, v3
    # loose tokens u2, u3, v2 join their most similar target (cosine): u2 = (.2, 1) -> v3; u3 = (1, .1) -> v1;
    # v2 = (0, 1) -> v3.  v1 absorbs 1: w = max(1/2, .6) = .6 -> .6 v1 + .4 u3 = (1, .04)
    #                     v3 absorbs 2: w = max(1/3, .6) = .6 -> .6 v3 + .2 u2 + .2 v2 = (.64, 1.0)
    video = two_frame_segment()
    c = create_compressor("fastvid", min_segments=1, cut_threshold=-1.0)
    result = run_video_compressor(c, video, 5)
    assert result.details.segments == ((0, 2),)
    f0, f1 = result.frames
    assert f0.selection.indices.tolist() == [0, 1] and f0.selection.features is None
    assert f1.selection.indices.tolist() == [0, 1, 3]
    assert f1.selection.details.context.tolist() == [1, 3]
    torch.testing.assert_close(f1.selection.features, torch.tensor([[0.0, 5.0], [1.0, 0.04], [0.64, 1.0]]))
    flat = result.flat(video)  # flat indices: u0..u3 = 0..3, v0..v3 = 4..7
    assert flat.indices.tolist() == [0, 1, 4, 5, 7]
    assert [g.tolist() for g in flat.groups] == [[0], [1], [4], [3, 5], [2, 6, 7]]
    assert [w.tolist() for w in flat.weights] == [pytest.approx(v) for v in
                                                   ([1.0], [1.0], [1.0], [0.4, 0.6], [0.2, 0.2, 0.6])]
    # per frame: frame 1's outputs absorbed tokens of frame 0, so its groups list its own tokens and no weights
    assert [g.tolist() for g in f1.selection.groups] == [[0], [1], [2, 3]] and f1.selection.weights is None
    assert f1.selection.details.absorbed.tolist() == [0, 1, 2]
    assert_stated_merges(result, video)
    # beta = .3: v1's w = max(1/2, .3) = .5 (mean of v1 and u3); v3's w = max(1/3, .3) = 1/3: the plain mean
    low = run_video_compressor(create_compressor("fastvid", min_segments=1, cut_threshold=-1.0, beta=0.3), video, 5)
    torch.testing.assert_close(low.frames[1].selection.features[1:],
                               torch.tensor([[1.0, 0.05], [0.4, 1.0]]))
    assert [w.tolist() for w in low.flat(video).weights][3:] == [pytest.approx([0.5, 0.5]),
                                                                 pytest.approx([1 / 3] * 3)]


def test_dtm_every_anchor_gets_its_own_merge_of_the_loose_tokens():
    # p = 1: both frames are anchors. C = 2 -> 1 + 1, S = 3 -> 2 (frame 0: u0, u1) + 1 (frame 1: v0).
    # frame 0's candidates u2, u3: equal densities (two points), u2 the denser by index; both scores = rho * d(u2,u3)
    # -> tie -> u2. Frame 1: v3 as before. Loose: u3, v1, v2 -- each joins u2 (anchor 0's only target) AND v3:
    # u2' = .6 u2 + .4/3 (u3 + v1 + v2), v3' = .6 v3 + .4/3 (u3 + v1 + v2)
    video = two_frame_segment()
    c = create_compressor("fastvid", min_segments=1, cut_threshold=-1.0, anchor_spacing=1)
    result = run_video_compressor(c, video, 5)
    assert result.details.anchors == (True, True)
    assert result.frames[0].selection.indices.tolist() == [0, 1, 2]
    assert result.frames[1].selection.indices.tolist() == [0, 3]
    flat = result.flat(video)
    assert flat.indices.tolist() == [0, 1, 2, 4, 7]
    assert [g.tolist() for g in flat.groups] == [[0], [1], [2, 3, 5, 6], [4], [3, 5, 6, 7]]
    share = 0.4 / 3
    assert flat.weights[2].tolist() == pytest.approx([0.6, share, share, share])
    assert flat.weights[4].tolist() == pytest.approx([share, share, share, 0.6])
    loose = torch.tensor([1.0, 0.1]) + torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0])
    torch.testing.assert_close(flat.features[2], 0.6 * torch.tensor([0.2, 1.0]) + share * loose)
    torch.testing.assert_close(flat.features[4], 0.6 * torch.tensor([1.0, 1.0]) + share * loose)
    assert_stated_merges(result, video)


def test_dtm_weight_rule():
    count = torch.tensor([0, 1, 2, 5])
    assert dtm_weight(count, 0.6).tolist() == pytest.approx([1.0, 0.6, 0.6, 0.6])
    assert dtm_weight(count, 0.0).tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1 / 6])
    assert dtm_weight(count, 1.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])  # targets never move


# ================================================================================================ image mode
def test_image_is_a_one_frame_segment():
    # 10 tokens, k = 5: C = floor(2.0) = 2 density peaks among the 7 non-salient, S = 3 top attention
    g = torch.Generator().manual_seed(3)
    attention = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.05, 0.04, 0.03, 0.02])
    tokens = frame(torch.randn(10, 4, generator=g), attention=attention, rows=2)
    c = create_compressor("fastvid")
    sel = run_compressor(c, tokens, 5)
    assert sel.details.salient.tolist() == [1, 3, 5]
    assert sel.details.context.numel() == 2 and sel.num_kept == 5
    candidates = torch.tensor([0, 2, 4, 6, 7, 8, 9])
    _, _, score = dpc_knn(tokens.features[candidates])
    expected = candidates[torch.sort(score, descending=True, stable=True).indices[:2]]
    assert sel.details.context.tolist() == sorted(expected.tolist())
    assert sel.weights is not None  # one frame: the merge is stated per frame
    torch.testing.assert_close(torch.stack([w @ tokens.features[gr] for w, gr in zip(sel.weights, sel.groups)]),
                               sel.features)
    assert torch.equal(sel.scores, attention)


# ================================================================================================ properties
@st.composite
def video_case(draw):
    num = draw(st.integers(1, 7))
    sizes = [draw(st.sampled_from([1, 2, 4, 6, 9])) for _ in range(num)]
    dim = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2 ** 16))
    total = sum(sizes)
    budget = draw(st.integers(1, total))
    options = {
        "min_segments": draw(st.integers(1, 8)),
        "cut_threshold": draw(st.sampled_from([-1.0, 0.5, 0.9, 0.99])),
        "context_ratio": draw(st.sampled_from([0.0, 0.4, 0.75, 1.0])),
        "anchor_spacing": draw(st.integers(1, 4)),
        "beta": draw(st.sampled_from([0.0, 0.6, 1.0])),
        "segment_ignore": draw(st.sampled_from([None, 0.5, 0.95])),
    }
    static = draw(st.booleans())  # repeated frames and quantised attention provoke ties everywhere
    return sizes, dim, seed, budget, options, static


def build_video(sizes, dim, seed, static) -> VideoTokens:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(sizes), dim, generator=g)
    frames = []
    for n in sizes:
        x = base[:n].clone() if static else base[:n] + 0.5 * torch.randn(n, dim, generator=g)
        a = torch.rand(n, generator=g)
        frames.append(frame(x, attention=(a * 4).round() / 4 if static else a))
    return VideoTokens(frames)


@settings(max_examples=120, deadline=None)
@given(case=video_case())
def test_exact_budget_sorted_indices_and_stated_merges(case):
    sizes, dim, seed, budget, options, static = case
    video = build_video(sizes, dim, seed, static)
    c = create_compressor("fastvid", **options)
    result = run_video_compressor(c, video, budget)  # validates: per-frame sorted unique indices, exact total
    assert result.num_kept == budget == result.budget
    d = result.details
    assert sum(d.segment_budgets) == budget
    for record in result.frames:
        t = record.frame
        idx = record.selection.indices.tolist()
        assert idx == sorted(set(idx)) and all(0 <= i < sizes[t] for i in idx)
        assert record.budget == d.salient_budgets[t] + d.context_budgets[t] + d.overflow[t]
        if d.context_budgets[t]:
            assert d.anchors[t]
    assert_stated_merges(result, video)
    again = run_video_compressor(c, video, budget)  # deterministic
    assert [r.selection.indices.tolist() for r in again.frames] == [r.selection.indices.tolist() for r in result.frames]
    flat, flat_again = result.flat(video), again.flat(video)
    if flat.features is not None:
        assert torch.equal(flat.features, flat_again.features)


@settings(max_examples=60, deadline=None)
@given(case=video_case())
def test_budget_of_every_token_keeps_everything_unmerged(case):
    sizes, dim, seed, _, options, static = case
    video = build_video(sizes, dim, seed, static)
    result = run_video_compressor(create_compressor("fastvid", **options), video, 1.0)
    assert result.num_kept == video.num_tokens
    assert result.flat_groups is None and result.flat_weights is None
    for record, n in zip(result.frames, sizes):
        assert record.selection.indices.tolist() == list(range(n))
        assert record.selection.features is None
    flat = result.flat(video)
    assert flat.features is None and flat.indices.tolist() == list(range(video.num_tokens))


@settings(max_examples=40, deadline=None)
@given(case=video_case())
def test_one_token_budget(case):
    sizes, dim, seed, _, options, static = case
    video = build_video(sizes, dim, seed, static)
    result = run_video_compressor(create_compressor("fastvid", **options), video, 1)
    assert result.num_kept == 1
    assert_stated_merges(result, video)


def test_identical_frames_still_get_min_segments_segments():
    # c - 1 = 7 forced cuts whatever the content: 16 identical frames -> 8 segments (ties to the earliest steps)
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    video = VideoTokens([frame(x, attention=torch.ones(6)) for _ in range(16)])
    result = run_video_compressor(create_compressor("fastvid"), video, 0.25)
    assert list(result.details.cuts) == list(range(7))
    assert len(result.details.segments) == 8
    assert result.num_kept == 24


# ================================================================================================ signals / options
def test_signals_declare_the_attention_of_the_feature_layer():
    c = create_compressor("fastvid")
    assert isinstance(c, FastVID) and c.video_only and c.handles_video and not c.uses_query
    assert c.signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 22),)
    assert c.signals(QWEN25) == (Signal(SignalKind.RECEIVED_ATTENTION, 31),)
    assert create_compressor("fastvid", layer=-1).signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 23),)
    qwen = create_compressor("fastvid", cut_threshold=0.84, segment_ignore=0.95)  # the reference's Qwen values
    assert qwen.options()["segment_ignore"] == 0.95


def test_missing_attention_names_what_was_captured():
    tokens = VisualTokens(features=torch.randn(4, 2), grid=(2, 2))
    with pytest.raises(KeyError, match="fastvid needs the attention"):
        run_compressor(create_compressor("fastvid"), tokens, 2)


@pytest.mark.parametrize("options, error, match", [
    ({"min_segments": 0}, ValueError, "min_segments"),
    ({"min_segments": 2.5}, (TypeError, ValueError), "min_segments"),
    ({"cut_threshold": 1.5}, ValueError, "cut_threshold"),
    ({"cut_threshold": float("nan")}, ValueError, "cut_threshold"),
    ({"cut_threshold": "0.9"}, (TypeError, ValueError), "cut_threshold"),
    ({"context_ratio": -0.1}, ValueError, "context_ratio"),
    ({"context_ratio": 1.1}, ValueError, "context_ratio"),
    ({"anchor_spacing": 0}, ValueError, "anchor_spacing"),
    ({"anchor_spacing": True}, (TypeError, ValueError), "anchor_spacing"),
    ({"beta": 1.5}, ValueError, "beta"),
    ({"segment_ignore": 2.0}, ValueError, "segment_ignore"),
    ({"segment_ignore": "high"}, (TypeError, ValueError), "segment_ignore"),
    ({"layer": 1.5}, TypeError, "layer"),
])
def test_bad_options_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        create_compressor("fastvid", **options)


def test_bad_budget():
    video = VideoTokens([frame(torch.randn(4, 2))])
    with pytest.raises(ValueError, match="budget"):
        create_compressor("fastvid").select_video(video, -1)
