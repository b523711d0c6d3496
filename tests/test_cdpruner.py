"""CDPruner (arXiv 2506.10967): hand-derived golden tests, the reference algorithm, properties, no query, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc
import vtc.compressors.cdpruner as cdpruner_module  # (also registers "cdpruner")
from vtc import VisualTokens, create_compressor, run_compressor
from vtc.compressors.cdpruner import (
    CDPruner,
    CDPrunerDetails,
    cdpruner_order,
    relevance_scores,
    relevance_weights,
)
from helpers import CLIP_L, QWEN25


def tokens_of(features, query=None, grid=None) -> VisualTokens:
    features = torch.as_tensor(features, dtype=torch.float32)
    if query is not None:
        query = torch.as_tensor(query, dtype=torch.float32)
    return VisualTokens(features=features, grid=grid or (1, features.shape[0]), query=query)


def cdpruner(tokens: VisualTokens, k, **options):
    return run_compressor(create_compressor("cdpruner", **options), tokens, k)


def reference_order(features: torch.Tensor, query: torch.Tensor | None, k: int, theta=None,
                    query_pool: str = "mean") -> list[int]:
    """The reference algorithm as the spec writes it, in float64: the kernel L~ = diag(r) S diag(r) built in full,
    d^2 = diag(L~), then per step j = argmax d^2, e = (L~[j] - sum_s C[s, j] C[s]) / sqrt(d^2[j]), d^2 -= e^2,
    d^2[j] = -inf. Relevance +cos (the LLM-space sign), r~ = (rel - min + 1e-6) / (max - min)."""
    unit = F.normalize(features.double(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(1.0)
    n = features.shape[0]
    if query is None:
        r = torch.ones(n, dtype=torch.float64)
    else:
        q = query.double()
        if query_pool == "mean":
            rel = unit @ F.normalize(q.mean(0), dim=0)
        else:
            rel = (unit @ F.normalize(q, dim=-1).T).mean(1)
        r = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        if theta is not None:
            r = torch.exp(theta / (2 * (1 - theta)) * r)
    kernel = r[:, None] * sim * r[None, :]
    d2 = torch.diagonal(kernel).clone()
    chol = torch.zeros(k, n, dtype=torch.float64)
    order = []
    for t in range(k):
        j = int(torch.argmax(d2))
        order.append(j)
        e = (kernel[j] - chol[:t, j] @ chol[:t]) / d2[j].sqrt()
        chol[t] = e
        d2 = d2 - e * e
        d2[j] = -math.inf
    return order


# ---------------------------------------------------------------------------------------------- registry
def test_registered_query_aware_without_signals():
    assert "cdpruner" in vtc.list_compressors()
    assert "cdpruner" in vtc.list_compressors("encoder")
    c = create_compressor("cdpruner")
    assert isinstance(c, CDPruner) and c.uses_query and not c.handles_video and not c.acts_in_llm
    assert c.options() == {"theta": None, "query_pool": "mean"}
    assert c.signals(CLIP_L) == () and c.signals(QWEN25) == ()


# ---------------------------------------------------------------------------------------------- golden
# Four unit features in 3-D (cosines by hand):
#   x0 = (1, 0, 0), x1 = (0, 1, 0), x2 = (.6, .8, 0), x3 = (0, 0, 1)
#   cos(x0, x2) = .6, cos(x1, x2) = .8, x3 is orthogonal to the other three, cos(x0, x1) = 0.
X4 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]
# One query token q = (0, .6, .8) (unit): rel = [0, .6, .48, .8]; min 0, max .8, spread .8 ->
#   r~ = (rel + 1e-6) / .8 = [1.25e-6, .75, .6, 1] (+1.25e-6 each).
Q4 = [[0.0, 0.6, 0.8]]


def test_golden_conditional_dpp():
    """Greedy on d_i^2 = r_i^2 * rho_i (rho_i: squared distance of x_i from the span of the picks):

    step 1: rho = 1 everywhere -> argmax r~ -> x3 (r~ = 1).
    step 2: x0, x1, x2 are orthogonal to x3 -> rho stays 1: d^2 = r~^2 = [1.6e-12, .5625, .36] -> x1.
    step 3: span{x3, x1}: rho0 = 1, rho2 = 1 - cos(x1, x2)^2 = 1 - .64 = .36:
            d^2_0 = 1.6e-12, d^2_2 = .36 * .36 = .1296 -> x2.
    Kept [1, 2, 3], picked 3, 1, 2 with residuals 1, 1, .36. k = 2 stops after step 2: [1, 3].
    """
    tokens = tokens_of(X4, Q4)
    selection = cdpruner(tokens, 3)
    assert selection.indices.tolist() == [1, 2, 3]
    details = selection.details
    assert isinstance(details, CDPrunerDetails) and details.signals == () and details.layers == ()
    assert details.conditioned and details.rounds == 1
    assert details.pick_order.tolist() == [3, 1, 2]
    torch.testing.assert_close(details.residuals, torch.tensor([1.0, 1.0, 0.36]), atol=1e-6, rtol=0)
    torch.testing.assert_close(details.relevance, torch.tensor([0.0, 0.6, 0.48, 0.8]), atol=1e-6, rtol=0)
    # scores: r / max r = (rel + 1e-6) / (.8 + 1e-6)
    torch.testing.assert_close(selection.scores, (torch.tensor([0.0, 0.6, 0.48, 0.8]) + 1e-6) / (0.8 + 1e-6),
                               atol=1e-6, rtol=1e-5)
    assert cdpruner(tokens, 2).indices.tolist() == [1, 3]
    assert cdpruner(tokens, 1).indices.tolist() == [3]  # the first pick is the most relevant token


def test_golden_without_query_is_a_plain_dpp():
    """Same features, no query: every r_i = 1, d^2_i = rho_i.

    step 1: rho = 1 everywhere, a tie -> the lowest index, x0.
    step 2: rho = 1 - cos(., x0)^2 = [-, 1, .64, 1] -> tie x1 / x3 -> x1.
    step 3: span{x0, x1} is the xy-plane: rho2 = 0 (spanned), rho3 = 1 -> x3.
    Kept [0, 1, 3] -- not the conditioned [1, 2, 3]. An empty query ([0, D]: no text tokens) is the same.
    """
    for query in (None, torch.zeros(0, 3)):
        selection = cdpruner(tokens_of(X4, query), 3)
        assert selection.indices.tolist() == [0, 1, 3]
        assert selection.details.pick_order.tolist() == [0, 1, 3]
        assert not selection.details.conditioned and selection.details.relevance is None
        assert torch.equal(selection.scores, torch.ones(4))


def test_golden_theta_weighting():
    """theta = .5: alpha = .5, r = exp(.5 r~), so log d^2 = r~ + log rho (theta / (1 - theta) = 1).

    step 1: argmax r~ -> x3.   step 2: rho = 1: log d^2 = r~ = [~0, .75, .6] -> x1.
    step 3: log d^2_0 = 1.25e-6 + log 1 = ~0;  log d^2_2 = .6 + log .36 = .6 - 1.0217 = -.4217 -> x0.
    Kept [0, 1, 3]: the weaker weighting lets diversity beat the relevance of x2 (default theta: [1, 2, 3]).
    theta = 0: alpha = 0, r = 1 -> the plain DPP [0, 1, 3] of the query-less test.
    """
    tokens = tokens_of(X4, Q4)
    selection = cdpruner(tokens, 3, theta=0.5)
    assert selection.details.pick_order.tolist() == [3, 1, 0]
    assert selection.indices.tolist() == [0, 1, 3]
    # scores: exp(.5 * (r~ - max r~)) = exp(.5 * (rel - .8) / .8)
    torch.testing.assert_close(selection.scores, torch.exp(0.5 * (torch.tensor([0.0, 0.6, 0.48, 0.8]) - 0.8) / 0.8),
                               atol=1e-6, rtol=1e-5)
    plain = cdpruner(tokens, 3, theta=0.0)
    assert plain.details.pick_order.tolist() == [0, 1, 3] and plain.details.conditioned
    assert torch.equal(plain.scores, torch.ones(4))


def test_golden_query_pool():
    """x0 = (1, 0), x1 = (0, 1), x2 = (1, 1)/sqrt 2; query tokens q_a = (10, 0), q_b = (0, 1).

    "mean": q = mean = (5, .5), direction (10, 1)/sqrt 101: rel = [.995, .0995, .774] -> first pick x0.
    "per_token": mean of cos = x . mean(unit q) = x . (.5, .5): rel = [.5, .5, .7071] -> first pick x2.
    """
    features = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    query = [[10.0, 0.0], [0.0, 1.0]]
    tokens = tokens_of(features, query)
    torch.testing.assert_close(relevance_scores(tokens.features, tokens.query, "mean"),
                               torch.tensor([10.0, 1.0, 11.0 / math.sqrt(2)]) / math.sqrt(101.0))
    torch.testing.assert_close(relevance_scores(tokens.features, tokens.query, "per_token"),
                               torch.tensor([0.5, 0.5, math.sqrt(0.5)]))
    assert cdpruner(tokens, 1).indices.tolist() == [0]
    assert cdpruner(tokens, 1, query_pool="per_token").indices.tolist() == [2]


def test_golden_rank_exhausted_starts_a_new_round():
    """X4 plus x4 = (1, 1, 1)/sqrt 3, no query, k = 4 of 5 (d^2 = rho):

    step 1: tie -> x0.   step 2: rho = 1 - cos(., x0)^2 = [-, 1, .64, 1, 2/3] -> tie x1 / x3 -> x1.
    step 3: span{x0, x1} = xy-plane: rho2 = 0, rho3 = 1, rho4 = 1 - 1/3 - 1/3 = 1/3 -> x3.
    step 4: span{x0, x1, x3} = R^3: rho2 = rho4 = 0 <= SPAN_TOLERANCE, every remaining token is spanned: a new round
            starts on them (rho = 1): tie -> x2, residual 1.
    Kept [0, 1, 2, 3], picked 0, 1, 3, 2, two rounds. (The reference would take sqrt of ~0 here: NaN.)
    """
    selection = cdpruner(tokens_of(X4 + [[1.0, 1.0, 1.0]]), 4)
    assert selection.indices.tolist() == [0, 1, 2, 3]
    assert selection.details.pick_order.tolist() == [0, 1, 3, 2]
    assert selection.details.rounds == 2
    torch.testing.assert_close(selection.details.residuals, torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_golden_identical_features_each_pick_is_its_own_round():
    """Five copies of one feature: after any pick the rest are spanned (rho = 0), so every pick starts a new round
    and takes the most relevant remaining token -- with no query (or equal relevance) the lowest index."""
    features = torch.tensor([[0.3, -1.0, 2.0]]).repeat(5, 1)
    selection = cdpruner(tokens_of(features), 3)
    assert selection.indices.tolist() == [0, 1, 2]
    assert selection.details.pick_order.tolist() == [0, 1, 2]
    assert selection.details.rounds == 3
    # same features -> same cosine to any query -> equal relevance -> uniform weights
    with_query = cdpruner(tokens_of(features, [[1.0, 2.0, 3.0]]), 3)
    assert with_query.indices.tolist() == [0, 1, 2] and torch.equal(with_query.scores, torch.ones(5))


def test_golden_span_tolerance():
    """x0 = (1, 0), x2 = (0, 1); query (1, 0): rel = [1, ~1, 0] -> x0 first, then x1 or x2.

    x1 = (1, .005): rho1 = sin^2 = .005^2 / (1 + .005^2) = 2.5e-5 <= SPAN_TOLERANCE (1e-4): spanned, x2 is taken
      (the reference would take x1: d^2_1 = ~1 * 2.5e-5 beats d^2_2 = (1e-6)^2).
    x1 = (1, .05): rho1 = .0025 / 1.0025 = 2.49e-3 > 1e-4: d^2_1 = ~2.5e-3 beats 1e-12 -> x1, as the reference.
    """
    assert cdpruner_module.SPAN_TOLERANCE == 1e-4
    near = tokens_of([[1.0, 0.0], [1.0, 0.005], [0.0, 1.0]], [[1.0, 0.0]])
    assert cdpruner(near, 2).details.pick_order.tolist() == [0, 2]
    apart = tokens_of([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]], [[1.0, 0.0]])
    assert cdpruner(apart, 2).details.pick_order.tolist() == [0, 1]
    assert reference_order(apart.features, apart.query, 2) == [0, 1]


def test_zero_feature_is_orthogonal_to_everything():
    """A zero vector has cosine 0 to every token and S_ii = 1 (the diagonal is set, as cos(i, i) = 1): no query ->
    step 1 tie -> x0; x1 = x0 is spanned; the zero token x2 (rho 1) is taken before the duplicate."""
    selection = cdpruner(tokens_of([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), 2)
    assert selection.details.pick_order.tolist() == [0, 2] and selection.details.rounds == 1


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("theta", [None, 0.5, 0.9])
@pytest.mark.parametrize("query_pool", ["mean", "per_token"])
def test_matches_the_reference_kernel_greedy(theta, query_pool):
    """On full-rank random inputs (D >= N, no ties) the log-domain greedy on S picks exactly what the reference's
    greedy on the full kernel L~ = diag(r) S diag(r) picks, in the same order."""
    generator = torch.Generator().manual_seed(7)
    for trial in range(12):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        k = int(torch.randint(1, n, (1,), generator=generator))
        features = torch.randn(n, 48, generator=generator)
        query = torch.randn(int(torch.randint(1, 6, (1,), generator=generator)), 48, generator=generator)
        selection = cdpruner(tokens_of(features, query), k, theta=theta, query_pool=query_pool)
        assert selection.details.pick_order.tolist() == reference_order(features, query, k, theta, query_pool)
        assert selection.details.rounds == 1


def test_no_query_matches_the_reference_plain_dpp():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(30, 40, generator=generator)
    assert cdpruner(tokens_of(features), 20).details.pick_order.tolist() == reference_order(features, None, 20)


def test_residuals_multiply_to_the_determinant():
    """Within one round prod(residuals) = det S_K of the kept tokens (the greedy is a Cholesky of S_K), and the
    gains add up: sum(2 log r + log rho) over the picks = log det L~_K up to the constant factor on r."""
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(25, 32, generator=generator)
    query = torch.randn(4, 32, generator=generator)
    selection = cdpruner(tokens_of(features, query), 10)
    kept = selection.details.pick_order
    unit = F.normalize(features.double(), dim=-1)[kept]
    det = torch.linalg.det(unit @ unit.T)
    assert float(selection.details.residuals.double().prod()) == pytest.approx(float(det), rel=1e-4)


def test_large_images_compute_similarity_rows_on_the_fly(monkeypatch):
    """Above SIMILARITY_MATRIX_ELEMENTS the N x N matrix is never built; the picks are the same."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(60, 8, generator=generator)  # N > D: rank exhaustion and new rounds included
    query = torch.randn(3, 8, generator=generator)
    tokens = tokens_of(features, query, grid=(6, 10))
    whole = cdpruner(tokens, 30)
    monkeypatch.setattr(cdpruner_module, "SIMILARITY_MATRIX_ELEMENTS", 0)
    rows = cdpruner(tokens, 30)
    assert rows.details.pick_order.tolist() == whole.details.pick_order.tolist()
    assert rows.details.rounds == whole.details.rounds > 1
    torch.testing.assert_close(rows.details.residuals, whole.details.residuals)


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def case(draw):
    rows, cols = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    k = draw(st.integers(1, n))
    dim = draw(st.sampled_from([2, 6, 64]))
    seed = draw(st.integers(0, 2**16))
    quantised = draw(st.booleans())  # duplicates and ties
    with_query = draw(st.sampled_from(["none", "empty", "tokens"]))
    theta = draw(st.sampled_from([None, 0.0, 0.5]))
    pool = draw(st.sampled_from(["mean", "per_token"]))
    return rows, cols, prefix, n, k, dim, seed, quantised, with_query, theta, pool


