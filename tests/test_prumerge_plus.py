"""LLaVA-PruMerge+ (arXiv 2403.15388): signals, IQR outliers, uniform supplement, kNN merge -- golden values by hand."""

from __future__ import annotations

import pytest
import torch

import vtc.compressors.prumerge_plus  # noqa: F401  (registers "prumerge_plus")
from vtc import Signal, SignalKind, VisualTokens, create_compressor, run_compressor
from vtc.compressors.prumerge_plus import PruMergePlusDetails, adaptive_stride, iqr_outliers, spread
from helpers import CLIP_L, QWEN25


CLS22 = Signal(SignalKind.CLS_ATTENTION, 22)
KEYS22 = Signal(SignalKind.KEYS, 22)


def check_merge(selection, features, n, prefix=0):
    """The merge contract: weights reproduce the features, every token is in some group, kept tokens own theirs."""
    assert selection.weights is not None and len(selection.weights) == selection.num_kept
    for i, (index, group, weight) in enumerate(zip(selection.indices.tolist(), selection.groups, selection.weights)):
        assert group.tolist() == sorted(set(group.tolist())), "a group lists each token once, ascending"
        assert index in group.tolist(), "a kept token is a member of its own group"
        expect = (weight.float() @ features[group].float()).to(features.dtype)
        assert torch.allclose(selection.features[i].float(), expect.float(), atol=1e-2 if features.dtype ==
                              torch.bfloat16 else 1e-5)
    covered = set(torch.cat(list(selection.groups)).tolist())
    assert covered == set(range(n)), "every token is merged into some kept token"
    for index, group in zip(selection.indices.tolist(), selection.groups):
        if index < prefix:
            assert group.tolist() == [index]


# ---------------------------------------------------------------------------------------------- signals
def test_clip_l_declares_cls_attention_and_keys_of_the_feature_layer():
    assert create_compressor("prumerge_plus").signals(CLIP_L) == (CLS22, KEYS22)


def test_no_cls_tower_declares_received_attention_and_keys():
    assert create_compressor("prumerge_plus").signals(QWEN25) == (
        Signal(SignalKind.RECEIVED_ATTENTION, 31),
        Signal(SignalKind.KEYS, 31),
    )


def test_layer_option_reference_last_layer():
    assert create_compressor("prumerge_plus", layer=-1).signals(CLIP_L) == (
        Signal(SignalKind.CLS_ATTENTION, 23),
        Signal(SignalKind.KEYS, 23),
    )
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("prumerge_plus", layer=24).signals(CLIP_L)


def test_defaults():
    compressor = create_compressor("prumerge_plus")
    assert compressor.options() == {"adaptive": False, "neighbors": 32, "merge": "reference", "layer": None}


def test_bad_options():
    with pytest.raises(ValueError, match="merge"):
        create_compressor("prumerge_plus", merge="sum")
    with pytest.raises(ValueError, match="neighbors"):
        create_compressor("prumerge_plus", neighbors=-1)
    with pytest.raises((TypeError, ValueError), match="neighbors"):
        create_compressor("prumerge_plus", neighbors=2.5)
    with pytest.raises(TypeError, match="adaptive"):
        create_compressor("prumerge_plus", adaptive="yes")
    with pytest.raises(TypeError, match="layer"):
        create_compressor("prumerge_plus", layer="last")
    with pytest.raises(TypeError, match="unknown option"):
        create_compressor("prumerge_plus", ratio=0.25)


# ---------------------------------------------------------------------------------------------- IQR
def test_iqr_threshold_by_hand():
    """Attention of 12 tokens: 2 3 1 2 30 2 4 2 3 25 2 1.

    Sorted: 1 1 2 2 2 2 2 3 3 4 25 30. Linear interpolation at position q * (n - 1) = q * 11:
      Q1 at 2.75 -> sorted[2] + .75 (sorted[3] - sorted[2]) = 2 + 0 = 2;
      Q3 at 8.25 -> sorted[8] + .25 (sorted[9] - sorted[8]) = 3 + .25 * 1 = 3.25.
    IQR = 1.25, fence = 3.25 + 1.5 * 1.25 = 5.125; strictly above it: 30 (token 4) and 25 (token 9); 4 is not.
    """
    outliers, q1, q3, threshold = iqr_outliers(torch.tensor([2, 3, 1, 2, 30, 2, 4, 2, 3, 25, 2, 1.0]))
    assert (q1, q3, threshold) == (2.0, 3.25, 5.125)
    assert outliers.tolist() == [4, 9]


