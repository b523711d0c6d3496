"""The ``dycoke`` video compressor (DyCoke stage 1, TTM; docs/methods/dycoke.md): frame roles, budget inversion,
hand-derived 4- and 6-frame goldens, properties of the exact budget, the one-frame rule and bad input.

Goldens use 2-D features at hand-chosen angles: the cosine of two same-position tokens is ``cos(delta)`` with
``delta`` the angle between them, so "lowest cosine first" is "largest |delta| (folded into [0, 180]) first", which
is read off on paper. Token magnitudes vary on purpose: the cosine ignores them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import VisualTokens, create_compressor, run_compressor
from vtc.compressors.dycoke import (
    DyCoke,
    DyCokeDetails,
    DyCokeFrameDetails,
    dycoke_roles,
    frame_budgets,
    reference_budget,
    reference_keep,
    same_position_cosine,
    uniform_positions,
)
from vtc.video import VideoTokens, run_video_compressor

A, P1, P2 = "anchor", "pass1", "pass2"


def angles_frame(degrees, scales=None) -> VisualTokens:
    """A 2x2 frame whose token ``p`` is ``scale_p * (cos a_p, sin a_p)``."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    x = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)
    if scales is not None:
        x = x * torch.tensor(scales, dtype=torch.float64)[:, None]
    return VisualTokens(features=x.float(), grid=(2, 2))


def kept(result) -> list[list[int]]:
    return [r.selection.indices.tolist() for r in result.frames]


def random_video(num_frames, rows, cols, prefix=0, dim=4, seed=0, ties=False) -> VideoTokens:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols + prefix
    frames = []
    for _ in range(num_frames):
        x = torch.randn(n, dim, generator=g)
        if ties:
            x = x.round()
        frames.append(VisualTokens(features=x, grid=(rows, cols), num_prefix_tokens=prefix))
    return VideoTokens(frames)


# ------------------------------------------------------------------------------------------------- frame roles
def test_roles_follow_the_two_passes_and_the_tail_window():
    # pass 1: every odd t against t - 1; pass 2: t = i + 2 for i in range(0, T - 4, 4) against i; the rest are anchors
    # (referenced to the previous anchor: t - 4 for a window start, t - 2 for the last window's third frame)
    assert dycoke_roles(0) == ((), ())
    assert dycoke_roles(1) == ((A,), (-1,))
    assert dycoke_roles(2) == ((A, P1), (-1, 0))
    assert dycoke_roles(3) == ((A, P1, A), (-1, 0, 0))  # range(0, -1, 4) is empty: frame 2 stays whole
    assert dycoke_roles(4) == ((A, P1, A, P1), (-1, 0, 0, 2))  # range(0, 0, 4) is empty too
    assert dycoke_roles(5) == ((A, P1, P2, P1, A), (-1, 0, 0, 2, 0))  # i = 0 < 1: frame 2 pass 2; frame 4 has no pair
    assert dycoke_roles(6) == ((A, P1, P2, P1, A, P1), (-1, 0, 0, 2, 0, 4))
    assert dycoke_roles(8) == ((A, P1, P2, P1, A, P1, A, P1), (-1, 0, 0, 2, 0, 4, 4, 6))  # i = 4 is not < 4
    assert dycoke_roles(9)[0] == (A, P1, P2, P1, A, P1, P2, P1, A)  # i = 4 < 5: frame 6 pass 2
    roles, refs = dycoke_roles(32)  # LLaVA-OV's 32 frames: windows 0..24 get pass 2, the last (28) does not
    assert [t for t, r in enumerate(roles) if r == A] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert [t for t, r in enumerate(roles) if r == P2] == [2, 6, 10, 14, 18, 22, 26]
    assert all(roles[t] == P1 and refs[t] == t - 1 for t in range(1, 32, 2))
    assert refs[30] == 28 and refs[28] == 24 and refs[26] == 24


