"""EVS, Efficient Video Sampling (arXiv 2510.14624, NVIDIA; vLLM PR #22980): drop the tokens that did not change
since the previous frame.

Features only (no attention, no query). For every spatial position of every frame after the first, the
dissimilarity ``1 - cos`` between its token and the token at the same position of the previous frame; the first
frame is always kept; the video keeps the global top-``K`` tokens by dissimilarity (ties to the earlier token), with
``K`` the video budget -- so static patches go first, wherever they are, and frames keep different counts. The
embedding-space cosine is vLLM's / SGLang's rule (the paper compares RGB patches). See docs/methods/evs.md (rule,
budgets below one frame, frames of different grids, positions, deviations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget_split import even_budgets
from ..compressor import VisualTokens, register, top_k_sorted
from ..selection import Details, Selection
from ..video import (
    FrameRecord,
    VideoCompressor,
    VideoSelection,
    VideoTokens,
    check_video_budget,
)

#: the dissimilarity of a token that is not compared with anything (first frame / anchor): above any ``1 - cos``
#: (at most 2), so it is kept before every compared token; vLLM writes 255
ANCHOR = math.inf
#: a dissimilarity at most this is float noise of identical tokens (fp32 ``1 - cos`` of a vector with itself is up
#: to ~1e-7) and snaps to 0, so identical patches tie exactly and the earlier one wins, not the rounding
TOLERANCE = 1e-6


@dataclass(frozen=True)
class EVSFrameDetails(Details):
    """What EVS decided for one frame (``FrameRecord.selection.details``); ``signals`` is ``()``.

    Fields:
      anchor: ``True`` for the first frame and for a frame whose token layout (grid, prefix tokens) differs from
        the previous frame's: its tokens are not compared and count as ``+inf`` dissimilarity (always kept first).
      subsampled: ``True`` when the budget could not cover the anchor tokens and this anchor frame kept a spatially
        uniform subsample of its grid (``spread_indices``) instead of all its tokens.
    ``Selection.scores`` (``[n]``) is each token's dissimilarity ``1 - cos`` to the same position in the previous
    frame, ``+inf`` on an anchor frame.
    """

    anchor: bool
    subsampled: bool


@dataclass(frozen=True)
class EVSDetails(Details):
    """What EVS decided for one video (``VideoSelection.details``); ``signals`` is ``()``.

    Fields (one entry per frame, time order):
      anchors: whether each frame is an anchor (see ``EVSFrameDetails.anchor``).
      anchor_tokens: tokens of all anchor frames together (``A``).
      subsampled: ``True`` when ``budget < A``: only anchor frames keep tokens, the budget split evenly over them
        (``even_budgets``) and each keeps a spatially uniform subsample of its grid.
      threshold: the lowest dissimilarity among the compared tokens kept (``None`` when none is kept, e.g.
        ``budget <= A``); every compared token above it is kept, and of those equal to it the earlier ones.
      kept: ``T`` ints, tokens each frame keeps (they sum to the video budget).
    """

    anchors: tuple[bool, ...]
    anchor_tokens: int
    subsampled: bool
    threshold: float | None
    kept: tuple[int, ...]


def _centres(size: int, parts: int) -> list[int]:
    # the cell nearest the middle of each of ``parts`` equal stretches of ``size`` cells: floor((2i + 1) size / 2parts)
    return [((2 * i + 1) * size) // (2 * parts) for i in range(parts)]


def spread_indices(grid: tuple[int, int], k: int, num_prefix_tokens: int = 0) -> list[int]:
    """``k`` token indices of one frame spread uniformly over its ``(rows, cols)`` grid, ascending.

    Prefix tokens (a CLS kept by LLaVA's ``"full"`` strategy) come first. The rest (``m = k - prefix`` cells) lie on
    ``h`` rows, ``h = clip(round(sqrt(m * rows / cols)), ceil(m / cols), rows)`` (about as many per row as the
    aspect ratio gives rows), the rows at the middles of ``h`` equal bands (``floor((2i + 1) rows / 2h)``), ``m``
    split evenly over them (remainder to the upper rows) and each row's share at the middles of equal column bands.
    Exactly ``k`` distinct indices for ``0 <= k <= prefix + rows * cols`` -- never the first ``k`` in raster order.
    """
    rows, cols = int(grid[0]), int(grid[1])
    n = num_prefix_tokens + rows * cols
    if not 0 <= k <= n:
        raise ValueError(f"cannot spread {k} tokens over a frame of {n}")
    prefix = min(num_prefix_tokens, k)
    out = list(range(prefix))
    m = k - prefix
    if m == 0:
        return out
    if m == rows * cols:
        return out + list(range(num_prefix_tokens, n))
    h = min(rows, max(-(-m // cols), math.floor(math.sqrt(m * rows / cols) + 0.5), 1))
    for r, share in zip(_centres(rows, h), even_budgets(m, [cols] * h)):
        out += [num_prefix_tokens + r * cols + c for c in _centres(cols, share)]
    return out


def dissimilarities(frames: list[VisualTokens]) -> tuple[list[torch.Tensor], list[bool]]:
    """Per frame ``[n_t]`` fp32 ``1 - cos(x_t[i], x_{t-1}[i])`` (vLLM's ``compute_retention_mask``), and whether
    the frame is an anchor (``+inf`` everywhere): the first frame, and every frame whose layout -- grid and prefix
    tokens -- differs from the previous frame's, since its positions have no counterpart.

    ``cos = a.b / max(|a| |b|, 1e-8)`` (a zero vector has cosine 0, dissimilarity 1); values up to ``TOLERANCE``
    snap to 0. On a CPU each frame's norms are computed once and each pair costs one row-wise dot product (a few
    passes over the features, no stacked copy of the video); on an accelerator, frames of one layout are stacked
    and compared in a handful of batched kernels instead of several per frame.
    """
    layouts = [(f.grid, f.num_prefix_tokens) for f in frames]
    anchors = [t == 0 or layouts[t] != layouts[t - 1] for t in range(len(frames))]
    device = frames[0].features.device
    if device.type != "cpu" and len(frames) > 1 and not any(anchors[1:]):
        x = torch.stack([f.features.detach() for f in frames]).float()  # [T, n, D]
        norms = x.norm(dim=-1)
        d = 1.0 - (x[1:] * x[:-1]).sum(dim=-1) / (norms[1:] * norms[:-1]).clamp_min(1e-8)
        d = torch.where(d <= TOLERANCE, torch.zeros_like(d), d)
        first = torch.full((1, d.shape[1]), ANCHOR, dtype=torch.float32, device=device)
        return list(torch.cat([first, d]).unbind(0)), anchors
    feats = [f.features.detach().to(device=device, dtype=torch.float32) for f in frames]
    norms = [x.norm(dim=-1) for x in feats]
    out = []
    for t, x in enumerate(feats):
        if anchors[t]:
            out.append(torch.full((x.shape[0],), ANCHOR, dtype=torch.float32, device=device))
            continue
        d = 1.0 - (x * feats[t - 1]).sum(dim=-1) / (norms[t] * norms[t - 1]).clamp_min(1e-8)
        out.append(torch.where(d <= TOLERANCE, torch.zeros_like(d), d))
    return out, anchors


@register
@dataclass
class EVS(VideoCompressor):
    """EVS: keep the tokens that changed most since the previous frame, the first frame whole
    (docs/methods/evs.md).

    ``K`` = the video budget. The first frame (every anchor frame) is kept whole when ``K`` covers it, and the other
    ``K - A`` tokens are the global top by ``1 - cos`` to the same position of the previous frame (stable: ties to
    the earlier token). When ``K`` is below the anchor tokens ``A`` -- vLLM never goes there, it floors ``K`` at one
    frame -- the anchor frames share ``K`` evenly and each keeps a spatially uniform subsample of its grid
    (``spread_indices``). An image (``select``) is a one-frame video, so it keeps that uniform subsample.

    Options: none (the reference's only knob, the pruning rate ``q``, is vtc's budget).
    """

    name: ClassVar[str] = "evs"
    video_only: ClassVar[bool] = True

    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        check_video_budget(budget)
        frames = video.frames
        sizes = video.frame_sizes
        device = frames[0].features.device
        total = min(int(budget), sum(sizes))
        dissim, anchors = dissimilarities(frames)
        anchor_tokens = sum(n for n, a in zip(sizes, anchors) if a)
        subsampled = total < anchor_tokens
        threshold = None
        spread = [False] * len(frames)
        if subsampled:
            shares = even_budgets(total, [n if a else 0 for n, a in zip(sizes, anchors)])
            kept = []
            for t, (f, b) in enumerate(zip(frames, shares)):
                spread[t] = anchors[t] and b < sizes[t]
                kept.append(torch.tensor(spread_indices(f.grid, b, f.num_prefix_tokens), dtype=torch.long,
                                         device=device))
        else:
            flat = torch.cat(dissim)
            picked = top_k_sorted(flat, total)  # ties to the earlier token: a stable descending sort
            counts = torch.bincount(torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                            torch.tensor(sizes, device=device))[picked],
                                    minlength=len(sizes))
            offsets = torch.tensor(video.offsets(), device=device)
            frame_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
            kept = list(torch.split(picked - offsets[frame_of], counts.tolist()))
            chosen = flat[picked]
            finite = chosen[torch.isfinite(chosen)]
            threshold = float(finite.min()) if finite.numel() else None
        records = []
        for t, idx in enumerate(kept):
            details = EVSFrameDetails(signals=(), anchor=anchors[t], subsampled=spread[t])
            selection = Selection(indices=idx.to(torch.long), scores=dissim[t], details=details)
            records.append(FrameRecord(frame=t, budget=int(idx.numel()), selection=selection, keyframe=anchors[t]))
        details = EVSDetails(signals=(), anchors=tuple(anchors), anchor_tokens=anchor_tokens, subsampled=subsampled,
                             threshold=threshold, kept=tuple(r.budget for r in records))
        return VideoSelection(records, budget=total, details=details)
