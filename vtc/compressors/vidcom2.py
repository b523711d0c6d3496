"""VidCom2 (arXiv 2505.14454, EMNLP'25): frames share a video's budget by their uniqueness, and each frame keeps the
tokens most distinct from both the video and the frame.

Features only (no attention, no query). On the lowest-variance half of the channels, L2-normalised, each token gets
a multi-scale Gaussian similarity to the video's mean token (``s_v``) and to its frame's mean token (``s_f``). A frame
whose tokens are far from the video centre (high uniqueness ``u_t = -mean_i s_v``) gets a larger share of the budget
through a sharp softmax; inside every frame the tokens with the lowest ``s_v + s_f`` are kept. vtc's budget replaces
the reference's ratio and the per-frame counts are a water-fill of the frame weights, so they sum exactly to the
budget. See docs/methods/vidcom2.md (rule, exact budgets, deviations from the reference).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget_split import water_fill
from ..compressor import register
from ..selection import Details, Selection
from ..video import (
    FrameRecord,
    VideoCompressor,
    VideoSelection,
    VideoTokens,
    check_video_budget,
)

#: the reference's Gaussian bandwidths ``a`` in ``exp(-||x - c||^2 / (2a))``: 2^-3 .. 2^1 (``vidcom2.py`` l.55)
DEFAULT_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class VidCom2FrameDetails(Details):
    """What VidCom2 computed for the tokens of one frame (``FrameRecord.selection.details``); ``signals`` is ``()``.

    Fields (``[n]``: one value per token of the frame, fp32 on the features' device):
      video_similarity: ``[n]`` ``s_v = G(x, c_v)``, the multi-scale Gaussian similarity of each (channel-selected,
        L2-normalised) token to the video centre ``c_v``; in ``(0, len(scales)]``.
      frame_similarity: ``[n]`` ``s_f = G(x, c_t)``, the same to the frame's own centre ``c_t``.
    ``Selection.scores`` is ``s_v + s_f``; the frame keeps its ``k_t`` tokens with the lowest values.
    """

    video_similarity: torch.Tensor
    frame_similarity: torch.Tensor


@dataclass(frozen=True)
class VidCom2Details(Details):
    """What VidCom2 decided for one video (``VideoSelection.details``); ``signals`` is ``()``.

    Fields (one entry per frame, time order; float64 on the CPU unless noted):
      channels: ``LongTensor [C']`` the feature channels scored (the ``C' = max(1, int(channel_ratio * D))`` of
        lowest variance over all the video's tokens), ascending.
      ratio: ``rho = budget / N``, the kept fraction the reference calls ``R_RATIO``.
      uniqueness: ``[T]`` ``u_t = -mean_i s_v[t, i]`` (``FrameRecord.score``; ``-inf`` for a frame without tokens,
        which then gets ``p = w = 0``).
      probs: ``[T]`` ``p = softmax((u - max u) / temperature)``.
      weights: ``[T]`` ``w_t = 1 + p_t - mean p`` (the reference's ``scale_t / rho`` before the cap at 1;
        ``FrameRecord.weight``).
      budgets: ``T`` ints, tokens each frame keeps: the water-fill of ``w_t * n_t`` capped at ``n_t`` with the floor
        ``min_per_frame`` (they sum to the video budget).
    """

    channels: torch.Tensor
    ratio: float
    uniqueness: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    budgets: tuple[int, ...]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def channel_variance(parts: list[torch.Tensor]) -> torch.Tensor:
    """``[D]`` fp32 population variance of every channel over all rows of ``parts`` (``[n_t, D]`` each), without
    concatenating them: sums of ``d = x - m_0`` and ``d^2`` accumulated part by part (``m_0`` the first part's mean,
    so ``E[d^2] - E[d]^2`` does not cancel when a channel's mean dwarfs its spread). Column sums are products with a
    ones vector -- several times faster on a CPU than ``torch.var(dim=0)`` of the whole video. On an accelerator the
    parts are concatenated first (one pass of a few kernels instead of several kernels per frame)."""
    if len(parts) > 1 and parts[0].device.type != "cpu":  # an accelerator: a few big kernels beat many small ones
        parts = [torch.cat([p.detach() for p in parts])]
    ref = parts[0].detach().float().mean(dim=0)
    s1, s2, count = torch.zeros_like(ref), torch.zeros_like(ref), 0
    for part in parts:
        d = part.detach().float() - ref
        ones = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
        s1 += ones @ d
        s2 += ones @ (d * d)
        count += d.shape[0]
    mean = s1 / count
    return (s2 / count - mean * mean).clamp_min(0.0)


def low_variance_channels(x: torch.Tensor | list[torch.Tensor], ratio: float) -> torch.Tensor:
    """Ascending indices of the ``max(1, int(ratio * D))`` channels of ``x`` (``[N, D]``, or a list of
    ``[n_t, D]`` frames) with the lowest population variance over all tokens (ties to the lower channel): VidCom2
    scores tokens on the channels that vary least, where an outlier stands out against a stable background."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    variance = channel_variance(parts)
    keep = max(1, int(variance.shape[0] * ratio))
    order = torch.sort(variance, stable=True).indices[:keep]
    return torch.sort(order).values


def multi_scale_gaussian(squared_distance: torch.Tensor, scales: tuple[float, ...] = DEFAULT_SCALES) -> torch.Tensor:
    """``G = sum_a exp(-d^2 / (2a))`` over the bandwidths ``scales`` (``d^2``: squared distances, any shape)."""
    return sum(torch.exp(-squared_distance / (2.0 * float(a))) for a in scales)


def _per_frame(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | torch.Tensor:
    # frames of one size: a [T, n, ...] view (one batched op per step); otherwise the list of each frame's rows
    if len(set(sizes)) == 1:
        return x.reshape(len(sizes), sizes[0], *x.shape[1:])
    return list(torch.split(x, sizes))


def vidcom2_scores(frames: list[torch.Tensor], channel_ratio: float = 0.5,
                   scales: tuple[float, ...] = DEFAULT_SCALES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VidCom2's token similarities of a video given as its frames' features (``[n_t, D]`` each, ``n_t >= 1``).

    Returns ``(s_v, s_f, channels)``: ``s_v [N]`` and ``s_f [N]`` (fp32, frames concatenated in time order) the
    multi-scale Gaussian similarity of every token to the video centre and to its frame's centre, both computed on
    the ``channels`` of lowest variance with every token L2-normalised there (``F.normalize``: a zero vector stays
    zero); centres are plain means of the normalised tokens (not re-normalised), as the reference.

    Squared distances are expanded, ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2`` (``|x|^2`` is 1, or 0 for a zero vector),
    so they cost a matrix-vector product per centre instead of an ``[N, C]`` difference; clamped at 0.
    """
    sizes = [int(f.shape[0]) for f in frames]
    device = frames[0].device
    channels = low_variance_channels(frames, channel_ratio).to(device)
    if device.type != "cpu":  # an accelerator: one gather of the concatenated video
        x = torch.cat([f.detach() for f in frames]).index_select(-1, channels).float()
    else:  # gather the channels frame by frame: no copy of the whole video
        x = torch.empty(sum(sizes), int(channels.numel()), dtype=torch.float32, device=device)
        start = 0
        for f, n in zip(frames, sizes):
            x[start:start + n] = f.detach().index_select(-1, channels)
            start += n
    norm = x.norm(dim=-1)
    scale = norm.clamp_min(1e-12)  # F.normalize's eps
    x /= scale[:, None]
    sq = (norm / scale).pow(2)
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=device)
    video_centre = (ones @ x) / x.shape[0]
    d_v = (sq - 2.0 * (x @ video_centre) + video_centre.dot(video_centre)).clamp_min(0.0)
    grouped = _per_frame(x, sizes)
    if isinstance(grouped, torch.Tensor):  # [T, n, C]
        t, n = grouped.shape[:2]
        centres = torch.bmm(torch.ones(t, 1, n, dtype=x.dtype, device=device), grouped) / n  # [T, 1, C]
        cross = torch.bmm(grouped, centres.transpose(1, 2)).reshape(t, n)
        d_f = (sq.reshape(t, n) - 2.0 * cross + centres.pow(2).sum(dim=-1)).reshape(-1)
    else:
        d_f = torch.cat([sq_t - 2.0 * (part @ c) + c.dot(c) for part, sq_t, c in
                         ((p, q, p.mean(dim=0)) for p, q in zip(grouped, torch.split(sq, sizes)))])
    return multi_scale_gaussian(d_v, scales), multi_scale_gaussian(d_f.clamp_min(0.0), scales), channels


def frame_weights(uniqueness: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, w)``: ``p = softmax((u - max u) / temperature)`` and the frame weights ``w = 1 + p - mean p`` (float64).

    The reference keeps ``rho * w_t`` of frame ``t`` (capped at 1): with a small temperature ``p`` is nearly
    one-hot, so the most unique frame gets about ``2 rho`` and every other about ``rho (1 - 1/T)``; equal
    uniquenesses give ``w = 1`` everywhere."""
    u = uniqueness.detach().double()
    p = torch.softmax((u - u.max()) / float(temperature), dim=0)
    return p, 1.0 + p - p.mean()


def keep_lowest_per_frame(scores: torch.Tensor, sizes: list[int], budgets: list[int]) -> list[torch.Tensor]:
    """Per frame, the ascending indices (into the frame) of its ``budgets[t]`` tokens with the lowest ``scores``
    (``[N]``, frames concatenated); ties to the lower index. One sort for the whole video, no loop over tokens."""
    device = scores.device
    frame_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    order = torch.sort(scores, stable=True).indices  # by score, ties to the lower (earlier) token
    order = order[torch.sort(frame_of[order], stable=True).indices]  # grouped by frame, score order inside
    starts = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device) - starts[frame_of[order]]
    kept = rank < torch.tensor(budgets, device=device)[frame_of]
    flat = kept.nonzero().flatten()
    local = flat - starts[frame_of[flat]]
    return list(torch.split(local, [int(b) for b in budgets]))


@register
@dataclass
class VidCom2(VideoCompressor):
    """VidCom2: uniqueness-driven frame budgets, then the tokens most distinct from the video and frame centres
    (docs/methods/vidcom2.md).

    An image (``select``) is a one-frame video: the frame takes the whole budget (``w = 1``) and keeps the ``k``
    tokens with the lowest ``2 G(x, c)``, i.e. those farthest from the image's mean token on its low-variance
    channels.

    Options (the reference's constants unless noted):
      temperature: of the frame softmax ``p = softmax((u - max u) / temperature)`` (0.01, ``compute_scales``).
      channel_ratio: fraction of channels scored, the lowest-variance ones (0.5, ``select_low_var_channels``);
        in (0, 1], at least one channel.
      scales: Gaussian bandwidths ``a`` of ``G = sum_a exp(-d^2 / (2a))`` ((1/8, 1/4, 1/2, 1, 2), the reference's
        ``2**k`` for ``k = -3..1``); a non-empty tuple of positive numbers.
      min_per_frame: tokens every frame keeps at least (1, the reference's ``max(1, round(.))``; vtc lowers it to
        ``budget // T`` when the budget cannot give every frame that many, and 0 lets a frame be dropped).
    """

    name: ClassVar[str] = "vidcom2"
    video_only: ClassVar[bool] = True

    temperature: float = 0.01
    channel_ratio: float = 0.5
    scales: tuple[float, ...] = DEFAULT_SCALES
    min_per_frame: int = 1

    def __post_init__(self):
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"vidcom2 temperature must be a finite number > 0 (the reference's 0.01), "
                             f"got {self.temperature!r}")
        if not _is_number(self.channel_ratio) or not 0 < self.channel_ratio <= 1:
            raise ValueError(f"vidcom2 channel_ratio must be a number in (0, 1] (fraction of lowest-variance "
                             f"channels scored; the reference's 0.5), got {self.channel_ratio!r}")
        if not isinstance(self.scales, (tuple, list)) or not self.scales or not all(
                _is_number(a) and math.isfinite(a) and a > 0 for a in self.scales):
            raise ValueError(f"vidcom2 scales must be a non-empty tuple of finite numbers > 0 (Gaussian "
                             f"bandwidths; the reference's (1/8, 1/4, 1/2, 1, 2)), got {self.scales!r}")
        self.scales = tuple(float(a) for a in self.scales)
        if isinstance(self.min_per_frame, bool) or not isinstance(self.min_per_frame, int) or self.min_per_frame < 0:
            raise ValueError(f"vidcom2 min_per_frame must be an int >= 0 (tokens per frame; the reference's 1), "
                             f"got {self.min_per_frame!r}")

    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        check_video_budget(budget)
        sizes = video.frame_sizes
        total_tokens = sum(sizes)
        device = video.frames[0].features.device
        live = [t for t, n in enumerate(sizes) if n > 0]  # frames with tokens (a video frame always has some)
        uniqueness = torch.full((len(sizes),), -math.inf, dtype=torch.float64)
        probs = torch.zeros(len(sizes), dtype=torch.float64)
        weights = torch.zeros(len(sizes), dtype=torch.float64)
        if live:
            s_v, s_f, channels = vidcom2_scores([video.frames[t].features for t in live],
                                                float(self.channel_ratio), self.scales)
            s_v, s_f = s_v.to(device), s_f.to(device)
            grouped = _per_frame(s_v.double(), [sizes[t] for t in live])
            mean_v = grouped.mean(dim=1) if isinstance(grouped, torch.Tensor) else torch.stack(
                [part.mean() for part in grouped])
            u = -mean_v.cpu()
            p, w = frame_weights(u, float(self.temperature))
            index = torch.tensor(live)
            uniqueness[index], probs[index], weights[index] = u, p, w
        else:
            s_v = s_f = torch.zeros(0, device=device)
            channels = torch.zeros(0, dtype=torch.long)
        budgets = water_fill(budget, weights * torch.tensor(sizes, dtype=torch.float64), sizes,
                             floor=self.min_per_frame)
        score = s_v + s_f
        kept = keep_lowest_per_frame(score, sizes, budgets)
        v_parts, f_parts, s_parts = torch.split(s_v, sizes), torch.split(s_f, sizes), torch.split(score, sizes)
        records = []
        for t, (b, idx) in enumerate(zip(budgets, kept)):
            details = VidCom2FrameDetails(signals=(), video_similarity=v_parts[t], frame_similarity=f_parts[t])
            selection = Selection(indices=idx.to(torch.long), scores=s_parts[t], details=details)
            records.append(FrameRecord(frame=t, budget=int(b), selection=selection,
                                       score=float(uniqueness[t]), weight=float(weights[t])))
        details = VidCom2Details(signals=(), channels=channels.cpu(),
                                 ratio=min(int(budget), total_tokens) / total_tokens if total_tokens else 0.0,
                                 uniqueness=uniqueness, probs=probs, weights=weights,
                                 budgets=tuple(int(b) for b in budgets))
        return VideoSelection(records, budget=sum(budgets), details=details)
