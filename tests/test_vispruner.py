"""VisPruner (arXiv 2412.01818 v2): signals, budget split, golden selections derived by hand, and properties.

The rule (spec ``more_compressors.md`` §3): ``T_imp = int(k * r)`` important tokens by attention; the rest ``R``, in
descending-attention order, lose duplicates in rounds: ``r_s = min(8, |R| - T_div)``, ``A = R[0::2]``,
``B = R[1::2]``, ``m_a = max_b cos(a, b)``, drop the ``r_s`` members of ``A`` with the largest ``m_a``, new
``R = [kept A in descending-m order] ++ B`` -- until ``|R| = T_div = k - T_imp``.

Golden features are 2-d vectors at an angle ``theta`` (times a norm that the cosine ignores), so the cosine of two
tokens is ``cos(gap)`` with ``gap`` their angular distance: the largest cosine is the smallest gap.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc.compressors.vispruner  # noqa: F401  (registers "vispruner")
from vtc import Signal, SignalKind, VisualTokens, create_compressor, run_compressor
from vtc.compressors.vispruner import VisPrunerDetails, remove_duplicates, split_budget
from helpers import CLIP_L, QWEN25


CLS22 = Signal(SignalKind.CLS_ATTENTION, 22)
KEYS22 = Signal(SignalKind.KEYS, 22)
RECEIVED31 = Signal(SignalKind.RECEIVED_ATTENTION, 31)


def at_angles(degrees: list[float], norms: list[float] | None = None) -> torch.Tensor:
    """``[N, 2]`` vectors at the given angles; norms vary so that only the normalised cosine can match by hand."""
    norms = norms or [1.0 + 0.5 * i for i in range(len(degrees))]
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (torch.stack([torch.cos(rad), torch.sin(rad)], dim=1) * torch.tensor(norms)[:, None]).float()


def naive_vispruner(attention: torch.Tensor, vectors: torch.Tensor, k: int, r: float, per_round: int = 8):
    """The spec transcribed with Python lists and float64 cosines (no prefix tokens): (important, diverse) sets."""
    n = attention.numel()
    order = sorted(range(n), key=lambda i: (-float(attention[i]), i))
    t_imp = int(k * r)
    t_div = k - t_imp
    important, rest = order[:t_imp], order[t_imp:]
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    cos = (unit @ unit.T).tolist()
    while t_div > 0:
        r_s = min(per_round, len(rest) - t_div)
        if r_s <= 0:
            break
        a, b = rest[0::2], rest[1::2]
        best = [max(cos[x][y] for y in b) for x in a]
        by_m = sorted(range(len(a)), key=lambda i: -best[i])  # Python's sort is stable
        rest = [a[i] for i in by_m[r_s:]] + b
    if t_div == 0:
        rest = []
    return sorted(important), sorted(rest)


# ---------------------------------------------------------------------------------------------- signals
def test_clip_l_declares_cls_attention_of_the_feature_layer_only():
    assert create_compressor("vispruner").signals(CLIP_L) == (CLS22,)


def test_keys_similarity_also_declares_keys_of_the_same_layer():
    assert create_compressor("vispruner", similarity="keys").signals(CLIP_L) == (CLS22, KEYS22)


def test_no_cls_tower_declares_received_attention_at_the_feature_layer():
    assert create_compressor("vispruner").signals(QWEN25) == (RECEIVED31,)
    assert create_compressor("vispruner", similarity="keys").signals(QWEN25) == (
        RECEIVED31, Signal(SignalKind.KEYS, 31))


def test_layer_option():
    assert create_compressor("vispruner", layer=-1).signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 23),)
    assert create_compressor("vispruner", layer=10).signals(QWEN25) == (Signal(SignalKind.RECEIVED_ATTENTION, 10),)
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("vispruner", layer=24).signals(CLIP_L)


def test_defaults():
    compressor = create_compressor("vispruner")
    assert compressor.options() == {"important_ratio": 0.5, "layer": None, "similarity": "features",
                                    "drop_per_round": 8}


def test_bad_options():
    for ratio in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="important_ratio"):
            create_compressor("vispruner", important_ratio=ratio)
    with pytest.raises((TypeError, ValueError), match="important_ratio"):
        create_compressor("vispruner", important_ratio="half")
    with pytest.raises((TypeError, ValueError), match="important_ratio"):
        create_compressor("vispruner", important_ratio=True)
    with pytest.raises(ValueError, match="similarity"):
        create_compressor("vispruner", similarity="cosine")
    with pytest.raises(ValueError, match="drop_per_round"):
        create_compressor("vispruner", drop_per_round=0)
    with pytest.raises((TypeError, ValueError), match="drop_per_round"):
        create_compressor("vispruner", drop_per_round=2.5)
    with pytest.raises(TypeError, match="layer"):
        create_compressor("vispruner", layer="22")
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("vispruner", ratio=0.5)


# ---------------------------------------------------------------------------------------------- budget split
def test_split_is_the_reference_floor():
    """int(k * r): the paper's 192 -> 96 + 96, 128 -> 64 + 64, 64 -> 32 + 32 at r = 0.5; README MME 64 at r = .75
    -> 48 + 16; odd budgets floor the important share: 5 -> 2 + 3; r = 0 -> all diverse; r = 1 -> all important."""
    assert split_budget(192, 0.5) == (96, 96)
    assert split_budget(128, 0.5) == (64, 64)
    assert split_budget(64, 0.5) == (32, 32)
    assert split_budget(64, 0.75) == (48, 16)
    assert split_budget(5, 0.5) == (2, 3)
    assert split_budget(1, 0.5) == (0, 1)
    assert split_budget(7, 0.0) == (0, 7)
    assert split_budget(7, 1.0) == (7, 0)
    # a kept prefix token (CLS under LLaVA's "full" strategy) counts as important; the patches share k - 1
    assert create_compressor("vispruner").split(6, 10, num_prefix_tokens=1) == (1 + 2, 3)
    assert create_compressor("vispruner").split(20, 10) == (5, 5)


# ---------------------------------------------------------------------------------------------- golden
def golden_one_round() -> VisualTokens:
    """8 tokens on a 2x4 grid.

    attention: 0 .30, 1 .05, 2 .20, 3 .10, 4 .12, 5 .08, 6 .25, 7 .02
      -> descending order [0, 6, 2, 4, 3, 5, 1, 7].
    feature angles: 0, 2, 6, 7 at 200 deg (0, 2, 6 duplicate 7 but are never compared when important),
      1 at 90, 3 at 0, 4 at 10, 5 at 60.
    """
    attention = torch.tensor([.30, .05, .20, .10, .12, .08, .25, .02])
    features = at_angles([200, 90, 200, 0, 10, 60, 200, 200])
    return VisualTokens(features=features, grid=(2, 4), signals={CLS22: attention})


def test_golden_one_round_default_drop_8():
    """k = 6, r = .5 -> T_imp = 3: important {0, 6, 2}; R = [4, 3, 5, 1, 7], T_div = 3.

    Round 1: r_s = min(8, 5 - 3) = 2; A = R[0::2] = [4, 5, 7], B = R[1::2] = [3, 1].
      gaps to the nearest B (3 at 0, 1 at 90): 4 (10): 10 to 3;  5 (60): 30 to 1;  7 (200): 110 to 1 (160 to 3).
      m = cos(gap): 4 .985 > 5 .866 > 7 -.342 -> drop 4 and 5; R = [7] ++ [3, 1] (|R| = 3, done).
    Kept: {0, 2, 6} + {1, 3, 7} = [0, 1, 2, 3, 6, 7].
    """
    tokens = golden_one_round()
    selection = run_compressor(create_compressor("vispruner"), tokens, 6)
    assert selection.indices.tolist() == [0, 1, 2, 3, 6, 7]
    details = selection.details
    assert isinstance(details, VisPrunerDetails)
    assert details.important.tolist() == [0, 2, 6]
    assert details.diverse.tolist() == [1, 3, 7]
    assert details.signals == (CLS22,) and details.layers == (22,)
    assert details.similarity == "features" and details.rounds == 1
    assert torch.equal(selection.scores, tokens.signals[CLS22])
    assert selection.features is None and selection.groups is None


def test_golden_odd_budget_floors_the_important_share():
    """k = 5, r = .5 -> T_imp = int(2.5) = 2: important {0, 6}; R = [2, 4, 3, 5, 1, 7], T_div = 3.

    Round 1: r_s = min(8, 6 - 3) = 3; A = [2, 3, 1], B = [4, 5, 7]; |A| = 3 = r_s, so all of A goes whatever m
      (for the record: 2 duplicates 7, m = 1; 3 is 10 from 4, m = .985; 1 is 30 from 5, m = .866).
    R = [4, 5, 7]. Kept: [0, 4, 5, 6, 7].
    """
    selection = run_compressor(create_compressor("vispruner"), golden_one_round(), 5)
    assert selection.indices.tolist() == [0, 4, 5, 6, 7]
    assert selection.details.important.tolist() == [0, 6]
    assert selection.details.diverse.tolist() == [4, 5, 7]


def golden_rounds(similarity_in_keys: bool = False) -> VisualTokens:
    """6 tokens on a 2x3 grid. attention: 0 .40, 1 .15, 2 .08, 3 .10, 4 .07, 5 .20 -> order [0, 5, 1, 3, 2, 4].
    angles: 0 at 0 (duplicates 1; important, never compared), 1 at 0, 2 at 30, 3 at 45, 4 at 90, 5 at 135."""
    attention = torch.tensor([.40, .15, .08, .10, .07, .20])
    vectors = at_angles([0, 0, 30, 45, 90, 135])
    if similarity_in_keys:  # the angles live in the keys; the features are all alike
        return VisualTokens(features=torch.ones(6, 3), grid=(2, 3), signals={CLS22: attention, KEYS22: vectors})
    return VisualTokens(features=vectors, grid=(2, 3), signals={CLS22: attention})


def test_golden_rounds_keep_the_descending_m_order():
    """k = 3, r = .5, one drop per round: T_imp = int(1.5) = 1 -> important {0}; R = [5, 1, 3, 2, 4], T_div = 2.

    Round 1 (|R| = 5, r_s = 1): A = [5, 3, 4], B = [1, 2] (at 0, 30).
      gaps: 5 (135): 105 to 2;  3 (45): 15 to 2;  4 (90): 60 to 2.  Largest m = smallest gap: drop 3.
      kept A in descending m: 4 (60) then 5 (105) -> R = [4, 5, 1, 2].
    Round 2 (|R| = 4, r_s = 1): A = [4, 1], B = [5, 2] (at 135, 30).
      gaps: 4 (90): 45 to 5;  1 (0): 30 to 2.  Drop 1 -> R = [4] ++ [5, 2] = [4, 5, 2].
    Round 3 (|R| = 3, r_s = 1): A = [4, 2], B = [5] (at 135).
      gaps: 4: 45;  2 (30): 105.  Drop 4 -> R = [2, 5].
    Kept: [0, 2, 5] in 3 rounds.

    The order matters: keeping A in its old order (round 1 would give R = [5, 4, 1, 2]) ends with {2, 4};
    re-sorting R by attention every round ends with {1, 5}.
    """
    selection = run_compressor(create_compressor("vispruner", drop_per_round=1), golden_rounds(), 3)
    assert selection.indices.tolist() == [0, 2, 5]
    assert selection.details.important.tolist() == [0]
    assert selection.details.diverse.tolist() == [2, 5]
    assert selection.details.rounds == 3


def test_golden_keys_similarity():
    """The same angles given as keys (features all alike) give the same rounds, [0, 2, 5], and record the keys.

    With similarity="features" on those identical features every m is 1 and the stable sort drops the first member
    of A each round: round 1 A = [5, 3, 4] drops 5 -> R = [3, 4, 1, 2]; round 2 A = [3, 1], B = [4, 2] drops 3 ->
    R = [1, 4, 2]; round 3 A = [1, 2], B = [4] drops 1 -> R = [2, 4]. Kept [0, 2, 4].
    """
    tokens = golden_rounds(similarity_in_keys=True)
    keys = run_compressor(create_compressor("vispruner", drop_per_round=1, similarity="keys"), tokens, 3)
    assert keys.indices.tolist() == [0, 2, 5]
    assert keys.details.signals == (CLS22, KEYS22) and keys.details.similarity == "keys"
    features = run_compressor(create_compressor("vispruner", drop_per_round=1), tokens, 3)
    assert features.indices.tolist() == [0, 2, 4]
    assert features.details.signals == (CLS22,)


def test_ties_go_to_the_lower_index():
    """6 tokens, equal attention and identical features, k = 5, r = .5.

    Important: int(2.5) = 2 -> the stable sort keeps the lowest indices {0, 1}; R = [2, 3, 4, 5], T_div = 3.
    Round 1: r_s = min(8, 1) = 1; A = [2, 4], B = [3, 5]; m = 1 for both: the stable sort drops the earlier member
    of A, 2 -> R = [4, 3, 5]. Kept [0, 1, 3, 4, 5].
    """
    tokens = VisualTokens(features=torch.ones(6, 4), grid=(2, 3), signals={CLS22: torch.full((6,), .1)})
    selection = run_compressor(create_compressor("vispruner"), tokens, 5)
    assert selection.indices.tolist() == [0, 1, 3, 4, 5]
    assert selection.details.important.tolist() == [0, 1]


def test_prefix_token_is_always_kept_and_counts_as_important():
    """The 6 tokens of golden_rounds behind a prefix token (CLS under LLaVA's "full"), with the lowest attention.

    k = 4: the prefix token is kept, the 6 patches get k' = 3 -> exactly golden_rounds shifted by one:
    patches [0, 2, 5] -> tokens [1, 3, 6]. Kept [0, 1, 3, 6]; important [0, 1] (prefix + top patch).
    """
    base = golden_rounds()
    attention = torch.cat([torch.zeros(1), base.signals[CLS22]])
    features = torch.cat([torch.ones(1, 2), base.features])
    tokens = VisualTokens(features=features, grid=(2, 3), num_prefix_tokens=1, signals={CLS22: attention})
    selection = run_compressor(create_compressor("vispruner", drop_per_round=1), tokens, 4)
    assert selection.indices.tolist() == [0, 1, 3, 6]
    assert selection.details.important.tolist() == [0, 1]
    assert selection.details.diverse.tolist() == [3, 6]
    assert run_compressor(create_compressor("vispruner"), tokens, 1).indices.tolist() == [0]


def test_no_cls_received_attention_path():
    """A Qwen-like tower: signals(QWEN25) asks for received attention at block 31, and select ranks by it.

    Same numbers as golden_one_round under received attention: k = 6 -> [0, 1, 2, 3, 6, 7].
    """
    compressor = create_compressor("vispruner")
    (signal,) = compressor.signals(QWEN25)
    assert signal == RECEIVED31
    base = golden_one_round()
    tokens = VisualTokens(features=base.features, grid=(2, 4), signals={signal: base.signals[CLS22] * 40})
    selection = run_compressor(compressor, tokens, 6)
    assert selection.indices.tolist() == [0, 1, 2, 3, 6, 7]
    assert selection.details.signals == (RECEIVED31,) and selection.details.layers == (31,)


def test_llava_budgets_run_the_reference_number_of_rounds():
    """576 tokens, r = .5: k = 64 -> R = 544, T_div = 32, (544 - 32) / 8 = 64 rounds (the spec's count);
    k = 128 -> (512 - 64) / 8 = 56; k = 192 -> (480 - 96) / 8 = 48. Each matches the naive transcription."""
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(576, generator=g)
    features = torch.randn(576, 32, generator=g)
    tokens = VisualTokens(features=features, grid=(24, 24), signals={CLS22: attention})
    for k, rounds in ((64, 64), (128, 56), (192, 48)):
        selection = run_compressor(create_compressor("vispruner"), tokens, k)
        assert selection.details.rounds == rounds
        important, diverse = naive_vispruner(attention, features, k, 0.5)
        assert selection.details.important.tolist() == important
        assert selection.details.diverse.tolist() == diverse
        assert selection.indices.tolist() == sorted(important + diverse)


def test_ratio_one_is_fastervlm():
    g = torch.Generator().manual_seed(1)
    tokens = VisualTokens(features=torch.randn(36, 5, generator=g), grid=(6, 6),
                          signals={CLS22: torch.rand(36, generator=g)})
    for k in (1, 7, 20):
        ours = run_compressor(create_compressor("vispruner", important_ratio=1.0), tokens, k)
        theirs = run_compressor(create_compressor("fastervlm"), tokens, k)
        assert ours.indices.tolist() == theirs.indices.tolist()
        assert ours.details.diverse.numel() == 0 and ours.details.rounds == 0


def test_missing_signals_are_reported():
    tokens = VisualTokens(features=torch.randn(12, 2), grid=(3, 4), signals={CLS22: torch.rand(12)})
    with pytest.raises(KeyError, match="keys"):
        run_compressor(create_compressor("vispruner", similarity="keys"), tokens, 6)
    bare = VisualTokens(features=torch.randn(12, 2), grid=(3, 4))
    with pytest.raises(KeyError, match="attention"):
        run_compressor(create_compressor("vispruner"), bare, 6)


def test_blocked_rounds_equal_the_cached_similarity():
    """Large remaining sets recompute each round's |A| x |B| block in row chunks instead of reading one cached
    |R| x |R| matrix; both give the same survivors."""
    g = torch.Generator().manual_seed(2)
    unit = torch.nn.functional.normalize(torch.randn(101, 16, generator=g), dim=-1)
    for target in (1, 13, 50, 100):
        cached, rounds = remove_duplicates(unit, target)
        blocked, rounds_blocked = remove_duplicates(unit, target, gram_max_elements=7)
        assert cached.tolist() == blocked.tolist() and rounds == rounds_blocked
        assert cached.numel() == target


@st.composite
def listed_case(draw):
    size = draw(st.integers(2, 90))
    target = draw(st.integers(1, size - 1))
    dim = draw(st.sampled_from([1, 2, 3, 8]))
    per_round = draw(st.sampled_from([1, 3, 8]))
    neighbours = draw(st.sampled_from([1, 2, 5, 64]))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    return size, target, dim, per_round, neighbours, seed, ties


@settings(max_examples=120, deadline=None)
@given(case=listed_case())
def test_neighbour_lists_equal_the_direct_rounds(case):
    """Large sets read ``m_a`` from per-row nearest-neighbour lists (refreshed when none is in ``B``); on the same
    cached matrix that is bit for bit the direct rule, ties included (binary vectors tie everywhere), for any list
    width; in float64 the blocked route (no cached matrix) agrees as well."""
    size, target, dim, per_round, neighbours, seed, ties = case
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(size, dim, generator=g)
    if ties:
        vectors = (vectors > 0).float() + (vectors.abs() < 0.2).float()  # zero rows too (cosine 0 to everything)
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    direct = remove_duplicates(unit, target, per_round, direct_max_tokens=size)
    listed = remove_duplicates(unit, target, per_round, direct_max_tokens=0, neighbours=neighbours)
    assert listed[0].tolist() == direct[0].tolist() and listed[1] == direct[1]
    if not ties:
        unit64 = torch.nn.functional.normalize(vectors.double(), dim=-1)
        direct64 = remove_duplicates(unit64, target, per_round, direct_max_tokens=size)
        blocked64 = remove_duplicates(unit64, target, per_round, gram_max_elements=size, direct_max_tokens=0,
                                      neighbours=neighbours)
        assert blocked64[0].tolist() == direct64[0].tolist()


def test_large_sets_take_the_listed_route_and_keep_the_rule():
    """Above ``DIRECT_MAX_TOKENS`` the default route is the listed one; its survivors equal the direct rule's on the
    same cached matrix (1,500 rows, 180 rounds, lists of 32 refreshed as their rows leave)."""
    g = torch.Generator().manual_seed(5)
    unit = torch.nn.functional.normalize(torch.randn(1500, 24, generator=g), dim=-1)
    default = remove_duplicates(unit, 60)
    direct = remove_duplicates(unit, 60, direct_max_tokens=1500)
    assert default[0].tolist() == direct[0].tolist() and default[1] == direct[1] == math.ceil((1500 - 60) / 8)


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def image_case(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    k = draw(st.integers(1, n))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1 / 3]))
    per_round = draw(st.sampled_from([1, 3, 8]))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    return rows, cols, prefix, n, k, ratio, per_round, seed, ties


@settings(max_examples=80, deadline=None)
@given(case=image_case())
def test_properties(case):
    rows, cols, prefix, n, k, ratio, per_round, seed, ties = case
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(n, generator=g)
    features = torch.randn(n, 6, generator=g)
    if ties:  # quantised scores and repeated features provoke ties everywhere
        attention = (attention * 4).round() / 4
        features = (features > 0).float()
    tokens = VisualTokens(features=features, grid=(rows, cols), signals={CLS22: attention},
                          num_prefix_tokens=prefix)
    compressor = create_compressor("vispruner", important_ratio=ratio, drop_per_round=per_round)
    selection = run_compressor(compressor, tokens, k)
    idx = selection.indices.tolist()
    assert len(idx) == k and idx == sorted(set(idx))
    assert idx[:min(prefix, k)] == list(range(min(prefix, k)))
    details = selection.details
    assert sorted(details.important.tolist() + details.diverse.tolist()) == idx
    assert details.important.numel() == min(prefix, k) + int((k - min(prefix, k)) * ratio)
    # deterministic
    again = run_compressor(compressor, tokens, k)
    assert again.indices.tolist() == idx and again.details.diverse.tolist() == details.diverse.tolist()
    # keep-all returns every token
    assert run_compressor(compressor, tokens, 1.0).indices.tolist() == list(range(n))
    assert run_compressor(compressor, tokens, n).indices.tolist() == list(range(n))
    # without a prefix it is the spec's transcription (the odd-|R| case included, where the reference crashes)
    if prefix == 0:
        important, diverse = naive_vispruner(attention, features, k, ratio, per_round)
        if not ties:  # exact float ties in m could order differently between float32 and float64
            assert details.important.tolist() == important
            assert details.diverse.tolist() == diverse


def test_low_precision_inputs_are_compared_in_fp32():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(49, 8, generator=g).to(torch.bfloat16)
    attention = torch.rand(49, generator=g).to(torch.float16)
    low = run_compressor(create_compressor("vispruner"), VisualTokens(features, (7, 7), {CLS22: attention}), 12)
    high = run_compressor(create_compressor("vispruner"),
                          VisualTokens(features.float(), (7, 7), {CLS22: attention.float()}), 12)
    assert low.indices.dtype == torch.long and low.scores.dtype == torch.float32
    assert low.indices.tolist() == high.indices.tolist()