# ------------------------------------------------------------------------------------------------- budget inversion
def test_reference_budget_and_its_inversion_at_32_frames_of_196():
    # K = 0.7: int(0.3 * 196) = int(58.8) = 58 per pruned frame; 9 anchors, 23 pruned frames:
    # 9 * 196 + 23 * 58 = 1764 + 1334 = 3098 (49.4 %; the spec's per-window (1 + 3 * 0.3) / 4 = 47.5 % ignores the
    # last window's second anchor)
    assert reference_keep(0.7, 196) == 58
    assert reference_budget(32, 196, 0.7) == 3098
    # K = 0.3 (builder.py default): int(0.7 * 196) = int(137.2) = 137 -> 1764 + 23 * 137 = 1764 + 3151 = 4915
    assert reference_budget(32, 196, 0.3) == 4915
    roles, _ = dycoke_roles(32)
    pruned = [t for t, r in enumerate(roles) if r != A]
    budgets, cut = frame_budgets(roles, 196, 3098)  # inverted: every pruned frame gets 58 again
    assert not cut and [budgets[t] for t in pruned] == [58] * 23
    assert all(budgets[t] == 196 for t, r in enumerate(roles) if r == A)
    budgets, _ = frame_budgets(roles, 196, 3100)  # 2 left over -> the two earliest pruned frames (1 and 2)
    assert budgets[1] == budgets[2] == 59 and [budgets[t] for t in pruned[2:]] == [58] * 21
    budgets, cut = frame_budgets(roles, 196, 1764)  # exactly the anchors: pruned frames empty, anchors whole
    assert not cut and sum(budgets) == 1764 and all(budgets[t] == 0 for t in pruned)
    # one below the anchors: pruned frames empty, the 9 anchors share 1763 = 9 * 195 + 8 -> the first 8 get 196
    budgets, cut = frame_budgets(roles, 196, 1763)
    assert cut and [budgets[t] for t in (0, 4, 8, 12, 16, 20, 24, 28, 30)] == [196] * 8 + [195]
    assert all(budgets[t] == 0 for t in pruned)
    budgets, _ = frame_budgets(roles, 196, 10_000)  # above N: everything
    assert budgets == [196] * 32


# ------------------------------------------------------------------------------------------------- goldens
def four_frame_video() -> VideoTokens:
    # T = 4: roles anchor, pass1 (vs 0), anchor (the last window's third frame), pass1 (vs 2)
    return VideoTokens([
        angles_frame([0, 0, 0, 0]),
        angles_frame([10, 170, 90, 45], scales=[1, 3, 1, 2]),  # |delta| vs F0 10 170 90 45 -> order p1 p2 p3 p0
        angles_frame([0, 60, 120, 180]),  # vs F0 (only when anchors are cut): 0 60 120 180 -> order p3 p2 p1 p0
        angles_frame([100, 60, 130, 200], scales=[0.5, 1, 1, 1]),  # vs F2: 100 0 10 20 -> order p0 p3 p2 p1
    ])


def test_four_frame_golden():
    video = four_frame_video()
    compressor = DyCoke()
    # N = 16, anchors F0 and F2 = 8 tokens, pruned F1, F3 share the rest
    result = run_video_compressor(compressor, video, 13)  # 5 = [3, 2] (remainder to the earlier frame)
    assert kept(result) == [[0, 1, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 3]]
    assert [r.budget for r in result.frames] == [4, 3, 4, 2]
    result = run_video_compressor(compressor, video, 10)  # 2 = [1, 1]
    assert kept(result) == [[0, 1, 2, 3], [1], [0, 1, 2, 3], [0]]
    result = run_video_compressor(compressor, video, 9)  # 1 = [1, 0]
    assert kept(result) == [[0, 1, 2, 3], [1], [0, 1, 2, 3], []]
    result = run_video_compressor(compressor, video, 8)  # exactly the anchors
    assert kept(result) == [[0, 1, 2, 3], [], [0, 1, 2, 3], []] and not result.details.anchors_cut
    # below the anchors: the pruned frames are empty, the anchors share the budget (remainder to the earlier)
    result = run_video_compressor(compressor, video, 7)  # [4, 3]: F2 against F0 keeps p3 p2 p1
    assert kept(result) == [[0, 1, 2, 3], [], [1, 2, 3], []] and result.details.anchors_cut
    result = run_video_compressor(compressor, video, 5)  # [3, 2]
    # F0 has no reference: uniform. pooling_grid(2, 2, 3) = (2, 2); cells round(linspace(0, 3, 3)) = round(0, 1.5, 3)
    # = 0, 2, 3 (half to even) -> tokens 0, 2, 3. F2 keeps p3 p2.
    assert kept(result) == [[0, 2, 3], [], [2, 3], []]
    assert result.frames[0].selection.details.rule == "uniform" and result.frames[2].selection.details.rule == \
        "dissimilar"
    result = run_video_compressor(compressor, video, 1)  # F0 alone, one cell of a (1, 1) grid: its centre (0, 0)
    assert kept(result) == [[0], [], [], []]
    assert kept(run_video_compressor(compressor, video, 1.0)) == [[0, 1, 2, 3]] * 4


