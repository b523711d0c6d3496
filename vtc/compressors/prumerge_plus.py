"""LLaVA-PruMerge+ (arXiv 2403.15388): IQR outliers of the attention, a spatially uniform supplement, kNN merging.

The tokens whose attention lies above the IQR upper fence ``Q3 + 1.5 * IQR`` are kept (PruMerge); PruMerge+ adds a
spatially uniform sample of the others. vtc keeps exactly ``k`` tokens: the outliers (the top ``k`` of them when
there are more), then a uniform supplement up to ``k``. Every kept token absorbs its ``neighbors`` most key-similar
tokens, weighted by their attention share; a pruned token that nobody picked joins its most similar kept token, so
every pruned token is merged somewhere. The merge is linear and stated as ``Selection.weights``. The paper's own
adaptive count is recorded in the details. See docs/methods/prumerge_plus.md (rule, options, deviations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compressor import Compressor, VisualTokens, find_signal, register, top_k_sorted
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: Tukey's whisker: a token is an outlier when its attention exceeds ``Q3 + IQR_FACTOR * (Q3 - Q1)`` (the reference).
IQR_FACTOR = 1.5
#: Neighbours each kept token merges in the reference (``topk(..., k=32)``).
DEFAULT_NEIGHBORS = 32

MERGE_MODES = ("reference", "mean")

_ATTENTION_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)


@dataclass(frozen=True)
class PruMergePlusDetails(Details):
    """What PruMerge+ decided for one image (view / frame): ``signals`` are the attention and (when something was
    merged) the keys of its layer. Token indices index the image's ``N`` tokens (prefix tokens included), ascending.

    Fields:
      q1, q3: the lower and upper quartiles of the grid tokens' attention (linear interpolation, numpy's default).
      threshold: the IQR upper fence ``q3 + 1.5 * (q3 - q1)``; outliers lie strictly above it.
      outliers: ``LongTensor [O]`` every IQR outlier. All of them are kept when ``O <= k`` (minus prefix tokens);
        otherwise the ``k`` with the highest attention are (``Selection.indices``).
      supplement: ``LongTensor [S]`` the spatially uniform tokens added to reach ``k`` (empty when the outliers fill
        the budget). ``Selection.indices`` = kept prefix tokens + kept outliers + ``supplement``.
      stride: the reference's adaptive sampling stride ``max(1, (G // max(O, 1)) // 3)`` over the ``G`` grid tokens.
      adaptive_count: grid tokens the paper's adaptive PruMerge+ would keep for this image: the outliers plus the
        stride samples ``0, stride, 2*stride, ... < G - 1`` that are not outliers (the reference appends one more,
        its extra token). PruMerge (without +) keeps ``O``.
      adaptive: whether the supplement was drawn from those stride samples (option ``adaptive``).
      merge: the merge rule (``"reference"`` or ``"mean"``).
      neighbors: neighbours merged per kept token, after clamping to the ``G - 1`` others (0 when nothing merged).
    """

    q1: float
    q3: float
    threshold: float
    outliers: torch.Tensor
    supplement: torch.Tensor
    stride: int
    adaptive_count: int
    adaptive: bool
    merge: str
    neighbors: int


def iqr_outliers(attention: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
    """``(outliers, q1, q3, threshold)`` of a 1-D attention vector: indices strictly above ``q3 + 1.5 (q3 - q1)``,
    ascending. Quartiles by linear interpolation (``torch.quantile``'s and numpy's default), computed in fp64."""
    values = attention.double()
    q1, q3 = (float(q) for q in torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64,
                                                                     device=values.device)))
    threshold = q3 + IQR_FACTOR * (q3 - q1)
    return torch.nonzero(values > threshold).flatten(), q1, q3, threshold


def spread(seq: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` entries of ``seq`` spread evenly over it, the centre of each of ``m`` equal parts:
    ``seq[floor((2j + 1) * L / (2m))]`` for ``j = 0 .. m - 1`` (``L = len(seq) >= m``; distinct, in ``seq`` order)."""
    length = seq.numel()
    if m <= 0:
        return seq[:0]
    positions = ((2 * torch.arange(m, device=seq.device) + 1) * length) // (2 * m)
    return seq[positions]


