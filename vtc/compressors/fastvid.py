"""FastVID (arXiv 2503.11187, NeurIPS'25): dynamic temporal segments, then salient + density-peak tokens per segment.

DySeg cuts the video where consecutive frame means turn away from each other (cosine below ``cut_threshold``) and
at the ``min_segments - 1`` largest turns. Each segment gets its share of the video budget; of it ``context_ratio``
goes to *context* tokens, chosen by density-peak clustering (DPC-kNN) on *anchor* frames (every
``anchor_spacing``-th frame from the segment's end), and the rest to *salient* tokens, the top attention of every
frame. DTM then merges every token of the segment that was not kept into its most similar context token of each
anchor frame, ``target <- w * target + (1 - w) * mean(assigned)``, ``w = max(1 / (count + 1), beta)``. Outputs keep
an original token's slot; the merges are linear and stated as weights. Exactly the video budget is kept. See
docs/methods/fastvid.md (the rule, options per family, deviations from the reference code).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget_split import split_budget
from ..compressor import find_signal, register
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo
from ..video import (
    FrameRecord,
    VideoCompressor,
    VideoSelection,
    VideoTokens,
    check_video_budget,
)

#: neighbours of the DPC-kNN density, the token itself included (the reference's ``topk(dist, k=4)`` over a distance
#: matrix whose diagonal is 0)
DENSITY_NEIGHBOURS = 4
#: ``floor(R * d)`` is computed as ``floor(R * d + FLOOR_SLACK)``: ``100 * 0.57`` is 56.99999999999999 in floating
#: point, and the context count is 57, as on paper.
FLOOR_SLACK = 1e-9

_ATTENTION_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)


# ==================================================================================================== records
@dataclass(frozen=True)
class FastVIDFrameDetails(Details):
    """One frame's part of FastVID (``FrameRecord.selection.details``); ``signals``: the attention it ranked by
    (``()`` for a frame with no tokens). Indices are into the frame's own tokens, ascending.

    Fields:
      segment: index of the DySeg segment the frame belongs to.
      quota: whether the frame has a salient quota (``False``: collapsed by ``segment_ignore`` -- it keeps tokens
        only when the quota frames cannot hold the segment's budget).
      anchor: whether the frame is an anchor of its segment (context tokens chosen here by DPC-kNN).
      salient: ``LongTensor [s]`` the top-attention tokens kept (overflow included).
      context: ``LongTensor [c]`` the density peaks kept (empty unless an anchor with a context quota).
      density: ``[N]`` float32 ``rho_i`` of the DPC candidates (the anchor's non-salient tokens), ``NaN`` at the
        other tokens; ``None`` when the frame ran no DPC.
      distance: ``[N]`` float32 ``delta_i`` of the candidates (distance to the nearest denser one), ``NaN``
        elsewhere; ``None`` likewise. The DPC score is ``density * distance``.
      absorbed: ``LongTensor [K]`` per kept token (``Selection.indices`` order), how many tokens of its segment were
        merged into it (0 for salient tokens).
    """

    segment: int
    quota: bool
    anchor: bool
    salient: torch.Tensor
    context: torch.Tensor
    density: torch.Tensor | None
    distance: torch.Tensor | None
    absorbed: torch.Tensor


@dataclass(frozen=True)
class FastVIDDetails(Details):
    """What FastVID decided for one video (``VideoSelection.details``); ``signals``: the attention the frames read.

    Fields (per frame: one entry per frame, time order):
      similarities: ``[T - 1]`` float64 ``cos(g_t, g_{t+1})`` of consecutive frame means.
      cuts: steps ``t`` (ascending) after which a segment ends (a cut between frame ``t`` and ``t + 1``).
      segments: ``(start, stop)`` frame range of each segment.
      segment_budgets: tokens each segment keeps (they sum to the video budget).
      salient_budgets: per frame, the salient quota (overflow excluded).
      context_budgets: per frame, the context quota (anchor frames only).
      overflow: per frame, top-attention tokens kept beyond its quotas because capped frames could not hold the
        segment's budget (0 normally).
      quota: per frame, whether it has a salient quota (all ``True`` unless ``segment_ignore`` collapses frames).
      anchors: per frame, whether it is an anchor frame.
    Each frame keeps ``salient_budgets + context_budgets + overflow`` tokens (``FrameRecord.budget``).
    """

    similarities: torch.Tensor
    cuts: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]
    segment_budgets: tuple[int, ...]
    salient_budgets: tuple[int, ...]
    context_budgets: tuple[int, ...]
    overflow: tuple[int, ...]
    quota: tuple[bool, ...]
    anchors: tuple[bool, ...]


# ==================================================================================================== pure rules
def dyseg_cuts(similarities: torch.Tensor, min_segments: int, threshold: float) -> list[int]:
    """DySeg: the steps ``t`` (cut between frame ``t`` and ``t + 1``) that end a segment, ascending.

    The union of the ``min(c - 1, T - 1)`` smallest similarities (``c = min_segments``; ties to the earlier step)
    and every step with ``similarity < threshold``. ``similarities`` is ``[T - 1]``: ``cos(g_t, g_{t+1})``.
    """
    s = similarities.detach().double().reshape(-1).cpu()
    forced = min(max(int(min_segments) - 1, 0), int(s.numel()))
    smallest = torch.sort(s, stable=True).indices[:forced].tolist()
    below = (s < threshold).nonzero().flatten().tolist()
    return sorted(set(smallest) | set(below))


def segment_bounds(num_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of the segments that the cut steps ``cuts`` make of ``num_frames`` frames."""
    stops = [c + 1 for c in cuts] + [num_frames]
    out, start = [], 0
    for stop in stops:
        if stop > start:
            out.append((start, stop))
            start = stop
    return out


def quota_frames(similarities: torch.Tensor, ignore: float | None) -> list[bool]:
    """DySeg_ignore inside one segment of ``L`` frames (``similarities`` its ``[L - 1]`` consecutive cosines):
    frame ``t`` gets a salient quota when it is the last one of a run of steps with cosine ``>= ignore`` --
    i.e. ``t = L - 1`` or ``similarities[t] < ignore``. ``ignore = None``: every frame has a quota."""
    s = similarities.detach().double().reshape(-1).cpu()
    length = int(s.numel()) + 1
    if ignore is None:
        return [True] * length
    return [bool(s[t] < ignore) for t in range(length - 1)] + [True]


def anchor_frames(quota: list[bool], spacing: int) -> list[bool]:
    """Anchors of a segment: among the frames with a quota ``v_0 .. v_{V-1}``, those with ``(V - 1 - j) % p == 0``
    (every ``p``-th counted from the segment's end, so the last quota frame is always one): ``ceil(V / p)``."""
    positions = [t for t, q in enumerate(quota) if q]
    count = len(positions)
    out = [False] * len(quota)
    for j, t in enumerate(positions):
        if (count - 1 - j) % spacing == 0:
            out[t] = True
    return out


def allocate_segment(budget: int, sizes: list[int], quota: list[bool], anchors: list[bool],
                     context_ratio: float) -> tuple[list[int], list[int], list[int]]:
    """Per-frame ``(salient, context, overflow)`` counts of one segment, summing exactly to ``min(budget, sum)``.

    ``C = floor(R * d)`` context tokens over the anchors evenly (the remainder to the latest anchors), each at most
    ``n_a // 2``; ``R - C`` salient tokens over the quota frames evenly (the remainder to the earliest), each at most
    ``n_t - context_t``. What caps leave over is kept by attention as overflow, evenly over the quota frames with
    room, then over the collapsed frames.
    """
    length = len(sizes)
    total = max(0, min(int(budget), sum(sizes)))
    context_total = min(total, math.floor(total * context_ratio + FLOOR_SLACK))
    salient_total = total - context_total
    context = [0] * length
    latest_first = [t for t in range(length - 1, -1, -1) if anchors[t]]
    for t, c in zip(latest_first, split_budget(context_total, [1.0] * len(latest_first),
                                               [sizes[t] // 2 for t in latest_first])):
        context[t] = c
    salient = [0] * length
    with_quota = [t for t in range(length) if quota[t]]
    for t, s in zip(with_quota, split_budget(salient_total, [1.0] * len(with_quota),
                                             [sizes[t] - context[t] for t in with_quota])):
        salient[t] = s
    overflow = [0] * length
    left = total - sum(context) - sum(salient)
    for group in (with_quota, [t for t in range(length) if not quota[t]]):
        if left <= 0:
            break
        room = [sizes[t] - context[t] - salient[t] for t in group]
        for t, e in zip(group, split_budget(left, [1.0] * len(group), room)):
            overflow[t] = e
            left -= e
    return salient, context, overflow


def dpc_knn(x: torch.Tensor, neighbours: int = DENSITY_NEIGHBOURS
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak scores of the rows of ``x [m, D]`` (or of each ``[B, m, D]`` batch item on its own):
    ``(rho, delta, rho * delta)``, each ``[m]`` (``[B, m]``) float32.

    ``d_ij = ||x_i - x_j|| / sqrt(D)``; ``rho_i = exp(-mean of d_ij^2 over the min(neighbours, m) nearest j, i
    itself included)``; ``delta_i = min d_ij over the denser j`` and, for the one token nothing is denser than,
    ``max_ij d_ij``. "Denser" is a strict total order: ``rho_j > rho_i``, equal densities ranked by index (the
    lower one is denser) -- the deterministic stand-in for the reference's ``1e-6 * rand`` jitter.
    """
    batched = x.dim() == 3
    x = (x if batched else x[None]).float()
    b, m, dim = (int(v) for v in x.shape)
    device = x.device
    if m == 0:
        empty = torch.zeros(b, 0, dtype=torch.float32, device=device)
        out = (empty, empty.clone(), empty.clone())
        return out if batched else tuple(o[0] for o in out)
    gram = x @ x.transpose(1, 2)
    gram = 0.5 * (gram + gram.transpose(1, 2))  # exact symmetry: the same pair gets the same distance both ways
    sq = gram.diagonal(dim1=1, dim2=2)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp_min(0.0) / max(dim, 1)
    d2.diagonal(dim1=1, dim2=2).zero_()
    k = min(int(neighbours), m)
    nearest = torch.topk(d2, k, dim=2, largest=False).values
    rho = torch.exp(-nearest.mean(dim=2))
    dist = d2.sqrt()
    index = torch.arange(m, device=device)
    denser = (rho[:, None, :] > rho[:, :, None]) | ((rho[:, None, :] == rho[:, :, None])
                                                   & (index[None, None, :] < index[None, :, None]))
    top = dist.flatten(1).max(dim=1).values[:, None, None].expand_as(dist)
    delta = torch.where(denser, dist, top).min(dim=2).values
    out = (rho, delta, rho * delta)
    return out if batched else tuple(o[0] for o in out)


def dtm_weight(count: torch.Tensor, beta: float) -> torch.Tensor:
    """DTM's weight of a target that absorbs ``count`` tokens: ``max(1 / (count + 1), beta)`` -- the plain mean of the
    target and its tokens, or more weight on the target when ``beta`` is higher; 1 when it absorbs none."""
    return torch.clamp(1.0 / (count.to(torch.float64) + 1.0), min=float(beta))


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest scores (ties to the lower position), ascending."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"fastvid {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"fastvid {name} must be an int >= {low}, got {value!r}")
    return int(value)


# ==================================================================================================== compressor
@register
@dataclass
class FastVID(VideoCompressor):
    """FastVID: DySeg segments, STPrune (salient + DPC-kNN context tokens), DTM merging (docs/methods/fastvid.md).

    On an image (``select``: a one-frame video) it is one segment of one frame: ``k - floor(k * d)`` top-attention
    tokens plus ``floor(k * d)`` density peaks of the rest, every other token merged into its most similar peak.

    Options (defaults: the reference's LLaVA-OneVision / LLaVA-Video scripts, ``scripts/eval.sh``):
      min_segments: DySeg ``c``: the ``c - 1`` lowest consecutive-frame cosines are always cuts (8).
      cut_threshold: DySeg ``tau``: every step with cosine below it is a cut too (0.9; Qwen2.5-VL: 0.84), in [-1, 1].
      context_ratio: STPrune ``d``: share of a segment's budget for context tokens, ``floor(R * d)`` (0.4), in [0, 1].
      anchor_spacing: DTM ``p``: every ``p``-th quota frame, counted from the segment's end, is an anchor (4), >= 1.
      beta: DTM ``beta``: floor of a target's own weight, ``w = max(1 / (count + 1), beta)`` (0.6), in [0, 1].
      segment_ignore: DySeg_ignore: inside a segment, steps with cosine ``>= segment_ignore`` collapse and only the
        last frame of such a run gets a salient quota (``None`` = off, the LLaVA reference; Qwen2.5-VL: 0.95),
        in [-1, 1].
      layer: vision layer of the attention saliency (negative = from the end); ``None`` = the feature layer.

    Records: per frame ``Selection.scores`` ``[n]`` the attention that ranked the salient tokens and a
    ``FastVIDFrameDetails``; per video a ``FastVIDDetails`` (cuts, segments, budgets, anchors). Cross-frame merges are
    stated in ``VideoSelection.flat_groups`` / ``flat_weights``.
    """

    name = "fastvid"
    video_only = True
    min_segments: int = 8
    cut_threshold: float = 0.9
    context_ratio: float = 0.4
    anchor_spacing: int = 4
    beta: float = 0.6
    segment_ignore: float | None = None
    layer: int | None = None

    def __post_init__(self):
        _integer(self.min_segments, "min_segments", 1)
        if not -1.0 <= _real(self.cut_threshold, "cut_threshold") <= 1.0:
            raise ValueError(f"fastvid cut_threshold must be a cosine in [-1, 1], got {self.cut_threshold!r}")
        if not 0.0 <= _real(self.context_ratio, "context_ratio") <= 1.0:
            raise ValueError(f"fastvid context_ratio must be in [0, 1], got {self.context_ratio!r}")
        _integer(self.anchor_spacing, "anchor_spacing", 1)
        if not 0.0 <= _real(self.beta, "beta") <= 1.0:
            raise ValueError(f"fastvid beta must be in [0, 1], got {self.beta!r}")
        if self.segment_ignore is not None and not -1.0 <= _real(self.segment_ignore, "segment_ignore") <= 1.0:
            raise ValueError(f"fastvid segment_ignore must be None or a cosine in [-1, 1], got {self.segment_ignore!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral)):
            raise TypeError(f"fastvid layer must be an int or None, got {self.layer!r}")

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        layer = tower.feature_layer if self.layer is None else int(self.layer)
        return (tower.attention_signal(tower.layer_index(layer)),)

    # ------------------------------------------------------------------------------------------------ the rule
    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        check_video_budget(budget)
        frames = video.frames
        num = len(frames)
        sizes = video.frame_sizes
        offsets = video.offsets()
        total = min(int(budget), sum(sizes))
        device = frames[0].features.device

        attention, read = [], []  # per frame: its saliency [n] and the signal it came from
        for frame in frames:
            if frame.num_tokens == 0:
                attention.append(torch.zeros(0, device=device))
                read.append(())
                continue
            signal = find_signal(frame, _ATTENTION_KINDS, self.layer, "fastvid",
                                 "attention (cls_attention or received_attention)")
            read.append((signal,))
            value = frame.signal(signal).to(device).reshape(-1)
            if value.numel() != frame.num_tokens:
                raise ValueError(f"fastvid: attention signal has {value.numel()} values for a frame of "
                                 f"{frame.num_tokens} tokens")
            attention.append(value)

        # DySeg on the frame means (float64 cosines: cut decisions do not flip on fp32 noise)
        means = torch.stack([f.features.detach().float().mean(dim=0) if f.num_tokens else
                             torch.zeros(f.features.shape[-1], dtype=torch.float32, device=f.features.device)
                             for f in frames]).double().cpu()
        sims = F.cosine_similarity(means[:-1], means[1:], dim=-1) if num > 1 else torch.zeros(0, dtype=torch.float64)
        cuts = dyseg_cuts(sims, self.min_segments, self.cut_threshold)
        segments = segment_bounds(num, cuts)
        seg_sizes = [sum(sizes[a:b]) for a, b in segments]
        seg_budgets = split_budget(total, seg_sizes, seg_sizes)

        salient_n, context_n, overflow_n = [0] * num, [0] * num, [0] * num
        quota, anchors, segment_of = [False] * num, [False] * num, [0] * num
        for s, ((a, b), r) in enumerate(zip(segments, seg_budgets)):
            q = quota_frames(sims[a:b - 1], self.segment_ignore)
            anc = anchor_frames(q, int(self.anchor_spacing))
            sal, ctx, over = allocate_segment(r, sizes[a:b], q, anc, float(self.context_ratio))
            salient_n[a:b], context_n[a:b], overflow_n[a:b] = sal, ctx, over
            quota[a:b], anchors[a:b] = q, anc
            segment_of[a:b] = [s] * (b - a)

        # STPrune: salient tokens by attention, context tokens by DPC-kNN among the rest of an anchor frame
        salient = [_stable_top(attention[t], salient_n[t] + overflow_n[t]) if sizes[t] else
                   torch.zeros(0, dtype=torch.long, device=device) for t in range(num)]
        context = [torch.zeros(0, dtype=torch.long, device=device) for _ in range(num)]
        density: list = [None] * num
        distance: list = [None] * num
        batches: dict = {}  # anchors with the same candidate count run as one batch
        for t in range(num):
            if context_n[t]:
                batches.setdefault(sizes[t] - int(salient[t].numel()), []).append(t)
        for group in batches.values():
            candidates = []
            for t in group:
                rest = torch.ones(sizes[t], dtype=torch.bool, device=device)
                rest[salient[t]] = False
                candidates.append(rest.nonzero().flatten())
            x = torch.stack([frames[t].features.detach().float()[c] for t, c in zip(group, candidates)])
            rho, delta, score = dpc_knn(x)
            for i, (t, c) in enumerate(zip(group, candidates)):
                context[t] = c[_stable_top(score[i], context_n[t])]
                density[t] = torch.full((sizes[t],), float("nan"), device=device).index_copy_(0, c, rho[i])
                distance[t] = torch.full((sizes[t],), float("nan"), device=device).index_copy_(0, c, delta[i])

        kept = [torch.sort(torch.cat([salient[t], context[t]])).values for t in range(num)]
        merges = self._merge(frames, segments, kept, context, offsets)
        return self._assemble(video, total, sims, cuts, segments, seg_budgets, salient_n, context_n, overflow_n,
                              quota, anchors, segment_of, attention, salient, context, density, distance, kept,
                              merges, read)

    # ------------------------------------------------------------------------------------------------ DTM
    def _merge(self, frames, segments, kept, context, offsets):
        """DTM per segment. Returns ``None`` when nothing is merged, else ``(entries, outputs, rows)``: ``entries`` =
        ``(output, member, coefficient)`` flat tensors (one entry per token of each context output's group, the
        output itself included), ``outputs`` the flat indices of the outputs that absorbed tokens and ``rows``
        their merged features ``[M, D]`` float32."""
        outs, members, coefs, merged_flat, merged_rows = [], [], [], [], []
        for a, b in segments:
            anchored = [t for t in range(a, b) if context[t].numel()]
            if not anchored:
                continue
            device = frames[a].features.device
            target_flat = torch.cat([offsets[t] + context[t] for t in anchored])
            targets = torch.cat([frames[t].features.detach().float()[context[t]] for t in anchored])
            width = int(targets.shape[0])
            # the similarity columns as one padded [anchors, widest] block (padding -> an extra column of -inf), so
            # one argmax assigns a token to its most similar target of every anchor at once
            widths = [int(context[t].numel()) for t in anchored]
            starts = [sum(widths[:i]) for i in range(len(widths))]
            slot = torch.arange(max(widths), device=device)
            block = torch.tensor(starts, device=device)[:, None] + slot[None, :]
            block = torch.where(slot[None, :] < torch.tensor(widths, device=device)[:, None], block, width)
            starts_of_rows = torch.arange(len(widths), device=device) * block.shape[1]  # row offsets in block
            unit_targets = torch.cat([F.normalize(targets, dim=-1), torch.zeros(1, targets.shape[1], device=device)])
            sums = torch.zeros(width + 1, targets.shape[1], dtype=torch.float32, device=device)  # row `width`: a bin
            seg_members, seg_columns = [], []
            for t in range(a, b):
                n = int(frames[t].features.shape[0])
                loose = torch.ones(n, dtype=torch.bool, device=device)
                loose[kept[t]] = False
                loose_rows = loose.nonzero().flatten()
                if not loose_rows.numel():
                    continue
                # on the frame's features as they are (no copy of the segment); the argmax of x_j . unit(target)
                # is the cosine argmax since |x_j| is the same along a row
                x = frames[t].features.detach().float()
                sim = x @ unit_targets.T  # [n, width + 1]
                sim[:, width] = -float("inf")
                best = sim.index_select(1, block.flatten()).view(n, *block.shape).argmax(dim=2)  # [n, A]
                columns = block.flatten()[best + starts_of_rows]
                columns = torch.where(loose[:, None], columns, width)  # kept rows go to the bin
                for column in columns.T:  # one index_add per anchor: a token joins one target of each
                    sums.index_add_(0, column, x)
                seg_members.append((offsets[t] + loose_rows)[:, None].expand(-1, len(widths)).flatten())
                seg_columns.append(columns[loose_rows].flatten())
            if not seg_members:
                continue
            member_flat, member_col = torch.cat(seg_members), torch.cat(seg_columns)
            count = torch.bincount(member_col, minlength=width)
            w = dtm_weight(count, self.beta)  # float64 [width]
            share = ((1.0 - w) / count.clamp_min(1).double())[member_col]
            outs += [target_flat, target_flat[member_col]]
            members += [target_flat, member_flat]
            coefs += [w, share]
            absorbing = (count > 0).nonzero().flatten()
            if absorbing.numel():
                mean = sums[absorbing] / count[absorbing, None].float()
                wa = w[absorbing].float()[:, None]
                merged_rows.append(wa * targets[absorbing] + (1.0 - wa) * mean)
                merged_flat.append(target_flat[absorbing])
        if not merged_flat:
            return None
        return (torch.cat(outs), torch.cat(members), torch.cat(coefs)), torch.cat(merged_flat), torch.cat(merged_rows)

    # ------------------------------------------------------------------------------------------------ records
    def _assemble(self, video, total, sims, cuts, segments, seg_budgets, salient_n, context_n, overflow_n, quota,
                  anchors, segment_of, attention, salient, context, density, distance, kept, merges, read):
        frames = video.frames
        offsets = video.offsets()
        num = len(frames)
        device = frames[0].features.device
        flat_groups = flat_weights = None
        frame_groups: list = [None] * num
        frame_weights: list = [None] * num
        absorbed = [torch.zeros(int(k.numel()), dtype=torch.long, device=device) for k in kept]
        features: list = [None] * num
        if merges is not None:
            (out, mem, coef), merged_flat, merged_rows = merges
            flat_kept = torch.cat([offsets[t] + kept[t] for t in range(num)])
            # every kept token not merged into is its own group with coefficient 1
            plain = torch.ones(flat_kept.numel(), dtype=torch.bool, device=device)
            plain[torch.searchsorted(flat_kept, out)] = False
            out = torch.cat([out, flat_kept[plain]])
            mem = torch.cat([mem, flat_kept[plain]])
            coef = torch.cat([coef, torch.ones(int(plain.sum()), dtype=torch.float64, device=device)])
            total_tokens = video.num_tokens
            order = torch.sort(out * total_tokens + mem).indices  # by output, then member ascending
            out, mem, coef = out[order], mem[order], coef[order]
            position = torch.searchsorted(flat_kept, out)
            group_sizes = torch.bincount(position, minlength=flat_kept.numel()).tolist()
            flat_groups = tuple(torch.split(mem, group_sizes))
            flat_weights = tuple(torch.split(coef.to(torch.float32), group_sizes))
            first_output = [0] * num  # position in flat_kept of each frame's first output
            for t in range(1, num):
                first_output[t] = first_output[t - 1] + int(kept[t - 1].numel())
            # entries are sorted by output and the merged outputs ascend, so each frame's are one slice of each
            edges = torch.tensor(offsets + [video.num_tokens], dtype=torch.long, device=device)
            entry_edges = torch.searchsorted(out, edges).tolist()
            merged_edges = torch.searchsorted(merged_flat, edges).tolist()
            for t in range(num):
                m0, m1 = merged_edges[t], merged_edges[t + 1]
                if m0 == m1:
                    continue
                x = frames[t].features
                merged = x.detach()[kept[t]].clone()
                merged[torch.searchsorted(kept[t], merged_flat[m0:m1] - offsets[t])] = merged_rows[m0:m1].to(x.dtype)
                features[t] = merged
                e0, e1 = entry_edges[t], entry_edges[t + 1]
                local = mem[e0:e1] - offsets[t]
                same = (local >= 0) & (local < frames[t].num_tokens)
                counts_t = torch.bincount(position[e0:e1][same] - first_output[t],
                                          minlength=int(kept[t].numel())).tolist()
                frame_groups[t] = torch.split(local[same], counts_t)
                if bool(same.all()):
                    frame_weights[t] = torch.split(coef[e0:e1].to(torch.float32), counts_t)
            absorbed_all = torch.tensor(group_sizes, dtype=torch.long, device=device) - 1
            for t in range(num):
                absorbed[t] = absorbed_all[first_output[t]:first_output[t] + int(kept[t].numel())]

        records = []
        for t, frame in enumerate(frames):
            details = FastVIDFrameDetails(signals=read[t], segment=segment_of[t], quota=quota[t],
                                          anchor=anchors[t], salient=torch.sort(salient[t]).values,
                                          context=torch.sort(context[t]).values, density=density[t],
                                          distance=distance[t], absorbed=absorbed[t])
            selection = Selection(indices=kept[t], features=features[t], groups=frame_groups[t],
                                  weights=frame_weights[t], scores=attention[t], details=details)
            first = any(a == t for a, _ in segments)
            records.append(FrameRecord(frame=t, budget=int(kept[t].numel()), selection=selection, keyframe=first,
                                       extra={"segment": segment_of[t], "anchor": anchors[t], "quota": quota[t],
                                              "salient": salient_n[t], "context": context_n[t],
                                              "overflow": overflow_n[t]}))
        used = tuple(dict.fromkeys(s for signals in read for s in signals))
        details = FastVIDDetails(signals=used, similarities=sims.double(), cuts=tuple(cuts),
                                 segments=tuple(segments), segment_budgets=tuple(int(r) for r in seg_budgets),
                                 salient_budgets=tuple(salient_n), context_budgets=tuple(context_n),
                                 overflow=tuple(overflow_n), quota=tuple(quota), anchors=tuple(anchors))
        return VideoSelection(records, budget=total, flat_groups=flat_groups, flat_weights=flat_weights,
                              details=details)
