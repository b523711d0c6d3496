"""VisionZip (arXiv 2412.04467): dominant tokens kept as they are, the rest merged into a few contextual tokens.

``D`` top-attention tokens of one layer survive; the others cluster around ``C`` evenly strided targets by key
similarity and each cluster becomes one token in its target's slot (``D + C = k``, paper split 54:10). Merging after
the projector keeps the LLM's token order. See docs/methods/visionzip.md (budget split, deviations from the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compressor import Compressor, VisualTokens, find_signal, register, top_k_sorted
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: The paper's split for 64 tokens (its README: ``visionzip(model, dominant=54, contextual=10)``); 128 = 108+20 and
#: 192 = 162+30 keep the same proportion.
DEFAULT_DOMINANT = 54
DEFAULT_CONTEXTUAL = 10

MERGE_MODES = ("mean", "target_plus_mean")

_ATTENTION_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)


@dataclass(frozen=True)
class VisionZipDetails(Details):
    """What VisionZip decided for one image (view / frame): ``signals`` are the attention and the keys of its layer.

    Fields (indices into the image's ``N`` tokens, ascending; together exactly ``Selection.indices``, so
    ``D + C = k``):
      dominant: ``LongTensor [D]`` tokens kept as they are (prefix tokens first), the top ``Selection.scores``.
      contextual: ``LongTensor [C]`` the cluster targets, whose slots hold the merged contextual tokens
        (``Selection.groups`` of those slots list each cluster's members).
      merge: the merge rule used (``"mean"`` or ``"target_plus_mean"``).
    """

    dominant: torch.Tensor
    contextual: torch.Tensor
    merge: str


def _check_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"visionzip {name} must be an int >= 0 (a token count) or None, got {value!r}")


@register
@dataclass
class VisionZip(Compressor):
    """VisionZip: keep the top-attention (dominant) tokens, merge the rest (docs/methods/visionzip.md).

    Options:
      dominant: dominant tokens per image (how it combines with ``contextual`` and the budget: ``split``); default
        the paper's 54:10 split of the budget.
      contextual: contextual (merged) tokens per image; default ``round(k * 10 / 64)`` (the paper's proportion), at
        least 1 for k >= 2.
      merge: ``"mean"`` (default, the paper: average of the target and its members) or ``"target_plus_mean"``
        (the reference code: target + mean of members).
      layer: the vision layer whose attention and keys are read (negative = from the end); default the feature
        layer, as the paper (22 on CLIP-L/14-336, the last block on Qwen2.5-VL).

    Records: ``Selection.scores`` ``[N]`` the attention that ranks the dominant tokens, ``details`` a
    ``VisionZipDetails`` (layer, dominant and contextual tokens).
    """

    name = "visionzip"
    dominant: int | None = None
    contextual: int | None = None
    merge: str = "mean"
    layer: int | None = None

    def __post_init__(self):
        _check_count("dominant", self.dominant)
        _check_count("contextual", self.contextual)
        if self.dominant is not None and self.contextual is not None and self.dominant + self.contextual == 0:
            raise ValueError("visionzip dominant + contextual must be at least 1")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"visionzip merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"visionzip layer must be an int or None, got {self.layer!r}")

    # ------------------------------------------------------------------------------------------ signals
    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.layer_index(tower.feature_layer if self.layer is None else self.layer)
        return (tower.attention_signal(layer), Signal(SignalKind.KEYS, layer))

    def _find(self, tokens: VisualTokens, kinds: tuple[SignalKind, ...], what: str) -> Signal:
        """The captured signal of one of ``kinds`` (select() is not told the tower, so match by kind)."""
        return find_signal(tokens, kinds, self.layer, "visionzip", what)

    # ------------------------------------------------------------------------------------------ budget split
    def split(self, k: int, num_tokens: int, num_prefix_tokens: int = 0) -> tuple[int, int]:
        """``(dominant, contextual)`` for a budget of ``k`` out of ``num_tokens`` tokens; they sum to ``min(k, N)``.

        Prefix tokens count as dominant and are always kept, so ``dominant >= min(num_prefix_tokens, k)``.
        """
        k = min(int(k), int(num_tokens))
        if k <= 0:
            return 0, 0
        if k >= num_tokens:
            return k, 0  # keep everything, nothing to merge
        if self.dominant is not None and self.contextual is None:
            contextual = k - min(self.dominant, k)
        elif self.contextual is not None and self.dominant is None:
            contextual = min(self.contextual, k)
        else:
            d = DEFAULT_DOMINANT if self.dominant is None else self.dominant
            c = DEFAULT_CONTEXTUAL if self.contextual is None else self.contextual
            contextual = round(k * c / (d + c))
            if c > 0 and k >= 2:
                contextual = max(contextual, 1)
            contextual = min(contextual, k - 1) if d > 0 else contextual
        contextual = min(contextual, k - min(num_prefix_tokens, k))  # prefix tokens are always kept
        return k - contextual, contextual

    # ------------------------------------------------------------------------------------------ selection
    def select(self, tokens: VisualTokens, k: int) -> Selection:
        device = tokens.features.device
        n = tokens.num_tokens
        prefix = min(tokens.num_prefix_tokens, n)
        attention = self._find(tokens, _ATTENTION_KINDS, "attention (cls_attention or received_attention)")
        score = tokens.signal(attention).to(device)
        dominant_count, contextual_count = self.split(k, n, prefix)
        arange = torch.arange(n, device=device)
        singletons = lambda idx: tuple(idx.view(-1, 1).unbind(0))  # noqa: E731

        # dominant tokens: prefix tokens first (always kept), then the top patches by attention
        kept_prefix = min(prefix, dominant_count)
        top = top_k_sorted(score[prefix:], dominant_count - kept_prefix) + prefix
        dominant = torch.cat([arange[:kept_prefix], top.to(device)])
        if contextual_count == 0:
            details = VisionZipDetails(signals=(attention,), dominant=dominant, contextual=dominant[:0],
                                       merge=self.merge)
            return Selection(indices=dominant, groups=singletons(dominant), scores=score, details=details)

        key_signal = self._find(tokens, (SignalKind.KEYS,), "keys")
        keys = tokens.signal(key_signal).to(device)
        is_dominant = torch.zeros(n, dtype=torch.bool, device=device)
        is_dominant[dominant] = True
        remaining = arange[~is_dominant]  # R, original order
        step = max(1, remaining.numel() // contextual_count)
        target_pos = torch.arange(contextual_count, device=device) * step
        targets = remaining[target_pos]
        is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=device)
        is_target[target_pos] = True
        members = remaining[~is_target]

        # hard assignment by cosine similarity of L2-normalised keys; argmax returns the first (lowest) target on ties
        unit = F.normalize(keys.float(), dim=-1)
        similarity = unit[members] @ unit[targets].T  # [M, C]
        assign = similarity.argmax(dim=1)  # cluster id in 0..C-1

        # cluster sums and sizes with index_add / bincount (fp32)
        features = tokens.features.float()
        member_sum = torch.zeros(contextual_count, features.shape[1], dtype=torch.float32, device=device)
        member_sum.index_add_(0, assign, features[members])
        member_count = torch.bincount(assign, minlength=contextual_count).to(torch.float32)[:, None]
        if self.merge == "mean":
            merged = (features[targets] + member_sum) / (member_count + 1.0)
        else:  # reference code: target + mean of members (just the target when the cluster is empty)
            merged = features[targets] + member_sum / member_count.clamp(min=1.0)

        # one output token per dominant token and per target, in original token order
        indices = torch.sort(torch.cat([dominant, targets])).values
        out = features[indices].clone()
        target_slot = torch.searchsorted(indices, targets)
        out[target_slot] = merged

        # groups: owner[i] = output slot that absorbed original token i (every token has one)
        owner = torch.empty(n, dtype=torch.long, device=device)
        owner[indices] = torch.arange(indices.numel(), device=device)
        owner[members] = target_slot[assign]
        order = torch.sort(owner, stable=True).indices  # grouped by slot, ascending token index inside a group
        sizes = torch.bincount(owner, minlength=indices.numel()).tolist()
        groups = tuple(torch.split(arange[order], sizes))
        details = VisionZipDetails(signals=(attention, key_signal), dominant=dominant, contextual=targets,
                                   merge=self.merge)
        return Selection(indices=indices, features=out.to(tokens.features.dtype), groups=groups, scores=score,
                         details=details)
