"""HiPrune (arXiv 2508.00553): anchors (object-layer attention) + their grid neighbours + registers (deep layer).

``N_a = round(k * alpha / 5)`` anchors by received attention at a middle layer, their 4-neighbours on the 2-D grid as
buffers, the rest of ``k`` by deep-layer received attention among the tokens not yet chosen -- exactly ``k`` tokens,
ties to the lower index. See docs/methods/hiprune.md (defaults per tower, deviations from the reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: On CLIP-L/14-336 (24 layers) the reference reads the object layer ``HIPRUNE_OBJECT_LAYER=9`` (1-based) = layer 8;
#: the generic rule keeps that depth fraction: ``round(num_layers * 9 / 24) - 1``.
OBJECT_LAYER_FRACTION = 9 / 24


def default_layers(tower: TowerInfo) -> tuple[int, int]:
    """The (object, deep) layers HiPrune reads on ``tower`` when none are given (docs/methods/hiprune.md).

    Windowed towers (``full_attention_layers`` set): deep = the last full-attention layer at or before the feature
    layer, object = the full-attention layer closest to ``num_layers / 2 - 1``; other towers: deep = the feature
    layer, object = ``round(num_layers * 9 / 24) - 1``. The object layer is clamped into ``[0, deep]``.
    CLIP-L/14-336: (8, 22); Qwen2.5-VL: (15, 31), as the reference code.
    """
    deep = tower.feature_layer
    full = sorted({int(layer) for layer in (tower.full_attention_layers or ())})
    full_upto_deep = [layer for layer in full if 0 <= layer <= tower.feature_layer]
    if full_upto_deep:
        deep = full_upto_deep[-1]
        target = tower.num_layers / 2 - 1
        obj = min(full_upto_deep, key=lambda layer: (abs(layer - target), layer))
    else:
        obj = round(tower.num_layers * OBJECT_LAYER_FRACTION) - 1
    obj = min(max(obj, 0), deep)
    return obj, deep


class HiPruneParts(NamedTuple):
    """The three kinds of kept tokens (each in the order chosen; indices into the image's N tokens)."""

    anchors: torch.Tensor  # by object-layer score, best first
    buffers: torch.Tensor  # by object-layer score, best first
    registers: torch.Tensor  # by deep-layer score, best first

    def indices(self) -> torch.Tensor:
        """All kept tokens in ascending (original) order."""
        return torch.sort(torch.cat([self.anchors, self.buffers, self.registers])).values


@dataclass(frozen=True)
class HiPruneDetails(Details):
    """What HiPrune decided for one image (view / frame): ``signals`` are the received attention of the object and
    the deep layer (one signal when they coincide).

    Fields (indices into the image's ``N`` tokens; ``anchors + buffers + registers`` are exactly the kept tokens):
      object_layer, deep_layer: the absolute layers that picked the anchors / the registers.
      anchors: ``LongTensor [N_a]``, ``N_a = round(k * alpha / 5)``, best object-layer score first.
      buffers: ``LongTensor [<= 4 N_a]``, the anchors' 4-neighbours on the grid, best object-layer score first.
      registers: ``LongTensor [k - N_a - buffers]``, best deep-layer score first.
      object_scores: ``[N]`` fp32 received attention of the object layer (``Selection.scores`` is the deep layer's).
    """

    object_layer: int
    deep_layer: int
    anchors: torch.Tensor
    buffers: torch.Tensor
    registers: torch.Tensor
    object_scores: torch.Tensor

    @property
    def parts(self) -> HiPruneParts:
        return HiPruneParts(anchors=self.anchors, buffers=self.buffers, registers=self.registers)


def _stable_desc(scores: torch.Tensor) -> torch.Tensor:
    """Positions of ``scores`` from best to worst, ties to the lower position."""
    return torch.sort(scores, descending=True, stable=True).indices


def num_anchors(k: int, alpha: float) -> int:
    """``N_a = round(k * alpha / 5)`` (Python ``round``, half-to-even), as the reference code."""
    return int(round(k * alpha / 5))


def hiprune_parts(object_score: torch.Tensor, deep_score: torch.Tensor, grid: tuple[int, int], k: int,
                  alpha: float = 0.1, num_prefix_tokens: int = 0) -> HiPruneParts:
    """Split a budget of ``k`` tokens into anchors, buffers and registers (docs/methods/hiprune.md).

    ``object_score`` / ``deep_score``: ``[N]`` received attention at the object / deep layer, laid out like the
    tokens (``num_prefix_tokens`` non-grid tokens, then the ``rows x cols`` grid row-major).
    """
    object_score = object_score.float().reshape(-1)
    deep_score = deep_score.float().to(object_score.device).reshape(-1)
    device = object_score.device
    n = object_score.numel()
    rows, cols = grid
    prefix = int(num_prefix_tokens)
    n_grid = rows * cols
    if deep_score.numel() != n or prefix + n_grid != n:
        raise ValueError(f"scores of {n} / {deep_score.numel()} tokens do not match {prefix} prefix tokens "
                         f"plus a {rows}x{cols} grid")
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"budget {k} is outside [0, {n}]")
    empty = torch.empty(0, dtype=torch.long, device=device)

    # anchors: top-N_a grid tokens by object-layer score
    n_anchor = min(max(num_anchors(k, alpha), 0), k, n_grid)
    anchors = _stable_desc(object_score[prefix:])[:n_anchor] + prefix if n_anchor else empty

    # buffers: 4-neighbours of the anchors on the 2-D grid (no wrap across rows), minus the anchors themselves
    buffers = empty
    if n_anchor and k > n_anchor:
        cell = anchors - prefix
        r, c = cell // cols, cell % cols
        nr = torch.stack([r, r, r - 1, r + 1])
        nc = torch.stack([c - 1, c + 1, c, c])
        inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
        is_buffer = torch.zeros(n, dtype=torch.bool, device=device)
        is_buffer[(nr * cols + nc)[inside] + prefix] = True
        is_buffer[anchors] = False
        candidates = torch.nonzero(is_buffer).flatten()  # ascending, so stable ties go to the lower index
        order = _stable_desc(object_score[candidates])
        buffers = candidates[order][: k - n_anchor]

    # registers: the rest of the budget by deep-layer score, strictly among the tokens not chosen yet
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    chosen[anchors] = True
    chosen[buffers] = True
    remaining = k - int(anchors.numel()) - int(buffers.numel())
    registers = empty
    if remaining > 0:
        candidates = torch.nonzero(~chosen).flatten()
        registers = candidates[_stable_desc(deep_score[candidates])[:remaining]]
    return HiPruneParts(anchors=anchors, buffers=buffers, registers=registers)


