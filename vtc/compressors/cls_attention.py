"""CLS-attention pruning: VTC-CLS (multi-layer ensemble) and FasterVLM (single layer).

VTC-CLS (arXiv 2412.05819): ``score[j] = sum_{l=s..F} mean_h A_l[h, CLS, j]`` over the layers from ``s`` up to the
feature layer ``F`` (22 on CLIP-L/14-336, so the reference default ``s = 16`` ensembles 7 layers); plain sum, no
normalisation; keep the top ``k`` in raster order. FasterVLM (arXiv 2412.01818) is the single-layer case ``s = F``.

Encoders without a CLS token (Qwen ViTs, SigLIP -- e.g. LLaVA-OneVision's tower) get the documented fallback: the same
sum over the same layers of *received* attention (head-mean attention each token receives, summed over the queries
that see it -- HiPrune's "global attention"). Its ranking is what CLS attention approximates: how much the rest of the
image looks at a token. The sum (not the mean) over queries keeps Qwen2.5-VL's windowed blocks neutral to window
size: every token of a window of any size averages 1 per block, so partial edge windows are not inflated and the
full-attention block of the ensemble counts as much as each windowed one (``SignalKind.RECEIVED_ATTENTION``). On AnyRes models the statistic is taken per view (the tower sees one view at a time), and
``tests/test_anyres.py`` checks the fallback on LLaVA-OneVision.
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
    """VTC-CLS: top-k tokens by CLS attention summed over several vision layers.

    Options:
      start_layer: first layer of the ensemble (negative = from the end); default: the 7 layers ending at the
        feature layer (16..22 on CLIP-L/14-336, as the reference CLI default).
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
    """FasterVLM: top-k tokens by the CLS attention of one layer (default: the feature layer, 22 on CLIP-L).

    Options:
      layer: the vision layer to read (negative = from the end); default the layer the visual tokens come from.

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