@settings(max_examples=80, deadline=None)
@given(c=case())
def test_valid_exact_deterministic(c):
    rows, cols, prefix, n, k, dim, seed, quantised, with_query, theta, pool = c
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    if quantised:
        features = features.round()
    query = {"none": None, "empty": torch.zeros(0, dim),
             "tokens": torch.randn(3, dim, generator=generator)}[with_query]
    tokens = VisualTokens(features=features, grid=(rows, cols), query=query, num_prefix_tokens=prefix)
    compressor = create_compressor("cdpruner", theta=theta, query_pool=pool)
    selection = run_compressor(compressor, tokens, k)  # validates: exactly k, sorted, unique, in range
    idx = selection.indices.tolist()
    assert len(idx) == k == len(set(idx)) and idx == sorted(idx)
    assert selection.features is None and selection.scores.shape == (n,)
    scores = selection.scores
    assert bool(((scores >= 0) & (scores <= 1)).all()) and float(scores.max()) == 1.0
    details = selection.details
    if k < n:
        assert sorted(details.pick_order.tolist()) == idx
        assert details.residuals.shape == (k,) and bool(torch.isfinite(details.residuals).all())
        assert bool((details.residuals > cdpruner_module.SPAN_TOLERANCE).all())
        assert 1 <= details.rounds <= k
        if with_query == "tokens":  # the first pick is a most relevant token
            assert float(scores[details.pick_order[0]]) == 1.0
    else:
        assert idx == list(range(n)) and details.rounds == 0 and details.pick_order.numel() == 0
    assert details.conditioned == (with_query == "tokens")
    again = run_compressor(compressor, tokens, k)
    assert again.indices.tolist() == idx and again.details.pick_order.tolist() == details.pick_order.tolist()


