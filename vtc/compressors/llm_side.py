"""The pruners that act inside the LLM: FastV, PyramidDrop, SparseVLM and DART (docs/methods/fastv.md, pdrop.md,
sparsevlm.md, dart.md). Each is a schedule (which layers drop, how many tokens survive each drop) and a selection
rule over LLM signals; the rules themselves are pure functions in ``vtc.inllm``.

Budgets (the one vocabulary: an int is tokens per image, a float a fraction of its tokens) mean what each paper
quotes, set by ``budget_mode``:

* ``"kept"`` -- the visual tokens left after the last drop (FastV's and DART's default: their "64 tokens");
* ``"equivalent"`` -- the visual tokens per LLM layer on average (PyramidDrop's and SparseVLM's default, the
  FLOPs-equivalent budget their tables quote); ``vtc.last_llm_selection(model)[i].average_tokens`` reports it for
  every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import resolve_budget
from ..compressor import register
from ..inllm import (
    SPARSEVLM_LAYERS,
    LLMCompressor,
    LLMSignal,
    LLMSignalKind,
    LLMTokens,
    Stage,
    dart_select,
    fastv_schedule,
    pdrop_schedule,
    sparsevlm_raters,
    sparsevlm_schedule,
    sparsevlm_scores,
    top_scores,
    validate_schedule,
)

_MODES = ("kept", "equivalent")


def _drop_layer(layer: int | None, default: int, first_layer: int, num_layers: int, name: str) -> int:
    """The drop layer: the paper default moved to ``first_layer`` when the family needs it, an explicit one
    checked against it."""
    if layer is None:
        return max(default, first_layer)
    if layer < first_layer:
        raise ValueError(f"{name}: a drop at layer {layer} comes before layer {first_layer}, the first this model "
                         "allows (earlier layers still add visual features to the image tokens); use layer >= "
                         f"{first_layer}")
    if layer >= num_layers:
        raise ValueError(f"{name}: a drop at layer {layer} is beyond this {num_layers}-layer LLM (valid: 1.."
                         f"{num_layers - 1})")
    return layer


def _check_mode(mode: str, allowed=_MODES) -> None:
    if mode not in allowed:
        raise ValueError(f"budget_mode must be one of {allowed}, got {mode!r}")


@register
@dataclass
class FastV(LLMCompressor):
    """FastV (Chen et al., ECCV'24): after layer ``K - 1``, keep the visual tokens the prompt's last token attends to
    most (head-mean attention of layer ``K - 1``); layers ``>= K`` see only them (docs/methods/fastv.md).

    Options:
      layer: K, the first layer that sees the kept tokens (default 2, the paper's; ``None`` = 2, or the family's
        first allowed layer when later)
      budget_mode: ``"kept"`` (default: ``budget`` tokens survive K) or ``"equivalent"`` (``budget`` visual tokens
        per layer on average: 192/128/64 -> 166/98/30 kept for 576 tokens, 32 layers, K=2)
    """

    name: ClassVar[str] = "fastv"
    layer: int | None = None
    budget_mode: str = "kept"

    def __post_init__(self):
        _check_mode(self.budget_mode)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1 (layer 0 must see every token), got {self.layer!r}")

    def schedule(self, num_visual, num_layers, budget, first_layer=1):
        layer = _drop_layer(self.layer, 2, first_layer, num_layers, "fastv")
        return fastv_schedule(num_visual, num_layers, resolve_budget(budget, num_visual), layer=layer,
                              mode=self.budget_mode)

    def llm_signals(self, stage, index):
        return (LLMSignal(LLMSignalKind.LAST_ATTENTION, stage.layer - 1),)

    def stage_scores(self, tokens: LLMTokens) -> torch.Tensor:
        return tokens.signal(LLMSignal(LLMSignalKind.LAST_ATTENTION, tokens.layer - 1))

    def select_stage(self, tokens: LLMTokens, k: int) -> torch.Tensor:
        return top_scores(self.stage_scores(tokens), k)


@register
@dataclass
class PDrop(LLMCompressor):
    """PyramidDrop (Xing et al., CVPR'25): drops at several layers, each keeping the fraction ``lambda`` of the
    previous stage's tokens by the last prompt token's attention *in that layer* (docs/methods/pdrop.md).

    Options:
      layers: the drop layers (default ``None``: 1/4, 1/2, 3/4 of the depth -- [8, 16, 24] on 32 layers -- or
        (2, 1/4, 1/2) when the budget is below what those reach, as the authors advise for low budgets)
      budget_mode: ``"equivalent"`` (default: ``budget`` visual tokens per layer on average; ``lambda`` is solved
        for; the paper's own setting, lambda 0.5 on [8, 16, 24], is budget 270 for 576 tokens) or ``"kept"``
        (``budget`` tokens after the last drop, ``lambda = (budget / N) ** (1 / stages)``)
    """

    name: ClassVar[str] = "pdrop"
    layers: tuple[int, ...] | None = None
    budget_mode: str = "equivalent"

    def __post_init__(self):
        _check_mode(self.budget_mode)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in self.layers):
                raise ValueError(f"layers must be ints >= 1, got {self.layers!r}")

    def candidate_layers(self, num_layers: int, first_layer: int = 1) -> list[tuple[int, ...]]:
        """The drop layers to try, in order: the given ones, else 1/4-1/2-3/4 of the depth then the low-budget
        (2, 1/4, 1/2), each moved to start at ``first_layer`` or later."""
        if self.layers is not None:
            for layer in self.layers:
                _drop_layer(layer, layer, first_layer, num_layers, "pdrop")
            return [self.layers]
        quarter = max(1, num_layers // 4)
        out = []
        for layers in ((quarter, 2 * quarter, 3 * quarter), (min(2, quarter), quarter, 2 * quarter)):
            lifted, previous = [], first_layer - 1
            for layer in layers:
                previous = max(layer, previous + 1)
                lifted.append(previous)
            if lifted[-1] < num_layers and tuple(lifted) not in out:
                out.append(tuple(lifted))
        if not out:
            raise ValueError(f"pdrop: a {num_layers}-layer LLM has no room for three drops from layer {first_layer}")
        return out

    def schedule(self, num_visual, num_layers, budget, first_layer=1):
        budget = resolve_budget(budget, num_visual)
        candidates = self.candidate_layers(num_layers, first_layer)
        if self.budget_mode == "kept":
            chosen = candidates[0]
            ratio = (budget / num_visual) ** (1 / len(chosen)) if num_visual else 0.0
            stages = pdrop_schedule(num_visual, num_layers, ratio=ratio, layers=chosen)
            # int(N * ratio**t) may land one below the budget through rounding: the last stage keeps exactly it
            return validate_schedule(stages[:-1] + (Stage(stages[-1].layer, min(budget, num_visual)),),
                                     num_visual, num_layers)
        error = None
        for layers in candidates:
            try:
                return pdrop_schedule(num_visual, num_layers, budget=budget, layers=layers)
            except ValueError as exc:
                error = error or exc
        raise error

    def llm_signals(self, stage, index):
        return (LLMSignal(LLMSignalKind.LAST_ATTENTION, stage.layer),)

    def stage_scores(self, tokens: LLMTokens) -> torch.Tensor:
        return tokens.signal(LLMSignal(LLMSignalKind.LAST_ATTENTION, tokens.layer))

    def select_stage(self, tokens: LLMTokens, k: int) -> torch.Tensor:
        return top_scores(self.stage_scores(tokens), k)


@register
@dataclass
class SparseVLM(LLMCompressor):
    """SparseVLM (Zhang et al., ICML'25): text raters (the text tokens after the image most relevant to it, from
    the input embeddings) score the visual tokens by their attention at layers 2, 6 and 15; each of those layers'
    outputs keeps the table's count (docs/methods/sparsevlm.md). Token recycling (v1.5) is not done: kept tokens
    keep their positions, as in SparseVLM v2.0.

    Options:
      layers: the three scoring layers (default ``None``: the paper's (2, 6, 15) on 32 layers, scaled to the depth)

    ``budget`` names a row of the paper's table: 192, 128, 96 or 64 (visual tokens per layer on average for 576
    tokens), or a budget between them (the rows interpolated linearly); a ratio ``r`` names the row ``r * 576``
    (0.25 -> 144). For other token counts the row's counts scale by ``N / 576``. Both are extensions: the paper
    gives four rows, for LLaVA-1.5 only.
    """

    name: ClassVar[str] = "sparsevlm"
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(self.layers) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                            for x in self.layers):
                raise ValueError(f"layers must be three ints >= 0 (the scoring layers), got {self.layers!r}")

    def check_budget(self, budget) -> None:
        sparsevlm_schedule(576, 32, budget * 576 if isinstance(budget, float) else budget)

    def scoring_layers(self, num_layers: int, first_layer: int = 1) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        scaled, previous = [], first_layer - 2
        for layer in SPARSEVLM_LAYERS:
            value = max(previous + 1, round(layer * num_layers / 32))
            scaled.append(value)
            previous = value
        return tuple(scaled)

    def schedule(self, num_visual, num_layers, budget, first_layer=1):
        layers = self.scoring_layers(num_layers, first_layer)
        for layer in layers:
            _drop_layer(layer + 1, layer + 1, first_layer, num_layers, "sparsevlm")
        row = budget * 576 if isinstance(budget, float) else budget  # a ratio names the row of that share of 576
        return sparsevlm_schedule(num_visual, num_layers, row, layers=layers)

    def llm_signals(self, stage, index):
        return (LLMSignal(LLMSignalKind.QUERY_ATTENTION, stage.layer - 1),)

    def text_queries(self, visual_embeds, text_embeds):
        return sparsevlm_raters(visual_embeds, text_embeds)

    def stage_scores(self, tokens: LLMTokens) -> torch.Tensor:
        return sparsevlm_scores(tokens.signal(LLMSignal(LLMSignalKind.QUERY_ATTENTION, tokens.layer - 1)))

    def select_stage(self, tokens: LLMTokens, k: int) -> torch.Tensor:
        return top_scores(self.stage_scores(tokens), k)


@register
@dataclass
class DART(LLMCompressor):
    """DART (Wen et al., EMNLP'25): at layer K, pivots (the visual and the text tokens with the largest key L1 norm
    in layer K - 1) each keep the visual tokens least similar to them -- duplicates go (docs/methods/dart.md).

    Options:
      layer: K (default 2, the paper's; ``None`` = 2 or the family's first allowed layer)
      image_pivots / text_pivots: pivots per modality (default 4 and 4)
      budget_mode: ``"exact"`` (default: exactly ``budget`` tokens kept) or ``"official"`` (the reference script's
        ``image_pivots + 8 * (budget // 8)``: 132 for 128)
    """

    name: ClassVar[str] = "dart"
    layer: int | None = None
    image_pivots: int = 4
    text_pivots: int = 4
    budget_mode: str = "exact"

    def __post_init__(self):
        _check_mode(self.budget_mode, ("exact", "official"))
        for key in ("image_pivots", "text_pivots"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("DART needs at least one pivot")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1 (layer 0 must see every token), got {self.layer!r}")

    def kept_count(self, num_visual: int, budget: int) -> int:
        if self.budget_mode == "official":
            pivots = self.image_pivots + self.text_pivots
            return min(num_visual, self.image_pivots + pivots * (budget // pivots))
        return min(num_visual, budget)

    def schedule(self, num_visual, num_layers, budget, first_layer=1):
        layer = _drop_layer(self.layer, 2, first_layer, num_layers, "dart")
        kept = self.kept_count(num_visual, resolve_budget(budget, num_visual))
        return validate_schedule((Stage(layer, kept),), num_visual, num_layers)

    def llm_signals(self, stage, index):
        return (LLMSignal(LLMSignalKind.KEYS, stage.layer - 1), LLMSignal(LLMSignalKind.HIDDEN, stage.layer))

    def select_stage(self, tokens: LLMTokens, k: int) -> torch.Tensor:
        keys, hidden = LLMSignal(LLMSignalKind.KEYS, tokens.layer - 1), LLMSignal(LLMSignalKind.HIDDEN, tokens.layer)
        if k >= tokens.num_tokens:
            return torch.arange(tokens.num_tokens)
        args = (tokens.signal(keys), tokens.text_signal(keys), tokens.signal(hidden), tokens.text_signal(hidden))
        if self.budget_mode == "official":  # k = pivots + 8 * (budget // 8): hand dart_select a budget with that quotient
            kept = dart_select(*args, k - min(self.image_pivots, k), self.image_pivots, self.text_pivots,
                               mode="official")
            if kept.numel() == k:
                return kept
            # fewer text tokens after the image than text pivots: the official counts leave shares unassigned;
            # the exact rule gives them to the last pivot, so the stage still keeps k
        return dart_select(*args, k, self.image_pivots, self.text_pivots, mode="exact")
