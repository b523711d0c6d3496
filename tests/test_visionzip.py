"""VisionZip (arXiv 2412.04467): signals, budget split, and golden selections / merges derived by hand."""

from __future__ import annotations

import pytest
import torch

import vtc.compressors.visionzip  # noqa: F401  (registers "visionzip")
from vtc import Signal, SignalKind, VisualTokens, create_compressor, run_compressor
from helpers import CLIP_L, QWEN25


CLS22 = Signal(SignalKind.CLS_ATTENTION, 22)
KEYS22 = Signal(SignalKind.KEYS, 22)


def assert_partition(groups, n):
    flat = torch.cat(list(groups)).tolist()
    assert sorted(flat) == list(range(n)), "every token must appear in exactly one group"


# ---------------------------------------------------------------------------------------------- signals
def test_clip_l_declares_cls_attention_and_keys_at_22_only():
    assert create_compressor("visionzip").signals(CLIP_L) == (CLS22, KEYS22)


def test_no_cls_tower_declares_received_attention_and_keys_at_feature_layer():
    assert create_compressor("visionzip").signals(QWEN25) == (
        Signal(SignalKind.RECEIVED_ATTENTION, 31),
        Signal(SignalKind.KEYS, 31),
    )


def test_layer_option():
    assert create_compressor("visionzip", layer=-1).signals(CLIP_L) == (
        Signal(SignalKind.CLS_ATTENTION, 23),
        Signal(SignalKind.KEYS, 23),
    )
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("visionzip", layer=24).signals(CLIP_L)


def test_bad_options():
    with pytest.raises(ValueError, match="merge"):
        create_compressor("visionzip", merge="sum")
    with pytest.raises(ValueError, match="dominant"):
        create_compressor("visionzip", dominant=-1)
    with pytest.raises(ValueError, match="at least 1"):
        create_compressor("visionzip", dominant=0, contextual=0)


# ---------------------------------------------------------------------------------------------- budget split
def test_default_split_matches_the_paper_and_scales_proportionally():
    """Paper: 54+10 (64), 108+20 (128), 162+30 (192). Otherwise C = round(k*10/64), D = k - C:

    k = 32 -> C = round(5.0) = 5 (LLaVA-NeXT per view 27+5); k = 100 -> round(15.625) = 16 -> 84+16;
    k = 4 -> round(0.625) = 1; k = 2 -> round(0.3125) = 0, raised to 1 -> 1+1; k = 1 -> 1+0; k = N -> N+0.
    """
    vz = create_compressor("visionzip")
    assert vz.split(64, 576) == (54, 10)
    assert vz.split(128, 576) == (108, 20)
    assert vz.split(192, 576) == (162, 30)
    assert vz.split(32, 576) == (27, 5)
    assert vz.split(100, 576) == (84, 16)
    assert vz.split(4, 576) == (3, 1)
    assert vz.split(2, 576) == (1, 1)
    assert vz.split(1, 576) == (1, 0)
    assert vz.split(576, 576) == (576, 0)
    assert vz.split(600, 576) == (576, 0)


def test_explicit_split_options():
    assert create_compressor("visionzip", dominant=54, contextual=10).split(64, 576) == (54, 10)
    assert create_compressor("visionzip", dominant=54, contextual=10).split(32, 576) == (27, 5)  # proportion
    assert create_compressor("visionzip", dominant=60).split(64, 576) == (60, 4)
    assert create_compressor("visionzip", dominant=80).split(64, 576) == (64, 0)
    assert create_compressor("visionzip", contextual=16).split(64, 576) == (48, 16)
    assert create_compressor("visionzip", dominant=4, contextual=2).split(6, 12) == (4, 2)
    # a prefix token (CLS under LLaVA's "full" strategy) is always kept, so it caps the contextual count
    assert create_compressor("visionzip", dominant=0, contextual=3).split(3, 10, num_prefix_tokens=1) == (1, 2)


# ---------------------------------------------------------------------------------------------- golden
def golden_tokens(dtype=torch.float32) -> VisualTokens:
    """12 tokens on a 3x4 grid; feature of token i = (i, 1).

    attention: tokens 1, 4, 7, 10 get .20 .15 .12 .10, every other token .02.
    keys (2-d): targets will be token 0 -> (1, 0) and token 6 -> (0, 1); members:
      2 -> (2, .5), 3 -> (.1, 1), 5 -> (1, 1) (exact tie), 8 -> (3, -1), 9 -> (-1, 2), 11 -> (0, 5);
      dominant tokens get (-1, -1) (never compared).
    """
    attention = torch.full((12,), 0.02)
    attention[torch.tensor([1, 4, 7, 10])] = torch.tensor([0.20, 0.15, 0.12, 0.10])
    keys = torch.full((12, 2), -1.0)
    keys[0], keys[6] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for i, key in {2: (2, .5), 3: (.1, 1), 5: (1, 1), 8: (3, -1), 9: (-1, 2), 11: (0, 5)}.items():
        keys[i] = torch.tensor(key, dtype=torch.float32)
    features = torch.stack([torch.arange(12, dtype=torch.float32), torch.ones(12)], dim=1).to(dtype)
    return VisualTokens(features=features, grid=(3, 4), signals={CLS22: attention, KEYS22: keys})