def test_invariant_to_positive_scaling_of_features_and_query():
    """S and rel are cosines: scaling any feature or query token by a positive number changes nothing ("mean" pools
    the raw query, so scale the whole query there; "per_token" normalises each token first)."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(40, 16, generator=generator)
    query = torch.randn(5, 16, generator=generator)
    base = cdpruner(tokens_of(features, query), 15).details.pick_order.tolist()
    factors = torch.rand(40, 1, generator=generator) * 10 + 0.1
    assert cdpruner(tokens_of(features * factors, query * 3.0), 15).details.pick_order.tolist() == base
    per_token = cdpruner(tokens_of(features, query), 15, query_pool="per_token").details.pick_order.tolist()
    token_factors = torch.rand(5, 1, generator=generator) * 10 + 0.1
    scaled = cdpruner(tokens_of(features * factors, query * token_factors), 15, query_pool="per_token")
    assert scaled.details.pick_order.tolist() == per_token


def test_equivariant_to_permuting_tokens():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(30, 32, generator=generator)
    query = torch.randn(2, 32, generator=generator)
    perm = torch.randperm(30, generator=generator)
    base = cdpruner(tokens_of(features, query), 12).details.pick_order
    permuted = cdpruner(tokens_of(features[perm], query), 12).details.pick_order
    assert perm[permuted].tolist() == base.tolist()


def test_equal_relevance_is_the_plain_dpp():
    """A query orthogonal to every feature gives rel = 0 everywhere: r~ is uniform, as without a query."""
    generator = torch.Generator().manual_seed(6)
    features = torch.cat([torch.randn(20, 8, generator=generator), torch.zeros(20, 1)], dim=1)
    query = torch.tensor([[0.0] * 8 + [1.0]])
    conditioned = cdpruner(tokens_of(features, query), 8)
    assert conditioned.details.conditioned and torch.equal(conditioned.scores, torch.ones(20))
    for theta in (None, 0.5):
        assert cdpruner(tokens_of(features, query), 8, theta=theta).indices.tolist() == \
            cdpruner(tokens_of(features), 8).indices.tolist()


def test_weights_are_finite_whatever_the_spread():
    """Only differences of 2 log r matter, so the weights are shifted to max 0: finite even for a tiny spread."""
    rel = torch.tensor([0.0, 1e-30, 0.5, -0.25])
    for theta in (None, 0.5, 0.99):
        w = relevance_weights(rel, 4, theta)
        assert bool(torch.isfinite(w).all()) and float(w.max()) == 0.0 and int(torch.argmax(w)) == 2
    assert torch.equal(relevance_weights(rel, 4, 0.0).abs(), torch.zeros(4))  # theta = 0: uniform
    w = relevance_weights(torch.tensor([0.3, 0.3 + 1e-7]), 2)
    assert bool(torch.isfinite(w).all())
    assert torch.equal(relevance_weights(None, 3), torch.zeros(3))


def test_keep_all_and_cdpruner_order_edges():
    tokens = tokens_of(X4, Q4)
    assert cdpruner(tokens, 1.0).indices.tolist() == [0, 1, 2, 3]
    order, residuals, rounds = cdpruner_order(torch.tensor(X4), 0)
    assert order.numel() == 0 and residuals.numel() == 0 and rounds == 0
    with pytest.raises(ValueError, match="outside"):
        cdpruner_order(torch.tensor(X4), 5)


def test_half_precision_features():
    """fp16 / bf16 features are compared in fp32: the same picks as their fp32 copy."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(24, 32, generator=generator).to(torch.bfloat16)
    query = torch.randn(3, 32, generator=generator).to(torch.bfloat16)
    low = cdpruner(VisualTokens(features, (4, 6), query=query), 9)
    high = cdpruner(VisualTokens(features.float(), (4, 6), query=query.float()), 9)
    assert low.details.pick_order.tolist() == high.details.pick_order.tolist()
    assert low.scores.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("theta", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        create_compressor("cdpruner", theta=theta)


def test_bad_options():
    for theta in ("0.5", True):
        with pytest.raises(TypeError, match="theta"):
            create_compressor("cdpruner", theta=theta)
    with pytest.raises(TypeError, match="theta"):
        CDPruner(theta="0.5")  # the dataclass itself checks too
    with pytest.raises(ValueError, match="query_pool"):
        create_compressor("cdpruner", query_pool="max")
    with pytest.raises(TypeError, match="valid options"):
        create_compressor("cdpruner", alpha=0.5)


def test_bad_query_shape():
    with pytest.raises(ValueError, match=r"query must be \[T, 3\]"):
        cdpruner(tokens_of(X4, [[1.0, 0.0]]), 2)
    with pytest.raises(ValueError, match="query must be"):
        cdpruner(tokens_of(X4, torch.zeros(2, 2, 3)), 2)
    # a single [D] vector is one query token
    assert cdpruner(tokens_of(X4, torch.tensor(Q4[0])), 3).indices.tolist() == [1, 2, 3]
