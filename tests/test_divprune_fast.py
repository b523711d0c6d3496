"""DivPrune's cheap exact first pick and batched greedy (issue 20 item 3): the same picks as the plain rule.

The reference below is the spec's algorithm written out with the whole ``N x N`` matrix in float64 (docs/methods/
divprune.md, image_compressors.md section 6.2); the fast paths are forced with tiny block sizes. No timing here:
the figures are in docs/methods/divprune.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc.compressors.divprune as dp
from vtc import VisualTokens, create_compressor, run_compressor
from vtc.compressors.divprune import cosine_error_bound, divprune_order, first_pick


def reference_distances(features: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` float64 cosine distances, rows normalised as ``normalize`` does (norm floored at 1e-12; a zero
    vector has cosine 0 to everything). Products summed elementwise so ``d(i, j)`` and ``d(j, i)`` are bit-equal."""
    x = features.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - (unit[:, None, :] * unit[None, :, :]).sum(dim=-1)


def reference_first(features: torch.Tensor) -> tuple[int, float]:
    """Step 1: ``argmax_i min_{j != i} d(i, j)``, ties to the lowest index; ``(index, distance)``. A tie is equality
    up to float64 rounding (1e-12): mathematically equal distances may round apart in the last bit."""
    dist = reference_distances(features)
    n = dist.shape[0]
    if n == 1:
        return 0, math.inf
    dist.fill_diagonal_(math.inf)
    nearest = dist.min(dim=1).values
    index = int(torch.nonzero(nearest >= nearest.max() - 1e-12)[0])  # the first (near-)maximum
    return index, float(nearest[index])


def reference_order(features: torch.Tensor, k: int) -> list[int]:
    """The whole greedy: step 1 as above, then ``argmax`` of the min distance to the kept set, kept tokens masked."""
    dist = reference_distances(features)
    chosen = [reference_first(features)[0]]
    for _ in range(1, k):
        score = dist[chosen].min(dim=0).values
        score[chosen] = -math.inf
        chosen.append(int(torch.argmax(score)))
    return chosen


@pytest.fixture
def small_blocks(monkeypatch):
    """Force the large-N code paths at small N: 100-similarity blocks, greedy batches of 3, 2 candidates."""
    monkeypatch.setattr(dp, "FIRST_PICK_BLOCK_ELEMENTS", 100)
    monkeypatch.setattr(dp, "GREEDY_BATCH", 3)
    monkeypatch.setattr(dp, "GREEDY_CANDIDATES", 2)


