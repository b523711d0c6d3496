"""VisPruner (arXiv 2412.01818 v2, ICCV'25): important tokens by attention, then diverse tokens by removing duplicates.

``floor(k * r)`` important tokens are the top attention of one layer (CLS attention; received attention on towers
without CLS). The other tokens, in descending-attention order, lose their near-duplicates in rounds of a bipartite
split (even / odd positions): each round drops up to 8 even-position tokens whose best cosine match among the
odd-position ones is highest, until ``k - floor(k * r)`` diverse tokens remain. Exactly ``k`` tokens, raster order.
See docs/methods/vispruner.md (the round rule, defaults, deviations from the reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compressor import Compressor, VisualTokens, find_signal, register
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: ``--important_ratio`` default of the reference evaluation scripts (``model_vqa_loader.py``): half of the budget.
DEFAULT_IMPORTANT_RATIO = 0.5
#: Duplicates removed per round at most (hard-coded 8 in the reference code).
DEFAULT_DROP_PER_ROUND = 8
#: What the duplicate search compares: the visual tokens' features (the reference) or the layer's head-mean keys.
SIMILARITIES = ("features", "keys")
#: Largest remaining set ``R`` whose whole cosine matrix (``|R| x |R|`` fp32, 64 MiB here) is built once and then
#: read by every round; above it the similarities are computed in row chunks of at most this many elements.
GRAM_MAX_ELEMENTS = 1 << 24
#: Nearest neighbours each row remembers (values and positions, descending). A round reads a row's ``m_a`` as the
#: first remembered neighbour that sits in ``B`` now; a row whose list holds none is recomputed exactly.
NEIGHBOURS = 32
#: Remaining sets at most this large run the plain rule (each round's ``|A| x |B|`` block of the cached matrix):
#: few rounds, and no host synchronisation on a GPU.
DIRECT_MAX_TOKENS = 1024

_ATTENTION_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)


@dataclass(frozen=True)
class VisPrunerDetails(Details):
    """What VisPruner decided for one image (view / frame): ``signals`` are the attention of its layer, plus that
    layer's keys when ``similarity="keys"``.

    Fields (indices into the image's ``N`` tokens, ascending; together exactly ``Selection.indices``):
      important: ``LongTensor [P + floor((k - P) * r)]`` the prefix tokens (always kept; ``P`` = kept prefix tokens,
        0 unless the host keeps a CLS token) and the top-attention patches (the top ``Selection.scores``).
      diverse: ``LongTensor [k - len(important)]`` the tokens left after the duplicate-removal rounds.
      similarity: what the duplicate search compared (``"features"`` or ``"keys"``).
      rounds: duplicate-removal rounds run (0 when nothing had to be removed).
    """

    important: torch.Tensor
    diverse: torch.Tensor
    similarity: str
    rounds: int


def split_budget(k: int, important_ratio: float) -> tuple[int, int]:
    """``(important, diverse)`` counts for ``k`` tokens: ``int(k * r)`` (the reference's floor) and the rest."""
    k = int(k)
    important = min(k, max(0, int(k * important_ratio)))
    return important, k - important


def remove_duplicates(unit: torch.Tensor, target: int, drop_per_round: int = DEFAULT_DROP_PER_ROUND,
                      gram_max_elements: int | None = None, neighbours: int | None = None,
                      direct_max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """VisPruner's duplicate removal on the rows of ``unit [R, d]`` (unit-norm, in the order of the list ``R``).

    While more than ``target`` rows remain: ``r_s = min(drop_per_round, |R| - target)``; ``A = R[0::2]``,
    ``B = R[1::2]``; ``m_a = max_b cos(a, b)``; the ``min(r_s, |A|)`` members of ``A`` with the largest ``m_a`` are
    dropped (stable descending sort: equal ``m`` drops the earlier member of ``A`` first); the new list is
    ``[kept A in descending-m order] ++ B``. Returns ``(positions into R of the survivors, in final list order;
    rounds run)``.

    Small sets (``|R| <= direct_max_tokens``) read each round's ``|A| x |B|`` block of one cached cosine matrix (the
    round count depends on sizes only, so that loop never synchronises with a device). Larger ones would make the
    rounds cost ``O(|R|^3 / 32)`` dot products (the reference recomputes an ``(|R|/2)^2 x d`` product every round:
    minutes at ``|R|`` ~ 10k), so there a row remembers its ``neighbours`` nearest rows (values, descending) and a
    round reads ``m_a`` as the first of them that is in ``B`` now: exact, since rows only ever leave the list, so
    every ``b`` with a larger cosine would be listed before it. A row without a list, or whose list holds no member
    of ``B``, is (re)computed against the rows still present. Both routes read the same matrix when it is cached
    (``|R|^2 <= gram_max_elements``), so they keep the same rows.
    """
    size = int(unit.shape[0])
    target = int(target)
    if not 0 <= target <= size:
        raise ValueError(f"cannot keep {target} of {size} tokens")
    if drop_per_round < 1:
        raise ValueError(f"drop_per_round must be >= 1, got {drop_per_round}")
    limit = GRAM_MAX_ELEMENTS if gram_max_elements is None else int(gram_max_elements)
    direct_max = DIRECT_MAX_TOKENS if direct_max_tokens is None else int(direct_max_tokens)
    device = unit.device
    positions = torch.arange(size, device=device)
    if target == 0:  # nothing diverse is kept (the reference's loop does not run): no comparison needed
        return positions[:0], 0
    if target == size:
        return positions, 0
    gram = unit @ unit.T if size * size <= limit else None
    if size <= direct_max:
        return _rounds_direct(unit, gram, positions, target, drop_per_round, limit)
    return _rounds_listed(unit, gram, positions, target, drop_per_round, limit,
                          NEIGHBOURS if neighbours is None else int(neighbours))


def _rounds_direct(unit, gram, positions, target, drop_per_round, limit):
    """The rule as stated: each round's ``m_a`` from the ``|A| x |B|`` block (cached matrix or row chunks)."""
    rounds = 0
    while positions.numel() > target:
        remaining = positions.numel()
        a, b = positions[0::2], positions[1::2]
        drop = min(drop_per_round, remaining - target, a.numel())
        if gram is not None:
            best = gram.index_select(0, a).index_select(1, b).max(dim=1).values  # cheaper than gram[a][:, b]
        else:
            rows = max(1, limit // b.numel())
            unit_b = unit.index_select(0, b)
            best = torch.cat([(unit.index_select(0, a[i:i + rows]) @ unit_b.T).max(dim=1).values
                              for i in range(0, a.numel(), rows)])
        order = torch.sort(best, descending=True, stable=True).indices
        positions = torch.cat([a[order[drop:]], b])
        rounds += 1
    return positions, rounds


def _rounds_listed(unit, gram, positions, target, drop_per_round, limit, neighbours):
    """The same rounds from per-row nearest-neighbour lists (see ``remove_duplicates``).

    A row gets its list the first time it is in ``A`` (rows that never are cost nothing), over the rows present
    then; the similarities are read from ``gram`` when it is cached, else computed against a compact copy of the
    present rows, rebuilt whenever a quarter of it has left (so no round copies the whole of ``unit``).
    """
    size = int(unit.shape[0])
    device = unit.device
    width = max(1, min(int(neighbours), size - 1))
    sentinel = size  # a list slot that names no row: never in B, never present
    listed = torch.full((size, width), sentinel, dtype=torch.long, device=device)  # no list yet: all sentinels
    values = torch.full((size, width), float("-inf"), dtype=unit.dtype, device=device)
    in_b = torch.zeros(size + 1, dtype=torch.bool, device=device)
    present = torch.zeros(size + 1, dtype=torch.bool, device=device)
    columns, compact = positions, None  # the rows the similarities are computed against (a superset of R)

    def refresh(rows: torch.Tensor) -> torch.Tensor:
        """Recompute ``rows``' lists over the present rows and return their ``m_a`` over ``B``."""
        nonlocal columns, compact
        if compact is None or positions.numel() * 4 < columns.numel() * 3:
            columns = positions
            compact = None if gram is not None else unit.index_select(0, columns)
        outside = ~present[columns]  # columns no longer in R
        not_b = ~in_b[columns]
        best = []
        chunk = max(1, limit // max(1, columns.numel()))
        for i in range(0, rows.numel(), chunk):
            part = rows[i:i + chunk]
            if gram is not None:
                sims = gram.index_select(0, part).index_select(1, columns)
            else:
                sims = unit.index_select(0, part) @ compact.T
            itself = columns.unsqueeze(0) == part.unsqueeze(1)
            sims = sims.masked_fill(itself | outside.unsqueeze(0), float("-inf"))
            best.append(sims.masked_fill(not_b.unsqueeze(0), float("-inf")).max(dim=1).values)
            top = sims.topk(min(width, columns.numel()), dim=1)
            named = columns[top.indices].masked_fill(top.values == float("-inf"), sentinel)
            listed[part] = sentinel
            values[part] = float("-inf")
            listed[part, :named.shape[1]] = named
            values[part, :named.shape[1]] = top.values
        return torch.cat(best)

    rounds = 0
    while positions.numel() > target:
        remaining = positions.numel()
        a, b = positions[0::2], positions[1::2]
        present.zero_()
        present[positions] = True
        in_b.zero_()
        in_b[b] = True
        drop = min(drop_per_round, remaining - target, a.numel())
        hits = in_b[listed.index_select(0, a)]  # [|A|, width]; a row without a list has no hit
        first = hits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first listed neighbour in B
        best = values.index_select(0, a).gather(1, first).squeeze(1)
        missing = (~hits.any(dim=1)).nonzero().squeeze(1)
        if missing.numel():
            best[missing] = refresh(a[missing])
        order = torch.sort(best, descending=True, stable=True).indices
        positions = torch.cat([a[order[drop:]], b])
        rounds += 1
    return positions, rounds


@register
@dataclass
class VisPruner(Compressor):
    """VisPruner: important tokens by attention + diverse tokens by duplicate removal (docs/methods/vispruner.md).

    Options:
      important_ratio: share ``r`` of the budget for important tokens, ``int(k * r)`` of them (floor, as the
        reference); the rest are diverse. Default 0.5, the reference's ``--important_ratio`` default (192 -> 96 + 96,
        128 -> 64 + 64, 64 -> 32 + 32); its README uses 0.75 for MME at 64 tokens. ``1.0`` is FasterVLM,
        ``0.0`` keeps only diverse tokens.
      layer: the vision layer whose attention ranks the tokens (negative = from the end); default the feature layer,
        as the reference (layer -2 = 22 on CLIP-L/14-336; block 31 on Qwen2.5-VL, as the LightCompress port).
      similarity: what the duplicate search compares: ``"features"`` (default, the reference: cosine of the visual
        tokens' features) or ``"keys"`` (cosine of the same layer's head-mean keys, a pre-projector alternative).
      drop_per_round: duplicates removed per round at most; default 8, the reference's hard-coded value.

    Records: ``Selection.scores`` ``[N]`` the attention the important tokens are ranked by (the diverse ones too,
    for the initial order of the duplicate search), ``details`` a ``VisPrunerDetails`` (important and diverse tokens).
    """

    name = "vispruner"
    important_ratio: float = DEFAULT_IMPORTANT_RATIO
    layer: int | None = None
    similarity: str = "features"
    drop_per_round: int = DEFAULT_DROP_PER_ROUND

    def __post_init__(self):
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"vispruner important_ratio must be a number in [0, 1], got {ratio!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"vispruner layer must be an int or None, got {self.layer!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"vispruner similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if isinstance(self.drop_per_round, bool) or not isinstance(self.drop_per_round, int) \
                or self.drop_per_round < 1:
            raise ValueError(f"vispruner drop_per_round must be an int >= 1, got {self.drop_per_round!r}")

    # ------------------------------------------------------------------------------------------ signals
    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.layer_index(tower.feature_layer if self.layer is None else self.layer)
        attention = tower.attention_signal(layer)
        if self.similarity == "keys":
            return (attention, Signal(SignalKind.KEYS, layer))
        return (attention,)

    def _find(self, tokens: VisualTokens, kinds: tuple[SignalKind, ...], what: str) -> Signal:
        """The captured signal of one of ``kinds`` (select() is not told the tower, so match by kind)."""
        return find_signal(tokens, kinds, self.layer, "vispruner", what)

    def split(self, k: int, num_tokens: int, num_prefix_tokens: int = 0) -> tuple[int, int]:
        """``(important, diverse)`` for a budget of ``k`` out of ``num_tokens``; they sum to ``min(k, N)``.

        Kept prefix tokens count as important and take their share off the budget first: the patches get
        ``k' = k - P`` tokens, ``int(k' * r)`` important and the rest diverse.
        """
        k = min(int(k), int(num_tokens))
        prefix = min(int(num_prefix_tokens), k)
        important, diverse = split_budget(k - prefix, self.important_ratio)
        return prefix + important, diverse

    # ------------------------------------------------------------------------------------------ selection
    def select(self, tokens: VisualTokens, k: int) -> Selection:
        device = tokens.features.device
        n = tokens.num_tokens
        attention = self._find(tokens, _ATTENTION_KINDS, "attention (cls_attention or received_attention)")
        score = tokens.signal(attention).to(device).reshape(-1)
        k = min(int(k), n)
        prefix = min(tokens.num_prefix_tokens, k)
        important_count, diverse_count = self.split(k, n, tokens.num_prefix_tokens)
        signals: tuple[Signal, ...] = (attention,)

        # important: prefix tokens, then the top patches by attention (stable: ties to the lower index)
        ranked = torch.sort(score[tokens.num_prefix_tokens:], descending=True, stable=True).indices
        ranked = ranked + tokens.num_prefix_tokens
        top = important_count - prefix
        important = torch.cat([torch.arange(prefix, device=device), ranked[:top]])
        rest = ranked[top:]  # R, still in descending-attention order

        rounds = 0
        if diverse_count == 0 or rest.numel() == diverse_count:  # nothing to compare: no similarity is read
            diverse = rest[:diverse_count]
        else:
            if self.similarity == "keys":
                key_signal = self._find(tokens, (SignalKind.KEYS,), "keys")
                signals = (attention, key_signal)
                vectors = tokens.signal(key_signal).to(device)
            else:
                vectors = tokens.features
            unit = F.normalize(vectors[rest].float(), dim=-1)
            survivors, rounds = remove_duplicates(unit, diverse_count, self.drop_per_round)
            diverse = rest[survivors]

        important = torch.sort(important).values
        diverse = torch.sort(diverse).values
        indices = torch.sort(torch.cat([important, diverse])).values
        details = VisPrunerDetails(signals=signals, important=important, diverse=diverse,
                                   similarity=self.similarity, rounds=rounds)
        return Selection(indices=indices, scores=score, details=details)
