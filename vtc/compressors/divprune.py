"""DivPrune (arXiv 2503.02175): greedy max-min cosine diversity of the post-projector visual tokens.

First the token whose nearest other token is farthest, then repeatedly the token farthest from the kept set; ties to
the lowest index. The first pick is decided exactly (float64) after an fp32 search that skips every token whose
bound already rules it out; the greedy keeps a running ``min_dist[N]``. Memory stays ``O(N)`` plus fixed-size
blocks: the ``N x N`` matrix is never built for large ``N``. See docs/methods/divprune.md (cost, deviations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection

#: Largest block of similarities (rows x columns) materialised while finding the first pick (16 MiB in fp32).
FIRST_PICK_BLOCK_ELEMENTS = 1 << 22
#: On CPU, greedy picks applied to ``min_dist`` together in one matmul (one pass over the features per batch
#: instead of one memory-bound mat-vec per pick); each pick in between is certified exactly on a few candidates.
GREEDY_BATCH = 32
#: Candidates re-checked per greedy pick before widening (x4) or falling back to applying the pending picks.
GREEDY_CANDIDATES = 16
#: ``torch.nn.functional.normalize``'s floor on the norm (a zero vector stays zero: cosine 0 to everything).
_NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class DivPruneDetails(Details):
    """What DivPrune decided for one image (view / frame); ``signals`` is ``()`` (it reads only the features).

    Fields:
      pick_order: ``LongTensor [k]`` the kept tokens in the order the greedy picked them (``pick_order[0]`` is the
        token whose nearest neighbour is farthest); sorted, it is ``Selection.indices``.
    """

    pick_order: torch.Tensor


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


def nearest_neighbour_distance(unit: torch.Tensor, block_elements: int | None = None) -> torch.Tensor:
    """``[N]`` cosine distance of every (unit-norm) row to its nearest other row; ``inf`` when ``N == 1``.

    Computed in row blocks of at most ``max(block_elements, N)`` similarities (default
    ``FIRST_PICK_BLOCK_ELEMENTS``), never the whole ``N x N`` matrix. Every row's value, in fp32 (DivPrune's first
    pick needs only the best one and uses ``first_pick`` instead).
    """
    if block_elements is None:
        block_elements = FIRST_PICK_BLOCK_ELEMENTS
    n = unit.shape[0]
    rows = max(1, block_elements // max(n, 1))
    best = torch.empty(n, dtype=torch.float32, device=unit.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sim = unit[start:stop] @ unit.T  # [rows, N]
        local = torch.arange(stop - start, device=unit.device)
        sim[local, local + start] = -float("inf")  # not its own neighbour
        best[start:stop] = 1.0 - sim.max(dim=1).values
    return best


def cosine_error_bound(dim: int) -> float:
    """A bound on ``|fp32 cosine of two normalised fp32 rows - float64 cosine of the original rows|`` for ``D = dim``.

    Normalising costs each element a relative error of at most about ``(D/2 + 2) u`` and the fp32 dot product of
    two near-unit vectors at most ``gamma_D ~ D u`` (``u = 2^-24``, any summation order); 1.25x their sum is margin.
    """
    return 1.25 * (2 * dim + 8) * 2.0 ** -24 + 1e-12


def _exact_max_similarity(features, unit, candidates, margin, block_elements, similarity=None):
    """``[C]`` float64 max cosine of each candidate row of ``features [N, D]`` to every *other* row.

    One fp32 pass (``unit`` rows, candidates in groups of at most ``block_elements`` similarities) finds, per
    candidate, the few rows within ``margin`` of its fp32 maximum -- the float64 maximum is among them -- and only
    those pairs are computed in float64 (rows normalised as ``normalize`` does: norm floored at 1e-12); rows with
    near-maxima nearly everywhere (near-copies) get all their pairs, as float64 products in chunks. ``similarity``:
    the fp32 ``[N, N]`` matrix (diagonal masked) when the caller has it, read instead of recomputed.
    """
    n, d = unit.shape
    best = torch.full((candidates.numel(),), -float("inf"), dtype=torch.float64, device=unit.device)
    group = max(1, block_elements // n)
    pairs_per_chunk = max(1, block_elements // max(d, 1))
    for start in range(0, candidates.numel(), group):
        rows = candidates[start:start + group]
        local = torch.arange(rows.numel(), device=unit.device)
        if similarity is not None:
            sim = similarity[rows]
        else:
            sim = unit[rows] @ unit.T  # [g, N]
            sim[local, rows] = -float("inf")  # not its own neighbour
        near = (sim >= sim.max(dim=1, keepdim=True).values - margin).nonzero()  # [P, 2]: (row in group, token)
        if near.shape[0] > sim.numel() // 8:  # tie-heavy rows (near-copies everywhere): all pairs, as products
            a = _unit64(features[rows])
            for cols in range(0, n, pairs_per_chunk):
                part = _unit64(features[cols:cols + pairs_per_chunk]) @ a.T  # [chunk, g]
                own = (rows >= cols) & (rows < cols + part.shape[0])
                part[rows[own] - cols, local[own]] = -float("inf")
                mine = best[start:start + rows.numel()]
                best[start:start + rows.numel()] = torch.maximum(mine, part.max(dim=0).values)
            continue
        for chunk in near.split(pairs_per_chunk):
            cosine = (_unit64(features[rows[chunk[:, 0]]]) * _unit64(features[chunk[:, 1]])).sum(dim=1)
            best[start:start + rows.numel()] = best[start:start + rows.numel()].scatter_reduce(
                0, chunk[:, 0], cosine, reduce="amax")
    return best


def _unit64(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(_NORM_FLOOR)


def _first_of_each_distinct_row(features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The lowest index of each distinct row among ``candidates`` (ascending): identical rows have identical
    nearest-neighbour distances, and ties go to the lowest index, so one of each is enough (blank images)."""
    if candidates.numel() <= 64:  # few enough to re-check as they are
        return candidates
    _, inverse = torch.unique(features[candidates], dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), features.shape[0], dtype=torch.long, device=candidates.device)
    return torch.sort(first.scatter_reduce(0, inverse, candidates, reduce="amin")).values