def test_iqr_is_strict_and_flat_attention_has_no_outlier():
    """1 1 1 1 1 10: Q1 (pos 1.25) = 1, Q3 (pos 3.75) = 1, IQR 0, fence 1 -> only 10 is above. Flat: nobody."""
    assert iqr_outliers(torch.tensor([1, 1, 1, 1, 1, 10.0]))[0].tolist() == [5]
    assert iqr_outliers(torch.full((9,), 0.3))[0].tolist() == []


# ---------------------------------------------------------------------------------------------- selection
def golden_tokens(signal=CLS22, keys_signal=KEYS22) -> VisualTokens:
    """3x4 grid (12 tokens), the attention of ``test_iqr_threshold_by_hand``; feature of token i = (i, 1)."""
    attention = torch.tensor([2, 3, 1, 2, 30, 2, 4, 2, 3, 25, 2, 1.0])
    keys = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    features = torch.stack([torch.arange(12, dtype=torch.float32), torch.ones(12)], dim=1)
    return VisualTokens(features=features, grid=(3, 4), signals={signal: attention, keys_signal: keys})


def test_golden_fixed_budget_supplement():
    """Outliers {4, 9}. Budget 6 -> 4 supplement tokens spread over the 10 non-outliers (raster order)
    R = [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]: positions floor((2j+1) * 10 / 8) = 1, 3, 6, 8 -> R = 1, 3, 7, 10.

    Grid:   .  S  .  S        kept = [1, 3, 4, 7, 9, 10]: one or two per row.
            O  .  .  S
            .  O  S  .
    Budget 9 -> 7 over R: floor((2j+1) * 10 / 14) = 0, 2, 3, 5, 6, 7, 9 -> 0, 2, 3, 6, 7, 8, 11.
    """
    tokens = golden_tokens()
    selection = run_compressor(create_compressor("prumerge_plus"), tokens, 6)
    assert selection.indices.tolist() == [1, 3, 4, 7, 9, 10]
    details = selection.details
    assert isinstance(details, PruMergePlusDetails)
    assert details.signals == (CLS22, KEYS22) and details.layers == (22,)
    assert (details.q1, details.q3, details.threshold) == (2.0, 3.25, 5.125)
    assert details.outliers.tolist() == [4, 9]
    assert details.supplement.tolist() == [1, 3, 7, 10]
    assert torch.equal(selection.scores, tokens.signals[CLS22])
    nine = run_compressor(create_compressor("prumerge_plus"), tokens, 9)
    assert nine.indices.tolist() == [0, 2, 3, 4, 6, 7, 8, 9, 11]
    assert nine.details.supplement.tolist() == [0, 2, 3, 6, 7, 8, 11]


def test_outliers_over_budget_are_trimmed_by_attention():
    """Budget 1 < 2 outliers: the top-attention outlier (token 4, 30) alone; budget 2: both, no supplement."""
    tokens = golden_tokens()
    one = run_compressor(create_compressor("prumerge_plus"), tokens, 1)
    assert one.indices.tolist() == [4] and one.details.supplement.numel() == 0
    assert one.details.outliers.tolist() == [4, 9]
    two = run_compressor(create_compressor("prumerge_plus"), tokens, 2)
    assert two.indices.tolist() == [4, 9] and two.details.supplement.numel() == 0


