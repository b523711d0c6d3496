"""TRIM (arXiv 2409.10994): golden tests by hand (scores, IQR fence, mean token, budgets), properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc
import vtc.compressors.trim  # (registers "trim")
from vtc import VisualTokens, create_compressor, run_compressor
from vtc.compressors.trim import TRIM, TRIMDetails, iqr_outliers, merge_runs
from helpers import CLIP_L, QWEN25


def tokens_of(features, query=None, grid=None, prefix=0) -> VisualTokens:
    features = torch.as_tensor(features, dtype=torch.float32)
    if query is not None:
        query = torch.as_tensor(query, dtype=torch.float32)
    return VisualTokens(features=features, grid=grid or (1, features.shape[0] - prefix), query=query,
                        num_prefix_tokens=prefix)


def trim(tokens: VisualTokens, k, **options):
    """The goldens are derived with the sign stated: ``+rel`` unless a test passes ``negate=True``."""
    options.setdefault("negate", False)
    return run_compressor(create_compressor("trim", **options), tokens, k)


def groups_of(selection):
    return [g.tolist() for g in selection.groups]


def check_merge(selection, features):
    """The merge contract: groups partition the image, each slot is the last member of its group, the weights
    reproduce the features (``weights @ X[group]``) and sum to 1."""
    n = features.shape[0]
    members = torch.cat(list(selection.groups)).tolist()
    assert sorted(members) == list(range(n)), "the groups partition the image's tokens"
    for i, (slot, group, weight) in enumerate(zip(selection.indices.tolist(), selection.groups, selection.weights)):
        assert group.tolist() == sorted(group.tolist()) and slot == group.tolist()[-1]
        assert float(weight.sum()) == pytest.approx(1.0, abs=1e-6)
        expect = weight.float() @ features[group].float()
        torch.testing.assert_close(selection.features[i].float(), expect, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- registry
def test_registered_query_aware_without_signals():
    assert "trim" in vtc.list_compressors() and "trim" in vtc.list_compressors("encoder")
    c = create_compressor("trim")
    assert isinstance(c, TRIM) and c.uses_query and not c.handles_video and not c.acts_in_llm and not c.video_only
    # the reference's sign by default (measured better on the embedded model, docs/methods/trim.md)
    assert c.options() == {"adaptive": False, "negate": True, "merge_rest": True, "query_pool": "mean"}
    assert c.signals(CLIP_L) == () and c.signals(QWEN25) == ()


# ---------------------------------------------------------------------------------------------- golden: scores
# Four 2-d tokens of different norms and a 1-row query q = (1, 0):
#   x0 = (3, 0), x1 = (0, 1), x2 = (1, 1), x3 = (-2, 0)
#   rel = cos(x_i, q) = [1, 0, 1/sqrt 2, -1]   (the dot products would be [3, 0, 1, -2]: same order here, but the
#   score is the cosine -- see the scaling test).
X4 = [[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.0]]
Q4 = [[1.0, 0.0]]
REL4 = [1.0, 0.0, 1.0 / math.sqrt(2.0), -1.0]


def softmax_by_hand(values):
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


def test_golden_scores_and_one_mean_token():
    """p = softmax(rel) = e^rel / sum e^rel (e^1 = 2.71828, e^0 = 1, e^.70711 = 2.02811, e^-1 = .36788; sum 6.11428):
    p = [.44458, .16355, .33170, .06017]. Ranking (by rel, same as by p): x0 > x2 > x1 > x3.

    k = 2: k - 1 = 1 token by score (x0) + the mean of the rest {x1, x2, x3} = ((0 + 1 - 2)/3, (1 + 1 + 0)/3)
           = (-1/3, 2/3) in the slot of the last of them, 3. Output [x0, mean] at indices [0, 3].
    k = 3: x0, x2 + the mean of {x1, x3} = (-1, 1/2) in slot 3.
    """
    tokens = tokens_of(X4, Q4)
    two = trim(tokens, 2)
    assert two.indices.tolist() == [0, 3]
    torch.testing.assert_close(two.features, torch.tensor([[3.0, 0.0], [-1.0 / 3.0, 2.0 / 3.0]]))
    assert groups_of(two) == [[0], [1, 2, 3]]
    torch.testing.assert_close(two.weights[1], torch.full((3,), 1.0 / 3.0))
    torch.testing.assert_close(two.scores, torch.tensor(softmax_by_hand(REL4)))
    torch.testing.assert_close(two.scores, torch.tensor([0.44458, 0.16355, 0.33170, 0.06017]), atol=1e-5, rtol=0)
    details = two.details
    assert isinstance(details, TRIMDetails) and details.signals == () and details.layers == ()
    assert details.conditioned and not details.negate
    torch.testing.assert_close(details.relevance, torch.tensor(REL4))
    assert details.kept.tolist() == [0] and details.merged.tolist() == [3]
    check_merge(two, tokens.features)

    three = trim(tokens, 3)
    assert three.indices.tolist() == [0, 2, 3] and groups_of(three) == [[0], [2], [1, 3]]
    torch.testing.assert_close(three.features, torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]))
    check_merge(three, tokens.features)


def test_golden_negate_is_the_reference_sign():
    """negate: s = -rel = [-1, 0, -.707, 1] -> x3 first. k = 2: x3 + the mean of {x0, x1, x2} = (4/3, 2/3) in the slot
    of the last of them, 2. Output [mean, x3] at [2, 3]; p = softmax(-rel)."""
    selection = trim(tokens_of(X4, Q4), 2, negate=True)
    assert selection.indices.tolist() == [2, 3] and groups_of(selection) == [[0, 1, 2], [3]]
    torch.testing.assert_close(selection.features, torch.tensor([[4.0 / 3.0, 2.0 / 3.0], [-2.0, 0.0]]))
    torch.testing.assert_close(selection.scores, torch.tensor(softmax_by_hand([-r for r in REL4])))
    assert selection.details.negate
    torch.testing.assert_close(selection.details.relevance, torch.tensor(REL4))  # recorded before the sign


def test_golden_budget_edges_n_and_1():
    """k = N: every token kept as it is (no merge; with one token left over the mean of it would be itself anyway).
    k = 1: no token by score, only the mean of all four: ((3 + 0 + 1 - 2)/4, (0 + 1 + 1 + 0)/4) = (.5, .5) in the
    slot of the last token, 3 -- a whole-image summary (the reference's output when the IQR finds no outlier)."""
    tokens = tokens_of(X4, Q4)
    for options in ({}, {"adaptive": True}, {"merge_rest": False}):
        everything = trim(tokens, 4, **options)
        assert everything.indices.tolist() == [0, 1, 2, 3] and everything.features is None
        assert everything.details.merged.numel() == 0 and everything.details.kept.tolist() == [0, 1, 2, 3]
        assert trim(tokens, 1.0, **options).indices.tolist() == [0, 1, 2, 3]
    for options in ({}, {"adaptive": True}):
        one = trim(tokens, 1, **options)
        assert one.indices.tolist() == [3] and groups_of(one) == [[0, 1, 2, 3]]
        torch.testing.assert_close(one.features, torch.tensor([[0.5, 0.5]]))
        torch.testing.assert_close(one.weights[0], torch.full((4,), 0.25))
        assert one.details.kept.numel() == 0 and one.details.merged.tolist() == [3]
    top = trim(tokens, 1, merge_rest=False)  # without the mean token: the best-scored token alone
    assert top.indices.tolist() == [0] and top.features is None


# ---------------------------------------------------------------------------------------------- golden: IQR
def test_iqr_fence_by_hand_linear_percentiles():
    """numpy-style linear percentiles (numpy.percentile's default "linear", torch.quantile's default): the q-quantile
    of n sorted values sits at position h = (n - 1) q, interpolated between the neighbours floor(h) and ceil(h).

    [1, 2, 3, 4, 5, 20] (n = 6): Q1 at h = 1.25 -> 2 + .25 (3 - 2) = 2.25; Q3 at h = 3.75 -> 4 + .75 (5 - 4) = 4.75;
    IQR = 2.5, fence = 4.75 + 1.5 * 2.5 = 8.5 -> 20 (index 5) is the only outlier.
    [1, 2, 3, 4, 5, 8.5]: the same quartiles and fence; 8.5 is not strictly above it -> no outlier.
    [-20, 1, 2, 3, 4, 5]: Q1 = 1 + .25 = 1.25, Q3 = 3 + .75 = 3.75, fence 7.5; -20 is a low outlier, which the
    rule ignores (upper fence only) -> none.
    """
    outliers, q1, q3, fence = iqr_outliers(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 20.0]))
    assert (q1, q3, fence) == (2.25, 4.75, 8.5) and outliers.tolist() == [5]
    outliers, q1, q3, fence = iqr_outliers(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 8.5]))
    assert fence == 8.5 and outliers.tolist() == []
    outliers, q1, q3, fence = iqr_outliers(torch.tensor([-20.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert (q1, q3, fence) == (1.25, 3.75, 7.5) and outliers.tolist() == []


# Nine unit tokens x_i = (c_i, sqrt(1 - c_i^2)) and q = (1, 0), so rel_i = c_i; c_i = ln v_i makes e^rel = v exactly:
#   v = [1, 1.25, 1, 1.7, 1, 1.5, 1, 1.25, 1]   (token 3 the most relevant, then 5, then 1 and 7)
# p = softmax(rel) = v / sum v = v / 10.7.
V9 = [1.0, 1.25, 1.0, 1.7, 1.0, 1.5, 1.0, 1.25, 1.0]


def tokens_9(query=True, **kwargs):
    c = torch.tensor([math.log(v) for v in V9], dtype=torch.float64)
    features = torch.stack([c, (1.0 - c * c).sqrt()], dim=1).float()
    return tokens_of(features, [[1.0, 0.0]] if query else None, grid=(3, 3), **kwargs)


def test_golden_softmax_changes_the_fence_not_the_ranking():
    """Sorted v: [1, 1, 1, 1, 1, 1.25, 1.25, 1.5, 1.7]; n = 9 -> Q1 at h = 2, Q3 at h = 6 (no interpolation).

    On p = v / 10.7: Q1 = 1/10.7, Q3 = 1.25/10.7, fence = (1.25 + 1.5 * .25)/10.7 = 1.625/10.7 -> token 3
      (1.7/10.7) is an outlier, token 5 (1.5/10.7) is not: O = 1, adaptive count O + 1 = 2.
    On rel = ln v itself: Q1 = 0, Q3 = ln 1.25 = .22314, fence = 2.5 * .22314 = .55786 > ln 1.7 = .53063 -> no
      outlier. The softmax's exp stretches the upper tail (its normalisation alone would not move the fence: the
      rule is invariant to positive scaling).
    The ranking is the same on p and on rel (monotone): default k = 4 keeps the top 3 -- token 3 (1.7), 5 (1.5) and
    1 (1.25, the tie with 7 goes to the lower index) -- and the mean of {0, 2, 4, 6, 7, 8} in slot 8.
    """
    tokens = tokens_9()
    selection = trim(tokens, 4)
    details = selection.details
    torch.testing.assert_close(selection.scores, torch.tensor(V9) / 10.7)
    assert details.q1 == pytest.approx(1.0 / 10.7, rel=1e-6) and details.q3 == pytest.approx(1.25 / 10.7, rel=1e-6)
    assert details.threshold == pytest.approx(1.625 / 10.7, rel=1e-6)
    assert details.outliers.tolist() == [3] and details.adaptive_count == 2
    raw_outliers, _, _, raw_fence = iqr_outliers(details.relevance)
    assert raw_outliers.tolist() == [] and raw_fence == pytest.approx(2.5 * math.log(1.25), rel=1e-5)

    assert selection.indices.tolist() == [1, 3, 5, 8]
    assert details.kept.tolist() == [1, 3, 5] and details.merged.tolist() == [8]
    assert groups_of(selection) == [[1], [3], [5], [0, 2, 4, 6, 7, 8]]
    # the mean token by hand: five (0, 1) and x7 = (ln 1.25, sqrt(1 - ln^2 1.25)) = (.2231436, .9747856)
    torch.testing.assert_close(selection.features[3], torch.tensor([0.2231436 / 6.0, (5.0 + 0.9747856) / 6.0]),
                               atol=1e-6, rtol=0)
    check_merge(selection, tokens.features)


def test_golden_adaptive_outliers_then_mean_runs():
    """adaptive (O = 1, token 3):
    k = 4: keep the outlier; the other 8 grid tokens [0, 1, 2, 4, 5, 6, 7, 8] (R = 8) form k - O = 3 runs,
      entry i in run floor(3 i / 8) = 0 0 0 1 1 1 2 2 -> [0, 1, 2], [4, 5, 6], [7, 8], each averaged into the slot
      of its last token: indices [2, 3, 6, 8], weights 1/3, 1/3, 1/2.
    k = 2 = the adaptive count: the reference's TRIM:-1 exactly -- the outlier + one mean of the other 8 in slot 8
      (here also the default's k = 2).
    k = 1: min(O, k - 1) = 0 outliers, the mean of everything.
    """
    tokens = tokens_9()
    four = trim(tokens, 4, adaptive=True)
    assert four.indices.tolist() == [2, 3, 6, 8]
    assert groups_of(four) == [[0, 1, 2], [3], [4, 5, 6], [7, 8]]
    assert four.details.kept.tolist() == [3] and four.details.merged.tolist() == [2, 6, 8] and four.details.adaptive
    torch.testing.assert_close(four.weights[0], torch.full((3,), 1.0 / 3.0))
    torch.testing.assert_close(four.weights[3], torch.full((2,), 0.5))
    check_merge(four, tokens.features)
    two = trim(tokens, 2, adaptive=True)
    assert two.indices.tolist() == [3, 8] and groups_of(two) == [[3], [0, 1, 2, 4, 5, 6, 7, 8]]
    assert two.indices.tolist() == trim(tokens, 2).indices.tolist()
    torch.testing.assert_close(two.features, trim(tokens, 2).features)
    one = trim(tokens, 1, adaptive=True)
    assert one.indices.tolist() == [8] and groups_of(one) == [list(range(9))]


def test_golden_negate_on_nine_tokens_and_no_merge():
    """negate: p = softmax(-ln v) = (1/v) / sum(1/v); sorted 1/v = [.588, .667, .8, .8, 1, 1, 1, 1, 1]:
    Q1 = .8, Q3 = 1 (h = 2, 6), fence 1.3 (over the common 1/sum) -> no outlier, adaptive count 1.
    Default k = 3: the two best are the first tokens with v = 1 (ties -> lower index): 0, 2; mean of the rest in 8.
    merge_rest=False, k = 3 (no negate): the top 3 by rel -- 3, 5, 1 -- and nothing merged."""
    tokens = tokens_9()
    negated = trim(tokens, 3, negate=True)
    assert negated.details.outliers.tolist() == [] and negated.details.adaptive_count == 1
    total = sum(1.0 / v for v in V9)
    assert negated.details.threshold == pytest.approx(1.3 / total, rel=1e-6)
    assert negated.indices.tolist() == [0, 2, 8] and groups_of(negated)[2] == [1, 3, 4, 5, 6, 7, 8]
    plain = trim(tokens, 3, merge_rest=False)
    assert plain.indices.tolist() == [1, 3, 5] and plain.features is None and plain.groups is None
    assert plain.details.kept.tolist() == [1, 3, 5] and plain.details.merged.numel() == 0
    assert plain.details.adaptive_count == 1  # the reference without its mean token: the one outlier


def test_merge_runs_helper():
    """floor(i m / R): R = 8, m = 3 -> 0 0 0 1 1 1 2 2; R = 5, m = 5 -> one token each; m = 1 -> one run."""
    run, sizes = merge_runs(torch.arange(8), 3)
    assert run.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and sizes.tolist() == [3, 3, 2]
    assert merge_runs(torch.arange(5), 5)[1].tolist() == [1] * 5
    assert merge_runs(torch.arange(4), 1)[0].tolist() == [0] * 4


# ---------------------------------------------------------------------------------------------- no query / prefix
def test_golden_without_query_spreads_and_records_it():
    """No query (None, or [0, D]): p = 1/9 everywhere, so the IQR has no outlier (Q1 = Q3 = fence, strict).
    Default k = 4: k - 1 = 3 tokens spread evenly over the 9 grid tokens, the centres of 3 equal parts:
      floor((2j + 1) 9 / 6) = 1, 4, 7; the mean of the other six in slot 8 -> [1, 4, 7, 8].
    adaptive k = 4: no outlier, 4 runs of the 9 tokens by floor(4 i / 9): [0, 1, 2], [3, 4], [5, 6], [7, 8] ->
      slots [2, 4, 6, 8] (a uniform pooling of the raster).
    merge_rest=False k = 3: the 3 spread tokens [1, 4, 7]."""
    for query in (None, torch.zeros(0, 2)):
        tokens = tokens_9(query=False)
        tokens.query = query
        selection = trim(tokens, 4)
        assert not selection.details.conditioned and selection.details.relevance is None
        assert selection.indices.tolist() == [1, 4, 7, 8] and groups_of(selection)[3] == [0, 2, 3, 5, 6, 8]
        torch.testing.assert_close(selection.scores, torch.full((9,), 1.0 / 9.0))
        assert selection.details.outliers.tolist() == [] and selection.details.adaptive_count == 1
        adaptive = trim(tokens, 4, adaptive=True)
        assert adaptive.indices.tolist() == [2, 4, 6, 8]
        assert groups_of(adaptive) == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
        check_merge(adaptive, tokens.features)
        assert trim(tokens, 3, merge_rest=False).indices.tolist() == [1, 4, 7]


def test_golden_prefix_token_is_kept_and_not_scored():
    """A CLS prefix (LLaVA "full") before a 2x2 grid: kept first, out of the softmax and the IQR, never merged.
    grid x1..x4 = (1, 0), (0, 1), (1, 1), (-1, 0) with q = (1, 0): rel = [1, 0, .707, -1].
    k = 1: the CLS alone. k = 2: CLS + the mean of the whole grid ((1 + 0 + 1 - 1)/4, (0 + 1 + 1 + 0)/4) =
    (.25, .5) in slot 4. k = 3: CLS + x1 + the mean of {x2, x3, x4} = (0, 2/3) in slot 4."""
    features = [[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]
    tokens = tokens_of(features, Q4, grid=(2, 2), prefix=1)
    one = trim(tokens, 1)
    assert one.indices.tolist() == [0] and one.features is None
    two = trim(tokens, 2)
    assert two.indices.tolist() == [0, 4] and groups_of(two) == [[0], [1, 2, 3, 4]]
    torch.testing.assert_close(two.features, torch.tensor([[5.0, 5.0], [0.25, 0.5]]))
    assert math.isnan(float(two.scores[0]))
    torch.testing.assert_close(two.scores[1:], torch.tensor(softmax_by_hand(REL4)))
    three = trim(tokens, 3)
    assert three.indices.tolist() == [0, 1, 4] and three.details.kept.tolist() == [0, 1]
    torch.testing.assert_close(three.features[2], torch.tensor([0.0, 2.0 / 3.0]))
    check_merge(three, tokens.features)


def test_query_pool_is_passed_to_the_relevance():
    """x0 = (1, 0), x1 = (0, 1), x2 = (1, 1); query rows (10, 0), (0, 1):
    "mean": cos to (5, .5) -> x0 best (.995 > .774 > .0995); "per_token": mean of cosines -> x2 best (.707 > .5)."""
    tokens = tokens_of([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[10.0, 0.0], [0.0, 1.0]])
    assert trim(tokens, 1, merge_rest=False).indices.tolist() == [0]
    assert trim(tokens, 1, merge_rest=False, query_pool="per_token").indices.tolist() == [2]


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def case(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    k = draw(st.integers(1, n))
    dim = draw(st.sampled_from([2, 6, 32]))
    seed = draw(st.integers(0, 2**16))
    quantised = draw(st.booleans())  # ties
    with_query = draw(st.sampled_from(["none", "empty", "tokens"]))
    options = draw(st.sampled_from([{}, {"adaptive": True}, {"merge_rest": False}, {"negate": True},
                                    {"query_pool": "per_token"}, {"adaptive": True, "negate": True}]))
    return rows, cols, prefix, n, k, dim, seed, quantised, with_query, options


@settings(max_examples=80, deadline=None)
@given(c=case())
def test_valid_exact_partition_deterministic(c):
    rows, cols, prefix, n, k, dim, seed, quantised, with_query, options = c
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    if quantised:
        features = features.round()
    query = {"none": None, "empty": torch.zeros(0, dim), "tokens": torch.randn(3, dim, generator=generator)}[with_query]
    tokens = VisualTokens(features=features, grid=(rows, cols), query=query, num_prefix_tokens=prefix)
    compressor = create_compressor("trim", **options)
    selection = run_compressor(compressor, tokens, k)  # validates: exactly k, sorted, unique, in range
    idx = selection.indices.tolist()
    assert len(idx) == k == len(set(idx)) and idx == sorted(idx)
    details = selection.details
    assert sorted(details.kept.tolist() + details.merged.tolist()) == idx
    assert details.conditioned == (with_query == "tokens")
    g, kept_prefix = n - prefix, min(prefix, k)
    k_grid = k - kept_prefix
    p = selection.scores[prefix:]
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5) and bool(torch.isnan(selection.scores[:prefix]).all())
    assert details.kept.tolist()[:kept_prefix] == list(range(kept_prefix))
    picked = details.kept[kept_prefix:]
    merge = compressor.merge_rest and 0 < k_grid < g
    assert details.merged.numel() == (0 if not merge else k_grid - picked.numel())
    if merge:
        check_merge(selection, features)
        expected_picked = min(details.outliers.numel(), k_grid - 1) if compressor.adaptive else k_grid - 1
        assert picked.numel() == expected_picked
    else:
        assert selection.features is None and picked.numel() == k_grid
    if details.conditioned and picked.numel() and picked.numel() < g:
        # kept by score: no unkept grid token scores above a kept one (the softmax is monotone)
        is_picked = torch.zeros(n, dtype=torch.bool)
        is_picked[picked] = True
        is_picked[:prefix] = True
        assert float(selection.scores[picked].min()) >= float(selection.scores[~is_picked].max())
    if compressor.adaptive and merge:
        assert set(picked.tolist()) <= set(details.outliers.tolist())
    again = run_compressor(compressor, tokens, k)
    assert again.indices.tolist() == idx and again.details.kept.tolist() == details.kept.tolist()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(2, 8), cols=st.integers(2, 8))
def test_adaptive_at_the_adaptive_count_is_the_reference_selection(seed, rows, cols):
    """At k = O + 1 (details.adaptive_count) adaptive keeps exactly the IQR outliers plus one mean of the rest: the
    reference's TRIM:-1."""
    generator = torch.Generator().manual_seed(seed)
    n = rows * cols
    features = torch.randn(n, 16, generator=generator)
    features[: n // 8] += 3.0 * torch.randn(16, generator=generator)  # a few tokens aligned with the query
    query = features[:1] + 0.1 * torch.randn(2, 16, generator=generator)
    tokens = VisualTokens(features=features, grid=(rows, cols), query=query)
    count = trim(tokens, 1, adaptive=True).details.adaptive_count
    selection = trim(tokens, min(count, n), adaptive=True)
    if count < n:
        assert selection.details.kept.tolist() == selection.details.outliers.tolist()
        assert selection.details.merged.numel() == 1


def test_invariant_to_positive_scaling_of_tokens_and_query():
    """rel is a cosine: scaling each token or the query by a positive factor keeps the selection (the reference's dot
    product would not: it ranks by norm too); the merged features scale with the tokens."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(36, 16, generator=generator)
    query = torch.randn(4, 16, generator=generator)
    factors = torch.rand(36, 1, generator=generator) * 10 + 0.1
    for options in ({}, {"adaptive": True}, {"negate": True}):
        base = trim(tokens_of(features, query, grid=(6, 6)), 12, **options)
        scaled = trim(tokens_of(features * factors, query * 3.0, grid=(6, 6)), 12, **options)
        assert scaled.indices.tolist() == base.indices.tolist()
        assert scaled.details.outliers.tolist() == base.details.outliers.tolist()


def test_merge_replays_on_another_feature_level():
    """Groups and weights come from the first level's scores; replaying them on a second feature set of the same
    tokens (Qwen3-VL deepstack) is weights @ level[group]."""
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(20, 8, generator=generator)
    level = torch.randn(20, 5, generator=generator)
    selection = trim(tokens_of(features, torch.randn(2, 8, generator=generator), grid=(4, 5)), 7, adaptive=True)
    replay = torch.stack([w @ level[g] for w, g in zip(selection.weights, selection.groups)])
    kept = [i for i, g in enumerate(selection.groups) if g.numel() == 1]
    torch.testing.assert_close(replay[kept], level[selection.indices[kept]])
    assert replay.shape == (7, 5)


def test_half_precision_features():
    """bf16 tokens are scored in fp32 and merged in fp32; the merged features come back in bf16."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(24, 32, generator=generator)
    query = torch.randn(3, 32, generator=generator)
    low = trim(VisualTokens(features.to(torch.bfloat16), (4, 6), query=query.to(torch.bfloat16)), 9)
    assert low.features.dtype == torch.bfloat16 and low.scores.dtype == torch.float32
    high = trim(VisualTokens(features.to(torch.bfloat16).float(), (4, 6), query=query.to(torch.bfloat16).float()), 9)
    assert low.indices.tolist() == high.indices.tolist()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option", ["adaptive", "negate", "merge_rest"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_bool_options(option, value):
    with pytest.raises(TypeError, match=option):
        create_compressor("trim", **{option: value})


def test_bad_options():
    with pytest.raises(ValueError, match="query_pool"):
        create_compressor("trim", query_pool="max")
    with pytest.raises(ValueError, match="adaptive.*merge_rest"):
        create_compressor("trim", adaptive=True, merge_rest=False)
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("trim", k=3)


def test_bad_query_shape():
    with pytest.raises(ValueError, match="trim query"):
        trim(tokens_of(X4, [[1.0, 0.0, 0.0]]), 2)