def adaptive_stride(grid_tokens: int, num_outliers: int) -> int:
    """The reference's PruMerge+ sampling stride: ``step = int(1 / ratio) = G // O``, stride ``step // 3``, at least 1
    (the reference's ``arange`` fails on 0 for ``O > G / 3``); ``O = 0`` is treated as 1 (the reference divides by
    0 there)."""
    return max(1, (grid_tokens // max(num_outliers, 1)) // 3)


@register
@dataclass
class PruMergePlus(Compressor):
    """LLaVA-PruMerge+: IQR outliers + uniform supplement, pruned tokens merged by key kNN
    (docs/methods/prumerge_plus.md).

    Options:
      adaptive: ``False`` (default): the supplement is spread evenly over the non-outlier grid tokens (raster order).
        ``True``: it is drawn from the paper's adaptive stride samples (thinned evenly when they exceed the budget,
        topped up evenly from the other tokens when short), so at ``k`` = the paper's adaptive count the selection
        is the paper's. Either way exactly ``k`` tokens are kept; ``details.adaptive_count`` is the paper's count.
      neighbors: key-nearest neighbours each kept token merges (default 32, the reference); 0 = none, each pruned
        token joins only its most similar kept token (the groups then partition the grid).
      merge: ``"reference"`` (default: the kept token plus its neighbours weighted by attention share, the
        reference code) or ``"mean"`` (attention-weighted average over the group, the kept token included).
      layer: the vision layer whose attention and keys are read (negative = from the end); default the feature layer
        (22 on CLIP-L/14-336; the reference recomputes attention from the last layer's q/k, ``layer=-1``).

    Records: ``Selection.scores`` ``[N]`` the attention, ``groups`` / ``weights`` the merges, ``details`` a
    ``PruMergePlusDetails`` (IQR quartiles and threshold, outliers, supplement, the paper's adaptive count).
    """

    name = "prumerge_plus"
    adaptive: bool = False
    neighbors: int = DEFAULT_NEIGHBORS
    merge: str = "reference"
    layer: int | None = None

    def __post_init__(self):
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"prumerge_plus adaptive must be a bool, got {self.adaptive!r}")
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int) or self.neighbors < 0:
            raise ValueError(f"prumerge_plus neighbors must be an int >= 0, got {self.neighbors!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"prumerge_plus merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"prumerge_plus layer must be an int or None, got {self.layer!r}")

    # ------------------------------------------------------------------------------------------ signals
    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.layer_index(tower.feature_layer if self.layer is None else self.layer)
        return (tower.attention_signal(layer), Signal(SignalKind.KEYS, layer))

    def _find(self, tokens: VisualTokens, kinds: tuple[SignalKind, ...], what: str) -> Signal:
        """The captured signal of one of ``kinds`` (``select`` is not told the tower, so match by kind)."""
        return find_signal(tokens, kinds, self.layer, "prumerge_plus", what)

    # ------------------------------------------------------------------------------------------ selection
    def choose(self, attention: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        """The ``k`` kept grid tokens (ascending, indices into ``attention``, the ``[G]`` grid attention) and the
        decisions behind them (``q1``, ``q3``, ``threshold``, ``outliers``, ``supplement``, ``stride``,
        ``adaptive_count``), for ``0 <= k <= G``."""
        g = attention.numel()
        device = attention.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if g == 0:
            nan = float("nan")
            return empty, dict(q1=nan, q3=nan, threshold=nan, outliers=empty, supplement=empty, stride=1,
                               adaptive_count=0)
        outliers, q1, q3, threshold = iqr_outliers(attention)
        n_out = outliers.numel()
        stride = adaptive_stride(g, n_out)
        is_outlier = torch.zeros(g, dtype=torch.bool, device=device)
        is_outlier[outliers] = True
        samples = torch.arange(0, max(g - 1, 0), stride, device=device)
        samples = samples[~is_outlier[samples]]  # the reference's uniform samples that are not outliers
        decisions = dict(q1=q1, q3=q3, threshold=threshold, outliers=outliers, stride=stride,
                         adaptive_count=n_out + samples.numel())
        if n_out >= k:  # the outliers fill the budget: the top k by attention (all of them outliers)
            decisions["supplement"] = empty
            return top_k_sorted(attention, k), decisions
        m = k - n_out
        rest = torch.nonzero(~is_outlier).flatten()  # non-outliers, raster order; m <= len(rest)
        if not self.adaptive:
            supplement = spread(rest, m)
        elif samples.numel() >= m:
            supplement = spread(samples, m)
        else:  # all of the paper's samples, topped up evenly from the other non-outliers
            is_sample = torch.zeros(g, dtype=torch.bool, device=device)
            is_sample[samples] = True
            others = rest[~is_sample[rest]]
            supplement = torch.sort(torch.cat([samples, spread(others, m - samples.numel())])).values
        decisions["supplement"] = supplement
        return torch.sort(torch.cat([outliers, supplement])).values, decisions

    def merge_matrix(self, kept: torch.Tensor, share: torch.Tensor, keys: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(members [k, G] bool, coefficients [k, G] fp32, neighbors used)`` of the merge of ``G`` grid tokens into
        the ``k`` kept ones (``kept`` ascending, ``share`` the attention shares, ``keys`` ``[G, d]``).

        Row ``i``: kept token ``kept[i]`` itself, its ``neighbors`` most key-similar other grid tokens (cosine of
        L2-normalised keys, kept or pruned, ties to the lower index) and the pruned tokens no row picked whose most
        similar kept token it is (ties to the lower kept index). Coefficients: ``"reference"`` 1 for the kept token
        and the share for every other member; ``"mean"`` the members' shares normalised to sum 1 (equal weights when
        they are all 0).
        """
        g = share.numel()
        k = kept.numel()
        device = share.device
        rows = torch.arange(k, device=device)
        unit = F.normalize(keys.float(), dim=-1)
        similarity = unit[kept] @ unit.T  # [k, G]
        members = torch.zeros(k, g, dtype=torch.bool, device=device)
        members[rows, kept] = True
        neighbors = min(self.neighbors, g - 1)
        if neighbors > 0:
            ranked = similarity.clone()
            ranked[rows, kept] = float("-inf")  # never its own neighbour
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :neighbors]
            members[rows[:, None].expand_as(order), order] = True
        is_kept = torch.zeros(g, dtype=torch.bool, device=device)
        is_kept[kept] = True
        leftover = torch.nonzero(~is_kept & ~members.any(dim=0)).flatten()
        if leftover.numel():
            owner = similarity[:, leftover].argmax(dim=0)  # first (lowest kept index) maximum
            members[owner, leftover] = True
        weight = share.float()[None, :].expand(k, g) * members
        if self.merge == "reference":
            coefficients = weight.clone()
            coefficients[rows, kept] = 1.0
        else:
            total = weight.sum(dim=1, keepdim=True)
            equal = members.float() / members.sum(dim=1, keepdim=True)
            coefficients = torch.where(total > 0, weight / total.clamp(min=torch.finfo(torch.float32).tiny), equal)
        return members, coefficients, neighbors

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        device = tokens.features.device
        n = tokens.num_tokens
        prefix = min(tokens.num_prefix_tokens, n)
        attention_signal = self._find(tokens, _ATTENTION_KINDS, "attention (cls_attention or received_attention)")
        score = tokens.signal(attention_signal).to(device)
        kept_prefix = min(prefix, k)
        k_grid = k - kept_prefix
        grid_attention = score[prefix:]
        g = grid_attention.numel()
        kept, decisions = self.choose(grid_attention, k_grid)
        indices = torch.cat([torch.arange(kept_prefix, device=device), kept + prefix])
        details = dict(q1=decisions["q1"], q3=decisions["q3"], threshold=decisions["threshold"],
                       outliers=decisions["outliers"] + prefix, supplement=decisions["supplement"] + prefix,
                       stride=decisions["stride"], adaptive_count=decisions["adaptive_count"],
                       adaptive=self.adaptive, merge=self.merge)
        if k_grid == 0 or k_grid >= g:  # nothing pruned (keep all) or no kept grid token to merge into
            singletons = tuple(indices.view(-1, 1).unbind(0))
            return Selection(indices=indices, groups=singletons, scores=score,
                             details=PruMergePlusDetails(signals=(attention_signal,), neighbors=0, **details))

        key_signal = self._find(tokens, (SignalKind.KEYS,), "keys")
        keys = tokens.signal(key_signal).to(device)[prefix:]
        total = float(grid_attention.sum())
        share = grid_attention / total if total > 0 else torch.full_like(grid_attention, 1.0 / g)
        members, coefficients, neighbors = self.merge_matrix(kept, share, keys)
        features = tokens.features.float()
        merged = coefficients @ features[prefix:]  # [k_grid, D]
        out = torch.cat([features[:kept_prefix], merged]).to(tokens.features.dtype)

        row, col = torch.nonzero(members, as_tuple=True)  # row-major: ascending token index inside each group
        sizes = members.sum(dim=1).tolist()
        grid_groups = torch.split(col + prefix, sizes)
        grid_weights = torch.split(coefficients[row, col], sizes)
        one = torch.ones(1, dtype=torch.float32, device=device)
        groups = tuple(indices[:kept_prefix].view(-1, 1).unbind(0)) + tuple(grid_groups)
        weights = tuple(one for _ in range(kept_prefix)) + tuple(grid_weights)
        return Selection(indices=indices, features=out, groups=groups, weights=weights, scores=score,
                         details=PruMergePlusDetails(signals=(attention_signal, key_signal), neighbors=neighbors,
                                                     **details))