def test_four_frame_scores_and_details():
    video = four_frame_video()
    result = run_video_compressor(DyCoke(), video, 13)
    details = result.details
    assert isinstance(details, DyCokeDetails) and details.signals == ()
    assert details.roles == (A, P1, A, P1) and details.references == (-1, 0, 0, 2)
    assert details.budgets == (4, 3, 4, 2) and not details.anchors_cut
    assert details.k == pytest.approx(1 - 5 / 8)  # the pruned frames kept 5 of 8
    cos = [math.cos(math.radians(d)) for d in (10, 170, 90, 45)]
    torch.testing.assert_close(details.similarity[1], torch.tensor(cos), atol=1e-6, rtol=0)
    assert bool(torch.isnan(details.similarity[0]).all())
    torch.testing.assert_close(result.frames[1].selection.scores, 1 - torch.tensor(cos), atol=1e-6, rtol=0)
    assert result.frames[0].selection.scores is None
    frame1 = result.frames[1].selection.details
    assert frame1 == DyCokeFrameDetails(signals=(), role=P1, reference=0, rule="dissimilar")
    assert result.frames[0].selection.details.rule == "all" and result.frames[0].keyframe
    assert result.frames[3].extra == {"role": P1, "reference": 2, "rule": "dissimilar"}


def six_frame_video() -> VideoTokens:
    # T = 6: anchor, pass1 (vs 0), pass2 (vs 0: i = 0 < T - 4 = 2), pass1 (vs 2, its full features), anchor (the tail
    # window's first frame; vs 0 when cut), pass1 (vs 4)
    return VideoTokens([
        angles_frame([0, 0, 0, 0]),
        angles_frame([20, 0, 150, 60]),  # vs F0: 20 0 150 60 -> order p2 p3 p0 p1
        angles_frame([0, 100, 30, 170], scales=[2, 1, 1, 4]),  # vs F0: 0 100 30 170 -> order p3 p1 p2 p0
        angles_frame([45, 180, 100, 170]),  # vs F2: 45 80 70 0 -> order p1 p2 p0 p3
        angles_frame([0, 90, 45, 135]),  # vs F0 (when cut): 0 90 45 135 -> order p3 p1 p2 p0
        angles_frame([50, 80, 45, 300]),  # vs F4: 50 10 0 165 -> order p3 p0 p1 p2
    ])


def test_six_frame_golden():
    video = six_frame_video()
    compressor = DyCoke()
    # N = 24, anchors F0, F4 = 8; pruned F1, F2, F3, F5 in time order
    result = run_video_compressor(compressor, video, 13)  # 5 over 4 = [2, 1, 1, 1]
    assert kept(result) == [[0, 1, 2, 3], [2, 3], [3], [1], [0, 1, 2, 3], [3]]
    result = run_video_compressor(compressor, video, 19)  # 11 over 4 = 2.75: [3, 3, 3, 2]
    assert kept(result) == [[0, 1, 2, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 2, 3], [0, 3]]
    # F3 ranks against F2's own features even where F2 dropped them (F2 kept only p3 at budget 13, F3 its p1)
    assert result.details.roles == (A, P1, P2, P1, A, P1) and result.details.references == (-1, 0, 0, 2, 0, 4)
    # anchors cut: 6 = [3, 3]; F0 uniform -> 0, 2, 3 (as in the 4-frame case); F4 against F0 keeps p3 p1 p2
    result = run_video_compressor(compressor, video, 6)
    assert kept(result) == [[0, 2, 3], [], [], [], [1, 2, 3], []]
    assert result.details.k == 1.0