def orthogonal_pairs(angles: list[float], scales: list[float] | None = None, seed: int = 0) -> torch.Tensor:
    """Token pairs ``(e_2i, cos a_i e_2i + sin a_i e_2i+1)`` in float64, shuffled: pair i's tokens are each other's
    nearest neighbour (other pairs are orthogonal), so both have ``min d = 1 - cos a_i`` -- an exact tie inside
    each pair, and the pair with the largest angle wins."""
    p = len(angles)
    features = torch.zeros(2 * p, 2 * p, dtype=torch.float64)
    for i, angle in enumerate(angles):
        features[2 * i, 2 * i] = 1.0
        features[2 * i + 1, 2 * i] = math.cos(angle)
        features[2 * i + 1, 2 * i + 1] = math.sin(angle)
    if scales is not None:
        features = features * torch.tensor(scales, dtype=torch.float64)[:, None]
    return features[torch.randperm(2 * p, generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------- first pick
@pytest.mark.parametrize("block", [None, 1, 7, 50, 333, 10_000])
def test_first_pick_equals_the_float64_rule_on_random_inputs(block):
    """Generic inputs, every block size (one row per block, partial last blocks, one block): the same index and
    distance as the float64 reference."""
    for seed, (n, d) in enumerate([(2, 3), (37, 5), (100, 16), (129, 64), (300, 8)]):
        if block is not None and block < 100 and n > 40:
            continue  # one or two rows per product: slow in Python, nothing new to learn
        features = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
        index, value, _ = first_pick(features, block_elements=block)
        expected, distance = reference_first(features)
        assert int(index) == expected
        assert float(value) == pytest.approx(distance, abs=1e-6)


def test_first_pick_exact_ties_go_to_the_lowest_index():
    """One-hot rows with duplicates: a duplicated row has min distance 0, a unique one exactly 1 -> all unique rows
    tie, the lowest-index unique row wins, whatever the block size (the tie survives pruning and the re-check)."""
    eye = torch.eye(12)
    rows = [3, 3, 7, 0, 0, 5, 9, 9, 1, 11, 5, 2, 2, 4]  # unique: 7 (index 2), 1 (8), 11 (9), 4 (13)
    features = eye[rows]
    for block in (None, 1, 5, 20, 64):
        index, value, _ = first_pick(features, block_elements=block)
        assert int(index) == 2 == reference_first(features)[0]
        assert float(value) == 1.0
    same = torch.ones(9, 4)  # every row identical: every min distance is 0 -> token 0
    assert int(first_pick(same, block_elements=3)[0]) == 0 == reference_first(same)[0]


def test_first_pick_blank_image_many_candidates():
    """A blank image (every row identical, or power-of-two multiples of one row): every token ties, more than 64
    candidates survive the fp32 search -> one per distinct row is re-checked (identical rows) or every pair in
    float64 products (scaled copies); token 0 either way, as the reference says."""
    for rows in (torch.ones(150, 24), torch.randn(1, 24) * 2.0 ** (torch.arange(150) % 5 - 2.0)[:, None]):
        expected = reference_first(rows)
        for block in (None, 3000):
            index, value, _ = first_pick(rows, block_elements=block)
            assert int(index) == expected[0] == 0
            assert float(value) == pytest.approx(expected[1], abs=1e-6)
        assert divprune_order(rows, 5)[0].tolist() == [0, 1, 2, 3, 4] == reference_order(rows, 5)


@pytest.mark.parametrize("gap", [1e-4, 1e-6, 1e-9])
def test_first_pick_resolves_near_ties_below_bf16_and_fp32(gap):
    """Pairs whose nearest-neighbour distances differ by ``gap`` radians of angle (a cosine gap of ~``gap * sin``):
    far below bf16 (~4e-3) and, at 1e-9, below fp32's resolution of a cosine near 0.5. The float64 rule decides;
    the winner's partner ties it exactly and has a higher index. Scales (powers of two keep normalising exact)."""
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        angles = (1.0 + gap * torch.randperm(40, generator=generator).double()).tolist()
        scales = (2.0 ** torch.randint(-3, 4, (80,), generator=generator)).tolist()
        features = orthogonal_pairs(angles, scales, seed)
        expected, distance = reference_first(features)
        for block in (None, 400):
            index, value, _ = first_pick(features, block_elements=block)
            assert int(index) == expected
            assert float(value) == pytest.approx(distance, rel=1e-6)
        assert int(first_pick(features.float(), block_elements=400)[0]) == reference_first(features.float())[0]


def test_first_pick_zero_vectors_have_cosine_zero():
    """Random 3-D rows crowd each other (nearest distance near 0); a zero row has distance 1 to everything and
    wins; two zero rows tie (cosine 0 to each other too) -> the lower index."""
    features = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    features[17] = 0.0
    assert int(first_pick(features, block_elements=11)[0]) == 17 == reference_first(features)[0]
    features[5] = 0.0
    for block in (None, 11):
        index, value, _ = first_pick(features, block_elements=block)
        assert int(index) == 5 == reference_first(features)[0] and float(value) == 1.0


def test_first_pick_single_token_and_matrix_kept_only_when_small():
    index, value, matrix = first_pick(torch.randn(1, 8), keep_matrix=True)
    assert int(index) == 0 and math.isinf(float(value)) and matrix is None
    features = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    assert first_pick(features, keep_matrix=True)[2].shape == (20, 20)  # 400 <= the default block
    assert first_pick(features, block_elements=100, keep_matrix=True)[2] is None
    assert first_pick(features, keep_matrix=False)[2] is None


class _ProductSizes(torch.overrides.TorchFunctionMode):
    """Records the number of elements of every matrix product's result."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            self.sizes.append(out.numel())
        return out


def test_first_pick_is_blocked_and_skips_work():
    """Above the block size the search runs in blocks: no product exceeds the block (no ``N x N`` matrix) and in
    all it computes far fewer than ``N^2`` similarities (symmetry + pruning), with the same answer as one block."""
    n, block = 600, 6000
    features = torch.randn(n, 32, generator=torch.Generator().manual_seed(4))
    with _ProductSizes() as sizes:
        index, _, matrix = first_pick(features, block_elements=block, keep_matrix=True)
    assert matrix is None and len(sizes.sizes) > 1
    assert max(sizes.sizes) <= block
    assert sum(sizes.sizes) < 0.6 * n * n, sum(sizes.sizes) / n**2
    assert int(index) == reference_first(features)[0] == int(first_pick(features, block_elements=n * n)[0])


def test_cosine_error_bound_covers_fp32():
    """The margin is a bound, not a guess: the fp32 similarities of normalised rows stay within it of float64."""
    for d in (1, 7, 256, 4096):
        features = torch.randn(32, d, generator=torch.Generator().manual_seed(d)).double() * 1e3
        unit = torch.nn.functional.normalize(features.float(), dim=-1)
        error = ((unit @ unit.T).double() - (1.0 - reference_distances(features))).abs().max()
        assert float(error) <= cosine_error_bound(d)


# ---------------------------------------------------------------------------------------------- whole order
@pytest.mark.parametrize("forced", [False, True])
def test_order_equals_the_reference_on_generic_inputs(forced, monkeypatch):
    """Continuous random features: the same greedy order as the float64 reference, by the default path and with
    the large-N paths forced (blocked first pick, batched greedy with certification and fallbacks); k = N too."""
    if forced:
        monkeypatch.setattr(dp, "FIRST_PICK_BLOCK_ELEMENTS", 100)
        monkeypatch.setattr(dp, "GREEDY_BATCH", 3)
        monkeypatch.setattr(dp, "GREEDY_CANDIDATES", 2)
    for seed in range(8):
        n = 9 + 11 * seed
        features = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
        for k in (1, 2, n // 3, n):
            order, scores = divprune_order(features, k)
            assert order.tolist() == reference_order(features, k)
            assert scores.shape == (n,) and scores.dtype == torch.float32


def test_order_exact_ties_and_duplicates(small_blocks):
    """One-hot rows (distances exactly 0 or 1, exact in fp32): every step is a tie or a duplicate; the batched
    greedy cannot certify strict winners and must fall back to the full update -- same order as the reference."""
    eye = torch.eye(10)
    rows = [4, 4, 1, 9, 0, 0, 0, 6, 2, 2, 8, 3, 7, 5, 1]
    features = eye[rows] * torch.tensor([1.0, 2.0, 0.5])[torch.arange(len(rows)) % 3][:, None]
    n = len(rows)
    for k in (1, 5, 10, n):
        assert divprune_order(features, k)[0].tolist() == reference_order(features, k)
    tokens = VisualTokens(features=features, grid=(3, 5))
    assert run_compressor(create_compressor("divprune"), tokens, 6).indices.tolist() == sorted(
        reference_order(features, 6))


def test_batched_greedy_scores_match_the_plain_loop(small_blocks):
    """Scores (each kept token's distance when picked, every other token's final distance) as the plain loop's."""
    features = torch.randn(90, 10, generator=torch.Generator().manual_seed(7))
    order, scores = divprune_order(features, 30)
    dist = reference_distances(features)
    kept = order.tolist()
    final = dist[kept].min(dim=0).values
    expected = final.clone()
    for step, token in enumerate(kept):
        expected[token] = reference_first(features)[1] if step == 0 else dist[kept[:step], token].min()
    assert torch.allclose(scores.double(), expected, atol=1e-5)


def test_single_token_and_full_budget(small_blocks):
    one = torch.randn(1, 5)
    order, scores = divprune_order(one, 1)
    assert order.tolist() == [0] and math.isinf(float(scores[0]))
    features = torch.randn(23, 4, generator=torch.Generator().manual_seed(8))
    order = divprune_order(features, 23)[0]
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() == reference_order(features, 23)


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 50), d=st.integers(1, 8), seed=st.integers(0, 2**16), copies=st.booleans(),
       zeros=st.integers(0, 2), block=st.sampled_from([1, 16, 100, 1 << 22]), data=st.data())
