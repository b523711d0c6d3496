"""HiPrune (arXiv 2508.00553) and DivPrune (arXiv 2503.02175): hand-derived golden tests, layer defaults, properties."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtc.compressors.divprune as divprune_module  # (also registers "divprune")
import vtc.compressors.hiprune  # noqa: F401  (registers "hiprune" until the package imports it)
from vtc import Signal, SignalKind, TowerInfo, VisualTokens, create_compressor, run_compressor, top_k_sorted
from vtc.compressors.divprune import divprune_order
from vtc.compressors.hiprune import default_layers, hiprune_parts, num_anchors
from helpers import CLIP_L, QWEN25

TINY_CLIP = TowerInfo(name="clip", num_layers=4, feature_layer=2, has_cls=True)
TINY_QWEN = TowerInfo(name="qwen2_5_vit", num_layers=4, feature_layer=3, has_cls=False, full_attention_layers=(1, 3))


def recv(layer: int) -> Signal:
    return Signal(SignalKind.RECEIVED_ATTENTION, layer)


def scores(n: int, values: dict[int, float], rest: float = 0.1) -> torch.Tensor:
    out = torch.full((n,), rest)
    for index, value in values.items():
        out[index] = value
    return out


# ================================================================================================ HiPrune
# ---------------------------------------------------------------------------------------------- layers
def test_hiprune_default_layers():
    """CLIP-L/14-336: object 8 (reference HIPRUNE_OBJECT_LAYER=9, 1-based), deep 22 (= feature layer, attentions[-2]).

    Qwen2.5-VL: full-attention blocks (7, 15, 23, 31); deep = last one = 31; object = the one closest to
    32/2 - 1 = 15 -> 15 (reference HIPRUNE_OBJECT_LAYER=16, 1-based). Tiny CLIP (4 layers, features from 2):
    round(4 * 9/24) - 1 = round(1.5) - 1 = 1, deep 2. Tiny Qwen (4 blocks, full at 1 and 3): target 4/2 - 1 = 1 ->
    object 1, deep 3. A one-layer tower clamps the object layer (round(.375) - 1 = -1) to 0 = deep.
    """
    assert default_layers(CLIP_L) == (8, 22)
    assert default_layers(QWEN25) == (15, 31)
    assert default_layers(TINY_CLIP) == (1, 2)
    assert default_layers(TINY_QWEN) == (1, 3)
    assert default_layers(TowerInfo(name="one", num_layers=1, feature_layer=0, has_cls=True)) == (0, 0)
    # every tower size: 0 <= object <= deep
    for layers in range(1, 60):
        obj, deep = default_layers(TowerInfo(name="t", num_layers=layers, feature_layer=layers - 1, has_cls=True))
        assert 0 <= obj <= deep == layers - 1


def test_hiprune_declares_exactly_the_two_received_attention_signals():
    hiprune = create_compressor("hiprune")
    assert hiprune.signals(CLIP_L) == (recv(8), recv(22))  # received attention even where a CLS token exists
    assert hiprune.signals(QWEN25) == (recv(15), recv(31))
    assert hiprune.signals(TINY_CLIP) == (recv(1), recv(2))


def test_hiprune_layer_options():
    assert create_compressor("hiprune", object_layer=-15, deep_layer=-1).signals(CLIP_L) == (recv(9), recv(23))
    assert create_compressor("hiprune", object_layer=5).signals(QWEN25) == (recv(5), recv(31))
    assert create_compressor("hiprune", deep_layer=12).signals(CLIP_L) == (recv(8), recv(12))
    assert create_compressor("hiprune", deep_layer=5).signals(CLIP_L) == (recv(5),)  # default object clamped
    # the same layer for both roles is captured once
    assert create_compressor("hiprune", object_layer=22).signals(CLIP_L) == (recv(22),)
    with pytest.raises(ValueError, match="after deep_layer"):
        create_compressor("hiprune", object_layer=23).signals(CLIP_L)
    with pytest.raises(ValueError, match="out of range"):
        create_compressor("hiprune", deep_layer=24).signals(CLIP_L)
    with pytest.raises(ValueError, match="alpha"):
        create_compressor("hiprune", alpha=-0.1)


def test_hiprune_anchor_count_is_pythons_round():
    """N_a = round(k * alpha / 5), half-to-even (reference code): LLaVA-1.5 192 -> 4, 128 -> 3, 64 -> 1; 25 -> round(.5)
    = 0, 26 -> 1, 75 -> round(1.5) = 2, 125 -> round(2.5) = 2."""
    assert [num_anchors(k, 0.1) for k in (192, 128, 64, 25, 26, 75, 125)] == [4, 3, 1, 0, 1, 2, 2]


# ---------------------------------------------------------------------------------------------- golden
def _grid_tokens(object_score, deep_score, grid=(5, 5), prefix=0, layers=(8, 22)) -> VisualTokens:
    n = prefix + grid[0] * grid[1]
    return VisualTokens(features=torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), grid=grid,
                        signals={recv(layers[0]): object_score, recv(layers[1]): deep_score},
                        num_prefix_tokens=prefix)


def test_hiprune_golden_anchors_buffers_registers():
    """5x5 grid (token = 5*row + col), alpha = 1.0, budget 12 -> N_a = round(12 * 1.0 / 5) = round(2.4) = 2.

    Layer 8 (object): token 24 .9, token 5 .8, token 12 .7, rest .1 -> anchors 24 (row 4, col 4: bottom-right
    corner) and 5 (row 1, col 0: left border).
    Buffers (4-neighbours on the grid, nothing outside it, no wrap):
      5  -> left: none (col 0; the reference's flat i-1 would wrap to token 4), right 6, up 0, down 10;
      24 -> left 23, right: none (reference: 25 clamped to 24), up 19, down: none (reference: 29 clamped to 24).
      buffers = {0, 6, 10, 19, 23}; anchors + buffers = 7, so 12 - 7 = 5 registers.
    Layer 22 (deep): 5 .9, 6 .8 (already chosen: excluded), 12 .7, 13 .6, 2 .5, 8 .4, 17 .3, 21 .3, token 4 .05,
    rest .1 -> registers 12, 13, 2, 8 and then 17 (ties with 21 at .3; the lower index wins).
    Kept = [0, 2, 5, 6, 8, 10, 12, 13, 17, 19, 23, 24]; token 4 (the reference's wrapped neighbour) is not kept.
    """
    obj = scores(25, {24: .9, 5: .8, 12: .7})
    deep = scores(25, {5: .9, 6: .8, 12: .7, 13: .6, 2: .5, 8: .4, 17: .3, 21: .3, 4: .05})
    tokens = _grid_tokens(obj, deep)
    selection = run_compressor(create_compressor("hiprune", alpha=1.0), tokens, 12)
    assert selection.indices.tolist() == [0, 2, 5, 6, 8, 10, 12, 13, 17, 19, 23, 24]
    assert torch.equal(selection.scores, deep)
    parts = hiprune_parts(obj, deep, (5, 5), 12, alpha=1.0)
    assert parts.anchors.tolist() == [24, 5]
    assert sorted(parts.buffers.tolist()) == [0, 6, 10, 19, 23]
    assert parts.registers.tolist() == [12, 13, 2, 8, 17]


def test_hiprune_golden_trims_buffers_to_the_budget():
    """Same grid and anchors, alpha = 2.5, budget 4 -> N_a = round(4 * 2.5 / 5) = 2: anchors 24 and 5.

    Their 5 buffers {0, 6, 10, 19, 23} do not fit in the 4 - 2 = 2 remaining slots: buffers are ranked by the
    object-layer score -- 0 .1, 6 .5, 10 .6, 19 .6, 23 .2 -> 10 and 19 (tied at .6, both fit; 10 first) -- and no
    registers are left. Kept = [5, 10, 19, 24]: exactly the budget.
    """
    obj = scores(25, {24: .9, 5: .8, 0: .1, 6: .5, 10: .6, 19: .6, 23: .2, 12: .7})
    deep = scores(25, {12: .9})
    parts = hiprune_parts(obj, deep, (5, 5), 4, alpha=2.5)
    assert parts.anchors.tolist() == [24, 5]
    assert parts.buffers.tolist() == [10, 19]
    assert parts.registers.numel() == 0
    tokens = _grid_tokens(obj, deep)
    assert run_compressor(create_compressor("hiprune", alpha=2.5), tokens, 4).indices.tolist() == [5, 10, 19, 24]
    # budget 3: one buffer slot, the tie at .6 goes to the lower index
    assert hiprune_parts(obj, deep, (5, 5), 3, alpha=2.5).buffers.tolist() == [10]


def test_hiprune_small_budget_has_no_anchors():
    """Default alpha 0.1, budget 5 -> N_a = round(0.1) = 0: no anchors, no buffers, 5 registers = the top 5 of the
    deep layer, whatever the object layer says (HiPrune degenerates to top-k received attention)."""
    generator = torch.Generator().manual_seed(1)
    obj, deep = torch.rand(25, generator=generator), torch.rand(25, generator=generator)
    parts = hiprune_parts(obj, deep, (5, 5), 5)
    assert parts.anchors.numel() == 0 and parts.buffers.numel() == 0
    selection = run_compressor(create_compressor("hiprune"), _grid_tokens(obj, deep), 5)
    assert selection.indices.tolist() == top_k_sorted(deep, 5).tolist()


def test_hiprune_golden_prefix_token_is_off_grid():
    """1 prefix token (index 0, e.g. CLS) + 3x3 grid (grid cell (r, c) = token 1 + 3r + c); alpha 1.0, budget 5 ->
    N_a = round(1.0) = 1.

    Object layer: prefix .9 (highest, but prefix tokens are never anchors), token 1 = cell (0, 0) .8 -> anchor 1.
    Its buffers: right cell (0, 1) = token 2, down cell (1, 0) = token 4; left/up are off the grid (the flat i-1
    would be the prefix token 0). Registers (5 - 3 = 2) by deep score: prefix .9, token 9 .5, rest .1 -> 0 and 9.
    Kept = [0, 1, 2, 4, 9].
    """
    obj = scores(10, {0: .9, 1: .8})
    deep = scores(10, {0: .9, 9: .5})
    tokens = _grid_tokens(obj, deep, grid=(3, 3), prefix=1)
    assert run_compressor(create_compressor("hiprune", alpha=1.0), tokens, 5).indices.tolist() == [0, 1, 2, 4, 9]
    parts = hiprune_parts(obj, deep, (3, 3), 5, alpha=1.0, num_prefix_tokens=1)
    assert parts.anchors.tolist() == [1] and parts.buffers.tolist() == [2, 4] and parts.registers.tolist() == [0, 9]


def test_hiprune_never_reselects_chosen_tokens_with_large_scores():
    """Qwen-style scores are sums over queries (can exceed 1): the reference's "subtract 1" exclusion would let the
    anchor (deep score 3.0 - 1 = 2.0 > 1.5) be picked again and keep fewer tokens. Here 5x5 grid, alpha 1.0,
    budget 6 -> 1 anchor (12, centre) + buffers 7, 11, 13, 17 + 1 register: the best *other* token, 0 (1.5)."""
    obj = scores(25, {12: 5.0})
    deep = scores(25, {12: 3.0, 7: 2.9, 0: 1.5, 1: 1.4})
    selection = run_compressor(create_compressor("hiprune", alpha=1.0), _grid_tokens(obj, deep), 6)
    assert selection.indices.tolist() == [0, 7, 11, 12, 13, 17]


def test_hiprune_same_layer_for_both_roles():
    """object_layer = deep_layer: one signal serves both roles (alpha 1.0, budget 6 on 5x5: anchor 12, 4 buffers,
    1 register = best remaining deep score)."""
    s = scores(25, {12: .9, 3: .8})
    tokens = VisualTokens(features=torch.zeros(25, 2), grid=(5, 5), signals={recv(22): s})
    compressor = create_compressor("hiprune", object_layer=22, alpha=1.0)
    assert compressor.signals(CLIP_L) == (recv(22),)
    assert run_compressor(compressor, tokens, 6).indices.tolist() == [3, 7, 11, 12, 13, 17]


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), prefix=st.integers(0, 2), alpha=st.sampled_from([0.1, 1.0, 5.0]),
       seed=st.integers(0, 2**16), data=st.data())
def test_hiprune_parts_properties(rows, cols, prefix, alpha, seed, data):
    """Any grid / budget / alpha: anchors, buffers, registers are disjoint, total exactly k, anchors on the grid and
    buffers 4-adjacent (same row or column, no wrap) to some anchor."""
    n = prefix + rows * cols
    k = data.draw(st.integers(0, n))
    generator = torch.Generator().manual_seed(seed)
    obj, deep = (torch.rand(n, generator=generator) * 4).round(), torch.rand(n, generator=generator)
    parts = hiprune_parts(obj, deep, (rows, cols), k, alpha=alpha, num_prefix_tokens=prefix)
    everything = parts.anchors.tolist() + parts.buffers.tolist() + parts.registers.tolist()
    assert len(everything) == len(set(everything)) == k
    assert parts.anchors.numel() == min(num_anchors(k, alpha), k, rows * cols)
    assert all(a >= prefix for a in parts.anchors.tolist())
    cells = [divmod(a - prefix, cols) for a in parts.anchors.tolist()]
    for b in parts.buffers.tolist():
        assert b >= prefix
        r, c = divmod(b - prefix, cols)
        assert any(abs(r - ar) + abs(c - ac) == 1 for ar, ac in cells)


# ================================================================================================ DivPrune
def _unit(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


def test_divprune_golden_greedy_order_with_a_tie():
    """2-D features; the cosine distance 1 - cos(angle) grows with the angle between them (0..180 degrees), so the
    greedy can be followed with angles. Token: angle -- 0: 0 deg = (1, 0); 1: 10 deg; 2: 90 deg = (0, 1);
    3: 180 deg = (-7, 0) (norm is ignored); 4: 105 deg; 5: 270 deg = (0, -1).

    Step 1, nearest *other* token of each: 0 -> 1 (10), 1 -> 0 (10), 2 -> 4 (15), 3 -> 4 (75), 4 -> 2 (15),
      5 -> 0 or 3 (90). Farthest nearest neighbour: token 5.
    Step 2, angle to {5}: 0: 90, 1: 100, 2: 180, 3: 90, 4: 165 -> token 2.
    Step 3, min angle to {5, 2}: 0: min(90, 90) = 90, 1: min(100, 80) = 80, 3: min(90, 90) = 90, 4: min(165, 15) = 15
      -> tie between 0 and 3 at exactly distance 1 (exact zero dot products) -> the lower index, 0.
    Step 4, min angle to {5, 2, 0}: 1: 10, 3: 90, 4: 15 -> 3.   Step 5: 1: 10, 4: 15 -> 4.   Step 6: 1.
    Order 5, 2, 0, 3, 4, 1; budget 3 -> [0, 2, 5], 4 -> [0, 2, 3, 5], 5 -> [0, 2, 3, 4, 5].
    """
    features = torch.tensor([[1.0, 0.0], _unit(10), [0.0, 1.0], [-7.0, 0.0], _unit(105), [0.0, -1.0]])
    order, _ = divprune_order(features, 6)
    assert order.tolist() == [5, 2, 0, 3, 4, 1]
    tokens = VisualTokens(features=features, grid=(2, 3))
    divprune = create_compressor("divprune")
    assert divprune.signals(CLIP_L) == () and divprune.signals(QWEN25) == ()
    assert run_compressor(divprune, tokens, 3).indices.tolist() == [0, 2, 5]
    assert run_compressor(divprune, tokens, 4).indices.tolist() == [0, 2, 3, 5]
    assert run_compressor(divprune, tokens, 5).indices.tolist() == [0, 2, 3, 4, 5]
    selection = run_compressor(divprune, tokens, 3)
    # scores: the first pick's nearest-neighbour distance (1 - cos 90 = 1), the second's distance 2 (180 deg)
    assert selection.scores[5].item() == pytest.approx(1.0) and selection.scores[2].item() == pytest.approx(2.0)


def test_divprune_golden_ties_and_duplicates():
    """3-D one-hot features e1, e2, e3: every pairwise distance is exactly 1, so every step is a tie -> picks in
    index order 0, 1, 2.

    [e1, e1, e2]: nearest-neighbour distances 0, 0, 1 -> first pick 2; then tokens 0 and 1 both at distance 1 ->
    0; then token 1 (distance 0 to token 0, still the only one left) -> order 2, 0, 1.
    [e1, e1, e1]: all distances 0 -> first pick 0; next, kept token 0 is masked (-inf) so the tie at 0 among the
    rest goes to 1: budget 2 -> [0, 1] (two distinct tokens, never token 0 twice).
    """
    e = torch.eye(3)
    assert divprune_order(e, 3)[0].tolist() == [0, 1, 2]
    assert divprune_order(torch.stack([e[0], e[0], e[1]]), 3)[0].tolist() == [2, 0, 1]
    same = VisualTokens(features=torch.stack([e[0], e[0], e[0]]), grid=(1, 3))
    assert run_compressor(create_compressor("divprune"), same, 2).indices.tolist() == [0, 1]


def test_divprune_block_size_does_not_change_the_answer(monkeypatch):
    """The first pick's nearest-neighbour search is done in row blocks; tiny blocks (1 or 2 rows, with a partial last
    block) must give the same nearest-neighbour distances and the same selection."""
    features = torch.randn(37, 5, generator=torch.Generator().manual_seed(3))
    unit = torch.nn.functional.normalize(features, dim=-1)
    reference = divprune_module.nearest_neighbour_distance(unit)
    for block in (1, 37, 74, 100):
        assert torch.allclose(divprune_module.nearest_neighbour_distance(unit, block), reference)
    expected = divprune_order(features, 12)[0]
    monkeypatch.setattr(divprune_module, "FIRST_PICK_BLOCK_ELEMENTS", 74)
    assert torch.equal(divprune_order(features, 12)[0], expected)


def test_divprune_never_builds_the_n_by_n_matrix():
    """N = 20000, D = 64: the distance matrix alone would be 20000^2 * 4 B = 1.6 GB. In a fresh process, the peak
    resident memory may grow by far less than that while selecting 64 tokens (blocks of 4M fp32 = 16 MB)."""
    script = textwrap.dedent("""
        import resource, torch
        from vtc.compressors.divprune import divprune_order
        torch.set_num_threads(4)
        divprune_order(torch.randn(300, 64), 8)  # warm up kernels and allocator
        features = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        order, scores = divprune_order(features, 64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert order.numel() == 64 and len(set(order.tolist())) == 64
        print((after - before) // 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    grown_mib = int(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 400, f"peak memory grew by {grown_mib} MiB"


def naive_divprune(features: torch.Tensor, k: int, follow: list[int] | None = None, tol: float = 1e-5):
    """The reference code's algorithm as written, in float64 with the full N x N distance matrix:
    step 1 = argmax of the 2nd smallest value of each column; then argmax of the min over the selected rows,
    recomputed from scratch each step, selected tokens masked. Returns the greedy order.

    With ``follow`` (another implementation's order) it checks each of its picks instead: the pick must score within
    ``tol`` of the best, and must *be* the best (lowest index among the maxima) whenever the best beats every other
    candidate by more than ``tol`` -- exact agreement up to float near-ties, which fp32 and fp64 may break
    differently. The check then continues along ``follow``.
    """
    x = features.double()
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    n = dist.shape[0]
    chosen: list[int] = []
    for step in range(k):
        if step == 0:
            score = dist.sort(dim=0).values[1] if n > 1 else torch.zeros(1, dtype=torch.float64)
        else:
            score = dist[chosen].min(dim=0).values.clone()
            score[chosen] = -math.inf
        best = int(torch.argmax(score))
        if follow is None:
            chosen.append(best)
            continue
        pick = follow[step]
        assert pick not in chosen
        assert score[pick] >= score[best] - tol
        others = score.clone()
        others[best] = -math.inf
        if n - step > 1 and score[best] - others.max() > tol:
            assert pick == best
        chosen.append(pick)
    return chosen


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 6), seed=st.integers(0, 2**16), duplicates=st.booleans(),
       data=st.data())
def test_divprune_matches_naive_reference(n, d, seed, duplicates, data):
    k = data.draw(st.integers(1, n))
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator)
    if duplicates and n > 2:  # exact and scaled copies of some rows provoke ties
        half = n // 2
        scale = torch.tensor([1.0, 2.0, 0.5])[torch.arange(n - half) % 3][:, None]
        features[half:] = features[: n - half].clone() * scale
    order = divprune_order(features, k)[0].tolist()
    assert len(set(order)) == k
    naive_divprune(features, k, follow=order)
    selection = run_compressor(create_compressor("divprune"), VisualTokens(features=features, grid=(1, n)), k)
    assert selection.indices.tolist() == sorted(order)


def test_divprune_equals_naive_reference_exactly_on_generic_inputs():
    """Continuous random features (no near-ties): the exact same greedy order as the naive float64 reference."""
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        n = 10 + seed * 7
        features = torch.randn(n, 8, generator=generator)
        k = n // 3
        assert divprune_order(features, k)[0].tolist() == naive_divprune(features, k)


def test_divprune_computes_in_fp32():
    """Half-precision features give the same picks as their fp32 copy (the distances are computed in fp32)."""
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)).half()
    assert torch.equal(divprune_order(features, 10)[0], divprune_order(features.float(), 10)[0])
    assert divprune_order(features, 10)[1].dtype == torch.float32