def test_fixed_k_reproduces_the_reference_count_or_refuses():
    video = six_frame_video()
    # K = 0.5: int(0.5 * 4) = 2 per pruned frame -> 8 + 4 * 2 = 16
    assert reference_budget(6, 4, 0.5) == 16
    result = run_video_compressor(DyCoke(k=0.5), video, 16)
    assert kept(result) == [[0, 1, 2, 3], [2, 3], [1, 3], [1, 2], [0, 1, 2, 3], [0, 3]]
    assert kept(result) == kept(run_video_compressor(DyCoke(), video, 16))  # the same as k=None at that budget
    assert reference_budget(6, 4, 0.7) == 12  # int(0.3 * 4) = int(1.2) = 1 -> 8 + 4
    with pytest.raises(ValueError, match=r"k=0\.5 keeps 16 .* budget is 13; pass budget=16"):
        run_video_compressor(DyCoke(k=0.5), video, 13)
    with pytest.raises(ValueError, match="budget=16"):
        run_video_compressor(DyCoke(k=0.5), video, 1.0)
    assert run_video_compressor(DyCoke(k=0.0), video, 1.0).num_kept == 24  # K = 0 keeps everything


# ------------------------------------------------------------------------------------------------- one frame
def test_one_frame_is_a_uniform_subset_and_an_image_goes_through_select():
    g = torch.Generator().manual_seed(0)
    tokens = VisualTokens(features=torch.randn(16, 5, generator=g), grid=(4, 4))
    # k = 4 on a 4x4 grid: pooling_grid -> (2, 2), cells 0..3, each a 2x2 block whose centre is its top-left + (0, 0)
    # ((r0 + r1 - 1) // 2 = (0 + 2 - 1) // 2 = 0): tokens (0, 0), (0, 2), (2, 0), (2, 2) = 0, 2, 8, 10
    selection = run_compressor(create_compressor("dycoke"), tokens, 4)
    assert selection.indices.tolist() == [0, 2, 8, 10]
    assert selection.scores is None
    assert selection.details == DyCokeFrameDetails(signals=(), role=A, reference=-1, rule="uniform")
    assert run_compressor(DyCoke(), tokens, 16).details.rule == "all"


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), prefix=st.integers(0, 1), data=st.data())
def test_uniform_positions_match_pool_sample_mode(rows, cols, prefix, data):
    from vtc.compressors.baselines import Pool
    n = rows * cols + prefix
    k = data.draw(st.integers(1, n))
    tokens = VisualTokens(features=torch.zeros(n, 2), grid=(rows, cols), num_prefix_tokens=prefix)
    assert uniform_positions((rows, cols), prefix, k).tolist() == Pool(mode="sample").select(tokens, k).indices.tolist()


# ------------------------------------------------------------------------------------------------- properties
@st.composite
def video_case(draw):
    num_frames = draw(st.integers(1, 10))
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    budget = draw(st.integers(1, num_frames * n))
    return num_frames, rows, cols, prefix, budget, draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=120, deadline=None)
@given(case=video_case())
def test_exact_budget_and_the_budget_shape(case):
    num_frames, rows, cols, prefix, budget, seed, ties = case
    video = random_video(num_frames, rows, cols, prefix, seed=seed, ties=ties)
    n = rows * cols + prefix
    result = run_video_compressor(DyCoke(), video, budget)  # validates sorted unique indices and the exact total
    assert result.num_kept == budget == sum(result.details.budgets)
    roles = result.details.roles
    anchors = [r.budget for r, role in zip(result.frames, roles) if role == A]
    pruned = [r.budget for r, role in zip(result.frames, roles) if role != A]
    if budget >= n * len(anchors):  # the first frame of every window (every anchor) whole
        assert anchors == [n] * len(anchors) and not result.details.anchors_cut
        assert max(pruned, default=0) - min(pruned, default=0) <= 1 and pruned == sorted(pruned, reverse=True)
    else:
        assert pruned == [0] * len(pruned) and result.details.anchors_cut
        assert max(anchors) - min(anchors) <= 1 and anchors == sorted(anchors, reverse=True)
    assert result.frames[0].budget >= 1
    # every frame ranked against a reference keeps its least similar tokens
    for record, sim in zip(result.frames, result.details.similarity):
        sel = record.selection
        if sel.details.rule == "dissimilar":
            mask = torch.zeros(n, dtype=torch.bool)
            mask[sel.indices] = True
            # (ranked by the recorded 1 - cos in fp32: cosines within one fp32 step of 1 - cos rank as ties)
            assert float(sim[mask].max()) <= float(sim[~mask].min()) + 1e-6
    # deterministic
    assert kept(run_video_compressor(DyCoke(), video, budget)) == kept(result)


