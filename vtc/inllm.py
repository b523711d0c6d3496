"""Selection rules and schedules of the visual-token pruners that act *inside* the LLM (FastV, PyramidDrop,
SparseVLM, DART): pure tensor functions, LLM signals in, kept visual indices (or per-layer token counts) out.

A schedule is a tuple of ``Stage(layer, keep)``: layers ``0 .. layer-1`` see every visual token of the image, layers
``>= layer`` only the ``keep`` tokens selected when the sequence reaches ``layer`` (a later stage selects among the
previous stage's survivors). Papers quote budgets in two ways, and both are computed here:

- *kept*: the visual tokens left after the last drop (``schedule[-1].keep``);
- *equivalent*: the average number of visual tokens per LLM layer (``average_tokens``), which is what FastV,
  PyramidDrop and SparseVLM tables mean by "64 tokens" (the FLOPs of the visual part scale with it).

Sources (facts and numbers, not code): FastV (Chen et al., ECCV'24, arXiv 2403.06764), PyramidDrop (Xing et al.,
CVPR'25, arXiv 2410.17247), SparseVLM (Zhang et al., ICML'25, arXiv 2410.04417), DART (Wen et al., EMNLP'25, arXiv
2502.11494); see docs/methods/ for each rule and the reference code's quirks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch

from .compressor import Compressor, VisualTokens
from .selection import Selection

__all__ = [
    "LLMCompressor",
    "LLMSignal",
    "LLMSignalKind",
    "LLMTokens",
    "LLMStageRecord",
    "LLMSelection",
    "Stage",
    "average_tokens",
    "validate_schedule",
    "fastv_schedule",
    "pdrop_schedule",
    "pdrop_average",
    "sparsevlm_schedule",
    "SPARSEVLM_TABLE",
    "top_scores",
    "sparsevlm_raters",
    "sparsevlm_scores",
    "dart_counts",
    "dart_select",
]


@dataclass(frozen=True)
class Stage:
    """Layers ``>= layer`` see ``keep`` visual tokens of each image (those selected on entering ``layer``)."""

    layer: int
    keep: int


class LLMSignalKind(str, enum.Enum):
    """What an LLM-side compressor may ask of a decoder layer (computed from the hidden states *entering* the layer,
    with the layer's own weights, over the sequence as it is at that layer -- earlier drops applied)."""

    #: head-mean softmax attention of the prompt's last token (its last real token) to the visual tokens: the row of
    #: the layer's own attention map (FastV, PyramidDrop). Visual ``[n]``.
    LAST_ATTENTION = "last_attention"
    #: head-mean softmax attention rows of the compressor's text queries (``LLMCompressor.text_queries``; SparseVLM's
    #: raters) to the visual tokens. Visual ``[R, n]``.
    QUERY_ATTENTION = "query_attention"
    #: post-rotary keys of the layer, heads flattened. Visual ``[n, Hkv * D]``, text ``[T, Hkv * D]`` (DART).
    KEYS = "keys"
    #: the layer's input after the LLM's final norm. Visual ``[n, d]``, text ``[T, d]`` (DART).
    HIDDEN = "hidden"


@dataclass(frozen=True)
class LLMSignal:
    kind: LLMSignalKind
    layer: int  # absolute 0-based decoder layer

    def __post_init__(self):
        object.__setattr__(self, "kind", LLMSignalKind(self.kind))
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"LLMSignal layer must be an absolute decoder layer >= 0, got {self.layer!r}")

    def __str__(self) -> str:
        return f"{self.kind.value}@llm{self.layer}"


