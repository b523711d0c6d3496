"""Golden tests from the papers and registry-generated property tests for every compressor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import Signal, SignalKind, VisualTokens, create_compressor, list_compressors, run_compressor
from helpers import CLIP_L, QWEN25


def cls_row(attention_maps: torch.Tensor) -> torch.Tensor:
    """Head-mean CLS row over the patch columns of a [H, N+1, N+1] map (FasterVLM, arXiv 2412.01818)."""
    return attention_maps[:, 0, 1:].mean(dim=0)


def tokens_with(signals: dict, n: int = 9, grid=(3, 3)) -> VisualTokens:
    return VisualTokens(features=torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), grid=grid,
                        signals=signals)


# ---------------------------------------------------------------------------------------------- layer defaults
def test_cls_attention_default_layers_are_16_to_22_on_clip_l():
    assert create_compressor("cls_attention").signals(CLIP_L) == tuple(
        Signal(SignalKind.CLS_ATTENTION, layer) for layer in range(16, 23)
    )


def test_fastervlm_default_layer_is_the_feature_layer():
    assert create_compressor("fastervlm").signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 22),)


def test_no_cls_tower_falls_back_to_received_attention():
    assert create_compressor("fastervlm").signals(QWEN25) == (Signal(SignalKind.RECEIVED_ATTENTION, 31),)
    assert create_compressor("cls_attention").signals(QWEN25) == tuple(
        Signal(SignalKind.RECEIVED_ATTENTION, layer) for layer in range(25, 32)
    )


def test_layer_options():
    assert create_compressor("cls_attention", start_layer=20).signals(CLIP_L)[0].layer == 20
    assert [s.layer for s in create_compressor("cls_attention", layers=(-2, 3)).signals(CLIP_L)] == [3, 22]
    assert create_compressor("fastervlm", layer=-1).signals(CLIP_L) == (Signal(SignalKind.CLS_ATTENTION, 23),)
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("fastervlm", layer=24).signals(CLIP_L)
    with pytest.raises(ValueError, match="after the feature layer"):
        create_compressor("cls_attention", start_layer=23).signals(CLIP_L)
    with pytest.raises(ValueError, match="non-empty"):
        create_compressor("cls_attention", layers=()).signals(CLIP_L)


# ---------------------------------------------------------------------------------------------- golden tests
def _maps(rows_per_head: list[list[float]]) -> torch.Tensor:
    """A [H, 10, 10] map whose CLS rows are given (CLS column first); other rows are irrelevant here."""
    maps = torch.full((len(rows_per_head), 10, 10), 0.1)
    for h, row in enumerate(rows_per_head):
        maps[h, 0] = torch.tensor(row)
    return maps


def test_fastervlm_golden():
    """Layer 22 CLS rows, 2 heads, 9 patches (columns 1..9 after the CLS column 0):

    head 0: patches 1..9 = .05 .30 .05 .05 .05 .05 .05 .20 .10     head 1: .05 .10 .05 .05 .35 .05 .05 .10 .10
    head mean per patch (0-based token j = column j+1):
      j: 0 .05, 1 .20, 2 .05, 3 .05, 4 .20, 5 .05, 6 .05, 7 .15, 8 .10
    top-3 = {1, 4, 7} (scores .20, .20, .15), returned in raster order [1, 4, 7].
    Top-4 adds token 8 (.10). Ties at .05 never enter before k = 5, where the stable rule picks the lowest index, 0.
    """
    m22 = _maps([[0.1, .05, .30, .05, .05, .05, .05, .05, .20, .10], [0.0, .05, .10, .05, .05, .35, .05, .05, .10, .10]])
    tokens = tokens_with({Signal(SignalKind.CLS_ATTENTION, 22): cls_row(m22)})
    compressor = create_compressor("fastervlm")
    assert run_compressor(compressor, tokens, 3).indices.tolist() == [1, 4, 7]
    assert run_compressor(compressor, tokens, 4).indices.tolist() == [1, 4, 7, 8]
    assert run_compressor(compressor, tokens, 5).indices.tolist() == [0, 1, 4, 7, 8]
    selection = run_compressor(compressor, tokens, 3)
    assert torch.allclose(selection.scores, cls_row(m22))


def test_cls_attention_golden_sum_over_layers():
    """VTC-CLS sums head-mean CLS rows over layers 16..22 (arXiv 2412.05819), unnormalised.

    Layers 16..21 (six of them) each give token 4 .15, token 2 .12 and the other seven tokens .08 (CLS column .17).
    Layer 22 gives token 0 .40, token 8 .20 and the others .05 (CLS column .05). Sums over the 7 layers:
      token 4: 6*.15 + .05 = .95;  token 0: 6*.08 + .40 = .88;  token 2: 6*.12 + .05 = .77;
      token 8: 6*.08 + .20 = .68;  every other token: 6*.08 + .05 = .53.
    Budget 2 -> {4, 0} in raster order [0, 4]; budget 3 adds 2 -> [0, 2, 4].
    FasterVLM (layer 22 alone) at budget 2 -> [0, 8]: the ensemble changes the answer.
    """
    early = torch.full((9,), .08)
    early[4], early[2] = .15, .12
    late = torch.full((9,), .05)
    late[0], late[8] = .40, .20
    signals = {Signal(SignalKind.CLS_ATTENTION, l): early.clone() for l in range(16, 22)}
    signals[Signal(SignalKind.CLS_ATTENTION, 22)] = late
    tokens = tokens_with(signals)
    selection = run_compressor(create_compressor("cls_attention"), tokens, 2)
    assert torch.allclose(selection.scores, torch.tensor([.88, .53, .77, .53, .95, .53, .53, .53, .68]))
    assert selection.indices.tolist() == [0, 4]
    assert run_compressor(create_compressor("cls_attention"), tokens, 3).indices.tolist() == [0, 2, 4]
    only_22 = tokens_with({Signal(SignalKind.CLS_ATTENTION, 22): late})
    assert run_compressor(create_compressor("fastervlm"), only_22, 2).indices.tolist() == [0, 8]


def test_pool_golden_mean_and_sample():
    """6x6 grid, budget 9 -> a 3x3 layout of 2x2 cells; cell (r, c) covers rows 2r..2r+1, cols 2c..2c+1.

    Its centre token is ((2r+1-1)//2... = 2r) * 6 + 2c, i.e. the top-left of each cell: 0, 2, 4, 12, 14, 16, 24,
    26, 28; the merged feature is the mean of the cell's 4 tokens.
    """
    features = torch.arange(36, dtype=torch.float32)[:, None].repeat(1, 2)
    tokens = VisualTokens(features=features, grid=(6, 6))
    selection = run_compressor(create_compressor("pool"), tokens, 9)
    assert selection.indices.tolist() == [0, 2, 4, 12, 14, 16, 24, 26, 28]
    assert selection.features[0].tolist() == [(0 + 1 + 6 + 7) / 4] * 2
    assert selection.groups[4].tolist() == [14, 15, 20, 21]
    sample = run_compressor(create_compressor("pool", mode="sample"), tokens, 9)
    assert sample.indices.tolist() == selection.indices.tolist() and sample.features is None


def test_pool_keeps_prefix_token_first():
    tokens = VisualTokens(features=torch.randn(17, 3), grid=(4, 4), num_prefix_tokens=1)
    selection = run_compressor(create_compressor("pool"), tokens, 5)
    assert selection.indices[0].item() == 0 and selection.num_kept == 5


def test_random_is_seeded_and_deterministic():
    tokens = VisualTokens(features=torch.randn(36, 3), grid=(6, 6))
    a = run_compressor(create_compressor("random", seed=3), tokens, 10).indices
    b = run_compressor(create_compressor("random", seed=3), tokens, 10).indices
    c = run_compressor(create_compressor("random", seed=4), tokens, 10).indices
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_missing_signal_names_what_was_captured():
    tokens = tokens_with({Signal(SignalKind.CLS_ATTENTION, 3): torch.rand(9)})
    with pytest.raises(KeyError, match="cls_attention@3"):
        tokens.signal(Signal(SignalKind.CLS_ATTENTION, 22))


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def image_case(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    prefix = draw(st.integers(0, 1))
    n = rows * cols + prefix
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    tower = draw(st.sampled_from([CLIP_L, QWEN25]))
    ties = draw(st.booleans())  # quantised scores provoke ties
    return rows, cols, prefix, n, k, seed, tower, ties


@pytest.mark.parametrize("name", list_compressors("encoder"))
@settings(max_examples=60, deadline=None)
@given(case=image_case())
def test_every_compressor_returns_a_valid_selection(name, case):
    rows, cols, prefix, n, k, seed, tower, ties = case
    generator = torch.Generator().manual_seed(seed)
    compressor = create_compressor(name)
    signals = {}
    for signal in compressor.signals(tower):
        shape = (n, 8) if signal.kind == SignalKind.KEYS else (n,)
        value = torch.rand(shape, generator=generator)
        signals[signal] = (value * 4).round() / 4 if ties else value
    features = torch.randn(n, 6, generator=generator)
    tokens = VisualTokens(features=features, grid=(rows, cols), signals=signals, num_prefix_tokens=prefix)
    selection = run_compressor(compressor, tokens, k)
    idx = selection.indices
    assert idx.numel() == k
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert 0 <= int(idx.min()) and int(idx.max()) < n
    if selection.features is not None:
        assert selection.features.shape == (k, 6)
    # deterministic: the same input gives the same selection
    assert run_compressor(compressor, tokens, k).indices.tolist() == idx.tolist()
    # keep-all returns every token
    assert run_compressor(compressor, tokens, 1.0).indices.tolist() == list(range(n))
