"""HoloV (arXiv 2510.02912, NeurIPS'25): crop-wise holistic allocation of the budget, then top tokens per crop.

The raster tokens are cut into ``C`` contiguous chunks ("crops"). In each chunk every token gets a holistic score
``h = a + alpha * gamma * v``: its attention ``a`` plus the variance ``v`` of its cosine similarities to the other
tokens of the chunk, rescaled by ``gamma = mean|a| / mean|v|`` so both terms are comparable. Chunk ``c`` gets the share
``w_c = mean_c(h)^tau / sum`` of the budget -- ``floor(w_c * k)``, the remainder one each to the largest weights,
the excess of a full chunk re-split over the others -- and keeps its top tokens by attention (the released code;
the paper ranks by ``h``). Exactly ``k`` tokens, raster order. The same rule splits an AnyRes image's budget over its
views (allocation ``"holov"``). See docs/methods/holov.md (rule, defaults, deviations from the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch

from ..allocation import Allocation, register_allocation
from ..budget_split import split_budget
from ..compressor import Compressor, VisualTokens, find_signal, register
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo

#: ``alpha``: weight of the rescaled similarity variance in ``h`` (hard-coded 0.09 in both reference files).
DEFAULT_ALPHA = 0.09
#: ``tau``: sharpness of the chunk weights ``mean(h)^tau`` (the Qwen file's ``power = 1``; the LLaVA file has none).
DEFAULT_TAU = 1.0
#: How tokens are ranked inside a chunk: ``"attention"`` (the released code) or ``"holistic"`` (the paper, by ``h``).
WITHIN = ("attention", "holistic")
#: The Qwen file's chunk rule ``C = int((1024 / 576) * N / K)``: 16 chunks at 64 of 576 tokens. ``1024 / 576 = 16/9``
#: exactly, so vtc evaluates it in integers, ``(16 N) // (9 K)`` (the same value as the float form for every
#: ``N < 3000``, checked; the float form could round down at an exact integer).
CHUNK_RULE = (16, 9)
#: Largest ``[chunks, rows, columns]`` similarity block (fp32 elements, 64 MiB) computed at once; bigger chunks (few,
#: long chunks at high keep ratios or a user's ``chunks=1`` on a large image) are computed in row blocks.
BLOCK_ELEMENTS = 1 << 24

_ATTENTION_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)


# ==================================================================================================== pure functions
def default_chunks(num_tokens: int, k: int) -> int:
    """``C = max(1, floor((1024 / 576) * N / K))`` (the Qwen file's rule): 16 / 8 / 5 at 64 / 128 / 192 of 576.

    Not capped here; ``chunk_sizes`` drops the empty chunks when ``C > N``.
    """
    num_tokens, k = int(num_tokens), int(k)
    if k < 1:
        raise ValueError(f"the holov chunk rule needs a budget >= 1, got {k}")
    num, den = CHUNK_RULE
    return max(1, (num * num_tokens) // (den * k))


def chunk_sizes(num_tokens: int, chunks: int) -> list[int]:
    """Sizes of the contiguous chunks of ``num_tokens`` raster tokens: ``N // C`` each, the first ``N % C`` one more
    (the reference's rule); empty chunks (``C > N``) are dropped, so there are ``min(C, N)`` chunks."""
    num_tokens, chunks = int(num_tokens), int(chunks)
    if chunks < 1:
        raise ValueError(f"holov chunks must be >= 1, got {chunks}")
    base, extra = divmod(num_tokens, chunks)
    sizes = [base + (1 if c < extra else 0) for c in range(chunks)]
    return [s for s in sizes if s > 0]


def _padded(sizes: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions [C, M], valid [C, M], sizes [C])`` of the chunks laid out as rows padded to the longest chunk
    ``M`` (padding positions point at token 0 and are masked out by ``valid``)."""
    size = torch.tensor([int(s) for s in sizes], dtype=torch.long, device=device)
    starts = torch.cumsum(size, 0) - size
    width = int(max(sizes)) if len(sizes) else 0
    column = torch.arange(width, device=device)
    valid = column[None, :] < size[:, None]
    positions = torch.where(valid, starts[:, None] + column[None, :], torch.zeros_like(column)[None, :])
    return positions, valid, size


def _runs(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first token, chunks, size)`` of each run of consecutive equal-size chunks (two runs from ``chunk_sizes``)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for size in (int(s) for s in sizes):
        if runs and runs[-1][2] == size:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, size)
        else:
            runs.append((start, 1, size))
        start += size
    return runs


def similarity_variance(features: torch.Tensor, sizes: Sequence[int],
                        block_elements: int | None = None) -> torch.Tensor:
    """``v [N]``: per token, the variance of its cosine similarities inside its chunk, as the reference computes it.

    For a chunk of ``M`` tokens: ``S`` = cosine matrix with the diagonal set to 0, ``mu_i = sum_j S_ij / (M - 1)``,
    ``v_i = sum_j (S_ij - mu_i)^2 / (M - 1)`` where ``j`` runs over **all** ``M`` tokens, so the zeroed diagonal
    contributes ``mu_i^2``. A one-token chunk has ``v = 0`` (no other token); a zero feature vector has cosine 0 to
    every token. ``features [N, D]`` in chunk order (``sum(sizes) == N``); fp32. Runs of equal-size chunks are
    batched as views (no copy); at most ``block_elements`` similarities are held at once (row blocks beyond).
    """
    n = int(features.shape[0])
    if sum(int(s) for s in sizes) != n:
        raise ValueError(f"chunk sizes {list(sizes)} do not cover the {n} tokens")
    limit = BLOCK_ELEMENTS if block_elements is None else max(1, int(block_elements))
    x = features.float()
    inverse = 1.0 / x.norm(dim=-1).clamp(min=1e-12)  # F.normalize's guard: a zero vector stays zero
    variance = torch.zeros(n, dtype=torch.float32, device=x.device)
    for first, count, size in _runs(sizes):
        if size < 2:
            continue
        per_batch = max(1, limit // (size * size))
        rows = max(1, min(size, limit // size))
        for c0 in range(0, count, per_batch):
            c1 = min(count, c0 + per_batch)
            lo, hi = first + c0 * size, first + c1 * size
            block = x[lo:hi].view(c1 - c0, size, -1)
            scale = inverse[lo:hi].view(c1 - c0, size)
            out = variance[lo:hi].view(c1 - c0, size)
            for r0 in range(0, size, rows):
                r1 = min(size, r0 + rows)
                sim = block[:, r0:r1] @ block.transpose(1, 2)  # [g, R, M]
                sim = sim * scale[:, r0:r1, None] * scale[:, None, :]
                rows_here = torch.arange(r1 - r0, device=x.device)
                sim[:, rows_here, rows_here + r0] = 0.0  # zero the diagonal
                mean = sim.sum(dim=-1, keepdim=True) / (size - 1)
                out[:, r0:r1] = ((sim - mean) ** 2).sum(dim=-1) / (size - 1)
    return variance


def holistic_scores(attention: torch.Tensor, variance: torch.Tensor, sizes: Sequence[int],
                    alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [N], gamma [C])``: ``h_i = a_i + alpha * gamma_c * v_i`` with ``gamma_c = mean_c|a| / mean_c|v|`` per chunk.

    ``gamma_c = 0`` where a chunk's variance is all zero (its term vanishes anyway). ``h`` is positively homogeneous in
    the attention scale: ``a -> s a`` gives ``h -> s h`` (docs/methods/holov.md, "one scale"), so the reference's
    ``1000 a`` changes nothing but its epsilons. For ``a >= 0``, ``mean_c(h) = (1 + alpha) mean_c(a)`` unless
    ``gamma_c = 0``.
    """
    device = attention.device
    a = attention.float().reshape(-1)
    v = variance.float().reshape(-1).to(device)
    size = torch.tensor([int(s) for s in sizes], dtype=torch.long, device=device)
    chunk_of = torch.repeat_interleave(torch.arange(size.numel(), device=device), size)
    count = size.float()
    mean_a = torch.zeros(size.numel(), device=device).index_add_(0, chunk_of, a.abs()) / count
    mean_v = torch.zeros(size.numel(), device=device).index_add_(0, chunk_of, v.abs()) / count
    gamma = torch.where(mean_v > 0, mean_a / mean_v.clamp(min=torch.finfo(torch.float32).tiny),
                        torch.zeros_like(mean_a))
    return a + float(alpha) * gamma[chunk_of] * v, gamma


def chunk_means(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[C]`` the mean of ``values [N]`` over each contiguous chunk."""
    size = torch.tensor([int(s) for s in sizes], dtype=torch.long, device=values.device)
    chunk_of = torch.repeat_interleave(torch.arange(size.numel(), device=values.device), size)
    sums = torch.zeros(size.numel(), dtype=torch.float32, device=values.device).index_add_(0, chunk_of,
                                                                                           values.float())
    return sums / size.float()


def powered(means: torch.Tensor | Sequence[float], tau: float, who: str = "holov") -> list[float]:
    """``max(mean, 0)^tau`` per part, as float64 host values (``0^0 = 1``); non-finite means raise ``ValueError``."""
    values = [float(m) for m in (means.tolist() if isinstance(means, torch.Tensor) else means)]
    if any(not math.isfinite(m) for m in values):
        raise ValueError(f"{who}: the holistic scores are not finite ({values}); check the attention and features "
                         "for NaN / inf")
    try:
        out = [max(m, 0.0) ** float(tau) for m in values]
    except OverflowError:
        out = [math.inf]
    if any(not math.isfinite(w) for w in out):
        raise ValueError(f"{who}: mean(h)^tau overflows for tau={tau}; use a smaller tau")
    return out


def holov_quotas(total: int, weights: Sequence[float], sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(quotas, reference_quotas)``: HoloV's integer split of ``total`` over parts of ``sizes`` by ``weights``.

    Reference rule: ``w_c = weights_c / sum(weights)``, ``q_c = floor(w_c * total)``; the ``total - sum(q)`` left over
    (fewer than the number of parts) go one each to the parts of **largest weight** (not largest remainder; ties to
    the lower index). These are ``reference_quotas`` (a part may get more than its size). vtc then caps each part at
    its size and re-splits the excess over the parts with room, in proportion to their weights (``split_budget``:
    water-filling, largest remainder) -- the reference drops it and pads zero vectors. ``quotas`` sum to
    ``min(total, sum(sizes))``. All-zero weights share evenly. Exact arithmetic (fractions of the float weights).
    """
    sizes = [max(0, int(s)) for s in sizes]
    weights = [float(w) for w in weights]
    if len(weights) != len(sizes):
        raise ValueError(f"got {len(weights)} weights for {len(sizes)} parts")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"holov weights must be finite and >= 0, got {weights}")
    total = max(0, min(int(total), sum(sizes)))
    parts = [i for i, s in enumerate(sizes) if s > 0]
    exact = {i: Fraction(weights[i]) for i in parts}
    mass = sum(exact.values(), Fraction(0))
    if mass == 0:
        exact = {i: Fraction(1) for i in parts}
        mass = Fraction(len(parts))
    reference = [0] * len(sizes)
    for i in parts:
        reference[i] = math.floor(total * exact[i] / mass)
    left = total - sum(reference)
    for i in sorted(parts, key=lambda i: (-exact[i], i))[:left]:
        reference[i] += 1
    quotas = [min(q, s) for q, s in zip(reference, sizes)]
    excess = total - sum(quotas)
    if excess:
        room = [s - q for s, q in zip(sizes, quotas)]
        share = [float(exact.get(i, 0)) for i in range(len(sizes))]
        quotas = [q + e for q, e in zip(quotas, split_budget(excess, share, room))]
    return quotas, reference


def top_per_chunk(keys: torch.Tensor, sizes: Sequence[int], quotas: Sequence[int]) -> torch.Tensor:
    """Sorted indices of the top ``quotas[c]`` tokens of each contiguous chunk by ``keys [N]`` (descending, stable:
    ties to the lower index). ``quotas[c] <= sizes[c]``."""
    device = keys.device
    positions, valid, _ = _padded(sizes, device)
    if positions.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    quota = torch.tensor([int(q) for q in quotas], dtype=torch.long, device=device)
    padded = torch.where(valid, keys.float()[positions], torch.full_like(positions, float("-inf"), dtype=torch.float))
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    ranked = positions.gather(1, order)
    take = torch.arange(positions.shape[1], device=device)[None, :] < quota[:, None]
    return torch.sort(ranked[take]).values


# ==================================================================================================== compressor
@dataclass(frozen=True)
class HoloVDetails(Details):
    """What HoloV decided for one image (view / frame): ``signals`` are the attention of its layer.

    Chunks cover the grid tokens (after the ``P`` prefix tokens, which are always kept); ``C`` = chunks used
    (``min(chunks, N - P)``; 0 when the budget holds only prefix tokens). Fields:
      chunk_starts: ``LongTensor [C]`` index of each chunk's first token (into the image's ``N`` tokens).
      chunk_sizes: ``LongTensor [C]`` tokens per chunk (``(N - P) // C``, the first ``(N - P) % C`` one more).
      variance: ``FloatTensor [N]`` ``v_i``, the variance of token ``i``'s in-chunk cosine similarities (NaN at prefix
        tokens).
      holistic: ``FloatTensor [N]`` ``h_i = a_i + alpha * gamma_c * v_i`` (NaN at prefix tokens).
      gamma: ``FloatTensor [C]`` ``mean_c|a| / mean_c|v|`` (0 where a chunk has no variance).
      weights: ``FloatTensor [C]`` ``w_c = mean_c(h)^tau / sum``, summing to 1.
      reference_quotas: ``LongTensor [C]`` the reference's ``floor(w_c * K)`` plus the remainder to the largest
        weights (``K = k - P``), before capping: a value above the chunk size is what the reference pads with zeros.
      quotas: ``LongTensor [C]`` tokens kept per chunk (at most its size, summing to ``K``).
      redistributed: tokens moved off full chunks onto others (``sum(reference_quotas - quotas)`` over full chunks).
      within: how tokens were ranked inside a chunk (``"attention"`` or ``"holistic"``).
    """

    chunk_starts: torch.Tensor
    chunk_sizes: torch.Tensor
    variance: torch.Tensor
    holistic: torch.Tensor
    gamma: torch.Tensor
    weights: torch.Tensor
    reference_quotas: torch.Tensor
    quotas: torch.Tensor
    redistributed: int
    within: str


def _check_number(value, name: str, low: float, who: str = "holov") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{who} {name} must be a finite number >= {low}, got {value!r}")


def _check_chunks(value, who: str = "holov") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{who} chunks must be an int >= 1 or None (the Qwen rule), got {value!r}")


def _check_layer(value, who: str = "holov") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{who} layer must be an int or None, got {value!r}")


@register
@dataclass
class HoloV(Compressor):
    """HoloV: crop-wise holistic budget allocation, top tokens per crop (docs/methods/holov.md).

    Options:
      chunks: number ``C`` of contiguous raster chunks ("crops"); default ``None`` = the Qwen file's rule
        ``max(1, int((1024 / 576) * N / K))`` -- 16 / 8 / 5 at 64 / 128 / 192 of 576 tokens (the LLaVA file
        hard-codes 16 at 64) -- capped at ``N``.
      alpha: weight of the rescaled similarity variance in ``h = a + alpha * gamma * v`` (default 0.09, both
        reference files).
      tau: chunk weights ``mean(h)^tau`` (default 1.0, the Qwen file's ``power``; 0 = every chunk the same share).
      within: ranking inside a chunk: ``"attention"`` (default, the released code) or ``"holistic"`` (by ``h``, the
        paper).
      layer: the vision layer whose attention scores the tokens (negative = from the end); default the feature layer,
        as the reference (CLS attention of layer -2 on LLaVA; the last block's received attention on Qwen2.5-VL).

    Records: ``Selection.scores`` ``[N]`` the in-chunk ranking key (the attention, or ``h`` with
    ``within="holistic"``; NaN at prefix tokens, which are always kept), ``details`` a ``HoloVDetails``.
    """

    name = "holov"
    chunks: int | None = None
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    within: str = "attention"
    layer: int | None = None

    def __post_init__(self):
        _check_chunks(self.chunks)
        _check_number(self.alpha, "alpha", 0.0)
        _check_number(self.tau, "tau", 0.0)
        if self.within not in WITHIN:
            raise ValueError(f"holov within must be one of {WITHIN}, got {self.within!r}")
        _check_layer(self.layer)

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.layer_index(tower.feature_layer if self.layer is None else self.layer)
        return (tower.attention_signal(layer),)

    def num_chunks(self, num_tokens: int, k: int) -> int:
        """Chunks used for ``k`` of ``num_tokens`` grid tokens: the option or the rule, at most ``num_tokens``."""
        chunks = default_chunks(num_tokens, k) if self.chunks is None else self.chunks
        return max(1, min(int(chunks), int(num_tokens)))

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        device = tokens.features.device
        n = tokens.num_tokens
        signal = find_signal(tokens, _ATTENTION_KINDS, self.layer, "holov",
                             "attention (cls_attention or received_attention)")
        attention = tokens.signal(signal).to(device).reshape(-1)
        k = min(int(k), n)
        prefix = min(tokens.num_prefix_tokens, k)
        start = tokens.num_prefix_tokens
        grid, budget = n - start, k - prefix
        nan = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        empty_long = torch.empty(0, dtype=torch.long, device=device)
        if budget == 0 or grid == 0:  # only prefix tokens fit: no chunk is scored
            details = HoloVDetails(signals=(signal,), chunk_starts=empty_long, chunk_sizes=empty_long,
                                   variance=nan, holistic=nan.clone(), gamma=nan[:0], weights=nan[:0],
                                   reference_quotas=empty_long, quotas=empty_long, redistributed=0,
                                   within=self.within)
            return Selection(indices=torch.arange(prefix, device=device), scores=nan.clone(), details=details)

        sizes = chunk_sizes(grid, self.num_chunks(grid, budget))
        a = attention[start:]
        variance = similarity_variance(tokens.features[start:], sizes)
        holistic, gamma = holistic_scores(a, variance, sizes, self.alpha)
        means = chunk_means(holistic, sizes)
        weights = powered(means, self.tau)
        quotas, reference = holov_quotas(budget, weights, sizes)
        key = a.float() if self.within == "attention" else holistic
        kept = top_per_chunk(key, sizes, quotas) + start
        indices = torch.cat([torch.arange(prefix, device=device), kept])

        size_t = torch.tensor(sizes, dtype=torch.long, device=device)
        reference_t = torch.tensor(reference, dtype=torch.long, device=device)
        mass = sum(weights)
        normalised = [w / mass for w in weights] if mass > 0 else [1.0 / len(weights)] * len(weights)
        scores, variance_n, holistic_n = nan.clone(), nan.clone(), nan.clone()
        scores[start:] = key
        variance_n[start:] = variance
        holistic_n[start:] = holistic
        details = HoloVDetails(
            signals=(signal,), chunk_starts=torch.cumsum(size_t, 0) - size_t + start, chunk_sizes=size_t,
            variance=variance_n, holistic=holistic_n, gamma=gamma,
            weights=torch.tensor(normalised, dtype=torch.float32, device=device),
            reference_quotas=reference_t, quotas=torch.tensor(quotas, dtype=torch.long, device=device),
            redistributed=int(sum(max(0, r - s) for r, s in zip(reference, sizes))), within=self.within)
        return Selection(indices=indices, scores=scores, details=details)


# ==================================================================================================== allocation
@register_allocation
@dataclass
class HoloVAllocation(Allocation):
    """HoloV over the views of an AnyRes image: each view weighs what its chunks weigh (docs/methods/holov.md).

    Every view is cut into chunks of about the length HoloV uses on the whole image (``C`` by the rule on the image's
    visual tokens and budget, ``round(n_v * C / N)`` of them in a view of ``n_v`` tokens, at least 1); the view's
    weight is the sum of its chunks' ``mean(h)^tau`` -- the share the reference's concatenated run gives those
    chunks -- and the budget is split by HoloV's quota rule (floor, remainder to the largest weights, capped at each
    view's size and re-split). The compressor then selects inside each view.

    Options:
      alpha, tau: as the compressor's (defaults 0.09 and 1.0).
      chunks: chunks over the whole image (all views); default ``None`` = the rule on its visual tokens and budget.
      layer: the vision layer whose attention scores the tokens; default the feature layer (CLS attention, or
        received attention on towers without CLS).
    """

    name = "holov"
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    chunks: int | None = None
    layer: int | None = None

    def __post_init__(self):
        _check_number(self.alpha, "alpha", 0.0, "holov allocation")
        _check_number(self.tau, "tau", 0.0, "holov allocation")
        _check_chunks(self.chunks, "holov allocation")
        _check_layer(self.layer, "holov allocation")

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.layer_index(tower.feature_layer if self.layer is None else self.layer)
        return (tower.attention_signal(layer),)

    def _signal(self, image) -> Signal:
        if image.tower is not None:
            return self.signals(image.tower)[0]
        found = {s for view in image.view_signals for s in view if s.kind in _ATTENTION_KINDS
                 and (self.layer is None or self.layer < 0 or s.layer == self.layer)}
        if len(found) != 1:
            have = sorted(str(s) for view in image.view_signals for s in view) or ["none"]
            raise KeyError(f"holov allocation needs exactly one attention signal (cls_attention or "
                           f"received_attention); captured: {', '.join(dict.fromkeys(have))}")
        return found.pop()

    def view_weights(self, image, k: int) -> list[float]:
        """Per view, the sum over its chunks of ``max(mean(h), 0)^tau`` (0 for an empty view)."""
        sizes = image.layout.view_sizes
        total = sum(sizes)
        chunks = default_chunks(total, max(1, int(k))) if self.chunks is None else self.chunks
        signal = self._signal(image)
        weights = []
        for view, n in enumerate(sizes):
            if n == 0:
                weights.append(0.0)
                continue
            share = (2 * n * chunks + total) // (2 * total)  # round(n * C / N), halves up
            parts = chunk_sizes(n, max(1, min(n, share)))
            tokens = image.view(view, (signal,))
            attention = tokens.signal(signal).reshape(-1).to(tokens.features.device)
            variance = similarity_variance(tokens.features, parts)
            holistic, _ = holistic_scores(attention, variance, parts, self.alpha)
            weights.append(sum(powered(chunk_means(holistic, parts), self.tau, "holov allocation")))
        return weights

    def budgets(self, image, k):
        quotas, _ = holov_quotas(k, self.view_weights(image, k), image.layout.view_sizes)
        return quotas


__all__ = ["HoloV", "HoloVAllocation", "HoloVDetails", "chunk_means", "chunk_sizes", "default_chunks",
           "holistic_scores", "holov_quotas", "similarity_variance", "top_per_chunk"]