def test_first_pick_property(n, d, seed, copies, zeros, block, data):
    """Any size, block, exact copies (power-of-two scaled: bit-equal once normalised) and zero rows: the first pick
    is the float64 rule's, index for index."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator)
    if copies and n > 2:
        half = n // 2
        features[half:] = features[: n - half] * 2.0 ** torch.randint(-2, 3, (n - half, 1), generator=generator)
    for row in data.draw(st.lists(st.integers(0, n - 1), max_size=zeros)):
        features[row] = 0.0
    index, value, _ = first_pick(features, block_elements=block)
    expected, distance = reference_first(features)
    assert int(index) == expected
    assert float(value) == pytest.approx(distance, abs=1e-6) or math.isinf(distance)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(2, 8), seed=st.integers(0, 2**16), data=st.data())
def test_forced_fast_paths_property(n, d, seed, data):
    """The forced large-N paths give a valid selection whose every pick is, up to fp32 near-ties (1e-5), the
    reference's best at that step (same check as test_hiprune_divprune's ``naive_divprune(follow=...)``)."""
    k = data.draw(st.integers(1, n))
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dp, "FIRST_PICK_BLOCK_ELEMENTS", data.draw(st.sampled_from([1, 40, 200])))
        patch.setattr(dp, "GREEDY_BATCH", data.draw(st.integers(1, 5)))
        patch.setattr(dp, "GREEDY_CANDIDATES", data.draw(st.integers(1, 4)))
        order = divprune_order(features, k)[0].tolist()
    assert len(set(order)) == k and order[0] == reference_first(features)[0]
    dist = reference_distances(features)
    for step in range(1, k):
        score = dist[order[:step]].min(dim=0).values
        score[order[:step]] = -math.inf
        best = int(torch.argmax(score))
        assert score[order[step]] >= score[best] - 1e-5
        others = score.clone()
        others[best] = -math.inf
        if n - step > 1 and score[best] - others.max() > 1e-5:
            assert order[step] == best
