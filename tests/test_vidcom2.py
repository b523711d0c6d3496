"""The ``vidcom2`` video compressor (docs/methods/vidcom2.md): hand-computed Gaussian similarities, channel selection
and frame budgets, a float64 transcription of the reference's rule, exact budgets, image mode and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import VisualTokens, create_compressor, run_compressor
from vtc.compressors.vidcom2 import (
    VidCom2,
    VidCom2Details,
    VidCom2FrameDetails,
    keep_lowest_per_frame,
    low_variance_channels,
    multi_scale_gaussian,
)
from vtc.video import VideoTokens, run_video_compressor
from helpers import CLIP_L


def frame(rows_of_features, grid=None) -> VisualTokens:
    x = torch.as_tensor(rows_of_features, dtype=torch.float32)
    return VisualTokens(features=x, grid=grid or (1, x.shape[0]))


def kept(result) -> list[list[int]]:
    return [r.selection.indices.tolist() for r in result.frames]


def G(d2: float) -> float:
    """The multi-scale Gaussian of the spec, term by term: a in (1/8, 1/4, 1/2, 1, 2) -> exp(-d2 / (2a)) =
    exp(-4 d2) + exp(-2 d2) + exp(-d2) + exp(-d2 / 2) + exp(-d2 / 4)."""
    return math.exp(-4 * d2) + math.exp(-2 * d2) + math.exp(-d2) + math.exp(-d2 / 2) + math.exp(-d2 / 4)


# ------------------------------------------------------------------------------------------------- golden tests
def test_gaussian_sums_by_hand():
    # G(0) = 5 (five terms of exp(0)); G(1) = e^-4 + e^-2 + e^-1 + e^-.5 + e^-.25
    #      = 0.018316 + 0.135335 + 0.367879 + 0.606531 + 0.778801 = 1.906862
    # G(0.25) = e^-1 + e^-.5 + e^-.25 + e^-.125 + e^-.0625 = .367879 + .606531 + .778801 + .882497 + .939413 = 3.575121
    values = multi_scale_gaussian(torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(values, torch.tensor([5.0, 1.906862, 3.575121]), atol=1e-5, rtol=0)
    assert G(1.0) == pytest.approx(1.906862, abs=1e-6)


# Two frames of two tokens, D = 4 (channels c0..c3):
#   frame 0: a = ( 2, 0,  10, -10)   b = (-1, 0, -10,  10)
#   frame 1: c = ( 1, 0,  10,  10)   d = ( 3, 0, -10, -10)
# Population variances over the 4 tokens: c0: values 2, -1, 1, 3, mean 1.25, squared deviations .5625 + 5.0625 +
# .0625 + 3.0625 = 8.75 -> 2.1875; c1: 0; c2 = c3: 100. channel_ratio 0.5 keeps int(4 * .5) = 2 channels: {0, 1}.
# Selected: a = (2, 0), b = (-1, 0), c = (1, 0), d = (3, 0); L2-normalised: a = (1, 0), b = (-1, 0), c = d = (1, 0).
# Centres: video c_v = mean of the four = (0.5, 0); frame 0 c_0 = (0, 0); frame 1 c_1 = (1, 0).
# Squared distances to c_v: a .25, b 2.25, c .25, d .25  ->  s_v = G(.25), G(2.25), G(.25), G(.25)
# Squared distances to c_t: a 1, b 1, c 0, d 0           ->  s_f = G(1), G(1), 5, 5
# G(2.25) = e^-9 + e^-4.5 + e^-2.25 + e^-1.125 + e^-.5625 = .000123 + .011109 + .105399 + .324652 + .569783 = 1.011066
# Uniqueness u_0 = -(3.575121 + 1.011066) / 2 = -2.293094; u_1 = -3.575121. (u_1 - u_0) / 0.01 = -128.2, so
# p = (1, e^-128.2) ~ (1, 0) and w = 1 + p - mean p = (1.5, 0.5).
# Token scores s_v + s_f: a 5.481983, b 2.917928, c = d = 8.575121 (a tie).
FRAME0 = [[2.0, 0.0, 10.0, -10.0], [-1.0, 0.0, -10.0, 10.0]]
FRAME1 = [[1.0, 0.0, 10.0, 10.0], [3.0, 0.0, -10.0, -10.0]]


def two_frame_video() -> VideoTokens:
    return VideoTokens([frame(FRAME0), frame(FRAME1)])


def test_channel_selection_by_hand():
    x = torch.tensor(FRAME0 + FRAME1)
    assert low_variance_channels(x, 0.5).tolist() == [0, 1]
    assert low_variance_channels(x, 0.25).tolist() == [1]  # the single lowest: c1 (variance 0)
    assert low_variance_channels(x, 0.75).tolist() == [0, 1, 2]  # c2, c3 tie at 100: the lower channel
    assert low_variance_channels(x, 0.1).tolist() == [1]  # int(0.4) = 0 -> at least one channel


def test_two_frame_golden_scores_and_weights():
    result = run_video_compressor(create_compressor("vidcom2"), two_frame_video(), 2)
    d = result.details
    assert isinstance(d, VidCom2Details) and d.signals == ()
    assert d.channels.tolist() == [0, 1] and d.ratio == pytest.approx(0.5)
    torch.testing.assert_close(d.uniqueness, torch.tensor([-2.293094, -3.575121], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(d.probs, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-40, rtol=1e-6)
    torch.testing.assert_close(d.weights, torch.tensor([1.5, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)
    f0, f1 = (r.selection.details for r in result.frames)
    assert isinstance(f0, VidCom2FrameDetails)
    torch.testing.assert_close(f0.video_similarity, torch.tensor([3.575121, 1.011066]), atol=1e-5, rtol=0)
    torch.testing.assert_close(f0.frame_similarity, torch.tensor([1.906862, 1.906862]), atol=1e-5, rtol=0)
    torch.testing.assert_close(f1.frame_similarity, torch.tensor([5.0, 5.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.frames[0].selection.scores, torch.tensor([5.481983, 2.917928]), atol=1e-5,
                               rtol=0)
    assert [r.score for r in result.frames] == pytest.approx([-2.293094, -3.575121], abs=1e-5)
    assert [r.weight for r in result.frames] == pytest.approx([1.5, 0.5])


@pytest.mark.parametrize("budget, options, expected", [
    # B = 2: continuous shares B * (w_t n_t) / sum = 2 * (3, 1) / 4 = (1.5, 0.5); the floor of 1 token per frame
    # binds for frame 1, so both keep 1 (the reference: round(1.5) = 2 and max(1, round(.5)) = 1, i.e. 3 tokens).
    # Frame 0 keeps b (score 2.92 < 5.48), frame 1 its tie c = d -> the lower index.
    (2, {}, [[1], [0]]),
    # min_per_frame = 0: floors (1, 0), one token left, remainders .5 / .5 tie -> the earlier frame: (2, 0).
    (2, {"min_per_frame": 0}, [[0, 1], []]),
    # B = 3: shares (2.25, .75); frame 0 capped at its 2 tokens, the rest (1) goes to frame 1: (2, 1).
    (3, {}, [[0, 1], [0]]),
    # B = 1 < T * floor: the floor drops to 1 // 2 = 0; shares (.75, .25) -> the larger remainder, frame 0, keeps b.
    (1, {}, [[1], []]),
    (4, {}, [[0, 1], [0, 1]]),
])
def test_two_frame_golden_budgets(budget, options, expected):
    result = run_video_compressor(create_compressor("vidcom2", **options), two_frame_video(), budget)
    assert kept(result) == expected
    assert list(result.details.budgets) == [len(k) for k in expected]


def test_all_channels_change_the_geometry():
    """channel_ratio = 1 scores on the +-10 channels too: a = (2, 0, 10, -10) and d = (3, 0, -10, -10) are no longer
    parallel to c, so frame 1's tie is broken -- and the frame scores move -- showing the 50 % selection mattered."""
    result = run_video_compressor(create_compressor("vidcom2", channel_ratio=1.0), two_frame_video(), 2)
    assert result.details.channels.tolist() == [0, 1, 2, 3]
    assert result.details.uniqueness.tolist() != pytest.approx([-2.293094, -3.575121], abs=1e-3)


