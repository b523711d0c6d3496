"""HoloV (arXiv 2510.02912): chunks, variance, gamma, quotas and selections derived by hand, properties, the
AnyRes allocation ``"holov"``, and one ``vtc.apply(..., allocation="holov")`` run on a tiny LLaVA-NeXT.

The rule (spec ``more_compressors.md`` §5): ``C`` contiguous raster chunks, ``N // C`` tokens each and the first
``N % C`` one more; per chunk ``S`` = cosine matrix with a zero diagonal, ``mu_i = sum_j S_ij / (M - 1)``,
``v_i = sum_j (S_ij - mu_i)^2 / (M - 1)`` (the zeroed diagonal term included); ``h = a + alpha * gamma * v`` with
``gamma = mean|a| / mean|v|`` per chunk; ``w_c = mean_c(h)^tau / sum``; ``q_c = floor(w_c K)`` and the remainder one
each to the largest weights; keep the top ``q_c`` of each chunk by attention (``within="holistic"``: by ``h``).

A fact used in the hand derivations (docs/methods/holov.md): for ``a >= 0`` and a chunk whose variance is not all
zero, ``mean_c(h) = mean_c(a) + alpha * gamma_c * mean_c(v) = (1 + alpha) * mean_c(a)``, so chunk weights are the
chunks' mean attention (to the power ``tau``) whatever the features (random features have ``v > 0``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc
from vtc import (
    Signal,
    SignalKind,
    TowerInfo,
    VisualTokens,
    create_compressor,
    run_compressor,
)
from vtc.allocation import create_allocation, list_allocations
from vtc.budget_split import split_budget
from vtc.compressors.holov import (
    HoloVAllocation,
    HoloVDetails,
    chunk_sizes,
    default_chunks,
    holistic_scores,
    holov_quotas,
    similarity_variance,
)
from vtc.layout import CropCanvas, PackedLayout
from vtc.multiview import MultiViewTokens, select_views
from helpers import CLIP_L, QWEN25

CLS22 = Signal(SignalKind.CLS_ATTENTION, 22)
RECEIVED31 = Signal(SignalKind.RECEIVED_ATTENTION, 31)


def at_angles(degrees: list[float], norms: list[float]) -> torch.Tensor:
    """``[N, 2]`` vectors at the given angles and norms (the cosine ignores the norms)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (torch.stack([torch.cos(rad), torch.sin(rad)], dim=1) * torch.tensor(norms, dtype=torch.float64)[:, None]
            ).float()


def random_features(n: int, seed: int = 0, dim: int = 6) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def image(attention: list[float], grid: tuple[int, int], seed: int = 0, prefix: int = 0,
          signal: Signal = CLS22) -> VisualTokens:
    n = len(attention)
    return VisualTokens(features=random_features(n, seed), grid=grid, signals={signal: torch.tensor(attention)},
                        num_prefix_tokens=prefix)


# ---------------------------------------------------------------------------------------------- options / signals
def test_defaults():
    assert create_compressor("holov").options() == {"chunks": None, "alpha": 0.09, "tau": 1.0,
                                                    "within": "attention", "layer": None}


def test_signals_are_the_feature_layer_attention():
    assert create_compressor("holov").signals(CLIP_L) == (CLS22,)
    assert create_compressor("holov").signals(QWEN25) == (RECEIVED31,)  # no CLS: received attention
    assert create_compressor("holov", layer=-1).signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 23),)
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("holov", layer=24).signals(CLIP_L)


def test_bad_options_name_the_option():
    for chunks in (0, -3):
        with pytest.raises(ValueError, match="chunks"):
            create_compressor("holov", chunks=chunks)
    for chunks in (2.5, True, "16"):
        with pytest.raises((TypeError, ValueError), match="chunks"):
            create_compressor("holov", chunks=chunks)
    for name in ("alpha", "tau"):
        for value in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                create_compressor("holov", **{name: value})
        for value in ("0.09", True, None):
            with pytest.raises((TypeError, ValueError), match=name):
                create_compressor("holov", **{name: value})
    with pytest.raises(ValueError, match="within"):
        create_compressor("holov", within="paper")
    with pytest.raises(TypeError, match="layer"):
        create_compressor("holov", layer="22")
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("holov", crops=16)