@settings(max_examples=60, deadline=None)
@given(case=video_case())
def test_selections_are_nested_while_the_anchors_are_whole(case):
    num_frames, rows, cols, prefix, _, seed, ties = case
    video = random_video(num_frames, rows, cols, prefix, seed=seed, ties=ties)
    n = rows * cols + prefix
    floor = n * dycoke_roles(num_frames)[0].count(A)
    previous = None
    for budget in range(floor, num_frames * n + 1):
        now = [set(s) for s in kept(run_video_compressor(DyCoke(), video, budget))]
        if previous is not None:
            assert all(p <= q for p, q in zip(previous, now))
            assert sum(map(len, now)) == sum(map(len, previous)) + 1
        previous = now


@settings(max_examples=60, deadline=None)
@given(case=video_case(), powers=st.lists(st.integers(-3, 3), min_size=40, max_size=40))
def test_invariant_to_token_magnitudes(case, powers):
    # cosines are unchanged when a token is scaled by a power of two (exact in floating point)
    num_frames, rows, cols, prefix, budget, seed, ties = case
    video = random_video(num_frames, rows, cols, prefix, seed=seed, ties=ties)
    scaled = []
    for t, f in enumerate(video.frames):
        s = torch.tensor([2.0 ** powers[(t * 7 + j) % 40] for j in range(f.num_tokens)])
        scaled.append(VisualTokens(features=f.features * s[:, None], grid=f.grid, num_prefix_tokens=prefix))
    assert kept(run_video_compressor(DyCoke(), VideoTokens(scaled), budget)) == \
        kept(run_video_compressor(DyCoke(), video, budget))


def test_budget_edges_one_and_all():
    video = random_video(7, 3, 3, seed=1)
    one = run_video_compressor(DyCoke(), video, 1)
    assert kept(one) == [[4]] + [[]] * 6  # frame 0's grid centre (cell (1, 1) of a 1x1 pooling grid -> row 1, col 1)
    assert kept(run_video_compressor(DyCoke(), video, 63)) == [list(range(9))] * 7
    assert kept(run_video_compressor(DyCoke(), video, 10_000)) == [list(range(9))] * 7


def test_zero_features_have_cosine_zero():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    assert same_position_cosine(a, b).tolist() == [0.0, -1.0]


# ------------------------------------------------------------------------------------------------- bad input
def test_frames_with_different_grids_are_refused():
    frames = [VisualTokens(features=torch.randn(4, 2), grid=(2, 2)), VisualTokens(features=torch.randn(4, 2),
                                                                                   grid=(1, 4))]
    with pytest.raises(ValueError, match="same grid"):
        run_video_compressor(DyCoke(), VideoTokens(frames), 3)
    frames[1] = VisualTokens(features=torch.randn(5, 2), grid=(2, 2), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="same grid"):
        run_video_compressor(DyCoke(), VideoTokens(frames), 3)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.7"])
def test_bad_k_names_the_option(bad):
    with pytest.raises((TypeError, ValueError), match="k must be"):
        create_compressor("dycoke", k=bad)
    with pytest.raises(ValueError, match="dycoke k"):
        DyCoke(k=bad)


def test_class_flags_and_signals():
    assert DyCoke.video_only and DyCoke.handles_video and not DyCoke.uses_query
    assert create_compressor("dycoke").options() == {"k": None}
    with pytest.raises(ValueError, match="video budget"):
        DyCoke().select_video(random_video(2, 2, 2), -1)