def test_identical_frames_share_evenly():
    """Three identical frames of (1, 0), (0, 1) (channel_ratio 1 keeps both channels): every token is at squared
    distance .5 from both centres (.5, .5), so all scores tie, u is equal, p = 1/3 and w = 1. B = 4 over 3 frames of
    2: shares 4/3 each, floors 1, the one left over to the earliest frame; tied tokens -> the lower index."""
    video = VideoTokens([frame([[1.0, 0.0], [0.0, 1.0]]) for _ in range(3)])
    result = run_video_compressor(create_compressor("vidcom2", channel_ratio=1.0), video, 4)
    assert kept(result) == [[0, 1], [0], [0]]
    torch.testing.assert_close(result.details.probs, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(result.details.weights, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.frames[0].selection.scores, torch.full((2,), 2 * G(0.5)))


def test_the_unique_frame_gets_about_twice_the_ratio():
    """Frames 0, 1, 3: four tokens (1, 0); frame 2: four tokens (0, 1) (channel_ratio 1). c_v = (12 (1, 0) +
    4 (0, 1)) / 16 = (.75, .25): squared distances .125 (frames 0, 1, 3) and 1.125 (frame 2), so u_2 - u_others =
    G(.125) - G(1.125) = 4.1764 - 1.7658 = 2.41, 241 temperatures: p = one-hot on frame 2, w = (.75, .75, 1.75, .75).
    B = 7 (rho = 7/16): shares 7 * 4w / 16 = (1.3125, 1.3125, 3.0625, 1.3125) -> floors (1, 1, 3, 1), the token left
    over to the largest remainder .3125, a tie of frames 0, 1, 3 -> frame 0: budgets (2, 1, 3, 1)."""
    same, other = [[1.0, 0.0]] * 4, [[0.0, 1.0]] * 4
    video = VideoTokens([frame(same, (2, 2)), frame(same, (2, 2)), frame(other, (2, 2)), frame(same, (2, 2))])
    result = run_video_compressor(create_compressor("vidcom2", channel_ratio=1.0), video, 7)
    assert list(result.details.budgets) == [2, 1, 3, 1]
    assert result.details.weights.tolist() == pytest.approx([0.75, 0.75, 1.75, 0.75])
    assert int(torch.argmax(result.details.uniqueness)) == 2
    assert kept(result) == [[0, 1], [0], [0, 1, 2], [0]]  # all tokens of a frame tie: the lowest indices


def test_image_is_one_frame_farthest_from_the_mean():
    """An image: w = 1, the frame takes the whole budget and keeps the tokens with the lowest 2 G(x, c), c the mean.
    Tokens (1, 0) x3 and (0, 1) (channel_ratio 1): c = (.75, .25); squared distances .125 x3 and 1.125 -> the odd
    token 3 first, then the tied ones by index."""
    image = frame([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], (2, 2))
    compressor = create_compressor("vidcom2", channel_ratio=1.0)
    assert run_compressor(compressor, image, 1).indices.tolist() == [3]
    assert run_compressor(compressor, image, 2).indices.tolist() == [0, 3]
    selection = run_compressor(compressor, image, 2)
    torch.testing.assert_close(selection.scores, torch.tensor([2 * G(0.125)] * 3 + [2 * G(1.125)]))
    assert isinstance(selection.details, VidCom2FrameDetails)


def test_keep_lowest_per_frame():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 0.0, 0.0])  # frames of 3, 4 (and an empty one)
    out = keep_lowest_per_frame(scores, [3, 0, 4], [2, 0, 3])
    assert [o.tolist() for o in out] == [[1, 2], [], [0, 2, 3]]  # frame 2: 0.0, 0.0 (indices 2, 3) then 1.0 (0)