@dataclass
class LLMTokens:
    """The visual tokens of one image (or one prompt's video) at one stage, as the LLM holds them there.

    ``visual[signal]``: one row per surviving visual token (``n`` of them, in prompt order); ``text[signal]``: for
    ``KEYS`` / ``HIDDEN``, one row per real text token after the image's span (other images' tokens excluded) --
    the tokens DART draws its text pivots from."""

    num_tokens: int
    stage: int  # index of the stage in the schedule
    layer: int  # the stage's drop layer
    visual: Mapping[LLMSignal, torch.Tensor] = field(default_factory=dict)
    text: Mapping[LLMSignal, torch.Tensor] = field(default_factory=dict)

    def signal(self, wanted: LLMSignal) -> torch.Tensor:
        try:
            return self.visual[wanted].float()
        except KeyError:
            have = ", ".join(map(str, self.visual)) or "none"
            raise KeyError(f"LLM signal {wanted} was not captured (captured: {have}); declare it in llm_signals()"
                           ) from None

    def text_signal(self, wanted: LLMSignal) -> torch.Tensor:
        if wanted not in self.text:
            raise KeyError(f"no text rows for LLM signal {wanted}; only keys and hidden states have them")
        return self.text[wanted].float()


class LLMCompressor(Compressor):
    """Base class of compressors that drop visual tokens *inside* the LLM (registered like every compressor).

    Contract (pure functions; the integration captures the signals and cuts the sequence):

    * ``schedule(num_visual, num_layers, budget, first_layer) -> tuple[Stage, ...]`` -- for an image of
      ``num_visual`` tokens in an LLM of ``num_layers`` layers under the resolved ``budget`` (an int; what it
      means -- tokens kept after the last drop, or visual tokens per layer on average -- is the compressor's
      ``budget_mode``); ``first_layer`` is the earliest layer the family allows a drop at (Qwen3-VL: after its
      deepstack injections), which a default drop layer moves to;
    * ``llm_signals(stage, index) -> tuple[LLMSignal, ...]`` -- what stage ``index`` reads (layers ``<=`` its drop
      layer, so that they exist when it drops);
    * ``text_queries(visual_embeds, text_embeds) -> bool [T] | None`` -- which text tokens after the image are the
      query rows of ``QUERY_ATTENTION`` (input embeddings; SparseVLM's raters);
    * ``select_stage(tokens, k) -> LongTensor [k]`` -- which ``k`` of the ``n`` surviving tokens survive this stage
      (ascending indices into the survivors); ``stage_scores(tokens)`` -- what it ranked by, for the records.
    """

    acts_in_llm: ClassVar[bool] = True

    def schedule(self, num_visual: int, num_layers: int, budget: int, first_layer: int = 1
                 ) -> tuple[Stage, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def llm_signals(self, stage: "Stage", index: int) -> tuple[LLMSignal, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def text_queries(self, visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor | None:
        return None

    def check_budget(self, budget) -> None:
        """Raise when ``budget`` can have no schedule whatever the model (checked before a model loads)."""

    def select_stage(self, tokens: LLMTokens, k: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage_scores(self, tokens: LLMTokens) -> torch.Tensor | None:
        """What the stage ranks its ``n`` tokens by, ``[n]``, for the records (``None``: the rule has no score)."""
        return None

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        raise TypeError(f"compressor {self.name!r} drops tokens inside the LLM; it has no encoder-side selection "
                        "(stack an encoder-side compressor with vtc.apply(..., encoder=(name, budget)))")


@dataclass(frozen=True)
class LLMStageRecord:
    """One drop: from layer ``layer`` on, the image keeps ``kept`` (ascending indices into its ``N`` visual tokens
    as the LLM received them); ``scores`` ``[n]`` what the stage ranked its ``n`` incoming survivors by
    (``LLMCompressor.stage_scores``; ``None`` for rules without one score per token, DART)."""

    layer: int
    kept: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass(frozen=True)
class LLMSelection:
    """The record of one image (or one prompt's videos) of the last call under an LLM-side compressor
    (``vtc.last_llm_selection``)."""

    batch_index: int
    kind: str  # "image" or "video"
    positions: torch.Tensor  # [N] prompt positions of its visual tokens in the sequence the LLM received
    budget: int  # the resolved budget (per the compressor's budget_mode)
    stages: tuple[LLMStageRecord, ...]
    num_layers: int
    compressor: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def kept(self) -> torch.Tensor:
        """Indices kept after the last drop."""
        return self.stages[-1].kept if self.stages else torch.arange(self.num_tokens)

    @property
    def average_tokens(self) -> float:
        """Visual tokens per LLM layer, averaged over the layers (the papers' equivalent budget)."""
        return average_tokens([Stage(s.layer, int(s.kept.numel())) for s in self.stages], self.num_tokens,
                              self.num_layers)

    def tokens_at(self, layer: int) -> int:
        """Visual tokens of this image that layer ``layer`` sees."""
        count = self.num_tokens
        for stage in self.stages:
            if stage.layer <= layer:
                count = int(stage.kept.numel())
        return count


def validate_schedule(stages: Sequence[Stage], num_visual: int, num_layers: int) -> tuple[Stage, ...]:
    """The schedule, checked: layers strictly increasing in ``1 .. num_layers-1`` (layer 0 must see every token:
    the signals come from earlier layers), counts non-increasing in ``0 .. num_visual``."""
    stages = tuple(stages)
    if not stages:
        raise ValueError("a schedule needs at least one stage")
    previous_layer, previous_keep = 0, num_visual
    for stage in stages:
        if not isinstance(stage.layer, int) or not 1 <= stage.layer < num_layers:
            raise ValueError(f"a drop at layer {stage.layer} is outside 1..{num_layers - 1} of this {num_layers}-layer "
                             "LLM (layers before the first drop produce the signals)")
        if stage.layer <= previous_layer and stage is not stages[0]:
            raise ValueError(f"drop layers must increase, got {[s.layer for s in stages]}")
        if not isinstance(stage.keep, int) or not 0 <= stage.keep <= previous_keep:
            raise ValueError(f"kept counts must be ints that never grow from {num_visual} visual tokens, got "
                             f"{[s.keep for s in stages]}")
        previous_layer, previous_keep = stage.layer, stage.keep
    return stages


def average_tokens(stages: Sequence[Stage], num_visual: int, num_layers: int) -> float:
    """Visual tokens per LLM layer, averaged over the ``num_layers`` layers (the papers' equivalent budget)."""
    total, layer, count = 0, 0, num_visual
    for stage in stages:
        total += (stage.layer - layer) * count
        layer, count = stage.layer, stage.keep
    total += (num_layers - layer) * count
    return total / num_layers


# -- schedules ----------------------------------------------------------------------------------------------


def fastv_schedule(num_visual: int, num_layers: int, budget: int, layer: int = 2, mode: str = "kept") -> tuple[Stage, ...]:
    """FastV: one drop at ``layer`` (K, paper default 2). ``mode="kept"``: ``budget`` tokens survive it;
    ``"equivalent"``: the count after K that makes the per-layer average ``budget``,
    ``k = round((budget * layers - K * N) / (layers - K))`` (576 tokens, 32 layers, K=2: 192/128/64 -> 166/98/30)."""
    if mode == "kept":
        keep = budget
    elif mode == "equivalent":
        floor = layer * num_visual / num_layers
        if budget < floor:
            raise ValueError(f"an average of {budget} visual tokens per layer is below the {floor:.1f} that the "
                             f"{layer} full layers before the drop already cost; lower the drop layer or raise "
                             "the budget")
        keep = round((budget * num_layers - layer * num_visual) / (num_layers - layer))
    else:
        raise ValueError(f"unknown budget mode {mode!r}; expected 'kept' or 'equivalent'")
    return validate_schedule((Stage(layer, min(int(keep), num_visual)),), num_visual, num_layers)


def pdrop_average(ratio: float, layers: Sequence[int], num_visual: int, num_layers: int) -> float:
    """PyramidDrop's average visual tokens per layer for ratio ``lambda`` and drop layers ``layers`` (the counts
    are ``int(N * lambda**t)`` after the t-th drop, as the reference code truncates)."""
    return average_tokens(_pdrop_stages(ratio, layers, num_visual), num_visual, num_layers)


def _pdrop_stages(ratio: float, layers: Sequence[int], num_visual: int) -> tuple[Stage, ...]:
    return tuple(Stage(int(layer), int(num_visual * ratio ** (t + 1))) for t, layer in enumerate(layers))


def pdrop_schedule(num_visual: int, num_layers: int, budget: float | None = None, layers: Sequence[int] | None = None,
                   ratio: float | None = None) -> tuple[Stage, ...]:
    """PyramidDrop: drops at ``layers`` keeping ``N * ratio**t`` after the t-th (paper default: layers at 1/4, 1/2
    and 3/4 of the depth, ratio 0.5 -- 270 tokens on average for 576 tokens and 32 layers).

    With ``budget`` (the average tokens per layer, as the paper's 192/128/64 rows) the ratio is solved for; the drop
    layers default to 1/4, 1/2, 3/4 of the depth when that can reach the budget, else to (2, 1/4, 1/2) -- the
    earlier first stage the authors recommend for low budgets ([2, 8, 16] on 32 layers, ratio 0.19 for 64)."""
    if (budget is None) == (ratio is None):
        raise ValueError("give PyramidDrop either a budget (average tokens per layer) or a ratio, not both")
    quarter = max(1, num_layers // 4)
    default = (quarter, 2 * quarter, 3 * quarter)
    if ratio is not None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        chosen = tuple(layers) if layers is not None else default
        return validate_schedule(_pdrop_stages(ratio, chosen, num_visual), num_visual, num_layers)
    candidates = [tuple(layers)] if layers is not None else [default, (min(2, quarter), quarter, 2 * quarter)]
    for chosen in candidates:
        low, high = pdrop_average(0.0, chosen, num_visual, num_layers), pdrop_average(1.0, chosen, num_visual,
                                                                                     num_layers)
        if low <= budget <= high:
            lo, hi = 0.0, 1.0
            for _ in range(60):  # the average grows with the ratio: bisection
                mid = (lo + hi) / 2
                if pdrop_average(mid, chosen, num_visual, num_layers) < budget:
                    lo = mid
                else:
                    hi = mid
            return validate_schedule(_pdrop_stages(hi, chosen, num_visual), num_visual, num_layers)
    floor = min(pdrop_average(0.0, c, num_visual, num_layers) for c in candidates)
    raise ValueError(f"an average of {budget} visual tokens per layer is out of PyramidDrop's reach here "
                     f"({floor:.1f} .. {num_visual}); give earlier drop layers or a larger budget")


#: SparseVLM v1.5's kept counts after its three pruning layers (2, 6, 15: each layer runs on the full sequence, its
#: output is pruned), per equivalent budget, for 576 visual tokens (the reference code's table).
SPARSEVLM_TABLE = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
SPARSEVLM_LAYERS = (2, 6, 15)


def sparsevlm_schedule(num_visual: int, num_layers: int, budget: float, layers: Sequence[int] = SPARSEVLM_LAYERS
                       ) -> tuple[Stage, ...]:
    """SparseVLM: the table row named by ``budget`` (192/128/96/64, the paper's equivalent budgets for 576 tokens);
    a budget between two rows takes their linear interpolation (an extension: the paper gives only these rows).
    For other token counts the row's counts scale by ``N / 576`` (also an extension: the paper defines the table
    for LLaVA-1.5 only). A pruning *layer* ``l`` runs in full and prunes its output, so the stage starts at
    ``l + 1``."""
    keys = sorted(SPARSEVLM_TABLE)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not keys[0] <= budget <= keys[-1]:
        known = ", ".join(str(b) for b in SPARSEVLM_TABLE)
        raise ValueError(f"SparseVLM defines schedules for budgets {known} (its table's rows, in visual tokens per "
                         f"layer for 576 tokens) and between them, not {budget!r}")
    if budget in SPARSEVLM_TABLE:
        row = SPARSEVLM_TABLE[int(budget)]
    else:
        high = next(k for k in keys if k > budget)
        low = keys[keys.index(high) - 1]
        t = (budget - low) / (high - low)
        row = tuple((1 - t) * a + t * b for a, b in zip(SPARSEVLM_TABLE[low], SPARSEVLM_TABLE[high]))
    scale = num_visual / 576
    stages, previous = [], num_visual
    for l, c in zip(layers, row):
        previous = min(previous, round(c * scale))
        stages.append(Stage(l + 1, previous))
    return validate_schedule(tuple(stages), num_visual, num_layers)


# -- selection rules ----------------------------------------------------------------------------------------


def top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` [N], ascending (FastV / PyramidDrop: attention received by each
    visual token from the last prompt token); ties go to the lower index."""
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"cannot keep {k} of {scores.shape[-1]} tokens")
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def sparsevlm_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters: ``r = mean_v softmax_t(E_v . E_t)`` over the text tokens after the image (input
    embeddings, no 1/sqrt(d) scaling); a text token rates when ``r_t > mean(r)``. Returns a bool mask [T]."""
    relevance = torch.softmax(visual_embeds.float() @ text_embeds.float().T, dim=-1).mean(0)
    return relevance > relevance.mean()


def sparsevlm_scores(attention: torch.Tensor) -> torch.Tensor:
    """Visual-token scores from the raters' attention rows [heads, raters, N] (or [raters, N]): mean over heads,
    then over raters."""
    attention = attention.float()
    if attention.dim() == 3:
        attention = attention.mean(0)
    return attention.mean(0)


def dart_counts(budget: int, image_pivots: int = 4, text_pivots: int = 4, mode: str = "exact") -> list[int]:
    """Tokens each DART pivot selects (in pivot order), besides the image pivots themselves.

    ``"exact"``: ``budget`` tokens in all -- ``(budget - image_pivots) // pivots`` each, the remainder to the last
    pivot. ``"official"``: ``budget // 8`` each (the reference code's LLaVA script, 4 + 8 * (budget // 8) tokens:
    132 for 128)."""
    pivots = image_pivots + text_pivots
    if mode == "official":
        return [budget // pivots] * pivots
    if mode != "exact":
        raise ValueError(f"unknown DART budget mode {mode!r}; expected 'exact' or 'official'")
    rest = max(0, budget - image_pivots)
    counts = [rest // pivots] * pivots
    counts[-1] += rest - sum(counts)
    return counts


def dart_select(visual_keys: torch.Tensor, text_keys: torch.Tensor, visual_hidden: torch.Tensor,
                text_hidden: torch.Tensor, budget: int, image_pivots: int = 4, text_pivots: int = 4,
                mode: str = "exact") -> torch.Tensor:
    """DART: kept visual indices (ascending) of one image.

    ``*_keys``: post-RoPE keys of layer K-1, heads flattened ([N, Hkv*D] visual, [T, Hkv*D] the tokens after the
    image); ``*_hidden``: the same tokens' layer-K input after the LM's final norm. Pivots are the ``image_pivots``
    visual and ``text_pivots`` text tokens with the largest key L1 norm; each pivot in turn (image pivots by
    decreasing norm, then text pivots) adds the candidates *least* cosine-similar to it (the least duplicated),
    which leave the candidate pool. Kept = image pivots + everything the pivots added."""
    n = visual_keys.shape[0]
    if not 0 <= budget <= n:
        raise ValueError(f"cannot keep {budget} of {n} visual tokens")
    p_img = min(image_pivots, n, budget if mode == "exact" else image_pivots)
    image_order = torch.sort(visual_keys.float().abs().sum(-1), descending=True, stable=True).indices
    pivots_img = image_order[:p_img]
    p_txt = min(text_pivots, text_keys.shape[0])
    text_order = torch.sort(text_keys.float().abs().sum(-1), descending=True, stable=True).indices[:p_txt]
    counts = dart_counts(budget, image_pivots, text_pivots, mode)[: p_img + p_txt] if budget > p_img else []
    if counts and p_img + p_txt < image_pivots + text_pivots:  # fewer pivots than asked: the last takes the rest
        counts[-1] += max(0, budget - p_img - sum(counts)) if mode == "exact" else 0
    candidates = torch.ones(n, dtype=torch.bool)
    candidates[pivots_img] = False
    visual = torch.nn.functional.normalize(visual_hidden.float(), dim=-1)
    pivot_vectors = [visual[i] for i in pivots_img.tolist()]
    pivot_vectors += [torch.nn.functional.normalize(text_hidden[i].float(), dim=-1) for i in text_order.tolist()]
    chosen = [pivots_img]
    for vector, count in zip(pivot_vectors, counts):
        pool = candidates.nonzero().squeeze(-1)
        take = min(count, pool.numel())
        if take == 0:
            continue
        similarity = visual[pool] @ vector
        picked = pool[torch.sort(similarity, stable=True).indices[:take]]
        candidates[picked] = False
        chosen.append(picked)
    return torch.sort(torch.cat(chosen)).values