def test_golden_adaptive_count_and_adaptive_supplement():
    """The paper's rule on G = 12 grid tokens with O = 2 outliers: step = 12 // 2 = 6, stride = 6 // 3 = 2,
    samples 0, 2, 4, 6, 8, 10 (< G - 1 = 11) minus outlier 4 -> U = [0, 2, 6, 8, 10]; adaptive count 2 + 5 = 7.

    adaptive=True, budget 7: exactly the paper's set {4, 9} + U.
    Budget 6 (4 supplement < 5 samples): U thinned, positions floor((2j+1) * 5 / 8) = 0, 1, 3, 4 -> 0, 2, 8, 10.
    Budget 9 (7 > 5 samples): all of U, plus 2 spread over the other non-outliers [1, 3, 5, 7, 11]: positions
    floor((2j+1) * 5 / 4) = 1, 3 -> 3, 7.
    """
    tokens = golden_tokens()
    adaptive = create_compressor("prumerge_plus", adaptive=True)
    seven = run_compressor(adaptive, tokens, 7)
    assert seven.indices.tolist() == [0, 2, 4, 6, 8, 9, 10]
    assert seven.details.stride == 2 and seven.details.adaptive_count == 7 and seven.details.adaptive
    assert run_compressor(adaptive, tokens, 6).indices.tolist() == [0, 2, 4, 8, 9, 10]
    nine = run_compressor(adaptive, tokens, 9)
    assert nine.indices.tolist() == [0, 2, 3, 4, 6, 7, 8, 9, 10]
    assert nine.details.supplement.tolist() == [0, 2, 3, 6, 7, 8, 10]
    # the fixed-budget default records the same adaptive count (it is a property of the image)
    fixed = run_compressor(create_compressor("prumerge_plus"), tokens, 6).details
    assert fixed.adaptive_count == 7 and fixed.stride == 2 and not fixed.adaptive


def test_adaptive_stride_matches_the_reference_counts():
    """CLIP-L/14-336 (G = 576): O = 32 -> step 18, stride 6; O = 20 -> step 28, stride 9; O = 97 -> step 5,
    stride 1; O = 193 -> step 2, stride 0 in the reference (arange fails) -> 1 here; O = 0 -> as O = 1: 192."""
    assert adaptive_stride(576, 32) == 6
    assert adaptive_stride(576, 20) == 9
    assert adaptive_stride(576, 97) == 1
    assert adaptive_stride(576, 193) == 1
    assert adaptive_stride(576, 0) == 192