def test_missing_attention_is_reported():
    bare = VisualTokens(features=torch.randn(8, 3), grid=(2, 4))
    with pytest.raises(KeyError, match="attention"):
        run_compressor(create_compressor("holov"), bare, 3)


# ---------------------------------------------------------------------------------------------- chunks
def test_chunk_boundaries_n10_c3():
    """10 // 3 = 3 tokens per chunk, 10 % 3 = 1: the first chunk one more -> sizes 4, 3, 3 = tokens 0-3, 4-6, 7-9."""
    assert chunk_sizes(10, 3) == [4, 3, 3]
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]  # 10 // 4 = 2, the first 10 % 4 = 2 chunks get 3
    assert chunk_sizes(3, 5) == [1, 1, 1]  # C > N: the empty chunks are dropped
    selection = run_compressor(create_compressor("holov", chunks=3), image([0.1] * 10, (2, 5)), 4)
    assert selection.details.chunk_starts.tolist() == [0, 4, 7]
    assert selection.details.chunk_sizes.tolist() == [4, 3, 3]


def test_default_chunk_rule():
    """C = max(1, int((1024 / 576) * N / K)): 1024 / 64 = 16, 1024 / 128 = 8, int(1024 / 192 = 5.33) = 5."""
    assert [default_chunks(576, k) for k in (64, 128, 192)] == [16, 8, 5]
    assert default_chunks(576, 576) == 1 and default_chunks(576, 520) == 1  # 1024 / 520 = 1.97
    assert default_chunks(10, 4) == 4  # 17.78 / 4 = 4.44
    assert default_chunks(10, 1) == 17  # more chunks than tokens: capped at N where used
    compressor = create_compressor("holov")
    assert compressor.num_chunks(10, 1) == 10 and compressor.num_chunks(576, 64) == 16
    assert create_compressor("holov", chunks=4).num_chunks(576, 64) == 4


# ---------------------------------------------------------------------------------------------- variance and gamma
# Three tokens at 0, 53.13 and 90 degrees (unit directions (1, 0), (.6, .8), (0, 1)) with norms 2, 3, .5:
#   cos(0, 1) = .6, cos(0, 2) = 0, cos(1, 2) = .8; diagonal zeroed; M - 1 = 2.
#   row 0: [0, .6, 0]   mu = .3  v = ((0-.3)^2 + (.6-.3)^2 + (0-.3)^2) / 2 = .27 / 2 = .135
#   row 1: [.6, 0, .8]  mu = .7  v = ((.6-.7)^2 + (0-.7)^2 + (.8-.7)^2) / 2 = .51 / 2 = .255
#   row 2: [0, .8, 0]   mu = .4  v = (.16 + .16 + .16) / 2 = .24
# Without the zeroed diagonal term row 0 would be ((.6-.3)^2 + (0-.3)^2) / 2 = .09.
THREE = at_angles([0.0, math.degrees(math.atan2(0.8, 0.6)), 90.0], [2.0, 3.0, 0.5])
THREE_VARIANCE = [0.135, 0.255, 0.24]


def test_variance_by_hand_includes_the_zeroed_diagonal_term():
    variance = similarity_variance(THREE, [3])
    assert torch.allclose(variance, torch.tensor(THREE_VARIANCE), atol=1e-6)
    # two chunks [0, 1] and [2]: M = 2 -> row 0: [0, .6], mu = .6, v = (.36 + 0) / 1 = .36 (same for row 1);
    # a one-token chunk has no variance
    assert torch.allclose(similarity_variance(THREE, [2, 1]), torch.tensor([0.36, 0.36, 0.0]), atol=1e-6)
    # a zero vector has cosine 0 to everything: with tokens (1, 0), (0, 0), (1, 0): rows [0, 0, 1], [0, 0, 0],
    # [1, 0, 0] -> mu = .5, 0, .5; v = (.25 + .25 + .25) / 2 = .375, 0, .375
    zero = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(similarity_variance(zero, [3]), torch.tensor([0.375, 0.0, 0.375]))


