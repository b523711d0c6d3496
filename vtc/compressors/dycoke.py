"""DyCoke stage 1 (arXiv 2411.15024, CVPR'25): temporal token merging (TTM) of a video, at an exact budget.

Frames go in windows of 4. The first frame of a window is an *anchor* and stays whole; an odd frame keeps the tokens
least similar (same-position cosine) to the frame before it (pass 1); the third frame of a window keeps those least
similar to the window's first frame (pass 2), except in the last window, whose third frame is an anchor too. Static
tokens are dropped, not averaged (the reference's "merging" is dropping). vtc derives the per-frame counts from the
video budget: anchors whole and the rest shared evenly by the pruned frames; below the anchors' total, the pruned
frames are empty and the anchors share the budget, each keeping its tokens least similar to the previous anchor.
Stage 2 (decode-time KV selection) is not implemented. See docs/methods/dycoke.md (rule, budgets, deviations).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..budget_split import even_budgets
from ..compressor import register, top_k_sorted
from ..selection import Details, Selection
from ..video import (
    FrameRecord,
    VideoCompressor,
    VideoSelection,
    VideoTokens,
    check_video_budget,
)
from .baselines import pooling_grid

#: the frame roles of TTM, per frame in time order
ANCHOR, PASS1, PASS2 = "anchor", "pass1", "pass2"
#: how a frame's kept tokens were chosen
RULES = ("all", "none", "dissimilar", "uniform")
#: norms below this count as zero in the cosine (a zero token has cosine 0 to everything, as torch's cosine_similarity)
COSINE_EPS = 1e-8
WINDOW = 4


@dataclass(frozen=True)
class DyCokeFrameDetails(Details):
    """How one frame was reduced (``FrameRecord.selection.details``; for an image, ``Selection.details``); no signals.

    Fields:
      role: ``"anchor"`` (kept whole while the budget allows), ``"pass1"`` (an odd frame, against the frame before)
        or ``"pass2"`` (a window's third frame, against the window's first frame).
      reference: the frame whose same-position tokens ranked this frame's (``-1``: none -- the first frame).
      rule: ``"all"`` (kept whole), ``"none"`` (emptied), ``"dissimilar"`` (the tokens with the lowest same-position
        cosine to ``reference``) or ``"uniform"`` (no reference: the centre tokens of an adaptive grid, as
        ``pool``'s ``sample`` mode).
    """

    role: str
    reference: int
    rule: str


@dataclass(frozen=True)
class DyCokeDetails(Details):
    """What TTM decided for one video (``VideoSelection.details``); no signals (features only).

    Fields (one entry per frame, time order):
      roles: ``"anchor"`` / ``"pass1"`` / ``"pass2"`` (``DyCokeFrameDetails.role``).
      references: the frame each frame is compared with (``-1``: none). Pass 1: ``t - 1``; pass 2: ``t - 2``;
        anchors: the previous anchor (``t - 4`` for a window's first frame, ``t - 2`` for the last window's third).
      budgets: tokens each frame kept (they sum to the video budget).
      anchors_cut: ``True`` when the budget was below the anchors' total (pruned frames empty, anchors cut).
      k: the reference's ``K`` (pruned fraction of a pass-1/2 frame) this budget amounts to,
        ``1 - mean(kept of pruned frames) / n``; ``None`` without pruned frames (one frame).
      similarity: ``[T, n]`` float32, the same-position cosine of each frame to its reference (``NaN`` row: none);
        ``Selection.scores`` of a frame is ``1 - similarity[t]``.
    """

    roles: tuple[str, ...]
    references: tuple[int, ...]
    budgets: tuple[int, ...]
    anchors_cut: bool
    k: float | None
    similarity: torch.Tensor


# ==================================================================================================== pure functions
def dycoke_roles(num_frames: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Role and reference frame of each of ``num_frames`` frames (spec: more_compressors.md §10).

    Pass 1: an odd frame ``t`` is pruned against ``t - 1``. Pass 2: frame ``i + 2`` is pruned against frame ``i`` for
    ``i in range(0, T - 4, 4)`` -- so the last window's third frame (``i + 4 >= T``) is not, and stays an anchor.
    Every other frame is an anchor, referenced to the previous anchor (``t - 4`` or ``t - 2``; ``-1`` for frame 0).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 0:
        raise ValueError(f"num_frames must be an int >= 0, got {num_frames!r}")
    pass2 = {i + 2 for i in range(0, int(num_frames) - WINDOW, WINDOW)}
    roles, refs = [], []
    for t in range(int(num_frames)):
        if t % 2 == 1:
            roles.append(PASS1)
            refs.append(t - 1)
        elif t in pass2:
            roles.append(PASS2)
            refs.append(t - 2)
        else:
            roles.append(ANCHOR)
            refs.append(t - 2 if t % WINDOW == 2 else t - WINDOW)  # frame 0: -4 -> none
    return tuple(roles), tuple(max(r, -1) for r in refs)


def reference_keep(k: float, tokens_per_frame: int) -> int:
    """Tokens a pruned frame keeps in the reference: ``int((1 - K) * n)`` (floor, in float arithmetic as there)."""
    return int((1 - float(k)) * int(tokens_per_frame))


def reference_budget(num_frames: int, tokens_per_frame: int, k: float) -> int:
    """Tokens the reference's TTM keeps for a video of ``num_frames`` frames of ``n`` tokens at ``K = k``:
    ``anchors * n + pruned * int((1 - K) * n)`` (the video budget that reproduces it; 3098 for 32 x 196 at 0.7)."""
    roles, _ = dycoke_roles(num_frames)
    anchors = roles.count(ANCHOR)
    return anchors * int(tokens_per_frame) + (len(roles) - anchors) * reference_keep(k, tokens_per_frame)


def frame_budgets(roles: tuple[str, ...], tokens_per_frame: int, budget: int) -> tuple[list[int], bool]:
    """Per-frame kept counts summing exactly to ``min(budget, T * n)``, and whether the anchors were cut.

    Anchors whole when ``budget >= anchors * n``; the pruned frames then share the rest evenly, the remainder to the
    earliest (``even_budgets``). Below that, the pruned frames get 0 and the anchors share the budget evenly, the
    remainder to the earliest anchors.
    """
    n = int(tokens_per_frame)
    total = max(0, min(int(budget), n * len(roles)))
    anchors = [t for t, r in enumerate(roles) if r == ANCHOR]
    pruned = [t for t, r in enumerate(roles) if r != ANCHOR]
    budgets = [0] * len(roles)
    cut = total < n * len(anchors)
    if cut:
        for t, b in zip(anchors, even_budgets(total, [n] * len(anchors))):
            budgets[t] = b
    else:
        for t in anchors:
            budgets[t] = n
        for t, b in zip(pruned, even_budgets(total - n * len(anchors), [n] * len(pruned))):
            budgets[t] = b
    return budgets, cut


def same_position_cosine(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor | None = None,
                         norm_b: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` cosine of ``a[j]`` and ``b[j]`` (``[n, D]`` each), float32: ``<a, b> / max(|a| |b|, 1e-8)``.
    ``norm_a`` / ``norm_b``: the row norms when already known (each frame's are computed once per video)."""
    a, b = a.detach().float(), b.detach().float()
    norm_a = torch.linalg.vector_norm(a, dim=-1) if norm_a is None else norm_a
    norm_b = torch.linalg.vector_norm(b, dim=-1) if norm_b is None else norm_b
    return torch.linalg.vecdot(a, b) / (norm_a * norm_b).clamp_min(COSINE_EPS)


def uniform_positions(grid: tuple[int, int], num_prefix_tokens: int, k: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``k`` sorted indices spread over the grid: prefix tokens first, then the centre token of each of ``k``
    cells of an adaptive ``(r, c)`` grid (``pool``'s ``sample`` mode, vectorised): cells
    ``round(linspace(0, r c - 1, k))``, cell rows ``[floor(i R / r), ceil((i + 1) R / r))`` and likewise columns."""
    prefix = min(int(num_prefix_tokens), int(k))
    k_grid = int(k) - prefix
    head = torch.arange(prefix, dtype=torch.long, device=device)
    if k_grid <= 0:
        return head
    rows, cols = int(grid[0]), int(grid[1])
    r, c = pooling_grid(rows, cols, k_grid)
    if k_grid > 1:
        cells = torch.linspace(0, r * c - 1, k_grid, device=device).round().long()
    else:
        cells = torch.tensor([(r * c - 1) // 2], dtype=torch.long, device=device)
    ci, cj = cells // c, cells % c
    r0, r1 = (ci * rows) // r, -((-(ci + 1) * rows) // r)
    c0, c1 = (cj * cols) // c, -((-(cj + 1) * cols) // c)
    centres = int(num_prefix_tokens) + ((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2
    return torch.cat([head, torch.sort(centres).values])


def _check_k(k) -> float | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(float(k)):
        raise ValueError(f"dycoke k must be None or a number in [0, 1] (the reference's pruned fraction of a "
                         f"pruned frame), got {k!r}")
    if not 0.0 <= float(k) <= 1.0:
        raise ValueError(f"dycoke k must be in [0, 1] (the reference's pruned fraction of a pruned frame), got {k!r}")
    return float(k)


# ==================================================================================================== the compressor
@register
@dataclass
class DyCoke(VideoCompressor):
    """DyCoke's temporal token merging (stage 1) at an exact video budget (docs/methods/dycoke.md).

    Windows of 4 frames: the window's first frame stays whole, each odd frame keeps its tokens least similar
    (same-position cosine) to the frame before, the third frame those least similar to the window's first (the last
    window's third frame stays whole). The pruned frames share what the anchors leave of the budget evenly; below the
    anchors' total they are emptied and each anchor keeps its tokens least similar to the previous anchor (the first
    frame, having none, a uniform spatial subset). An image (one frame) is that first frame: a uniform subset.

    Options:
      k: ``None`` (default): the pruned frames' keep count comes from the budget. A number in [0, 1]: the
        reference's ``dycoke_k`` (pruned fraction; the lmms-eval wrapper and README use 0.7); the resolved video
        budget must then equal ``reference_budget(T, n, k)`` or ``select_video`` raises, so a fixed ratio is never
        silently traded for a different token count.
    """

    name = "dycoke"
    video_only = True
    k: float | None = None

    def __post_init__(self):
        _check_k(self.k)

    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        check_video_budget(budget)
        frames = video.frames
        layouts = {(tuple(f.grid), f.num_prefix_tokens) for f in frames}
        if len(layouts) != 1:
            raise ValueError("dycoke compares tokens at the same position across frames, so every frame of a video "
                             f"needs the same grid and prefix tokens; got (grid, prefix) {sorted(layouts)} (resize "
                             "the frames / images to one size)")
        n = frames[0].num_tokens
        num = len(frames)
        total = min(int(budget), n * num)
        k = _check_k(self.k)
        if k is not None:
            expected = reference_budget(num, n, k)
            if total != expected:
                raise ValueError(f"dycoke k={k} keeps {expected} of the {n * num} tokens of this video ({num} frames "
                                 f"of {n}), but its budget is {total}; pass budget={expected} (or the ratio "
                                 f"{expected}/{n * num}) to reproduce the reference, or k=None to prune to the budget")
        roles, refs = dycoke_roles(num)
        budgets, cut = frame_budgets(roles, n, total)

        device = frames[0].features.device
        similarity = torch.full((num, n), float("nan"), dtype=torch.float32, device=device)
        norms = [torch.linalg.vector_norm(f.features.detach().float().to(device), dim=-1) for f in frames]
        for t, r in enumerate(refs):
            if r >= 0:
                similarity[t] = same_position_cosine(frames[t].features.to(device), frames[r].features.to(device),
                                                     norms[t], norms[r])

        records = []
        for t, frame in enumerate(frames):
            b, r = budgets[t], refs[t]
            dev = frame.features.device
            scores = None if r < 0 else (1.0 - similarity[t]).to(dev)
            if b == n:
                indices, rule = torch.arange(n, dtype=torch.long, device=dev), "all"
            elif b == 0:
                indices, rule = torch.zeros(0, dtype=torch.long, device=dev), "none"
            elif r >= 0:
                indices, rule = top_k_sorted(scores, b), "dissimilar"
            else:
                indices, rule = uniform_positions(frame.grid, frame.num_prefix_tokens, b, dev), "uniform"
            details = DyCokeFrameDetails(signals=(), role=roles[t], reference=r, rule=rule)
            selection = Selection(indices=indices, scores=scores, details=details)
            records.append(FrameRecord(frame=t, budget=b, selection=selection, keyframe=roles[t] == ANCHOR,
                                       extra={"role": roles[t], "reference": r, "rule": rule}))
        pruned = [b for b, role in zip(budgets, roles) if role != ANCHOR]
        k_eff = (1.0 - sum(pruned) / (len(pruned) * n)) if pruned and n else None
        details = DyCokeDetails(signals=(), roles=roles, references=refs, budgets=tuple(budgets), anchors_cut=cut,
                                k=k_eff, similarity=similarity)
        return VideoSelection(records, budget=total, details=details)


__all__ = ["DyCoke", "DyCokeDetails", "DyCokeFrameDetails", "dycoke_roles", "frame_budgets", "reference_budget",
           "reference_keep", "same_position_cosine", "uniform_positions"]