def test_clip_like_adaptive_count_is_the_paper_s_128():
    """24x24 grid, 32 outliers at 6j + 1 (never on a stride-6 sample): samples range(0, 575, 6) = 96 tokens, so
    the paper keeps 32 + 96 = 128 (the spec: IQR 32 -> 96 uniform samples). adaptive=True at 128 is that set."""
    attention = torch.ones(576)
    outliers = torch.arange(32) * 18 + 1  # 1, 19, 37, ..., 559: spread over the image, all = 1 (mod 6)
    attention[outliers] = 10.0
    g = torch.Generator().manual_seed(1)
    tokens = VisualTokens(features=torch.randn(576, 8, generator=g), grid=(24, 24),
                          signals={CLS22: attention, KEYS22: torch.randn(576, 16, generator=g)})
    samples = torch.arange(0, 575, 6)
    assert samples.numel() == 96
    selection = run_compressor(create_compressor("prumerge_plus", adaptive=True), tokens, 128)
    assert selection.details.adaptive_count == 128 and selection.details.stride == 6
    assert selection.indices.tolist() == sorted(outliers.tolist() + samples.tolist())
    # the fixed default at 64: the outliers + 32 spread over the 544 others (positions floor((2j+1) * 544 / 64))
    fixed = run_compressor(create_compressor("prumerge_plus"), tokens, 64)
    mask = torch.ones(576, dtype=torch.bool)
    mask[outliers] = False
    rest = torch.arange(576)[mask]
    supplement = rest[((2 * torch.arange(32) + 1) * 544) // 64]
    assert fixed.indices.tolist() == sorted(outliers.tolist() + supplement.tolist())
    assert fixed.details.adaptive_count == 128
    check_merge(fixed, tokens.features, 576)


def test_spread_helper():
    seq = torch.tensor([10, 11, 12, 13, 14])
    assert spread(seq, 5).tolist() == [10, 11, 12, 13, 14]  # m = L: everything
    assert spread(seq, 2).tolist() == [11, 13]  # floor(5/4) = 1, floor(15/4) = 3
    assert spread(seq, 1).tolist() == [12]  # the middle
    assert spread(seq, 0).tolist() == []


# ---------------------------------------------------------------------------------------------- merge
def merge_tokens() -> VisualTokens:
    """2x3 grid, 6 tokens; feature of token i = (i, 1).

    attention 1 1 1 1 1 5 (sum 10 -> shares .1 .1 .1 .1 .1 .5). IQR: sorted 1 1 1 1 1 5, Q1 (pos 1.25) = 1,
    Q3 (pos 3.75) = 1, fence 1 -> outlier token 5. Budget 2 -> supplement spread(R = [0..4], 1) = R[floor(5/2)] = 2.
    Kept [2, 5]; keys: 0 (1, .1), 1 (.1, 1), 2 (1, 0), 3 (1, 1), 4 (-1, 0), 5 (0, 1).
    Cosines to kept 2 = (1, 0): 0 .995, 1 .0995, 3 .7071, 4 -1, 5 0.
    Cosines to kept 5 = (0, 1): 0 .0995, 1 .995, 2 0, 3 .7071, 4 0.
    """
    attention = torch.tensor([1, 1, 1, 1, 1, 5.0])
    keys = torch.tensor([[1, .1], [.1, 1], [1, 0], [1, 1], [-1, 0], [0, 1]])
    features = torch.stack([torch.arange(6, dtype=torch.float32), torch.ones(6)], dim=1)
    return VisualTokens(features=features, grid=(2, 3), signals={CLS22: attention, KEYS22: keys})


def test_golden_reference_merge():
    """neighbors=2: kept 2 takes 0 (.995), 3 (.7071); kept 5 takes 1 (.995), 3 (.7071) -- token 3 goes to both.
    Token 4 is nobody's neighbour: it joins the kept token it is most similar to, 5 (0 > -1).
    Groups [0, 2, 3] and [1, 3, 4, 5]. Reference weights: 1 for the kept token, the share .1 for the others:
      slot 2: .1 (0, 1) + (2, 1) + .1 (3, 1) = (2.3, 1.2);
      slot 5: .1 (1, 1) + .1 (3, 1) + .1 (4, 1) + (5, 1) = (5.8, 1.3).
    """
    tokens = merge_tokens()
    selection = run_compressor(create_compressor("prumerge_plus", neighbors=2), tokens, 2)
    assert selection.indices.tolist() == [2, 5]
    assert selection.details.outliers.tolist() == [5] and selection.details.supplement.tolist() == [2]
    assert [g.tolist() for g in selection.groups] == [[0, 2, 3], [1, 3, 4, 5]]
    assert torch.allclose(selection.weights[0], torch.tensor([.1, 1, .1]))
    assert torch.allclose(selection.weights[1], torch.tensor([.1, .1, .1, 1]))
    assert torch.allclose(selection.features, torch.tensor([[2.3, 1.2], [5.8, 1.3]]))
    assert selection.details.neighbors == 2 and selection.details.merge == "reference"
    assert selection.details.signals == (CLS22, KEYS22)
    check_merge(selection, tokens.features, 6)


def test_golden_mean_merge():
    """Same groups; "mean" = shares over the group (the kept token's own included) normalised to 1:
      slot 2: shares .1 .1 .1 -> 1/3 each -> ((0 + 2 + 3) / 3, 1) = (5/3, 1);
      slot 5: shares .1 .1 .1 .5 (sum .8) -> 1/8 1/8 1/8 5/8 -> ((1 + 3 + 4) / 8 + 25 / 8, 1) = (4.125, 1).
    """
    tokens = merge_tokens()
    selection = run_compressor(create_compressor("prumerge_plus", neighbors=2, merge="mean"), tokens, 2)
    assert [g.tolist() for g in selection.groups] == [[0, 2, 3], [1, 3, 4, 5]]
    assert torch.allclose(selection.weights[1], torch.tensor([1 / 8, 1 / 8, 1 / 8, 5 / 8]))
    assert torch.allclose(selection.features, torch.tensor([[5 / 3, 1], [4.125, 1]]))
    for weight in selection.weights:
        assert weight.sum().item() == pytest.approx(1.0)


def test_kept_tokens_are_neighbours_too_as_in_the_reference():
    """neighbors=4: kept 2 ranks 0 (.995), 3 (.7071), 1 (.0995), 5 (0) -- the kept token 5 is among them;
    kept 5 ranks 1, 3, 0, then 2 and 4 tie at 0 -> the lower index, 2. Nobody is left over but 4, whose most
    similar kept token is 5. Groups [0, 1, 2, 3, 5] and [0, 1, 2, 3, 4, 5]; slot 2 weighs kept 5 by its share .5."""
    tokens = merge_tokens()
    selection = run_compressor(create_compressor("prumerge_plus", neighbors=4), tokens, 2)
    assert [g.tolist() for g in selection.groups] == [[0, 1, 2, 3, 5], [0, 1, 2, 3, 4, 5]]
    assert torch.allclose(selection.weights[0], torch.tensor([.1, .1, 1, .1, .5]))
    check_merge(selection, tokens.features, 6)


def test_no_neighbours_partitions_by_nearest_kept_token():
    """neighbors=0: every pruned token joins only its most similar kept token: 0 -> 2, 1 -> 5, 3 -> tie (.7071
    both) -> the lower kept index 2, 4 -> 5. Groups [0, 2, 3], [1, 4, 5]: a partition."""
    tokens = merge_tokens()
    selection = run_compressor(create_compressor("prumerge_plus", neighbors=0), tokens, 2)
    assert [g.tolist() for g in selection.groups] == [[0, 2, 3], [1, 4, 5]]
    assert sorted(torch.cat(list(selection.groups)).tolist()) == list(range(6))
    assert selection.details.neighbors == 0
    assert torch.allclose(selection.features, torch.tensor([[2.3, 1.2], [5.5, 1.2]]))


def test_neighbours_are_clamped_to_the_other_tokens():
    """Default 32 neighbours on 6 tokens: each kept token takes all 5 others."""
    selection = run_compressor(create_compressor("prumerge_plus"), merge_tokens(), 2)
    assert selection.details.neighbors == 5
    assert [g.tolist() for g in selection.groups] == [list(range(6))] * 2


def test_merge_replays_on_another_feature_level():
    """Groups and weights come from the signals only: running on other features of the same tokens gives the same
    groups and weights, and its features are those weights applied to the other level (Qwen3-VL deepstack)."""
    tokens = golden_tokens()
    other = torch.randn(12, 5, generator=torch.Generator().manual_seed(4))
    level = VisualTokens(features=other, grid=(3, 4), signals=tokens.signals)
    a = run_compressor(create_compressor("prumerge_plus"), tokens, 5)
    b = run_compressor(create_compressor("prumerge_plus"), level, 5)
    assert all(torch.equal(x, y) for x, y in zip(a.groups, b.groups))
    assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights))
    replay = torch.stack([w @ other[g] for g, w in zip(a.groups, a.weights)])
    assert torch.allclose(replay, b.features, atol=1e-6)


