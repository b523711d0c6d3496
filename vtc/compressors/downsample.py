"""Downsampling baseline (VTC-Bench, arXiv 2510.07143): fewer visual tokens from a smaller input, not from pruning.

On dynamic-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the image (each video frame) is resized *before the
encoder* to the grid ``input_grid`` picks for the budget, so the vision tower runs on fewer patches too and the
LLM sees a complete, in-distribution grid with its own positions -- what a user does by handing the processor a
smaller picture. Fixed-resolution towers (LLaVA-1.5's 336 px CLIP; the AnyRes views of LLaVA-NeXT / OneVision)
cannot take a smaller input, so there the features are average-pooled to exactly ``k`` cells (``select``, the
spec's option (i), the ``pool`` rule). See docs/methods/downsample.md (the grid rule, exactness, FLOPs, deviations).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection
from .baselines import Pool

MODES = ("auto", "resize", "pool")
#: Largest aspect distortion a resized grid may have: ``max(a, 1/a) - 1`` with ``a = (h / w) / (rows / cols)``.
#: 10 % lets 24 x 24 -> 64 tokens be 8 x 8 exactly and 128 be 11 x 11 (121, the grid Qwen's own ``smart_resize``
#: gives for that many pixels) rather than a 2:1 stretched 8 x 16.
DEFAULT_ASPECT_TOLERANCE = 0.1


@dataclass(frozen=True)
class DownsampleDetails(Details):
    """What ``downsample`` did to one image (view / frame); no signals.

    Fields:
      mode: ``"all"`` (every token kept: the budget covers the image -- which is what the encoder's output of an
        input resized before the encoder always is; ``ImageSelection.extra["resized_from"]`` then holds the grid the
        image had) or ``"pool"`` (the features were average-pooled after the encoder).
      grid: ``(h, w)`` the grid the LLM received (all) or the pooling layout (pool; ``r * c >= k`` cells of
        which ``k`` survive, see ``pool``).
    """

    mode: str
    grid: tuple[int, int]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _distortion(h: int, w: int, rows: int, cols: int) -> float:
    a = (h / w) / (rows / cols)
    return max(a, 1 / a) - 1


def input_grid(rows: int, cols: int, k: int, tolerance: float = DEFAULT_ASPECT_TOLERANCE) -> tuple[int, int]:
    """The ``(h, w)`` token grid a ``rows x cols`` image is resized to for at most ``k`` tokens.

    The *processor grid* is what scaling both sides by ``s = sqrt(k / (rows * cols))`` and flooring gives
    (``max(1, floor(rows * s)) x max(1, floor(cols * s))``, as Qwen's ``smart_resize`` does for ``k`` tokens of
    pixels; a side raised to 1 caps the other at ``k`` tokens). Among the grids with ``h <= rows``, ``w <= cols`` and ``h * w <= k`` whose aspect distortion
    ``max(a, 1/a) - 1`` (``a = (h / w) / (rows / cols)``) is at most ``max(tolerance, the processor grid's)``, the
    one with the most tokens; ties go to the smaller distortion, then to the smaller ``h``. So never fewer tokens
    than the processor grid, never more distorted than it or ``tolerance``, and exactly ``k`` whenever such a grid
    has ``k`` tokens (24 x 24 at 64 -> 8 x 8; at 128 -> 11 x 11 = 121, as the processor). ``k >= rows * cols``
    keeps the grid.
    """
    rows, cols, k = int(rows), int(cols), int(k)
    if rows < 1 or cols < 1:
        raise ValueError(f"the grid must be at least 1 x 1, got {rows} x {cols}")
    if k < 1:
        raise ValueError(f"the token budget must be >= 1, got {k}")
    if not _is_number(tolerance) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"aspect tolerance must be a finite number >= 0, got {tolerance!r}")
    if k >= rows * cols:
        return rows, cols
    scale = math.sqrt(k / (rows * cols))
    floor_h, floor_w = max(1, math.floor(rows * scale)), max(1, math.floor(cols * scale))
    if floor_h * floor_w > k:  # a side raised to 1 token leaves the other k tokens at most
        floor_h, floor_w = (1, min(floor_w, k)) if floor_h == 1 else (min(floor_h, k), 1)
    limit = max(float(tolerance), _distortion(floor_h, floor_w, rows, cols)) + 1e-12
    best = None
    for h in range(1, rows + 1):
        for w in range(1, min(cols, k // h) + 1):
            distortion = _distortion(h, w, rows, cols)
            if distortion <= limit:
                key = (-(h * w), distortion, h)
                if best is None or key < best[0]:
                    best = (key, (h, w))
    return best[1]


@register
@dataclass
class Downsample(Compressor):
    """Fewer tokens from a smaller input (docs/methods/downsample.md).

    Options:
      mode: ``"auto"`` (default): resize the input before the encoder where the family's tower takes any size (the
        Qwen families), pool the features elsewhere (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision);
        ``"resize"``: resize only (refused on a family whose tower has a fixed input size);
        ``"pool"``: average-pool the encoder's features to exactly ``k`` tokens on every family.
      aspect_tolerance: the largest aspect distortion of a resized grid (``input_grid``); default 0.1. ``0``
        keeps the aspect exactly (fewer tokens than the budget more often); a large value always reaches ``k``
        tokens when some ``h * w = k`` grid fits.

    Budgets: pooling keeps exactly ``k`` tokens; a resize keeps ``h * w <= k`` (``input_grid``), exactly ``k`` when
    a grid of ``k`` tokens is within the aspect tolerance -- the records (and ``vtc.last_prompt_lengths``) say how
    many the LLM received. Videos are resized frame by frame to one grid: ``budget // steps`` tokens per temporal
    step. Records: ``details`` a ``DownsampleDetails``; no scores.
    """

    name = "downsample"
    mode: str = "auto"
    aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"downsample mode must be one of {MODES}, got {self.mode!r}")
        tol = self.aspect_tolerance
        if not _is_number(tol):
            raise TypeError(f"downsample aspect_tolerance must be a number, got {tol!r}")
        if not math.isfinite(tol) or tol < 0:
            raise ValueError(f"downsample aspect_tolerance must be a finite number >= 0, got {tol!r}")

    # -- the pre-encoder stage (see Compressor.input_grid) ----------------------------------------------------
    def input_grid(self, grid: tuple[int, int], k: int) -> tuple[int, int] | None:
        """``input_grid(rows, cols, k)`` in the modes that resize; ``None`` (no pre-encoder stage) for ``pool``."""
        if self.mode == "pool":
            return None
        return input_grid(grid[0], grid[1], k, self.aspect_tolerance)

    @property
    def requires_input_resize(self) -> bool:
        return self.mode == "resize"

    # -- after the encoder: pooling -----------------------------------------------------------------------------
    def select(self, tokens: VisualTokens, k: int) -> Selection:
        """Exactly ``k`` tokens: all of them (``k = N``, e.g. an image already resized before the encoder), else the
        features average-pooled over ``k`` cells of the grid (``pool``'s rule, ``mode="mean"``)."""
        if k >= tokens.num_tokens:
            indices = torch.arange(tokens.num_tokens, device=tokens.features.device)
            return Selection(indices=indices, details=DownsampleDetails(signals=(), mode="all", grid=tokens.grid))
        pooled = Pool(mode="mean").select(tokens, k)
        return Selection(indices=pooled.indices, features=pooled.features, groups=pooled.groups,
                         weights=tuple(torch.full((g.numel(),), 1.0 / g.numel()) for g in pooled.groups),
                         details=DownsampleDetails(signals=(), mode="pool", grid=pooled.details.shape))