def test_variance_in_row_blocks_equals_one_block():
    features = random_features(101, seed=3, dim=16)
    sizes = chunk_sizes(101, 3)  # 34, 34, 33
    whole = similarity_variance(features, sizes)
    for limit in (1, 7, 40, 2000):
        assert torch.allclose(similarity_variance(features, sizes, block_elements=limit), whole, atol=1e-6)


def test_gamma_and_holistic_scores_by_hand():
    """a = .2, .1, .3: mean|a| = .2, mean v = .63 / 3 = .21, gamma = .2 / .21 = 20/21.

    h = a + .09 * 20/21 * v:  h0 = .2 + .243/21, h1 = .1 + .459/21, h2 = .3 + .432/21; mean h = .218 = 1.09 * .2.
    Scaling the attention by 1000 (the reference's LLaVA scale) scales gamma and h by 1000: the scale is immaterial.
    """
    attention = torch.tensor([0.2, 0.1, 0.3])
    h, gamma = holistic_scores(attention, torch.tensor(THREE_VARIANCE), [3], alpha=0.09)
    assert torch.allclose(gamma, torch.tensor([20 / 21]))
    assert torch.allclose(h, torch.tensor([0.2 + 0.243 / 21, 0.1 + 0.459 / 21, 0.3 + 0.432 / 21]))
    assert math.isclose(float(h.mean()), 1.09 * 0.2, rel_tol=1e-6)
    h1000, gamma1000 = holistic_scores(attention * 1000, torch.tensor(THREE_VARIANCE), [3], alpha=0.09)
    assert torch.allclose(gamma1000, gamma * 1000) and torch.allclose(h1000, h * 1000)
    # no variance at all (one-token chunks): gamma = 0 and h = a
    h0, gamma0 = holistic_scores(attention, torch.zeros(3), [1, 1, 1])
    assert gamma0.tolist() == [0.0, 0.0, 0.0] and torch.equal(h0, attention)


# ---------------------------------------------------------------------------------------------- quotas
def test_quotas_floor_then_remainder_to_the_largest_weights():
    """Two chunks of 10, weights 3 : 1, K = 7: w = .75 / .25 -> floor(5.25) = 5, floor(1.75) = 1, one left -> the
    largest weight (chunk 0) -> 6 / 1. The largest-remainder rule of split_budget would give 5 / 2 (.75 > .25)."""
    assert holov_quotas(7, [3.0, 1.0], [10, 10]) == ([6, 1], [6, 1])
    assert split_budget(7, [3.0, 1.0], [10, 10]) == [5, 2]
    # tau = 2: weights 9 : 1 -> floor(6.3) = 6, floor(.7) = 0, one left -> chunk 0 -> 7 / 0
    assert holov_quotas(7, [9.0, 1.0], [10, 10]) == ([7, 0], [7, 0])
    # equal weights (tau = 0, or all zero): floor(5 / 3) = 1 each, two left -> ties to the lower chunks
    assert holov_quotas(5, [1.0, 1.0, 1.0], [2, 2, 2]) == ([2, 2, 1], [2, 2, 1])
    assert holov_quotas(5, [0.0, 0.0, 0.0], [2, 2, 2]) == ([2, 2, 1], [2, 2, 1])


def test_quotas_redistribute_the_excess_of_full_chunks():
    """sizes 2, 6, 6; weights 6 : 2 : 1 (w = 6/9, 2/9, 1/9), K = 8: floors 5 (5.33), 1 (1.78), 0 (.89), two left ->
    the two largest weights -> reference 6, 2, 0. Chunk 0 holds 2: the excess 4 goes to chunks 1, 2 by weight 2 : 1
    (room 4 and 6): 8/3 = 2.67 and 4/3 = 1.33 -> floors 2, 1, the last token to the larger remainder (chunk 1) ->
    3, 1 -> final 2, 5, 1. The reference keeps 2 + 2 + 0 = 4 tokens and pads 4 zero vectors."""
    assert holov_quotas(8, [6.0, 2.0, 1.0], [2, 6, 6]) == ([2, 5, 1], [6, 2, 0])
    # cascade: sizes 2, 3, 10, weights 6 : 3 : 1, K = 10 -> reference 6, 3, 1 (exact); chunk 0 overflows by 4 and
    # chunk 1 is already full, so all 4 go to chunk 2 -> 2, 3, 5
    assert holov_quotas(10, [6.0, 3.0, 1.0], [2, 3, 10]) == ([2, 3, 5], [6, 3, 1])
    # the excess reaches a weight-0 chunk when the others are full: weights 1 : 0, sizes 2, 5, K = 3 -> 3, 0 -> 2, 1
    assert holov_quotas(3, [1.0, 0.0], [2, 5]) == ([2, 1], [3, 0])
    # a budget above the tokens is the tokens: 5 = 2.5 + 2.5 -> 2, 2, one left to the lower chunk -> 3, 2 -> 2, 3
    assert holov_quotas(50, [1.0, 1.0], [2, 3]) == ([2, 3], [3, 2])
    with pytest.raises(ValueError, match="finite and >= 0"):
        holov_quotas(3, [1.0, float("nan")], [2, 2])