def test_attention_scale_does_not_change_the_result():
    """Merge weights are attention shares, so received attention (mean 1 per token) and CLS attention (sum <= 1)
    of the same ranking give the same selection and merge."""
    tokens = golden_tokens()
    scaled = VisualTokens(features=tokens.features, grid=(3, 4),
                          signals={CLS22: tokens.signals[CLS22] * 37.0, KEYS22: tokens.signals[KEYS22]})
    a = run_compressor(create_compressor("prumerge_plus"), tokens, 5)
    b = run_compressor(create_compressor("prumerge_plus"), scaled, 5)
    assert a.indices.tolist() == b.indices.tolist()
    assert torch.allclose(a.features, b.features, atol=1e-5)


# ---------------------------------------------------------------------------------------------- edges
def test_keep_all_is_the_identity():
    tokens = golden_tokens()
    selection = run_compressor(create_compressor("prumerge_plus"), tokens, 1.0)
    assert selection.indices.tolist() == list(range(12)) and selection.features is None
    assert selection.details.neighbors == 0 and selection.details.signals == (CLS22,)


def test_prefix_token_is_kept_and_left_out_of_the_iqr():
    """LLaVA "full": CLS is token 0 with a huge self-attention value; it is kept as a singleton (weight 1) and does
    not enter the quartiles: the grid part is the golden 3x4 attention, so the fence is still 5.125."""
    base = golden_tokens()
    attention = torch.cat([torch.tensor([1000.0]), base.signals[CLS22]])
    keys = torch.cat([torch.zeros(1, 4), base.signals[KEYS22]])
    features = torch.cat([torch.tensor([[-1.0, 1.0]]), base.features])
    tokens = VisualTokens(features=features, grid=(3, 4), num_prefix_tokens=1,
                          signals={CLS22: attention, KEYS22: keys})
    selection = run_compressor(create_compressor("prumerge_plus"), tokens, 7)
    assert selection.details.threshold == 5.125
    assert selection.details.outliers.tolist() == [5, 10]  # grid tokens 4, 9 shifted by the prefix
    # prefix, then the golden budget-6 grid selection [1, 3, 4, 7, 9, 10] shifted by 1
    assert selection.indices.tolist() == [0, 2, 4, 5, 8, 10, 11]
    assert selection.groups[0].tolist() == [0] and selection.weights[0].tolist() == [1.0]
    assert selection.features[0].tolist() == [-1.0, 1.0]
    check_merge(selection, features, 13, prefix=1)
    only_prefix = run_compressor(create_compressor("prumerge_plus"), tokens, 1)
    assert only_prefix.indices.tolist() == [0] and only_prefix.features is None


