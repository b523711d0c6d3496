"""CDPruner (arXiv 2506.10967): keep the ``k`` tokens of maximal *conditional* diversity -- a DPP whose kernel
``L = diag(r) S diag(r)`` weighs the cosine similarity ``S`` of the visual features by each token's relevance ``r``
to the prompt, with greedy MAP inference (fast incremental Cholesky, Chen et al. 2018).

The greedy is run on ``S`` alone: for a kept set ``K`` the reference's marginal gain ``d_i^2`` on ``L`` is
``r_i^2 * rho_i`` with ``rho_i = S_ii - S_iK S_KK^-1 S_Ki`` the squared distance of token ``i``'s unit feature from
the span of the kept ones, so picks compare ``2 log r_i + log rho_i`` -- the same choices without an ``N x N`` kernel
or any overflow. See docs/methods/cdpruner.md (relevance, degenerate kernels, deviations from the reference).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..compressor import Compressor, VisualTokens, register
from ..selection import Details, Selection

#: The reference's offset in ``r~ = (rel - min + 1e-6) / (max - min)``: the least relevant token keeps a tiny weight.
RELEVANCE_OFFSET = 1e-6
#: A token whose residual ``rho_i`` (squared distance of its unit feature from the span of the round's picks, in
#: [0, 1]) is at most this counts as spanned: fp32 rounding alone leaves ~1e-5 at 1,500 picks (measured), so below
#: it the greedy would rank noise -- and the reference takes ``sqrt`` of a value that may be negative (NaN).
SPAN_TOLERANCE = 1e-4
#: Largest similarity matrix (N x N fp32) kept whole for the greedy (16 MiB, N <= 2048); larger images compute one
#: row per pick instead (a mat-vec), so memory stays ``O(k * N)``.
SIMILARITY_MATRIX_ELEMENTS = 1 << 22

QUERY_POOLS = ("mean", "per_token")


@dataclass(frozen=True)
class CDPrunerDetails(Details):
    """What CDPruner decided for one image (view / frame); ``signals`` is ``()`` (it reads the features and the query).

    Fields:
      conditioned: ``True`` when a non-empty text query weighted the kernel; ``False`` without one
        (``VisualTokens.query`` ``None`` or ``[0, D]``): every relevance weight is 1 and the selection is a plain,
        query-agnostic DPP on the feature similarity.
      relevance: ``FloatTensor [N]`` the raw instruction relevance ``rel_i`` (cosine to the query, before min-max
        normalisation; see ``CDPruner``), or ``None`` when not conditioned.
      pick_order: ``LongTensor [k]`` the kept tokens in the order the greedy picked them (``pick_order[0]`` is the
        most relevant token); sorted, it is ``Selection.indices``. Empty when ``k == N`` (nothing pruned, the greedy
        does not run).
      residuals: ``FloatTensor [k]`` per pick, its ``rho`` when picked: the squared distance of its unit feature from
        the span of the earlier picks of its round (1 for a round's first pick). Its gain in ``log det L`` was
        ``2 log r + log rho``; within one round the product of the residuals is ``det S`` of the picks.
      rounds: how many greedy rounds ran: 1 normally; each further round began when every remaining token was
        spanned by the round's picks (rank exhausted, e.g. more picks than feature dimensions or exact duplicates)
        and restarts the DPP on the remaining tokens. 0 when ``k == N``.
    """

    conditioned: bool
    relevance: torch.Tensor | None
    pick_order: torch.Tensor
    residuals: torch.Tensor
    rounds: int


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def relevance_scores(features: torch.Tensor, query: torch.Tensor, query_pool: str = "mean") -> torch.Tensor:
    """``[N]`` fp32 instruction relevance of each visual token (``features [N, D]``) to ``query [T, D]`` (``T >= 1``):

    * ``"mean"``: ``rel_i = cos(x_i, mean_t q_t)`` -- the paper's LLM-space recipe (one text embedding, the mean of
      the instruction's input embeddings);
    * ``"per_token"``: ``rel_i = mean_t cos(x_i, q_t)`` -- the reference's aggregation over its text embeddings.

    A zero vector (feature or pooled query) has cosine 0.
    """
    if query_pool not in QUERY_POOLS:
        raise ValueError(f"cdpruner query_pool must be one of {QUERY_POOLS}, got {query_pool!r}")
    unit = F.normalize(features.float(), dim=-1)
    q = query.detach().float().to(unit.device).reshape(-1, query.shape[-1])
    if query_pool == "per_token":
        direction = F.normalize(q, dim=-1).mean(dim=0)
    else:
        direction = F.normalize(q.mean(dim=0), dim=0)
    return unit @ direction


def query_relevance(tokens: VisualTokens, query_pool: str, who: str) -> torch.Tensor | None:
    """``relevance_scores`` of ``tokens`` to their own query, ``None`` without query text (``query`` is ``None`` or
    ``[0, D]``); a query that is not ``[T, D]`` text embeddings in the tokens' space raises (``who`` names the
    compressor)."""
    query = tokens.query
    if query is None:
        return None
    dim = tokens.features.shape[-1]
    if query.dim() not in (1, 2) or query.shape[-1] != dim:
        raise ValueError(f"{who} query must be [T, {dim}] text embeddings (the LLM input space of the visual "
                         f"tokens), got shape {tuple(query.shape)}")
    if query.numel() == 0:
        return None
    return relevance_scores(tokens.features, query, query_pool)


def relevance_weights(relevance: torch.Tensor | None, n: int, theta: float | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
    """``[N]`` fp32 ``w_i = 2 log r_i - max_j 2 log r_j`` (``<= 0``; the best token 0) of the kernel weights ``r``.

    With ``r~ = (rel - min + 1e-6) / (max - min)`` (the reference's min-max normalisation):

    * ``theta is None`` (the reference code's default): ``r = r~``, so ``w = 2 log((rel - min + 1e-6) / (max - min
      + 1e-6))``;
    * ``theta`` in [0, 1) (the paper's weighting): ``r = exp(alpha r~)`` with ``alpha = theta / (2 (1 - theta))``,
      so ``w = theta / (1 - theta) * (rel - max) / (max - min)`` (``theta = 0``: a plain DPP).

    Only differences of ``w`` matter to the greedy (a constant factor on ``r`` scales ``L`` by a constant), which is
    why the maximum is subtracted: every weight is finite, whatever the spread of ``rel``. No query
    (``relevance is None``) or equal relevances: all 0 (uniform ``r``).
    """
    if relevance is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    rel = relevance.detach().double()
    low, high = rel.min(), rel.max()
    spread = high - low
    if theta is None:
        w = 2.0 * (torch.log(rel - low + RELEVANCE_OFFSET) - torch.log(spread + RELEVANCE_OFFSET))
    else:
        factor = float(theta) / (1.0 - float(theta))
        w = torch.where(spread > 0, factor * (rel - high) / torch.where(spread > 0, spread, 1.0), 0.0)
    return w.float()


def cdpruner_order(features: torch.Tensor, k: int, weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The greedy MAP picks of ``k`` tokens of the DPP ``L = diag(r) S diag(r)``, in the order they were picked.

    ``features [N, D]`` give ``S_ij = cos(x_i, x_j)`` (``S_ii = 1``, a zero vector is orthogonal to every other);
    ``weights [N]`` are ``2 log r_i`` up to a constant (``relevance_weights``; ``None``: uniform, a plain DPP).
    Each step picks ``argmax_i 2 log r_i + log rho_i`` over the remaining tokens that the round's picks do not span
    (``rho_i > SPAN_TOLERANCE``), ties to the lowest index, then updates every ``rho`` with one Cholesky row
    (Chen et al. 2018). When every remaining token is spanned, a new round starts on the remaining tokens
    (``rho = 1``). Returns ``(order [k], residuals [k], rounds)``; fp32, no host synchronisation inside the loop.
    """
    n = int(features.shape[0])
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"budget {k} is outside [0, {n}]")
    device = features.device
    order = torch.empty(k, dtype=torch.long, device=device)
    residuals = torch.empty(k, dtype=torch.float32, device=device)
    if k == 0:
        return order, residuals, 0
    w = torch.zeros(n, dtype=torch.float32, device=device) if weights is None else weights.float().to(device)
    unit = F.normalize(features.float(), dim=-1)
    similarity = None
    if n * n <= SIMILARITY_MATRIX_ELEMENTS:
        similarity = unit @ unit.T
        similarity.fill_diagonal_(1.0)
    one = torch.ones(1, dtype=torch.float32, device=device)

    def row(index: torch.Tensor) -> torch.Tensor:  # [N] S[index, :] with S_ii = 1
        if similarity is not None:
            return similarity.index_select(0, index).squeeze(0)
        return (unit @ unit.index_select(0, index).squeeze(0)).index_put((index,), one)

    cholesky = torch.zeros(k, n, dtype=torch.float32, device=device)  # row t: the t-th pick's Cholesky vector
    in_round = torch.zeros(k, dtype=torch.float32, device=device)  # 1 for rows of the current round
    rho = torch.ones(n, dtype=torch.float32, device=device)
    remaining = torch.ones(n, dtype=torch.bool, device=device)
    restarts = torch.zeros((), dtype=torch.long, device=device)
    minus_inf = torch.tensor(-math.inf, dtype=torch.float32, device=device)
    for step in range(k):
        live = remaining & (rho > SPAN_TOLERANCE)
        exhausted = ~live.any()  # every remaining token is spanned: start a new round on them
        restarts = restarts + exhausted.long()
        rho = torch.where(exhausted, torch.ones_like(rho), rho)
        in_round = in_round * (~exhausted).float()
        live = torch.where(exhausted, remaining, live)
        score = torch.where(live, w + torch.log(rho.clamp_min(SPAN_TOLERANCE)), minus_inf)
        pick = torch.argmax(score).view(1)  # ties to the lowest index
        order[step] = pick[0]
        picked_rho = rho.index_select(0, pick)
        residuals[step] = picked_rho[0]
        coefficients = cholesky[:step].index_select(1, pick).squeeze(1) * in_round[:step]  # [step]
        e = (row(pick) - coefficients @ cholesky[:step]) / picked_rho.sqrt()
        cholesky[step] = e
        in_round[step] = 1.0
        rho = rho - e * e
        remaining[pick] = False
    return order, residuals, 1 + int(restarts)