@register
@dataclass
class HiPrune(Compressor):
    """HiPrune: anchors (object-layer attention) + their grid neighbours + registers (docs/methods/hiprune.md).

    Options:
      object_layer: layer whose received attention picks the anchors (negative = from the end); default per tower
        as the reference code, see ``default_layers`` (8 on CLIP-L/14-336, block 15 on Qwen2.5-VL).
      deep_layer: layer whose received attention picks the registers; default as the reference code: the feature
        layer (22 on CLIP-L/14-336) or the last full-attention block (31 on Qwen2.5-VL).
      alpha: share of the budget for anchors + buffers; ``round(k * alpha / 5)`` anchors (default 0.1, the
        reference code's).

    The object layer must not be deeper than the deep layer (``signals`` raises otherwise); when both are the same
    layer a single signal is captured and serves both roles.

    ``Selection.scores`` is the deep-layer received attention (what the registers are ranked by); ``details`` is a
    ``HiPruneDetails``: the two layers, anchors / buffers / registers and the object-layer scores.
    """

    name = "hiprune"
    object_layer: int | None = None
    deep_layer: int | None = None
    alpha: float = 0.1

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha < 0:
            raise ValueError(f"hiprune alpha must be a finite number >= 0, got {self.alpha!r}")

    def layers(self, tower: TowerInfo) -> tuple[int, int]:
        """The absolute (object, deep) layers for ``tower``, options applied."""
        obj, deep = default_layers(tower)
        if self.deep_layer is not None:
            deep = tower.layer_index(self.deep_layer)
            obj = min(obj, deep)  # a default object layer never ends up after a chosen deep layer
        if self.object_layer is not None:
            obj = tower.layer_index(self.object_layer)
        return obj, deep

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        obj, deep = self.layers(tower)
        if obj > deep:
            raise ValueError(
                f"hiprune object_layer ({obj}) is after deep_layer ({deep}) on the {tower.name} tower; the object "
                f"layer (anchors) must be at or before the deep layer (registers)"
            )
        if obj == deep:
            return (Signal(SignalKind.RECEIVED_ATTENTION, obj),)
        return (Signal(SignalKind.RECEIVED_ATTENTION, obj), Signal(SignalKind.RECEIVED_ATTENTION, deep))

    @staticmethod
    def _received(tokens: VisualTokens) -> tuple[Signal, Signal]:
        # signals() guarantees object <= deep, so the shallower received-attention signal is the object layer;
        # with a single one (object == deep) both roles read it
        received = sorted((s for s in tokens.signals if s.kind == SignalKind.RECEIVED_ATTENTION),
                          key=lambda s: s.layer)
        if not received:
            have = ", ".join(map(str, tokens.signals)) or "none"
            raise KeyError(f"hiprune needs received-attention signals (declare them with signals()); captured: {have}")
        if len(received) > 2:
            raise ValueError(f"hiprune reads at most 2 received-attention layers, got {', '.join(map(str, received))}")
        return received[0], received[-1]

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        obj, deep = self._received(tokens)
        device = tokens.features.device
        object_score, deep_score = tokens.signal(obj).to(device), tokens.signal(deep).to(device)
        parts = hiprune_parts(object_score, deep_score, tokens.grid, k, alpha=self.alpha,
                              num_prefix_tokens=tokens.num_prefix_tokens)
        details = HiPruneDetails(signals=tuple(dict.fromkeys((obj, deep))), object_layer=obj.layer,
                                 deep_layer=deep.layer, anchors=parts.anchors, buffers=parts.buffers,
                                 registers=parts.registers, object_scores=object_score.float().reshape(-1))
        return Selection(indices=parts.indices(), scores=deep_score, details=details)