def test_no_cls_path_with_received_attention():
    """A Qwen2.5-VL tower: the declared signals (received attention + keys of block 31) drive the selection."""
    compressor = create_compressor("prumerge_plus")
    received, keys = compressor.signals(QWEN25)
    g = torch.Generator().manual_seed(2)
    attention = torch.rand(36, generator=g) + 0.5  # received attention averages about 1 per token
    attention[torch.tensor([7, 20, 33])] = 8.0
    tokens = VisualTokens(features=torch.randn(36, 5, generator=g), grid=(6, 6),
                          signals={received: attention, keys: torch.randn(36, 8, generator=g)})
    selection = run_compressor(compressor, tokens, 8)
    assert selection.details.outliers.tolist() == [7, 20, 33]
    assert {7, 20, 33} <= set(selection.indices.tolist())
    assert selection.details.signals == (received, keys) and selection.details.layers == (31,)
    check_merge(selection, tokens.features, 36)


def test_missing_keys_signal_is_reported():
    tokens = VisualTokens(features=torch.randn(12, 2), grid=(3, 4), signals={CLS22: torch.rand(12)})
    with pytest.raises(KeyError, match="keys"):
        run_compressor(create_compressor("prumerge_plus"), tokens, 6)


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("options", [{}, {"adaptive": True}, {"merge": "mean"}, {"neighbors": 0},
                                     {"neighbors": 3, "adaptive": True, "merge": "mean"}])
def test_properties_random(options):
    """Exactly k, sorted unique, every token covered, weights reproduce the features, deterministic, dtype kept."""
    g = torch.Generator().manual_seed(5)
    compressor = create_compressor("prumerge_plus", **options)
    for trial in range(40):
        rows, cols = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        prefix = int(torch.randint(0, 2, (1,), generator=g))
        n = rows * cols + prefix
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        attention = torch.rand(n, generator=g)
        if trial % 3 == 0:
            attention = (attention * 4).round() / 4  # ties
        dtype = torch.bfloat16 if trial % 4 == 0 else torch.float32
        features = torch.randn(n, 6, generator=g).to(dtype)
        tokens = VisualTokens(features=features, grid=(rows, cols), num_prefix_tokens=prefix,
                              signals={CLS22: attention, KEYS22: torch.randn(n, 4, generator=g)})
        selection = run_compressor(compressor, tokens, k)
        idx = selection.indices.tolist()
        assert len(idx) == k and idx == sorted(set(idx))
        assert idx[:min(prefix, k)] == list(range(min(prefix, k)))
        again = run_compressor(compressor, tokens, k)
        assert again.indices.tolist() == idx
        details = selection.details
        grid_kept = [i for i in idx if i >= prefix]
        kept_outliers = [i for i in grid_kept if i in set(details.outliers.tolist())]
        assert sorted(kept_outliers + details.supplement.tolist()) == grid_kept
        assert len(kept_outliers) == min(details.outliers.numel(), len(grid_kept))
        if selection.features is None:
            continue
        assert selection.features.dtype == dtype and selection.features.shape == (k, 6)
        assert torch.equal(again.features, selection.features)
        check_merge(selection, features, n, prefix)
        if options.get("neighbors") == 0:
            grid_members = torch.cat([grp for grp, i in zip(selection.groups, idx) if i >= prefix]).tolist()
            assert sorted(grid_members) == list(range(prefix, n)), "neighbors=0 partitions the grid"