@register
@dataclass
class CDPruner(Compressor):
    """CDPruner: the ``k`` tokens of maximal conditional diversity (docs/methods/cdpruner.md). No signals.

    Relevance ``rel_i`` of each token to the prompt's text embeddings ``VisualTokens.query`` (``[T, D]``, the LLM
    input space of the features; ``query_pool``), min-max normalised as the reference ``r~ = (rel - min + 1e-6) /
    (max - min)``; kernel ``L = diag(r) S diag(r)`` with ``S`` the cosine similarity of the features; greedy MAP,
    ties to the lower index, fp32, deterministic. The first pick is the most relevant token.

    Without a query (``query`` ``None`` or no text tokens) every ``r_i`` is 1: a plain, query-agnostic DPP on the
    features (the paper's unconditional ablation), recorded as ``details.conditioned = False`` -- not an error, so
    the method still runs where no prompt is embedded. Equal relevances give the same.

    Options:
      theta: relevance weighting. ``None`` (default, the reference code: its theta lines are commented out)
        ``r = r~``; a number in [0, 1): the paper's ``r = exp(alpha r~)``, ``alpha = theta / (2 (1 - theta))``,
        so ``log det L = theta / (1 - theta) * sum r~ + log det S`` (0: plain DPP; 0.5: alpha = 0.5).
      query_pool: ``"mean"`` (default; the paper's LLM-space recipe: cosine to the mean query embedding) or
        ``"per_token"`` (mean of the cosines to every query embedding; the reference's aggregation over its CLIP
        text segments).

    Records: ``Selection.scores`` ``[N]`` each token's kernel weight ``r_i / max r`` in [0, 1] (the most relevant
    token 1, all 1 without a query; 0 only by fp32 underflow for ``theta`` above ~0.995), ``details`` a
    ``CDPrunerDetails`` (raw relevance, pick order, residuals, rounds).
    """

    name: ClassVar[str] = "cdpruner"
    uses_query: ClassVar[bool] = True

    theta: float | None = None
    query_pool: str = "mean"

    def __post_init__(self):
        if self.theta is not None and not _is_number(self.theta):
            raise TypeError(f"cdpruner theta must be None or a number in [0, 1), got {self.theta!r}")
        if self.theta is not None and not 0 <= self.theta < 1:
            raise ValueError(f"cdpruner theta must be None (the reference: no weighting) or a number in [0, 1) "
                             f"(the paper's relevance weight; 0.5 gives alpha = 0.5), got {self.theta!r}")
        if self.query_pool not in QUERY_POOLS:
            raise ValueError(f"cdpruner query_pool must be one of {', '.join(map(repr, QUERY_POOLS))}, "
                             f"got {self.query_pool!r}")

    def relevance(self, tokens: VisualTokens) -> torch.Tensor | None:
        """``[N]`` raw relevance ``rel_i`` of every token to ``tokens.query``, or ``None`` without query text."""
        return query_relevance(tokens, self.query_pool, "cdpruner")

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        n = tokens.num_tokens
        device = tokens.features.device
        relevance = self.relevance(tokens)
        weights = relevance_weights(relevance, n, self.theta, device=device)
        scores = torch.exp(0.5 * weights)  # r_i / max r
        if int(k) == n:  # nothing to prune: keep every token without running the greedy
            order = torch.zeros(0, dtype=torch.long, device=device)
            residuals = torch.zeros(0, dtype=torch.float32, device=device)
            indices, rounds = torch.arange(n, device=device), 0
        else:
            order, residuals, rounds = cdpruner_order(tokens.features, k, weights)
            indices = torch.sort(order).values
        details = CDPrunerDetails(signals=(), conditioned=relevance is not None, relevance=relevance,
                                  pick_order=order, residuals=residuals, rounds=rounds)
        return Selection(indices=indices, scores=scores, details=details)
