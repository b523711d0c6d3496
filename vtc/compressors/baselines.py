"""Honest baselines, strong at moderate budgets: seeded random selection and uniform spatial pooling.

See docs/methods/random.md and docs/methods/pool.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection


@dataclass(frozen=True)
class RandomDetails(Details):
    """``random``: no signals; ``seed`` the generator seed that drew the kept tokens (same seed, same draw)."""

    seed: int


@dataclass(frozen=True)
class PoolDetails(Details):
    """``pool``: no signals. ``shape``: the ``(r, c)`` adaptive-pooling layout of the grid (``(0, 0)`` when only
    prefix tokens are kept); ``mode``: ``"mean"`` (merged cell means) or ``"sample"`` (cell centres).
    ``Selection.groups`` lists each kept cell's members."""

    shape: tuple[int, int]
    mode: str


@register
@dataclass
class RandomSelection(Compressor):
    """Keep ``k`` tokens drawn uniformly without replacement (docs/methods/random.md).

    Options:
      seed: generator seed (default 0, vtc's choice); the same seed, ``N`` and ``k`` give the same indices
        on every platform.

    Records: no scores, ``details`` a ``RandomDetails``.
    """

    name = "random"
    seed: int = 0

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        generator = torch.Generator().manual_seed(int(self.seed))
        picked = torch.randperm(tokens.num_tokens, generator=generator)[:k]
        return Selection(indices=torch.sort(picked).values.to(tokens.features.device),
                         details=RandomDetails(signals=(), seed=int(self.seed)))


def pooling_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Output grid (r, c) with ``r*c >= k``, r <= rows, c <= cols, closest in aspect to the input grid.

    ``c = ceil(k / r)``, so at most ``r - 1`` cells are left over; ties in aspect go to the fewest spare cells.
    """
    best = None
    for r in range(1, rows + 1):
        c = math.ceil(k / r)
        if c > cols:
            continue
        waste = r * c - k
        aspect = abs(math.log((r / c) / (rows / cols)))
        key = (round(aspect, 9), waste)
        if best is None or key < best[0]:
            best = (key, (r, c))
    assert best is not None, "k <= rows*cols always admits r = rows"
    return best[1]


def _cell_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    # adaptive-pooling bounds, as torch.nn.AdaptiveAvgPool2d: [floor(i*n/p), ceil((i+1)*n/p))
    return [((i * size) // parts, -((-(i + 1) * size) // parts)) for i in range(parts)]


@register
@dataclass
class Pool(Compressor):
    """Uniform spatial pooling of the token grid down to ``k`` cells, each at its centre token (docs/methods/pool.md).

    Options:
      mode: ``"mean"`` (default: cell means, merged -- the average pooling papers compare against) or
        ``"sample"`` (the centre token's own feature; strided downsampling).

    Records: no scores, ``groups`` each kept cell's members, ``details`` a ``PoolDetails`` (the pooling layout).
    """

    name = "pool"
    mode: str = "mean"

    def __post_init__(self):
        if self.mode not in ("mean", "sample"):
            raise ValueError(f"pool mode must be 'mean' or 'sample', got {self.mode!r}")

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        device = tokens.features.device
        prefix = min(tokens.num_prefix_tokens, k)
        k_grid = k - prefix
        indices = list(range(prefix))
        groups = [torch.tensor([i], device=device) for i in range(prefix)]
        r = c = 0
        if k_grid > 0:
            rows, cols = tokens.grid
            r, c = pooling_grid(rows, cols, k_grid)
            cells = torch.linspace(0, r * c - 1, k_grid).round().long().tolist() if k_grid > 1 else [(r * c - 1) // 2]
            row_bounds, col_bounds = _cell_bounds(rows, r), _cell_bounds(cols, c)
            base = tokens.num_prefix_tokens
            for cell in cells:
                (r0, r1), (c0, c1) = row_bounds[cell // c], col_bounds[cell % c]
                members = (torch.arange(r0, r1, device=device)[:, None] * cols + torch.arange(c0, c1, device=device))
                members = members.flatten() + base
                centre = base + ((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2
                indices.append(centre)
                groups.append(members)
        order = sorted(range(len(indices)), key=indices.__getitem__)
        index_tensor = torch.tensor([indices[i] for i in order], dtype=torch.long, device=device)
        groups = tuple(groups[i] for i in order)
        features = None
        if self.mode == "mean":
            features = torch.stack([tokens.features[g].mean(dim=0) for g in groups]).to(tokens.features.dtype)
        return Selection(indices=index_tensor, features=features, groups=groups,
                         details=PoolDetails(signals=(), shape=(r, c), mode=self.mode))