def test_golden_mean_merge():
    """Budget 6 = dominant 4 + contextual 2.

    Dominant: top-4 attention = {1, 4, 7, 10}.
    R = [0, 2, 3, 5, 6, 8, 9, 11] (|R| = 8), step = 8 // 2 = 4 -> targets R[0] = 0 and R[4] = 6.
    Members by cosine with target keys (1,0) / (0,1): 2 -> 0 (.97 vs .24), 3 -> 6, 5 -> tie .7071/.7071 ->
    the earlier target 0, 8 -> 0 (.95 vs -.32), 9 -> 6, 11 -> 6.
    Clusters: token 0 = {0, 2, 5, 8}, token 6 = {3, 6, 9, 11}.
    Mean merge: token 0 -> ((0+2+5+8)/4, 1) = (3.75, 1); token 6 -> ((3+6+9+11)/4, 1) = (7.25, 1).
    Output (slot order) [0, 1, 4, 6, 7, 10] with features (3.75,1) (1,1) (4,1) (7.25,1) (7,1) (10,1).
    """
    tokens = golden_tokens()
    selection = run_compressor(create_compressor("visionzip", dominant=4, contextual=2), tokens, 6)
    assert selection.indices.tolist() == [0, 1, 4, 6, 7, 10]
    assert [g.tolist() for g in selection.groups] == [[0, 2, 5, 8], [1], [4], [3, 6, 9, 11], [7], [10]]
    expected = torch.tensor([[3.75, 1], [1, 1], [4, 1], [7.25, 1], [7, 1], [10, 1]])
    assert torch.allclose(selection.features, expected)
    assert_partition(selection.groups, 12)
    # merged features are the group means (mean mode), dominant ones their own feature
    for i, group in enumerate(selection.groups):
        assert torch.allclose(selection.features[i], tokens.features[group].mean(dim=0))
    assert torch.allclose(selection.scores, tokens.signals[CLS22])


def test_golden_reference_merge_target_plus_mean():
    """Same clusters; reference code: h(target) + mean(members).

    token 0: (0, 1) + mean((2,1), (5,1), (8,1)) = (0 + 5, 1 + 1) = (5, 2);
    token 6: (6, 1) + mean((3,1), (9,1), (11,1)) = (6 + 23/3, 2).
    """
    tokens = golden_tokens()
    compressor = create_compressor("visionzip", dominant=4, contextual=2, merge="target_plus_mean")
    selection = run_compressor(compressor, tokens, 6)
    assert selection.indices.tolist() == [0, 1, 4, 6, 7, 10]
    expected = torch.tensor([[5, 2], [1, 1], [4, 1], [6 + 23 / 3, 2], [7, 1], [10, 1]])
    assert torch.allclose(selection.features, expected)


def test_empty_cluster():
    """6 tokens, budget 3 = 1 + 2. Dominant: token 5 (attention .9). R = [0..4], step = 5 // 2 = 2, targets 0 and 2.

    All members (1, 3, 4) have key (1, .1), closest to target 0's (1, 0); target 2 (0, 1) gets nobody.
    Mean: token 0 -> mean(0, 1, 3, 4) = 2; token 2 stays 2 (both modes). Reference: token 0 -> 0 + 8/3.
    """
    features = torch.arange(6, dtype=torch.float32)[:, None]
    attention = torch.tensor([.01, .01, .01, .01, .01, .9])
    keys = torch.tensor([[1, 0], [1, .1], [0, 1], [1, .1], [1, .1], [0, 0]], dtype=torch.float32)
    tokens = VisualTokens(features=features, grid=(2, 3), signals={CLS22: attention, KEYS22: keys})
    mean = run_compressor(create_compressor("visionzip", dominant=1, contextual=2), tokens, 3)
    assert mean.indices.tolist() == [0, 2, 5]
    assert [g.tolist() for g in mean.groups] == [[0, 1, 3, 4], [2], [5]]
    assert mean.features.flatten().tolist() == [2.0, 2.0, 5.0]
    ref = run_compressor(create_compressor("visionzip", dominant=1, contextual=2, merge="target_plus_mean"), tokens, 3)
    assert torch.allclose(ref.features.flatten(), torch.tensor([8 / 3, 2.0, 5.0]))