# ---------------------------------------------------------------------------------------------- selections by hand
# Two chunks of 4 on a 2x4 grid: attention chunk 0 = .5 .1 .3 .3 (mean .3), chunk 1 = .05 .2 .1 .05 (mean .1).
# Weights .327 : .109 = 3 : 1 (w = .75, .25).
TWO = [0.5, 0.1, 0.3, 0.3, 0.05, 0.2, 0.1, 0.05]


def test_two_chunk_selection_by_hand():
    holov = create_compressor("holov", chunks=2)
    tokens = image(TWO, (2, 4))
    # K = 3: floor(2.25) = 2, floor(.75) = 0, one left -> chunk 0 -> 3 / 0: chunk 0's top 3 = .5 (0), .3 (2), .3 (3)
    selection = run_compressor(holov, tokens, 3)
    assert selection.indices.tolist() == [0, 2, 3]
    details = selection.details
    assert isinstance(details, HoloVDetails) and details.quotas.tolist() == [3, 0] and details.redistributed == 0
    assert torch.allclose(details.weights, torch.tensor([0.75, 0.25]))
    assert torch.equal(selection.scores, torch.tensor(TWO))  # within="attention": the attention ranks
    # K = 5: floor(3.75) = 3, floor(1.25) = 1, one left -> chunk 0 -> 4 / 1: chunk 1's top = .2 (5)
    assert run_compressor(holov, tokens, 5).indices.tolist() == [0, 1, 2, 3, 5]
    # K = 6: floor(4.5) = 4, floor(1.5) = 1, one left -> chunk 0 -> reference 5 / 1; chunk 0 holds 4, its excess 1
    # goes to chunk 1 -> 4 / 2: chunk 1's top 2 = .2 (5), .1 (6)
    full = run_compressor(holov, tokens, 6)
    assert full.indices.tolist() == [0, 1, 2, 3, 5, 6]
    assert full.details.reference_quotas.tolist() == [5, 1] and full.details.quotas.tolist() == [4, 2]
    assert full.details.redistributed == 1
    # tau = 0: equal weights; K = 3 -> 1.5 each -> 1 / 1 and the remainder to the tie's lower chunk -> 2 / 1:
    # chunk 0's top 2 = .5 (0) and the lower of the .3 tie (2); chunk 1's top = .2 (5)
    assert run_compressor(create_compressor("holov", chunks=2, tau=0.0), tokens, 3).indices.tolist() == [0, 2, 5]


def test_ten_tokens_three_chunks_by_hand():
    """N = 10, K = 5: the rule gives C = int(17.78 / 5) = 3 chunks of 4, 3, 3 tokens.

    attention: chunk 0 = .4 .1 .3 .2 (mean .25), chunk 1 = .05 .15 .1 (mean .1), chunk 2 = .02 .06 .07 (mean .05).
    w = .625, .25, .125 -> floors 3 (3.125), 1 (1.25), 0 (.625), one left -> chunk 0 -> 4, 1, 0:
    all of chunk 0 and chunk 1's top (.15, token 5).
    K = 7 (chunks=3): floors 4 (4.375), 1 (1.75), 0 (.875), two left -> chunks 0, 1 -> reference 5, 2, 0; chunk 0
    holds 4: its excess 1 goes by weight .25 : .125 to chunk 1 (room 1) or 2 (room 3): 2/3 vs 1/3 -> chunk 1 ->
    4, 3, 0 = tokens 0..6.
    """
    attention = [0.4, 0.1, 0.3, 0.2, 0.05, 0.15, 0.1, 0.02, 0.06, 0.07]
    tokens = image(attention, (2, 5), seed=1)
    selection = run_compressor(create_compressor("holov"), tokens, 5)
    assert selection.details.chunk_sizes.tolist() == [4, 3, 3]
    assert selection.details.quotas.tolist() == [4, 1, 0]
    assert selection.indices.tolist() == [0, 1, 2, 3, 5]
    seven = run_compressor(create_compressor("holov", chunks=3), tokens, 7)
    assert seven.details.reference_quotas.tolist() == [5, 2, 0] and seven.details.quotas.tolist() == [4, 3, 0]
    assert seven.indices.tolist() == list(range(7))


