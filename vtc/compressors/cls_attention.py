"""CLS-attention pruning: VTC-CLS (arXiv 2412.05819, several layers) and FasterVLM (arXiv 2412.01818, one layer).

Keep the top ``k`` tokens by head-mean CLS attention summed over layers, in raster order; towers without CLS read
received attention at the same layers. See docs/methods/cls_attention.md and docs/methods/fastervlm.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compressor import Compressor, VisualTokens, register, top_k_sorted
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: VTC-CLS ensembles the 7 layers 16..22 of CLIP-L/14-336 (start layer 16, feature layer 22).
VTC_CLS_NUM_LAYERS = 7


@dataclass(frozen=True)
class ClsAttentionDetails(Details):
    """``cls_attention`` / ``fastervlm``: ``signals`` are the layers summed into ``Selection.scores`` (CLS attention,
    or received attention on towers without CLS, one signal per layer); the kept tokens are its top ``k``."""

    @property
    def uses_received_attention(self) -> bool:
        """True when the tower has no CLS token and the documented received-attention fallback was read."""
        return any(s.kind == SignalKind.RECEIVED_ATTENTION for s in self.signals)


def _ensemble(tokens: VisualTokens, signals: tuple[Signal, ...]) -> torch.Tensor:
    score = torch.zeros(tokens.num_tokens, dtype=torch.float32, device=tokens.features.device)
    for signal in signals:
        score = score + tokens.signal(signal).to(score.device)
    return score


@register
@dataclass
class ClsAttention(Compressor):
    """VTC-CLS: top-k tokens by CLS attention summed over several vision layers (docs/methods/cls_attention.md).

    Options:
      start_layer: first layer of the ensemble (negative = from the end); default the 7 layers ending at the
        feature layer (16..22 on CLIP-L/14-336: the reference CLI default ``s = 16``).
      layers: explicit layers to ensemble instead (overrides ``start_layer``).

    Records: ``Selection.scores`` ``[N]`` the summed attention, ``details`` a ``ClsAttentionDetails`` (the layers).
    """

    name = "cls_attention"
    start_layer: int | None = None
    layers: tuple[int, ...] | None = None

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        if self.layers is not None:
            if isinstance(self.layers, int) or len(self.layers) == 0:
                raise ValueError(f"layers must be a non-empty sequence of layer indices, got {self.layers!r}")
            chosen = sorted({tower.layer_index(layer) for layer in self.layers})
        else:
            if self.start_layer is None:
                start = max(0, tower.feature_layer - (VTC_CLS_NUM_LAYERS - 1))
            else:
                start = tower.layer_index(self.start_layer)
            if start > tower.feature_layer:
                raise ValueError(
                    f"start_layer {self.start_layer} is after the feature layer {tower.feature_layer}; "
                    f"choose a layer <= {tower.feature_layer}"
                )
            chosen = range(start, tower.feature_layer + 1)
        return tuple(tower.attention_signal(layer) for layer in chosen)

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        signals = tuple(tokens.signals)
        score = _ensemble(tokens, signals)
        return Selection(indices=top_k_sorted(score, k), scores=score, details=ClsAttentionDetails(signals))


@register
@dataclass
class FasterVLM(Compressor):
    """FasterVLM: top-k tokens by the CLS attention of one layer (docs/methods/fastervlm.md).

    Options:
      layer: the vision layer to read (negative = from the end); default the feature layer (22 on CLIP-L), the
        paper's choice.

    Records: ``Selection.scores`` ``[N]`` that layer's attention, ``details`` a ``ClsAttentionDetails`` (the layer).
    """

    name = "fastervlm"
    layer: int | None = None

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        return (tower.attention_signal(tower.feature_layer if self.layer is None else self.layer),)

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        signals = tuple(tokens.signals)
        score = _ensemble(tokens, signals)
        return Selection(indices=top_k_sorted(score, k), scores=score, details=ClsAttentionDetails(signals))