def test_clip_like_stride_at_64_of_576():
    """576 tokens, k = 64 -> 54 dominant (top attention) + 10 targets R[0], R[52], ..., R[468] (|R| = 522)."""
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(576, generator=g)
    keys = torch.randn(576, 64, generator=g)
    features = torch.randn(576, 32, generator=g)
    tokens = VisualTokens(features=features, grid=(24, 24), signals={CLS22: attention, KEYS22: keys})
    selection = run_compressor(create_compressor("visionzip"), tokens, 64)
    dominant = torch.sort(torch.argsort(attention, descending=True)[:54]).values
    mask = torch.ones(576, dtype=torch.bool)
    mask[dominant] = False
    remaining = torch.arange(576)[mask]
    targets = remaining[torch.arange(10) * (522 // 10)]
    assert 522 // 10 == 52
    assert selection.indices.tolist() == sorted(dominant.tolist() + targets.tolist())
    assert_partition(selection.groups, 576)
    for i, group in enumerate(selection.groups):
        assert torch.allclose(selection.features[i], features[group].mean(dim=0), atol=1e-5)
        if group.numel() > 1:
            assert int(selection.indices[i]) in targets.tolist()


def test_prefix_token_is_always_kept():
    """LLaVA "full": CLS is token 0 (lowest attention) and is kept as one of the dominant tokens."""
    g = torch.Generator().manual_seed(1)
    attention = torch.rand(10, generator=g) + 1.0
    attention[0] = 0.0
    tokens = VisualTokens(features=torch.randn(10, 3, generator=g), grid=(3, 3), num_prefix_tokens=1,
                          signals={CLS22: attention, KEYS22: torch.randn(10, 4, generator=g)})
    selection = run_compressor(create_compressor("visionzip", dominant=2, contextual=2), tokens, 4)
    assert selection.indices[0].item() == 0 and selection.groups[0].tolist() == [0]
    best_patch = int(torch.argmax(attention[1:])) + 1
    assert best_patch in selection.indices.tolist()
    assert_partition(selection.groups, 10)
    single = run_compressor(create_compressor("visionzip"), tokens, 1)
    assert single.indices.tolist() == [0]


def test_no_cls_received_attention_is_used():
    """Qwen-style tokens carry received attention + keys at layer 31; the top received-attention token is dominant."""
    g = torch.Generator().manual_seed(2)
    received = torch.rand(36, generator=g)
    signals = {Signal(SignalKind.RECEIVED_ATTENTION, 31): received, Signal(SignalKind.KEYS, 31): torch.randn(36, 8)}
    tokens = VisualTokens(features=torch.randn(36, 5, generator=g), grid=(6, 6), signals=signals)
    selection = run_compressor(create_compressor("visionzip"), tokens, 8)  # 8 -> round(1.25) = 1 -> 7 + 1
    top7 = torch.argsort(received, descending=True)[:7].tolist()
    assert set(top7) <= set(selection.indices.tolist())
    assert sum(g.numel() > 1 for g in selection.groups) == 1
    assert_partition(selection.groups, 36)


def test_keep_all_and_single_token():
    tokens = golden_tokens()
    everything = run_compressor(create_compressor("visionzip"), tokens, 1.0)
    assert everything.indices.tolist() == list(range(12)) and everything.features is None
    one = run_compressor(create_compressor("visionzip"), tokens, 1)
    assert one.indices.tolist() == [1] and one.features is None


def test_dtype_preserved_and_groups_partition_random():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n = int(torch.randint(2, 80, (1,), generator=g))
        k = int(torch.randint(2, n + 1, (1,), generator=g)) if n > 2 else 2
        k = min(k, n - 1) if n > 2 else 1
        signals = {CLS22: torch.rand(n, generator=g), KEYS22: torch.randn(n, 6, generator=g)}
        features = torch.randn(n, 4, generator=g).to(torch.bfloat16)
        tokens = VisualTokens(features=features, grid=(1, n), signals=signals)
        selection = run_compressor(create_compressor("visionzip"), tokens, k)
        assert selection.num_kept == k
        if selection.features is None:
            continue
        assert selection.features.dtype == torch.bfloat16
        assert_partition(selection.groups, n)
        for i, group in enumerate(selection.groups):
            expect = features[group].float().mean(dim=0).to(torch.bfloat16)
            assert torch.allclose(selection.features[i].float(), expect.float(), atol=1e-2)


def test_missing_keys_signal_is_reported():
    tokens = VisualTokens(features=torch.randn(12, 2), grid=(3, 4), signals={CLS22: torch.rand(12)})
    with pytest.raises(KeyError, match="keys"):
        run_compressor(create_compressor("visionzip"), tokens, 6)