# ------------------------------------------------------------------------------------------------- the reference
def reference_rule(frames: list[torch.Tensor], rho: float) -> tuple[list[int], list[list[int]]]:
    """A float64 transcription of the spec's steps 1-5 (uniform frame size n): the reference's k_t and kept sets."""
    x = torch.cat(frames).double()
    n = frames[0].shape[0]
    var = x.var(dim=0, unbiased=False)
    channels = torch.argsort(var, stable=True)[:max(1, int(x.shape[1] * 0.5))]
    x = torch.nn.functional.normalize(x[:, channels], dim=-1).reshape(len(frames), n, -1)
    cv, ct = x.mean(dim=(0, 1), keepdim=True), x.mean(dim=1, keepdim=True)
    g = lambda d2: sum(torch.exp(-d2 / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))
    s_v, s_f = g(((x - cv) ** 2).sum(-1)), g(((x - ct) ** 2).sum(-1))
    u = -s_v.mean(dim=1)
    p = torch.softmax((u - u.max()) / 0.01, dim=0)
    scale = (rho * (1 + p - p.mean())).clamp(max=1.0)
    ks = [max(1, int(torch.round(s * n))) for s in scale]
    return ks, [sorted(torch.argsort(s_v[t] + s_f[t])[:k].tolist()) for t, k in enumerate(ks)]


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_reference_up_to_rounding(seed):
    """Where no frame hits the cap (rho w_t < 1) or the floor, vtc's water-fill has the reference's continuous
    shares rho w_t n, so each k_t is within 1 of the reference's round(.); and every frame keeps its k_t lowest
    s_v + s_f exactly as the reference ranks them."""
    g = torch.Generator().manual_seed(seed)
    num, n, dim = 5, 12, 16
    frames = [torch.randn(n, dim, generator=g) + (2.0 if t == seed % num else 0.0) for t in range(num)]
    budget = 24  # rho = 0.4: the unique frame ~0.8 n, the others ~0.32 n
    result = run_video_compressor(create_compressor("vidcom2"), VideoTokens([frame(f) for f in frames]), budget)
    ref_k, _ = reference_rule(frames, budget / (num * n))
    ours = list(result.details.budgets)
    assert sum(ours) == budget
    assert all(abs(a - b) <= 1 for a, b in zip(ours, ref_k)), (ours, ref_k)
    for t, record in enumerate(result.frames):  # each frame: its k_t lowest scores
        ranking = torch.argsort(record.selection.scores.double(), stable=True)
        assert record.selection.indices.tolist() == sorted(ranking[:ours[t]].tolist())
    # and at the reference's own k_t the reference's kept sets are the frames' lowest-score prefixes
    same = [t for t in range(num) if ours[t] == ref_k[t]]
    _, ref_sets = reference_rule(frames, budget / (num * n))
    for t in same:
        assert result.frames[t].selection.indices.tolist() == ref_sets[t]