def test_holistic_ranking_uses_the_variance():
    """One chunk of the three tokens above with equal attention .2: attention ties keep the lowest indices (0, then
    0, 1); h = .2 + .09 * (.2 / .21) * v ranks by v = .135, .255, .24 -> token 1, then 2."""
    tokens = VisualTokens(features=THREE, grid=(1, 3), signals={CLS22: torch.full((3,), 0.2)})
    attention = create_compressor("holov", chunks=1)
    holistic = create_compressor("holov", chunks=1, within="holistic")
    assert run_compressor(attention, tokens, 1).indices.tolist() == [0]
    assert run_compressor(attention, tokens, 2).indices.tolist() == [0, 1]
    assert run_compressor(holistic, tokens, 1).indices.tolist() == [1]
    assert run_compressor(holistic, tokens, 2).indices.tolist() == [1, 2]
    selection = run_compressor(holistic, tokens, 2)
    expected = torch.tensor([0.2 + 0.09 * 0.2 / 0.21 * v for v in THREE_VARIANCE])
    assert torch.allclose(selection.scores, expected) and torch.allclose(selection.details.holistic, expected)
    assert torch.allclose(selection.details.variance, torch.tensor(THREE_VARIANCE), atol=1e-6)


def test_prefix_token_is_always_kept_and_the_chunks_cover_the_grid():
    """A CLS prefix before the 2x4 grid of the two-chunk example: it is kept, the grid shares K - 1 = 3 as above
    (tokens 0, 2, 3 of the grid = 1, 3, 4 here); it is in no chunk and has no score."""
    tokens = image([0.9] + TWO, (2, 4), prefix=1)
    selection = run_compressor(create_compressor("holov", chunks=2), tokens, 4)
    assert selection.indices.tolist() == [0, 1, 3, 4]
    assert selection.details.chunk_starts.tolist() == [1, 5]
    assert math.isnan(float(selection.scores[0])) and math.isnan(float(selection.details.holistic[0]))
    only = run_compressor(create_compressor("holov"), tokens, 1)
    assert only.indices.tolist() == [0] and only.details.quotas.numel() == 0


def test_no_cls_received_attention_gives_the_same_selection():
    """Received attention (a column sum, mean 1 per token) is another scale of the same ranking: gamma absorbs it,
    so 576 times the attention selects the same tokens."""
    cls = image(TWO, (2, 4))
    received = VisualTokens(features=cls.features, grid=(2, 4), signals={RECEIVED31: torch.tensor(TWO) * 576})
    for k in (1, 3, 5, 6):
        ours = run_compressor(create_compressor("holov", chunks=2, within="holistic"), received, k)
        theirs = run_compressor(create_compressor("holov", chunks=2, within="holistic"), cls, k)
        assert ours.indices.tolist() == theirs.indices.tolist()
        assert ours.details.signals == (RECEIVED31,)


def test_low_precision_inputs_are_scored_in_fp32():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(49, 8, generator=g).to(torch.bfloat16)
    attention = torch.rand(49, generator=g).to(torch.float16)
    low = run_compressor(create_compressor("holov"), VisualTokens(features, (7, 7), {CLS22: attention}), 12)
    high = run_compressor(create_compressor("holov"),
                          VisualTokens(features.float(), (7, 7), {CLS22: attention.float()}), 12)
    assert low.indices.dtype == torch.long and low.scores.dtype == torch.float32
    assert low.indices.tolist() == high.indices.tolist()


