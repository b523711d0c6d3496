"""TRIM (arXiv 2409.10994, COLING'25): keep the tokens most similar to the prompt, merge the rest into mean tokens.

Each grid token is scored by its similarity to the prompt's text embedding, the scores go through a softmax over
the image's tokens (the IQR outlier rule reads that softmax), the best tokens are kept and one extra token -- the
mean of every token not kept -- is placed in a free slot. The reference compares CLIP's ``visual_projection`` of the
layer -2 patches with CLIP's text tower; the models vtc wraps carry neither, so vtc scores in the LLM input space
instead (the post-projector tokens against the prompt's input embeddings), as CDPruner's paper does for Qwen. See
docs/methods/trim.md (budget semantics, the sign question, deviations from the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection
from .cdpruner import QUERY_POOLS, query_relevance
from .prumerge_plus import iqr_outliers, spread

__all__ = ["TRIM", "TRIMDetails", "iqr_outliers", "merge_runs"]


@dataclass(frozen=True)
class TRIMDetails(Details):
    """What TRIM decided for one image (view / frame); ``signals`` is ``()`` (it reads the features and the query).
    Token indices index the image's ``N`` tokens (prefix tokens included), ascending.

    Fields:
      conditioned: ``True`` when a non-empty text query scored the tokens; ``False`` without one (``query`` ``None``
        or ``[0, D]``): every grid token then scores the same, the tokens kept as they are are spread evenly over
        the grid and the IQR finds no outlier.
      relevance: ``FloatTensor [N]`` ``cos(x_i, query)`` of every token before the sign (``query_pool``), or ``None``
        when not conditioned. The ranked similarity is ``relevance`` (``negate=False``) or ``-relevance``.
      q1, q3: the quartiles of the grid tokens' softmax scores (``Selection.scores``; linear interpolation, numpy's
        ``percentile`` default), NaN when the image has no grid token.
      threshold: the IQR upper fence ``q3 + 1.5 * (q3 - q1)``; outliers lie strictly above it.
      outliers: ``LongTensor [O]`` every IQR outlier: the paper's adaptive selection (``TRIM:-1``), always the ``O``
        best-scored grid tokens.
      adaptive_count: tokens the reference's ``TRIM:-1`` emits for this image: ``O + 1`` (the outliers and the mean
        token; ``O`` with ``merge_rest=False``), prefix tokens not counted.
      kept: ``LongTensor [S]`` tokens passed through unchanged: the kept prefix tokens, then the grid tokens picked
        by score (or spread evenly when not conditioned).
      merged: ``LongTensor [M]`` the slots holding merged tokens (``M`` is 1 by default, 0 with ``merge_rest=False``
        or when every token is kept); ``Selection.groups`` of those slots list what each one averages.
        ``kept`` and ``merged`` together are ``Selection.indices``.
      adaptive, merge_rest, negate: the options the selection ran with.
    """

    conditioned: bool
    relevance: torch.Tensor | None
    q1: float
    q3: float
    threshold: float
    outliers: torch.Tensor
    adaptive_count: int
    kept: torch.Tensor
    merged: torch.Tensor
    adaptive: bool
    merge_rest: bool
    negate: bool


def merge_runs(rest: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``rest`` (``[R]`` token indices, ascending, ``1 <= m <= R``) into ``m`` contiguous runs: entry ``i`` goes to
    run ``floor(i * m / R)``, so every run has ``floor(R / m)`` or ``ceil(R / m)`` tokens. Returns ``(run [R], sizes
    [m])``; ``m = 1`` is one run of everything."""
    r = rest.numel()
    run = (torch.arange(r, device=rest.device) * m) // r
    return run, torch.bincount(run, minlength=m)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"trim {name} must be a bool, got {value!r}")