# ------------------------------------------------------------------------------------------------- properties
@st.composite
def video_case(draw):
    num_frames = draw(st.integers(1, 6))
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    uniform = draw(st.booleans())
    grids = [(rows, cols) if uniform else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
             for _ in range(num_frames)]
    dim = draw(st.sampled_from([1, 3, 8]))
    total = sum(r * c for r, c in grids)
    budget = draw(st.integers(1, total))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    floor = draw(st.integers(0, 3))
    return grids, dim, budget, seed, ties, floor


@settings(max_examples=60, deadline=None)
@given(case=video_case())
def test_exact_budgets_and_valid_records(case):
    grids, dim, budget, seed, ties, floor = case
    g = torch.Generator().manual_seed(seed)
    frames = []
    for rows, cols in grids:
        x = torch.randn(rows * cols, dim, generator=g)
        frames.append(VisualTokens(features=x.round() if ties else x, grid=(rows, cols)))
    video = VideoTokens(frames)
    compressor = create_compressor("vidcom2", min_per_frame=floor)
    result = run_video_compressor(compressor, video, budget)  # validates sorted unique indices and the sum
    assert result.num_kept == budget == sum(result.details.budgets)
    sizes = video.frame_sizes
    effective_floor = floor if sum(min(floor, n) for n in sizes) <= budget else budget // len(sizes)
    for record, size in zip(result.frames, sizes):
        assert min(effective_floor, size) <= record.num_kept <= size
        # the kept tokens are the frame's lowest scores (ties to the lower index)
        ranking = torch.sort(record.selection.scores, stable=True).indices
        assert record.selection.indices.tolist() == sorted(ranking[:record.num_kept].tolist())
    again = run_video_compressor(compressor, video, budget)
    assert kept(again) == kept(result)
    # rescaling every feature changes nothing: variances scale together, tokens are normalised (a power of two, so
    # every float operation scales exactly and even exact ties stay ties)
    scaled = VideoTokens([VisualTokens(features=4.0 * f.features, grid=f.grid) for f in frames])
    assert kept(run_video_compressor(compressor, scaled, budget)) == kept(result)
    # keep-all
    assert kept(run_video_compressor(compressor, video, 1.0)) == [list(range(n)) for n in sizes]