def test_non_finite_attention_is_an_error():
    tokens = image([0.1, float("nan"), 0.2, 0.3], (2, 2))
    with pytest.raises(ValueError, match="not finite"):
        run_compressor(create_compressor("holov", chunks=2), tokens, 2)


# ---------------------------------------------------------------------------------------------- properties
def naive_holov(attention: list[float], features: torch.Tensor, k: int, chunks: int | None, alpha: float,
                tau: float, within: str) -> list[int]:
    """The spec transcribed with Python lists and float64 (no prefix): chunks, S, mu, v, gamma, h, weights, the
    reference quotas, then capping with the excess re-split by ``split_budget`` (vtc's documented deviation)."""
    n = len(attention)
    c = max(1, (16 * n) // (9 * k)) if chunks is None else chunks
    c = min(c, n)
    sizes = [n // c + (1 if i < n % c else 0) for i in range(c)]
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    cos = (unit @ unit.T).tolist()
    start, h, means = 0, [0.0] * n, []
    for m in sizes:
        members = list(range(start, start + m))
        v = {}
        for i in members:
            row = [0.0 if j == i else cos[i][j] for j in members]
            mu = sum(row) / (m - 1) if m > 1 else 0.0
            v[i] = sum((s - mu) ** 2 for s in row) / (m - 1) if m > 1 else 0.0
        mean_a = sum(abs(attention[i]) for i in members) / m
        mean_v = sum(abs(v[i]) for i in members) / m
        gamma = mean_a / mean_v if mean_v > 0 else 0.0
        for i in members:
            h[i] = attention[i] + alpha * gamma * v[i]
        means.append(max(0.0, sum(h[i] for i in members) / m))
        start += m
    weights = [Fraction(mean ** tau) for mean in means]
    total = sum(weights)
    if total == 0:
        weights, total = [Fraction(1)] * c, Fraction(c)
    quotas = [math.floor(k * w / total) for w in weights]
    for i in sorted(range(c), key=lambda i: (-weights[i], i))[:k - sum(quotas)]:
        quotas[i] += 1
    capped = [min(q, m) for q, m in zip(quotas, sizes)]
    extra = split_budget(k - sum(capped), [float(w) for w in weights], [m - q for m, q in zip(sizes, capped)])
    key = attention if within == "attention" else h
    kept, start = [], 0
    for m, q in zip(sizes, [q + e for q, e in zip(capped, extra)]):
        kept += sorted(range(start, start + m), key=lambda i: (-key[i], i))[:q]
        start += m
    return sorted(kept)


@st.composite
def image_case(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    k = draw(st.integers(1, n))
    chunks = draw(st.one_of(st.none(), st.integers(1, 12)))
    tau = draw(st.sampled_from([0.0, 1.0, 2.0]))
    within = draw(st.sampled_from(["attention", "holistic"]))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    return rows, cols, prefix, n, k, chunks, tau, within, seed, ties


@settings(max_examples=80, deadline=None)
@given(case=image_case())
def test_properties(case):
    rows, cols, prefix, n, k, chunks, tau, within, seed, ties = case
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(n, generator=g)
    features = torch.randn(n, 6, generator=g)
    if ties:  # quantised attention and repeated features provoke ties everywhere
        attention = (attention * 4).round() / 4
        features = (features > 0).float()
    tokens = VisualTokens(features=features, grid=(rows, cols), signals={CLS22: attention}, num_prefix_tokens=prefix)
    compressor = create_compressor("holov", chunks=chunks, tau=tau, within=within)
    selection = run_compressor(compressor, tokens, k)
    idx = selection.indices.tolist()
    assert len(idx) == k and idx == sorted(set(idx))
    kept_prefix = min(prefix, k)
    assert idx[:kept_prefix] == list(range(kept_prefix))
    d = selection.details
    if k > kept_prefix:
        sizes, quotas, reference = d.chunk_sizes.tolist(), d.quotas.tolist(), d.reference_quotas.tolist()
        assert sum(sizes) == n - prefix and d.chunk_starts.tolist()[0] == prefix
        assert sum(quotas) == sum(reference) == k - kept_prefix
        assert all(0 <= q <= s for q, s in zip(quotas, sizes))
        assert all(q >= min(r, s) for q, r, s in zip(quotas, reference, sizes))
        if all(r <= s for r, s in zip(reference, sizes)):
            assert quotas == reference and d.redistributed == 0
        assert math.isclose(float(d.weights.sum()), 1.0, rel_tol=1e-5)
        key = selection.scores
        kept = set(idx)
        for start, size, quota in zip(d.chunk_starts.tolist(), sizes, quotas):
            members = list(range(start, start + size))
            inside = [i for i in members if i in kept]
            assert len(inside) == quota
            dropped = [i for i in members if i not in kept]
            if inside and dropped:  # the top of each chunk by its key
                assert min(float(key[i]) for i in inside) >= max(float(key[i]) for i in dropped)
    # deterministic, and exactly invariant to the attention scale and to each feature's norm (powers of two scale
    # floats exactly): only the cosine and the attention's proportions matter
    assert run_compressor(compressor, tokens, k).indices.tolist() == idx
    scaled = VisualTokens(features=features * (2.0 ** torch.randint(-3, 4, (n, 1), generator=g)),
                          grid=(rows, cols), signals={CLS22: attention * 1024}, num_prefix_tokens=prefix)
    assert run_compressor(compressor, scaled, k).indices.tolist() == idx
    assert run_compressor(compressor, tokens, 1.0).indices.tolist() == list(range(n))
    if prefix == 0 and not ties:  # the float64 transcription of the spec
        assert idx == naive_holov(attention.tolist(), features, k, chunks, 0.09, tau, within)


# ---------------------------------------------------------------------------------------------- allocation
CLIP = TowerInfo(name="clip", num_layers=4, feature_layer=2, has_cls=True)
SIGLIP = TowerInfo(name="siglip", num_layers=4, feature_layer=3, has_cls=False)
CLS2 = Signal(SignalKind.CLS_ATTENTION, 2)


def multiview(layout: PackedLayout, view_attention: list[torch.Tensor], seed: int = 0) -> MultiViewTokens:
    features = random_features(layout.num_tokens, seed, dim=5)
    return MultiViewTokens(features=features, layout=layout, view_signals=[{CLS2: a} for a in view_attention],
                           tower=CLIP)


def test_allocation_is_registered_with_options():
    assert "holov" in list_allocations()
    assert isinstance(create_allocation("holov"), HoloVAllocation)
    assert HoloVAllocation().signals(CLIP) == (CLS2,)
    assert HoloVAllocation().signals(SIGLIP) == (Signal(SignalKind.RECEIVED_ATTENTION, 3),)
    assert HoloVAllocation(layer=0).signals(CLIP) == (Signal(SignalKind.CLS_ATTENTION, 0),)
    with pytest.raises(ValueError, match="alpha"):
        HoloVAllocation(alpha=-1)
    with pytest.raises(ValueError, match="tau"):
        HoloVAllocation(tau=float("nan"))
    with pytest.raises(ValueError, match="chunks"):
        HoloVAllocation(chunks=0)


def test_allocation_by_hand_three_equal_views():
    """Base 2x2 and two 2x2 crops: views of 4 tokens, N = 12. K = 5: C = (16 * 12) // (9 * 5) = 4 chunks over the
    image -> round(4 * 4 / 12) = 1 chunk per view, so a view weighs
    (1 + alpha) * its mean attention: .1, .3, .2 -> w = 1/6, 1/2, 1/3 -> floors 0 (.83), 2 (2.5), 1 (1.67), two left
    -> the largest weights (views 1, 2) -> 0, 3, 2. split_budget's largest remainders would give 1, 2, 2."""
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2)))
    assert layout.view_sizes == (4, 4, 4)
    means = [0.1, 0.3, 0.2]
    attention = [torch.tensor([m - 0.05, m + 0.05, m, m]) for m in means]
    image = multiview(layout, attention)
    assert HoloVAllocation().budgets(image, 5) == [0, 3, 2]
    assert split_budget(5, means, layout.view_sizes) == [1, 2, 2]
    result = select_views(create_compressor("holov"), HoloVAllocation(), image, 5, {CLS2})
    assert result.view_budgets == (0, 3, 2) and result.budget == 5


