"""What a compressor may ask the vision tower for, and what it is told about the tower.

Signals are declared, not taken: a compressor lists the ``Signal``s it needs for a given ``TowerInfo`` and the
integration captures exactly those (hooks on those layers only, freed after the call). Every signal reaches the
compressor already laid out like the image's visual tokens (one value per LLM token, host token order), so
compressors never see a vision tower's internal order (CLS column, Qwen window permutation, 2x2 merge units).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SignalKind(str, enum.Enum):
    #: head-mean post-softmax attention of the CLS query to every token, at one layer. Shape ``[N]``.
    CLS_ATTENTION = "cls_attention"
    #: head-mean post-softmax attention *received* by every token, **summed** over the queries that attend to it
    #: (HiPrune's "global attention", column sum; windowed layers use their real window mask, one sum per window).
    #: Every query gives out 1 over its span, so a span's tokens average exactly 1 whatever its size: scores do not
    #: depend on the window a token sits in (a column *mean* would, ``1 / window``), and windowed and full-attention
    #: layers weigh alike when summed. A uniform map scores 1 everywhere. Shape ``[N]``.
    RECEIVED_ATTENTION = "received_attention"
    #: head-mean key vectors of one layer (VisionZip's merge metric). Shape ``[N, head_dim]``.
    KEYS = "keys"
    #: head-mean *pre-softmax* scaled logits ``q_cls . k / sqrt(d)`` of the CLS query to every token, at one layer
    #: (GlobalCom²'s score). Shape ``[N]``. Only towers with a CLS token; others fall back to received attention.
    CLS_LOGITS = "cls_logits"


@dataclass(frozen=True)
class Signal:
    kind: SignalKind
    layer: int  # absolute 0-based index of the vision layer / block

    def __post_init__(self):
        object.__setattr__(self, "kind", SignalKind(self.kind))
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"Signal layer must be an absolute layer index >= 0, got {self.layer!r}")

    def __str__(self) -> str:  # e.g. "cls_attention@22"
        return f"{self.kind.value}@{self.layer}"


@dataclass(frozen=True)
class TowerInfo:
    """The few facts about a vision tower that compressors need to pick their default layers."""

    name: str  # e.g. "clip", "qwen2_5_vit"
    num_layers: int
    feature_layer: int  # absolute index of the layer whose output becomes the visual tokens
    has_cls: bool  # whether a CLS query exists (CLS-attention signals available)
    full_attention_layers: tuple[int, ...] | None = None  # None: every layer attends globally

    def layer_index(self, layer: int) -> int:
        """Absolute index of ``layer`` (negative counts from the end, Python style), validated."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        absolute = layer + self.num_layers if layer < 0 else layer
        if not 0 <= absolute < self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for the {self.name} tower with {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1} or -{self.num_layers}..-1)"
            )
        return absolute

    def attention_signal(self, layer: int) -> Signal:
        """CLS attention where the tower has a CLS token, otherwise received attention (the documented fallback)."""
        kind = SignalKind.CLS_ATTENTION if self.has_cls else SignalKind.RECEIVED_ATTENTION
        return Signal(kind, self.layer_index(layer))