def test_budget_edges_one_and_all():
    g = torch.Generator().manual_seed(3)
    video = VideoTokens([frame(torch.randn(6, 5, generator=g), (2, 3)) for _ in range(4)])
    compressor = create_compressor("vidcom2")
    one = run_video_compressor(compressor, video, 1)
    assert one.num_kept == 1 and sum(r.num_kept > 0 for r in one.frames) == 1
    # the one token goes to the most unique frame (the largest weight)
    assert one.frames[int(torch.argmax(one.details.weights))].num_kept == 1
    assert kept(run_video_compressor(compressor, video, 24)) == [list(range(6))] * 4
    four = run_video_compressor(compressor, video, 4)  # B = T: the floor gives every frame exactly one
    assert [r.num_kept for r in four.frames] == [1, 1, 1, 1]


def test_flags_and_signals():
    assert VidCom2.video_only and VidCom2.handles_video and not VidCom2.uses_query
    assert create_compressor("vidcom2").signals(CLIP_L) == ()
    c = create_compressor("vidcom2", scales=[0.5, 1])
    assert c.scales == (0.5, 1.0) and c.options()["scales"] == (0.5, 1.0)


@pytest.mark.parametrize("options, option", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": "0.01"}, "temperature"),
    ({"channel_ratio": 0.0}, "channel_ratio"), ({"channel_ratio": 1.5}, "channel_ratio"),
    ({"channel_ratio": True}, "channel_ratio"), ({"scales": ()}, "scales"), ({"scales": (0.5, -1.0)}, "scales"),
    ({"scales": 0.5}, "scales"), ({"scales": ("a",)}, "scales"), ({"min_per_frame": -1}, "min_per_frame"),
    ({"min_per_frame": 1.5}, "min_per_frame"), ({"min_per_frame": True}, "min_per_frame"),
])
def test_bad_options(options, option):
    with pytest.raises((ValueError, TypeError), match=option):
        create_compressor("vidcom2", **options)


def test_bad_budget_and_unknown_option():
    video = two_frame_video()
    with pytest.raises(ValueError, match="budget"):
        VidCom2().select_video(video, -1)
    with pytest.raises(ValueError, match="budget"):
        run_video_compressor(VidCom2(), video, 0)
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("vidcom2", temp=0.1)