def test_allocation_weighs_a_view_by_its_chunks():
    """Base 4x4 (16 tokens), crop 1 shows 4x2 (8), crop 2 shows 4x4 (16): N = 40. K = 10: C = 640 // 90 = 7 over
    the image -> round(16 * 7 / 40 = 2.8) = 3, round(1.4) = 1 and 3 chunks. Attention .05 in the base and crop 1,
    .06 in crop 2: every chunk weighs (1 + alpha) times its view's level, so the views weigh 3 * .05 : 1 * .05 :
    3 * .06 = 15 : 5 : 18 -> 3.95, 1.32, 4.74 -> floors 3, 1, 4, two left -> the largest weights (views 2, 0) ->
    4, 1, 5. Weighing each view by its mean alone (5 : 5 : 6) would give 3.13, 3.13, 3.75 -> 3, 3, 4.

    K = 20, one chunk per view (C = 640 // 180 = 3): means .1, .6, .2 -> w = 1/9, 6/9, 2/9 -> floors 2, 13, 4, one
    left -> view 1 -> 2, 14, 4; crop 1 holds 8: its 6 extra go to views 0 and 2 by 1 : 2 -> 2 + 2, 8, 4 + 4."""
    layout = PackedLayout(base=(4, 4), canvas=CropCanvas(tiles=(1, 2), tile=(4, 4), box=(0, 4, 2, 8)))
    assert layout.view_sizes == (16, 8, 16)
    levels = multiview(layout, [torch.full((n,), m) for n, m in zip(layout.view_sizes, [0.05, 0.05, 0.06])], seed=1)
    assert HoloVAllocation().budgets(levels, 10) == [4, 1, 5]
    peaked = multiview(layout, [torch.full((n,), m) for n, m in zip(layout.view_sizes, [0.1, 0.6, 0.2])], seed=2)
    assert HoloVAllocation().budgets(peaked, 20) == [4, 8, 8]