def first_pick(features: torch.Tensor, unit: torch.Tensor | None = None, block_elements: int | None = None,
               keep_matrix: bool = False):
    """DivPrune's first pick: ``argmax_i min_{j != i} d(i, j)``, ties to the lowest index, decided in float64.

    ``features [N, D]`` (``unit``: their fp32 normalised rows, computed if not given). Returns ``(index, distance,
    similarity)``: the pick (0-d long), its float64 nearest-neighbour distance as fp32 (``inf`` when ``N == 1``),
    and, with ``keep_matrix`` and ``N x N <= max(block_elements, N)``, the fp32 similarity matrix (else ``None``).

    Why it is cheap: an fp32 search in row blocks of at most ``block_elements`` similarities, most promising rows
    first. Each block is multiplied only by the rows not yet processed (the symmetric half was seen when those were
    processed) and raises every column's lower bound on its max similarity; a row whose bound already exceeds the
    best finished row by more than twice ``cosine_error_bound`` can never win and is skipped. The few finished rows
    within that margin of the best are re-checked in float64, so the pick is the float64 rule's, not fp32 noise's;
    values within float64 rounding of each other (``8 (2D + 8) 2^-53``) count as a tie (the lowest index wins).
    """
    if block_elements is None:
        block_elements = FIRST_PICK_BLOCK_ELEMENTS
    if unit is None:
        unit = _normalised(features)
    n, d = unit.shape
    device = unit.device
    if n == 1:
        return torch.zeros((), dtype=torch.long, device=device), torch.tensor(float("inf"), device=device), None
    margin = 2.0 * cosine_error_bound(d)
    rows = max(1, block_elements // n)
    # gathered columns per product: the product stays <= block_elements, the gather buffer <= 4x that (64 MiB);
    # fewer, larger products run faster (-18 % at N = 12,544, D = 4096 than 16 MiB gathers)
    column_rows = max(1, min(block_elements // rows, 4 * block_elements // max(d, 1)))
    buffer = None
    lower = torch.full((n,), -float("inf"), dtype=torch.float32, device=device)  # max sim to processed rows
    exact = torch.full((n,), float("inf"), dtype=torch.float32, device=device)  # processed: max sim to all others
    done = torch.zeros(n, dtype=torch.bool, device=device)
    best = float("inf")
    matrix = None
    while True:
        alive = ~done & (lower <= best + margin)
        remaining = int(alive.sum())
        if remaining == 0:
            break
        # the most promising rows (lowest bound; ties by index), at most `rows` of them
        key = torch.where(alive, lower, torch.full_like(lower, float("inf")))
        block = torch.sort(torch.argsort(key, stable=True)[:min(rows, remaining)]).values
        columns = (~done).nonzero().squeeze(1)  # processed rows' similarities to `block` are already in `lower`
        whole = columns.numel() == n
        row_max = lower[block].clone()
        column_max = torch.empty(columns.numel(), dtype=torch.float32, device=device)
        local = torch.arange(block.numel(), device=device)
        left = unit if block.numel() == n else unit[block]
        for start in range(0, n if whole else columns.numel(), n if whole else column_rows):
            if whole:  # nothing processed yet: every column, no gather
                cols, right = columns, unit
            else:  # gather into one reused buffer (fresh 100 MB copies cost as much as the product)
                cols = columns[start:start + column_rows]
                if buffer is None:
                    buffer = torch.empty(column_rows, d, dtype=unit.dtype, device=device)
                right = torch.index_select(unit, 0, cols, out=buffer[:cols.numel()])
            sim = left @ right.T  # [rows, columns]
            if whole and block.numel() == n:
                matrix = sim  # every row and column (diagonal masked below: a kept token is masked anyway)
            position = torch.searchsorted(cols, block).clamp_max(cols.numel() - 1)  # each block row among cols
            own = cols[position] == block
            sim[local[own], position[own]] = -float("inf")  # not its own neighbour
            row_max = torch.maximum(row_max, sim.max(dim=1).values)
            column_max[start:start + cols.numel()] = sim.max(dim=0).values
        lower[columns] = torch.maximum(lower[columns], column_max)
        exact[block] = row_max
        done[block] = True
        best = float(exact.min())
    candidates = (done & (exact <= best + margin)).nonzero().squeeze(1)  # every row that may still be the best
    candidates = _first_of_each_distinct_row(features, candidates)
    exact64 = _exact_max_similarity(features, unit, candidates, margin, block_elements, matrix)
    # candidates ascend: the first within float64 rounding of the minimum (a tie: the lowest index)
    tied = exact64 <= exact64.min() + 8.0 * (2 * d + 8) * 2.0 ** -53
    winner = int(torch.argmax(tied.to(torch.uint8)))
    return candidates[winner], (1.0 - exact64[winner]).float(), matrix if keep_matrix else None


def _certified_pick(unit, min_dist, pending, width):
    """The exact next greedy pick while ``pending`` picks are not yet applied to ``min_dist`` (an upper bound).

    Re-checks the ``width`` (then ``4 * width``) tokens of largest ``min_dist`` against the pending picks; returns
    ``(index, value)`` when the best of them provably beats every other token's bound (strictly: ties are left to
    the full update), else ``None``.
    """
    n = min_dist.numel()
    for _ in range(2):  # width, then 4x width; beyond that one full update is cheaper
        if width >= n:
            break
        values, index = torch.topk(min_dist, width + 1)
        fresh = torch.minimum(values[:width], 1.0 - (unit[index[:width]] @ unit[pending].T).max(dim=1).values)
        top = fresh.max()
        if float(top) > float(values[width]):
            return index[:width][fresh == top].min(), top
        width *= 4
    return None


def divprune_order(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy max-min picks of ``k`` tokens out of ``features [N, D]``, in the order they were picked.

    Returns ``(order [k], scores [N])``; ``scores`` holds, for a kept token, its distance to the kept set at the time
    it was picked (the first pick: its nearest-neighbour distance) and, for any other token, its final distance to
    the kept set -- so higher means "more novel". The first pick is ``first_pick``'s (float64-exact); the greedy
    runs in fp32. Off CPU the greedy has no host synchronisation; on CPU above one block it batches its updates
    (``GREEDY_BATCH``) and certifies each pick on a few candidates (the same picks up to fp32 rounding at
    near-ties; one pass over the features per batch instead of per pick).
    """
    n = int(features.shape[0])
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"budget {k} is outside [0, {n}]")
    device = features.device
    order = torch.empty(k, dtype=torch.long, device=device)
    if k == 0:
        return order, torch.zeros(n, dtype=torch.float32, device=device)
    unit = _normalised(features)
    # A small image's whole similarity matrix is the one block the first pick computes anyway (<= 16 MiB); keeping
    # it lets every greedy step read a row instead of redoing a mat-vec over all features (2.5x faster at N = 576).
    first, first_value, similarity = first_pick(features, unit, keep_matrix=k > 1)
    order[0] = first
    picked_value = torch.empty(k, dtype=torch.float32, device=device)
    picked_value[0] = first_value

    def distance_to(index: torch.Tensor) -> torch.Tensor:  # [N] cosine distance of every token to one token
        return 1.0 - (similarity[index] if similarity is not None else unit @ unit[index])

    min_dist = distance_to(first)  # [N] distance to the kept set
    min_dist[first] = -float("inf")
    if similarity is None and device.type == "cpu" and k > 2:
        min_dist = _batched_greedy(unit, order, picked_value, min_dist)
    else:
        for step in range(1, k):
            pick = torch.argmax(min_dist)  # farthest from the kept set, ties to the lowest index
            order[step] = pick
            picked_value[step] = min_dist[pick]
            min_dist = torch.minimum(min_dist, distance_to(pick))
            min_dist[pick] = -float("inf")
    scores = min_dist.clone()
    scores[order] = picked_value
    return order, scores


def _batched_greedy(unit, order, picked_value, min_dist):
    """Fills ``order[1:]`` / ``picked_value[1:]`` with the picks of the one-mat-vec-per-pick loop (up to fp32
    rounding at near-ties: the same products, summed by another kernel); returns the final ``min_dist`` (kept tokens
    ``-inf``). Pending picks are applied ``GREEDY_BATCH`` at a time in one matmul: compute-bound, not memory-bound."""
    pending: list[int] = []

    def apply(md):
        if pending:
            md = torch.minimum(md, 1.0 - (unit @ unit[pending].T).max(dim=1).values)  # == min of 1 - sim
            pending.clear()
        return md

    for step in range(1, order.numel()):
        found = _certified_pick(unit, min_dist, pending, GREEDY_CANDIDATES) if pending else None
        if found is None:
            min_dist = apply(min_dist)
            pick = torch.argmax(min_dist)  # farthest from the kept set, ties to the lowest index
            value = min_dist[pick]
        else:
            pick, value = found
        order[step] = pick
        picked_value[step] = value
        min_dist[pick] = -float("inf")
        pending.append(int(pick))
        if len(pending) == GREEDY_BATCH:
            min_dist = apply(min_dist)
    return apply(min_dist)


@register
@dataclass
class DivPrune(Compressor):
    """DivPrune: keep the ``k`` most mutually diverse tokens (docs/methods/divprune.md). No options, no signals.

    Records: ``Selection.scores`` each token's distance to the kept set (see ``divprune_order``), ``details`` a
    ``DivPruneDetails`` (the pick order).
    """

    name = "divprune"

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        order, scores = divprune_order(tokens.features, k)
        return Selection(indices=torch.sort(order).values, scores=scores,
                         details=DivPruneDetails(signals=(), pick_order=order))