@register
@dataclass
class TRIM(Compressor):
    """TRIM: the grid tokens most similar to the prompt, plus one mean token of the rest (docs/methods/trim.md).

    What vtc does when the model has no text tower (none of the six wrapped families has one): the reference scores
    CLIP's ``visual_projection`` of the layer -2 patches against CLIP's text embedding of the prompt; vtc scores the
    post-projector tokens ``VisualTokens.features`` against the prompt's LLM input embeddings ``VisualTokens.query``
    (``[T, D]``), with CDPruner's ``relevance_scores``: ``rel_i = cos(x_i, mean_t q_t)`` (``query_pool``), the recipe
    CDPruner's paper uses for Qwen. The reference *negates* the similarity (``softmax(-s)``, blamed by its authors on
    CLIP's layer mismatch); vtc keeps that sign by default (``negate=True``): in the LLM space too, ``+rel`` kept the
    wrong tokens on the embedded model (40 % vs 56 % accuracy at a third of the tokens, docs/methods/trim.md). Scores ``p = softmax(+-rel)`` over the grid tokens; the softmax is monotone, so it never
    changes which tokens rank first, but the IQR fence is read on ``p`` (as the reference does), not on ``rel``.

    Budget ``k`` (exact, the vtc contract): prefix tokens (LLaVA's CLS under ``"full"``) are kept first and stay out
    of scoring; of the ``k'`` grid tokens, ``k' - 1`` are the best-scored (ties to the lower index) and the last is
    the mean of every other grid token, in the slot of the last of them (the reference appends it after the kept
    tokens). ``k' = 1`` is the mean of the whole grid; keeping every token is the identity.

    No query (``None`` or ``[0, D]``): every grid token scores the same (``p = 1/G``), the ``k' - 1`` tokens are
    spread evenly over the grid (``prumerge_plus.spread``) instead of taken from its top rows, the IQR finds no
    outlier, and ``details.conditioned`` is ``False`` -- a query-agnostic summary, never silent.

    Options:
      adaptive: ``False`` (default): ``k' - 1`` tokens by score + 1 mean token (the reference's ``TRIM:(k-1)/N``).
        ``True``: the paper's ``TRIM:-1`` under an exact budget: the IQR outliers of ``p`` are kept (the best
        ``k' - 1`` of them when there are more) and the rest of the budget goes to mean tokens: the other grid
        tokens, in raster order, are cut into ``k' - O`` contiguous runs, each averaged into the slot of its last
        token. At ``k' = details.adaptive_count`` it is the reference's selection; below it, the default's.
        Needs ``merge_rest`` (without mean tokens the outliers topped up by score are the default).
      negate: rank by ``-rel`` (the reference's sign, default ``True``) or, with ``False``, by ``+rel``.
      merge_rest: ``True`` (default): the mean token(s) above. ``False``: the ``k'`` best-scored tokens, nothing
        merged (the reference without its aggregated token).
      query_pool: ``"mean"`` (default: cosine to the mean query embedding, one text embedding as the reference's
        pooled CLIP text embedding) or ``"per_token"`` (mean of the cosines to every query token), as ``cdpruner``.

    Records: ``Selection.scores`` ``[N]`` the softmax ``p`` (sums to 1 over the grid; NaN at prefix tokens),
    ``groups`` / ``weights`` (a kept token: itself, weight 1; a mean token: its run, ``1 / len`` each; together a
    partition of the image), ``details`` a ``TRIMDetails``.
    """

    name: ClassVar[str] = "trim"
    uses_query: ClassVar[bool] = True

    adaptive: bool = False
    negate: bool = True
    merge_rest: bool = True
    query_pool: str = "mean"

    def __post_init__(self):
        _check_bool("adaptive", self.adaptive)
        _check_bool("negate", self.negate)
        _check_bool("merge_rest", self.merge_rest)
        if self.query_pool not in QUERY_POOLS:
            raise ValueError(f"trim query_pool must be one of {', '.join(map(repr, QUERY_POOLS))}, "
                             f"got {self.query_pool!r}")
        if self.adaptive and not self.merge_rest:
            raise ValueError("trim adaptive=True needs merge_rest=True: without mean tokens the IQR outliers topped up "
                             "by score are exactly the top-k of adaptive=False")

    def relevance(self, tokens: VisualTokens) -> torch.Tensor | None:
        """``[N]`` ``cos`` of every token to ``tokens.query`` (``query_pool``), or ``None`` without query text."""
        return query_relevance(tokens, self.query_pool, "trim")

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        features = tokens.features
        device = features.device
        n = tokens.num_tokens
        k = int(k)
        prefix = min(tokens.num_prefix_tokens, n)
        g = n - prefix
        kept_prefix = min(prefix, k)
        k_grid = k - kept_prefix

        relevance = self.relevance(tokens)
        if relevance is None:
            similarity = torch.zeros(g, dtype=torch.float32, device=device)
        else:
            similarity = (-relevance if self.negate else relevance)[prefix:].float()
        p = torch.softmax(similarity.double(), dim=0)
        scores = torch.cat([torch.full((prefix,), float("nan"), device=device), p.float()])
        if g:
            outliers, q1, q3, threshold = iqr_outliers(p)
        else:  # only prefix tokens: nothing to score
            outliers = torch.zeros(0, dtype=torch.long, device=device)
            q1 = q3 = threshold = float("nan")
        n_out = outliers.numel()

        if k_grid == 0 or k_grid >= g or not self.merge_rest:  # prefix only, keep all, or nothing merged
            picked_count, runs = k_grid, 0
        elif self.adaptive:
            picked_count = min(n_out, k_grid - 1)
            runs = k_grid - picked_count
        else:
            picked_count, runs = k_grid - 1, 1

        if relevance is None:
            picked = spread(torch.arange(g, device=device), picked_count)
        else:
            order = torch.sort(similarity, descending=True, stable=True).indices  # ties to the lower index
            picked = torch.sort(order[:picked_count]).values

        details = dict(conditioned=relevance is not None, relevance=relevance, q1=q1, q3=q3, threshold=threshold,
                       outliers=outliers + prefix, adaptive_count=n_out + int(self.merge_rest), adaptive=self.adaptive,
                       merge_rest=self.merge_rest, negate=self.negate)
        head = torch.arange(kept_prefix, device=device)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if runs == 0:  # plain gather: every token kept, or the k' best without merging
            indices = torch.cat([head, picked + prefix])
            return Selection(indices=indices, scores=scores,
                             details=TRIMDetails(signals=(), kept=indices, merged=empty, **details))

        is_picked = torch.zeros(g, dtype=torch.bool, device=device)
        is_picked[picked] = True
        rest = torch.nonzero(~is_picked).flatten()  # raster order, len >= runs
        run, sizes = merge_runs(rest, runs)
        coefficient = 1.0 / sizes.float()
        grid = features[prefix:].float()
        # no copy of the unkept rows: one mat-vec (one run) or a segment sum over all rows, picked ones to a spare row
        if runs == 1:
            mean_weights = torch.zeros(g, dtype=torch.float32, device=device).index_fill_(0, rest, 1.0 / rest.numel())
            merged = (mean_weights @ grid)[None]
        else:
            target = torch.full((g,), runs, dtype=torch.long, device=device).index_put_((rest,), run)
            sums = torch.zeros(runs + 1, grid.shape[1], dtype=torch.float32, device=device).index_add_(0, target, grid)
            merged = sums[:runs] * coefficient[:, None]
        last = torch.cumsum(sizes, 0) - 1
        slots = rest[last] + prefix

        kept = torch.cat([head, picked + prefix])
        unsorted = torch.cat([kept, slots])
        order = torch.argsort(unsorted)
        indices = unsorted[order]
        out = torch.cat([features[:kept_prefix].float(), grid[picked], merged])[order].to(features.dtype)
        one = torch.ones(1, dtype=torch.float32, device=device)
        size_list = sizes.tolist()
        groups = tuple(kept.view(-1, 1).unbind(0)) + torch.split(rest + prefix, size_list)
        weights = (one,) * kept.numel() + torch.split(coefficient[run], size_list)
        permutation = order.tolist()
        return Selection(indices=indices, features=out, groups=tuple(groups[i] for i in permutation),
                         weights=tuple(weights[i] for i in permutation), scores=scores,
                         details=TRIMDetails(signals=(), kept=kept, merged=slots, **details))