@st.composite
def anyres_layouts(draw):
    side = draw(st.integers(2, 4))
    tiles = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    full_h, full_w = tiles[0] * side, tiles[1] * side
    pad = draw(st.integers(0, full_w // 2))
    return PackedLayout(base=(side, side), canvas=CropCanvas(tiles=tiles, tile=(side, side),
                                                             box=(0, full_h, pad, full_w - pad)))


@settings(max_examples=40, deadline=None)
@given(anyres_layouts(), st.integers(1, 120), st.sampled_from(["holov", "fastervlm"]), st.integers(0, 10),
       st.sampled_from([HoloVAllocation(), HoloVAllocation(tau=0.0, chunks=3)]))
def test_allocation_contract(layout, budget, compressor_name, seed, allocation):
    g = torch.Generator().manual_seed(seed)
    image = MultiViewTokens(features=torch.randn(layout.num_tokens, 5, generator=g), layout=layout,
                            view_signals=[{CLS2: torch.rand(n, generator=g)} for n in layout.view_sizes], tower=CLIP)
    compressor = create_compressor(compressor_name)
    result = select_views(compressor, allocation, image, budget, set(compressor.signals(CLIP)))
    k = min(budget, layout.num_visual_tokens)
    assert result.budget == sum(result.view_budgets) == k
    assert all(0 <= b <= n for b, n in zip(result.view_budgets, layout.view_sizes))
    assert list(result.view_budgets) == allocation.budgets(image, k)  # deterministic


@pytest.fixture(scope="module")
def llava_next():
    from vtc import testing as tiny

    return tiny.build_tiny("llava_next", seed=0)


def test_apply_with_holov_allocation_equals_hand_built_prompt(llava_next):
    from helpers import QUESTIONS, greedy, hand_built, make_inputs

    model, processor = llava_next
    inputs = make_inputs(processor, "llava_next", QUESTIONS[:1], [1], first_image=1)
    vtc.apply(model, "holov", budget=9, allocation="holov")
    out = greedy(model, inputs, max_new_tokens=4)
    record = vtc.last_selection(model)[0]
    assert record.allocation == "holov" and sum(record.view_budgets) == record.num_kept_visual == 9
    views = record.details.views
    assert all(v is None or isinstance(v, HoloVDetails) for v in views)
    short, short_len = hand_built(model, inputs, "llava_next")
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=4)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == reference[:, short_len:].tolist()
