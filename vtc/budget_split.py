"""Integer budget splitting: one resolved budget shared by the parts of an image (views) or a video (frames).

Every split here returns integers that sum **exactly** to ``min(total, sum(caps))``, gives no part more than its cap
(its token count) and rounds with the largest-remainder method, ties to the lower index, so results are the same on
every platform. The AnyRes strategies (``vtc.allocation``) and the video compressors build on these functions.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch


def _checked(weights: Sequence[float] | torch.Tensor, caps: Sequence[int], what: str) -> tuple[list[float], list[int]]:
    """``weights`` as floats and ``caps`` as ints >= 0, or a ``ValueError`` naming the parts (``what``)."""
    caps = [max(0, int(c)) for c in caps]
    weights = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(weights) != len(caps):
        raise ValueError(f"got {len(weights)} weights for {len(caps)} {what}s")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"{what} weights must be finite and >= 0, got {weights}")
    return weights, caps


def split_budget(total: int, weights: Sequence[float] | torch.Tensor, caps: Sequence[int]) -> list[int]:
    """Integer budgets proportional to ``weights``, each at most its cap, summing to ``min(total, sum(caps))``.

    Water-filling: a part whose proportional share reaches its cap gets the cap and leaves; the rest of the budget is
    shared again among the others, evenly when their weights are all zero. The final shares are rounded with the
    largest-remainder method (ties to the lower index). Arithmetic is exact (fractions), so the result is the same on
    every platform.
    """
    weights, caps = _checked(weights, caps, "view")
    total = max(0, min(int(total), sum(caps)))
    budgets = [0] * len(caps)
    active = [i for i, c in enumerate(caps) if c > 0]
    remaining = total
    while remaining > 0 and active:
        w = {i: Fraction(weights[i]) for i in active}
        mass = sum(w.values())
        if mass == 0:
            w = {i: Fraction(1) for i in active}
            mass = Fraction(len(active))
        shares = {i: remaining * w[i] / mass for i in active}
        full = [i for i in active if shares[i] >= caps[i]]
        if full:
            for i in full:
                budgets[i] = caps[i]
                remaining -= caps[i]
            active = [i for i in active if i not in full]
            continue
        floors = {i: math.floor(shares[i]) for i in active}
        left = remaining - sum(floors.values())
        order = sorted(active, key=lambda i: (-(shares[i] - floors[i]), i))
        for i in active:
            budgets[i] = floors[i]
        for i in order[:left]:
            budgets[i] += 1
        remaining = 0
    return budgets


def even_budgets(total: int, sizes: Sequence[int]) -> list[int]:
    """The same budget for every non-empty part, the remainder to the first parts, capped and redistributed."""
    return split_budget(total, [1.0] * len(sizes), sizes)


def water_fill(total: int, weights: Sequence[float] | torch.Tensor, caps: Sequence[int], floor: int = 0) -> list[int]:
    """Frame budgets ``b_t = clip(kappa * w_t, floor, cap_t)``, integers summing exactly to ``min(total, sum(caps))``.

    QuoTA's frame allocation (arXiv 2503.08689) with a cap and a floor: ``kappa`` is found by bisection so the
    continuous budgets sum to the total, then they are rounded with the largest-remainder method (ties to the lower
    frame). A frame never gets more than its cap (its native token count: no up-sampling, unlike QuoTA v1) nor less
    than ``floor`` (capped at the frame's size). With ``floor = 0`` a frame of weight 0 gets 0 tokens and is dropped,
    as in QuoTA. If ``floor * T`` exceeds the total, the floor is lowered to ``total // T`` so the sum stays exact.
    All-zero weights share evenly.
    """
    weights, caps = _checked(weights, caps, "frame")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floor must be an int >= 0 (tokens per frame), got {floor!r}")
    total = max(0, min(int(total), sum(caps)))
    if not caps or total == 0:
        return [0] * len(caps)
    if sum(min(floor, c) for c in caps) > total:
        floor = total // len(caps)
    if sum(weights) == 0:
        weights = [1.0] * len(caps)
    lows = [min(floor, c) for c in caps]

    def filled(kappa: float) -> list[float]:
        return [min(float(c), max(float(lo), kappa * w)) for w, c, lo in zip(weights, caps, lows)]

    lo_k, hi_k = 0.0, 1.0
    while sum(filled(hi_k)) < total:
        hi_k *= 2.0
        if hi_k > 1e300:  # only frames of weight 0 are left below their cap: fill them evenly
            break
    for _ in range(200):
        mid = (lo_k + hi_k) / 2
        if sum(filled(mid)) < total:
            lo_k = mid
        else:
            hi_k = mid
    shares = filled(hi_k)
    budgets = [min(c, max(lo, math.floor(s + 1e-9))) for s, c, lo in zip(shares, caps, lows)]
    left = total - sum(budgets)
    order = sorted(range(len(caps)), key=lambda i: (-(shares[i] - budgets[i]), i))
    while left != 0:  # exact sum despite float rounding: hand out (or take back) one token at a time
        step = 1 if left > 0 else -1
        for i in order if step > 0 else reversed(order):
            if left == 0:
                break
            if (step > 0 and budgets[i] < caps[i] and (weights[i] > 0 or budgets[i] < lows[i] or
                                                       all(w == 0 or b == c for w, b, c in
                                                           zip(weights, budgets, caps)))) or \
                    (step < 0 and budgets[i] > lows[i]):
                budgets[i] += step
                left -= step
    return budgets


__all__ = ["even_budgets", "split_budget", "water_fill"]
