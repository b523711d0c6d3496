"""Progressive video compression: a training-free analogue of PVC (arXiv 2412.09613).

Frames in time order; a token already seen in the last ``window`` frames of its scene is folded into the output that
carries it, and each frame's budget goes to its novel tokens (novelty x saliency x diversity). Scene cuts are
keyframes with a boosted budget and a fresh memory; unspent budget carries forward, and what is left at the end is
handed back, so the video keeps exactly ``min(B, N)`` tokens. Query-agnostic by default, so one compressed video
serves every question. Every merge is linear and stated as ``weights``. See docs/methods/progressive.md (algorithm,
records, cost).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget_split import split_budget
from ..compressor import VisualTokens, register
from ..selection import Details, Selection
from ..signals import Signal, SignalKind, TowerInfo
from ..video import (
    FrameRecord,
    VideoCompressor,
    VideoSelection,
    VideoTokens,
    check_video_budget,
)
from .divprune import nearest_neighbour_distance

#: similarity comparisons tolerate this much float noise (identical tokens are redundant even at threshold 1.0)
TOLERANCE = 1e-6
#: largest block of similarities (rows x memory) materialised at once in the novelty pass
NOVELTY_BLOCK_ELEMENTS = 1 << 22

_SALIENCY_KINDS = (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION)
# token states of the causal pass
_KEPT, _MERGED, _FOLDED, _FORCED, _DROPPED = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ProgressiveDetails(Details):
    """What the progressive pass decided for one video (``VideoSelection.details``); ``signals`` are the saliency
    signals the frames read (CLS / received attention of the feature layer; ``()`` when the frames carry none).

    Fields (one entry per frame, time order; docs/methods/progressive.md, steps 1, 5 and 6):
      keyframes: whether the frame starts a scene (memory reset, boosted budget).
      novelty_mass: ``M_t = sum_i nu_i`` (``FrameRecord.score``).
      relevance: ``q_t`` in [0, 1] when the query term is on (``query_weight > 0`` and a query), else ``None``.
      base_budgets: the frame's share of the video budget before carry-forward.
      carried_in: unspent budget of earlier frames available to it.
      spent: tokens picked in the causal pass (``min(base + carried_in, novel tokens)``).
      handed_back: tokens it got back from the budget left after the last frame.
    Every frame keeps ``spent + handed_back`` tokens; token-level bookkeeping (folds, drops) is in
    ``FrameRecord.extra``.
    """

    keyframes: tuple[bool, ...]
    novelty_mass: tuple[float, ...]
    relevance: tuple[float, ...] | None
    base_budgets: tuple[int, ...]
    carried_in: tuple[int, ...]
    spent: tuple[int, ...]
    handed_back: tuple[int, ...]


def _saliency_signals(frame: VisualTokens) -> tuple[Signal, ...]:
    return tuple(s for s in frame.signals if SignalKind(s.kind) in _SALIENCY_KINDS)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"progressive {name} must be a finite number, got {value!r}")
    return float(value)


def weighted_maxmin(unit: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity weighted per token (ADTS): ``k`` picks out of unit rows ``unit [m, D]``, in pick order.

    First ``argmax weight_i * d_nn(i)`` (``d_nn``: cosine distance to the nearest other row), then repeatedly
    ``argmax weight_i * min_{s picked} d(i, s)``; picked rows are masked, ties go to the lowest index.
    """
    m = int(unit.shape[0])
    if not 0 <= k <= m:
        raise ValueError(f"cannot pick {k} of {m} tokens")
    if k == m:
        return torch.arange(m, device=unit.device)
    order = torch.empty(k, dtype=torch.long, device=unit.device)
    if k == 0:
        return order
    weight = weight.float()
    first = torch.argmax(weight * nearest_neighbour_distance(unit).clamp_min(0.0))
    order[0] = first
    min_dist = (1.0 - unit @ unit[first]).clamp_min(0.0)
    picked = torch.zeros(m, dtype=torch.bool, device=unit.device)
    picked[first] = True
    for step in range(1, k):
        score = (weight * min_dist).masked_fill(picked, -float("inf"))
        pick = torch.argmax(score)
        order[step] = pick
        picked[pick] = True
        min_dist = torch.minimum(min_dist, (1.0 - unit @ unit[pick]).clamp_min(0.0))
    return order


def _saliency(frame: VisualTokens) -> torch.Tensor:
    """The frame's attention saliency divided by its maximum (all ones when the frame carries none)."""
    n = frame.num_tokens
    device = frame.features.device
    values = [v for s, v in frame.signals.items() if SignalKind(s.kind) in _SALIENCY_KINDS]
    if not values:
        return torch.ones(n, dtype=torch.float32, device=device)
    a = torch.zeros(n, dtype=torch.float32, device=device)
    for v in values:
        v = v.float().reshape(-1).to(device)
        if v.numel() != n:
            raise ValueError(f"saliency signal has {v.numel()} values for a frame of {n} tokens")
        a = a + v
    if n and float(a.min()) < 0:
        a = a - a.min()
    top = float(a.max()) if n else 0.0
    return a / top if top > 0 and math.isfinite(top) else torch.ones_like(a)


@register
@dataclass
class Progressive(VideoCompressor):
    """Progressive video compression: novel tokens in, redundant ones folded (docs/methods/progressive.md).

    On an image (``select``: a one-frame video, hence a keyframe with novelty 1) it is saliency x diversity
    selection, every other token merged (mean) into its most similar kept token.

    Options:
      cut_threshold: a frame whose mean feature has cosine below this to the previous frame's is a keyframe
        (0.9, vtc's choice).
      keyframe_boost: a keyframe's base budget is this many times a P-frame's, capped at its size (2.0, >= 1).
      window: frames of memory a token is compared with, any position (1: the previous frame, as FlashVID,
        arXiv 2602.08024).
      merge_threshold: cosine to the memory at or above which a token is redundant and folded (0.85, vtc's choice).
      beta: floor of the old token's weight in a fold, ``w = max(c/(c+k), beta)`` (0.6 as FastVID's DTM,
        arXiv 2503.11187; in [0, 1]).
      gamma: exponent of novelty in the token score ``u = nu^gamma * (eps + a)^eta`` (1.0, >= 0).
      eta: exponent of the normalised saliency in ``u`` (0.5, >= 0).
      eps: saliency offset in ``u``, so tokens without attention still compete on novelty (0.05, >= 0).
      query_weight: ``rho`` in the frame weight ``boost * q^rho * novelty_mass^(1-rho)`` (0.0 = query-agnostic).
    """

    name = "progressive"
    cut_threshold: float = 0.9
    keyframe_boost: float = 2.0
    window: int = 1
    merge_threshold: float = 0.85
    beta: float = 0.6
    gamma: float = 1.0
    eta: float = 0.5
    eps: float = 0.05
    query_weight: float = 0.0

    def __post_init__(self):
        for name in ("cut_threshold", "merge_threshold"):
            value = _real(getattr(self, name), name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"progressive {name} must be a cosine in (0, 1], got {value!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral) or self.window < 1:
            raise ValueError(f"progressive window must be an int >= 1 (frames of memory), got {self.window!r}")
        if _real(self.keyframe_boost, "keyframe_boost") < 1.0:
            raise ValueError(f"progressive keyframe_boost must be >= 1, got {self.keyframe_boost!r}")
        if not 0.0 <= _real(self.beta, "beta") <= 1.0:
            raise ValueError(f"progressive beta must be in [0, 1], got {self.beta!r}")
        for name in ("gamma", "eta", "eps"):
            if _real(getattr(self, name), name) < 0:
                raise ValueError(f"progressive {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= _real(self.query_weight, "query_weight") <= 1.0:
            raise ValueError(f"progressive query_weight must be in [0, 1], got {self.query_weight!r}")

    @property
    def uses_query(self) -> bool:  # the integration embeds the prompt only when the query term is on
        return self.query_weight > 0

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        return (tower.attention_signal(tower.feature_layer),)

    # ------------------------------------------------------------------------------------------------ the pass
    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        check_video_budget(budget)
        frames = video.frames
        num = len(frames)
        sizes = video.frame_sizes
        total = min(int(budget), sum(sizes))
        units = [F.normalize(f.features.detach().float(), dim=-1) for f in frames]
        keyframes = self._keyframes(frames)
        novelty, match_scene, match_any = self._novelty(units, keyframes)
        scores = []
        for t, frame in enumerate(frames):
            sal = _saliency(frame)
            scores.append(novelty[t].pow(self.gamma) * (self.eps + sal).pow(self.eta))
        mass = [float(nu.sum()) for nu in novelty]

        weights = [self.keyframe_boost if k else 1.0 for k in keyframes]
        relevance = self._relevance(video, units)
        if relevance is not None:
            rho = self.query_weight
            weights = [w * (q ** rho) * (m ** (1.0 - rho)) for w, q, m in zip(weights, relevance, mass)]
        base = split_budget(total, weights, sizes)
        weight_sum = sum(weights)

        # causal pass: who is emitted, and what every other token points to
        state, parent_frame, parent_index, emitted = [], [], [], []
        spent, carried_in, novel_counts = [], [], []
        pool = 0
        for t in range(num):
            n = sizes[t]
            device = units[t].device
            st_t = torch.full((n,), _KEPT, dtype=torch.long, device=device)
            pf = torch.full((n,), -1, dtype=torch.long, device=device)
            pi = torch.full((n,), -1, dtype=torch.long, device=device)
            em = torch.zeros(n, dtype=torch.bool, device=device)
            sim_s, frame_s, index_s = match_scene[t]
            redundant = sim_s >= self.merge_threshold - TOLERANCE
            novel = (~redundant).nonzero().flatten()
            carried_in.append(pool)
            available = base[t] + pool
            s = min(available, int(novel.numel()))
            pool = available - s
            spent.append(s)
            novel_counts.append(int(novel.numel()))
            st_t[redundant] = _FOLDED
            pf[redundant], pi[redundant] = frame_s[redundant], index_s[redundant]
            if s > 0:
                picks = novel[weighted_maxmin(units[t][novel], scores[t][novel], s)]
                em[picks] = True
                rest = novel[~em[novel]]
                if rest.numel():
                    nearest = (units[t][rest] @ units[t][picks].T).argmax(dim=1)
                    st_t[rest] = _MERGED
                    pf[rest] = t
                    pi[rest] = picks[nearest]
            elif novel.numel():
                _, frame_a, index_a = match_any[t]
                has = frame_a[novel] >= 0
                forced, dropped = novel[has], novel[~has]
                st_t[forced] = _FORCED
                pf[forced], pi[forced] = frame_a[forced], index_a[forced]
                st_t[dropped] = _DROPPED
            state.append(st_t)
            parent_frame.append(pf)
            parent_index.append(pi)
            emitted.append(em)

        # hand-back: the pool left after the last frame goes to the highest-u tokens not emitted
        handed = [0] * num
        if pool > 0:
            flat_u = torch.cat([sc.detach().cpu() for sc in scores])
            flat_emitted = torch.cat([em.cpu() for em in emitted])
            flat_u = flat_u.masked_fill(flat_emitted, -float("inf"))
            order = torch.sort(flat_u, descending=True, stable=True).indices[:pool]
            starts = torch.tensor(video.offsets(), dtype=torch.long)
            owner = torch.searchsorted(starts, order, right=True) - 1
            for t in owner.unique().tolist():
                mine = order[owner == t] - starts[t]
                mine = mine.to(emitted[t].device)
                emitted[t][mine] = True
                state[t][mine] = _KEPT
                handed[t] = int(mine.numel())

        offsets = video.offsets()
        roots = self._roots(emitted, parent_frame, parent_index, offsets)
        features, absorbed, coef, root_flat = self._assemble(frames, roots, offsets)
        flat_groups, flat_weights = self._flat_merges(emitted, offsets, coef, root_flat)

        records = []
        for t, frame in enumerate(frames):
            kept = emitted[t].nonzero().flatten()
            root_f, root_i = roots[t]
            same = root_f == t
            groups = tuple((same & (root_i == j)).nonzero().flatten() for j in kept.tolist())
            dtype = frame.features.dtype
            # per-frame weights only where the frame's groups tell the whole merge (no later frame folded into it)
            exact = not bool((absorbed[t][kept] > 0).any())
            frame_coef = coef[offsets[t]:offsets[t] + sizes[t]]
            selection = Selection(indices=kept, features=features[t][kept].to(dtype), groups=groups,
                                  scores=scores[t],
                                  weights=tuple(frame_coef[g].to(torch.float32) for g in groups) if exact else None,
                                  details=Details(signals=_saliency_signals(frame)))
            cross = ((root_f >= 0) & (root_f < t)).nonzero().flatten()
            folded_into = {int(i): (int(root_f[i]), int(root_i[i])) for i in cross.tolist()}
            extra = {
                "novel": novel_counts[t],
                "spent": spent[t],
                "handed_back": handed[t],
                "merged": int(((root_f == t) & ~emitted[t]).sum()),
                "folded": len(folded_into),
                "forced": int((state[t] == _FORCED).sum()),
                "base_budget": base[t],
                "carried_in": carried_in[t],
                "folded_into": folded_into,
                "absorbed_later": absorbed[t][kept],
                "dropped": (root_f < 0).nonzero().flatten().tolist(),
            }
            share = total * weights[t] / weight_sum if weight_sum > 0 else 0.0
            records.append(FrameRecord(frame=t, budget=int(kept.numel()), selection=selection, score=mass[t],
                                       weight=share, keyframe=keyframes[t], extra=extra))
        signals = tuple(dict.fromkeys(s for frame in frames for s in _saliency_signals(frame)))
        details = ProgressiveDetails(signals=signals, keyframes=tuple(bool(k) for k in keyframes),
                                     novelty_mass=tuple(mass), relevance=None if relevance is None else tuple(
                                         float(q) for q in relevance), base_budgets=tuple(int(b) for b in base),
                                     carried_in=tuple(int(c) for c in carried_in), spent=tuple(int(x) for x in spent),
                                     handed_back=tuple(int(h) for h in handed))
        return VideoSelection(records, budget=total, flat_groups=flat_groups, flat_weights=flat_weights,
                              details=details)

    # ------------------------------------------------------------------------------------------------ helpers
    def _keyframes(self, frames: list[VisualTokens]) -> list[bool]:
        out, previous = [], None
        for t, frame in enumerate(frames):
            if frame.num_tokens == 0:
                out.append(t == 0)
                continue
            mean = frame.features.detach().float().mean(dim=0)
            cut = previous is None or float(F.cosine_similarity(mean, previous, dim=0)) < self.cut_threshold - TOLERANCE
            out.append(t == 0 or cut)
            previous = mean
        return out

    def _novelty(self, units: list[torch.Tensor], keyframes: list[bool]):
        """Per frame: novelty ``[n]``, the best match in the scene's window ``(sim, frame, index)`` and the best match
        in the window regardless of cuts (for forced folds). Frame ``-1`` means no match."""
        novelty, scene, anywhere = [], [], []
        scene_start = 0
        for t, unit in enumerate(units):
            if keyframes[t]:
                scene_start = t
            n, device = unit.shape[0], unit.device
            lo = max(0, t - self.window)
            recent = [f for f in range(t - 1, lo - 1, -1) if units[f].shape[0]]  # newest first: ties to recent
            best = [torch.full((n,), -float("inf"), device=device),
                    torch.full((n,), -1, dtype=torch.long, device=device),
                    torch.full((n,), -1, dtype=torch.long, device=device)]
            best_scene = [b.clone() for b in best]
            if recent and n:
                memory = torch.cat([units[f] for f in recent])
                col_frame = torch.cat([torch.full((units[f].shape[0],), f, dtype=torch.long, device=device)
                                       for f in recent])
                col_index = torch.cat([torch.arange(units[f].shape[0], device=device) for f in recent])
                in_scene = col_frame >= scene_start
                rows = max(1, NOVELTY_BLOCK_ELEMENTS // memory.shape[0])
                for start in range(0, n, rows):
                    stop = min(n, start + rows)
                    sim = unit[start:stop] @ memory.T
                    value, where = sim.max(dim=1)
                    best[0][start:stop], best[1][start:stop], best[2][start:stop] = value, col_frame[where], \
                        col_index[where]
                    if not keyframes[t] and bool(in_scene.any()):
                        sim = sim.masked_fill(~in_scene, -float("inf"))
                        value, where = sim.max(dim=1)
                        best_scene[0][start:stop] = value
                        best_scene[1][start:stop], best_scene[2][start:stop] = col_frame[where], col_index[where]
            if keyframes[t]:
                nu = torch.ones(n, device=device)
            else:  # float noise of identical tokens is snapped to 0 so that they tie exactly (deterministic order)
                nu = (1.0 - best_scene[0]).clamp(0.0, 1.0)
                nu = nu.masked_fill(nu <= TOLERANCE, 0.0)
            novelty.append(nu.float())
            scene.append(tuple(best_scene))
            anywhere.append(tuple(best))
        return novelty, scene, anywhere

    def _relevance(self, video: VideoTokens, units: list[torch.Tensor]) -> list[float] | None:
        """``q_t`` in [0, 1] when the query term is on and there is a query, else ``None``."""
        if self.query_weight <= 0:
            return None
        if video.frame_scores is not None:
            q = video.frame_scores.detach().float().cpu()
            if not bool(torch.isfinite(q).all()):
                raise ValueError("frame_scores must be finite")
            return q.clamp(0.0, 1.0).tolist()
        if video.query is None or video.query.numel() == 0:
            return None
        query = F.normalize(video.query.float().reshape(-1, video.query.shape[-1]), dim=-1)
        raw = []
        for unit in units:
            if unit.shape[0] == 0:
                raw.append(None)
                continue
            raw.append(float((query.to(unit.device) @ unit.T).max(dim=1).values.mean()))
        present = [r for r in raw if r is not None]
        lo, hi = min(present), max(present)
        return [0.0 if r is None else (1.0 if hi - lo <= 0 else (r - lo) / (hi - lo)) for r in raw]

    @staticmethod
    def _roots(emitted, parent_frame, parent_index, offsets):
        """``(frame [n], index [n])`` per frame: the output token each token ends in (``-1``: dropped).

        Parents are always earlier tokens (an earlier frame, or a token of the same frame picked in the causal pass),
        so one gather per frame over a flat ``[N]`` table of roots resolves every chain."""
        device = emitted[0].device if emitted else torch.device("cpu")
        total = sum(int(em.numel()) for em in emitted)
        root = torch.full((total,), -1, dtype=torch.long, device=device)  # flat index of each token's output
        starts = torch.tensor(offsets + [total], dtype=torch.long, device=device)
        out = []
        for t, em in enumerate(emitted):
            n = em.shape[0]
            own = torch.arange(n, device=device)
            pf, pi = parent_frame[t].to(device), parent_index[t].to(device)
            r = torch.full((n,), -1, dtype=torch.long, device=device)
            r[em.to(device)] = offsets[t] + own[em.to(device)]
            root[offsets[t]:offsets[t] + n] = r  # this frame's outputs first: same-frame merges point at them
            follow = ~em.to(device) & (pf >= 0)
            if bool(follow.any()):
                r[follow] = root[starts[pf[follow]] + pi[follow]]
            root[offsets[t]:offsets[t] + n] = r
            frame_of = torch.searchsorted(starts, r.clamp_min(0), right=True) - 1
            rf = torch.where(r >= 0, frame_of, torch.full_like(r, -1))
            ri = torch.where(r >= 0, r - starts[frame_of.clamp(0, len(offsets) - 1)], torch.full_like(r, -1))
            out.append((rf.to(em.device), ri.to(em.device)))
        return out

    def _assemble(self, frames, roots, offsets):
        """Final features of every output token: mean of its same-frame group, then the beta-floored folds in
        frame order. Returns per frame ``features [n, D]`` (rows of output tokens meaningful) and ``absorbed [n]``
        (tokens of later frames folded into each), computed on flat ``[N, D]`` / ``[N]`` tables."""
        device = frames[0].features.device
        features = torch.cat([f.features.float().to(device) for f in frames])
        total = features.shape[0]
        counts = torch.zeros(total, dtype=torch.float32, device=device)
        absorbed = torch.zeros(total, dtype=torch.long, device=device)
        # the merge as coefficients: every rule below is linear in the features, so output r's feature is
        # sum_j coef[j] * x_j over the tokens j with root_flat[j] == r (float64, so the sum matches the fp32 folds)
        coef = torch.zeros(total, dtype=torch.float64, device=device)
        root_flat = torch.full((total,), -1, dtype=torch.long, device=device)
        starts = torch.tensor(offsets, dtype=torch.long, device=device)
        for t, frame in enumerate(frames):
            x = frame.features.float().to(device)
            rf, ri = (r.to(device) for r in roots[t])
            own = offsets[t] + torch.arange(frame.num_tokens, device=device)
            same = rf == t
            target = offsets[t] + ri[same]
            features[target] = 0.0  # a group's output (always in the group) becomes the group mean
            features.index_add_(0, target, x[same])
            counts.index_add_(0, target, torch.ones(target.numel(), device=device))
            group = torch.unique(target)
            features[group] = features[group] / counts[group][:, None]
            root_flat[own[same]] = target
            coef[own[same]] = 1.0 / counts[target].double()
            cross = (rf >= 0) & (rf < t)
            if not bool(cross.any()):
                continue
            flat = starts[rf[cross]] + ri[cross]
            targets, inverse = flat.unique(return_inverse=True)
            k = torch.zeros(targets.numel(), dtype=torch.float32, device=device).index_add_(
                0, inverse, torch.ones(inverse.numel(), device=device))
            mean = torch.zeros(targets.numel(), x.shape[1], device=device).index_add_(0, inverse, x[cross])
            mean = mean / k[:, None]
            c = counts[targets]
            w = torch.clamp(c / (c + k), min=self.beta)
            features[targets] = w[:, None] * features[targets] + (1.0 - w[:, None]) * mean
            counts[targets] = c + k
            absorbed[targets] += k.long()
            # m <- w m + (1 - w) mean(folded): the target's old coefficients scale by w, each folded token gets (1-w)/k
            scale = torch.ones(total, dtype=torch.float64, device=device)
            scale[targets] = w.double()
            seen = (root_flat[:offsets[t]] >= 0).nonzero().flatten()
            coef[seen] *= scale[root_flat[seen]]
            root_flat[own[cross]] = flat
            coef[own[cross]] = ((1.0 - w.double()) / k.double())[inverse]
        split = [f.num_tokens for f in frames]
        return list(features.split(split)), list(absorbed.split(split)), coef, root_flat

    @staticmethod
    def _flat_merges(emitted, offsets, coef, root_flat):
        """Per output token in the video's flat order: its whole group (every token of any frame that ends in it,
        ascending flat indices) and its merge coefficients (``VideoSelection.flat_groups`` / ``flat_weights``)."""
        device = root_flat.device
        outputs = torch.cat([offsets[t] + em.to(device).nonzero().flatten() for t, em in enumerate(emitted)])
        members = (root_flat >= 0).nonzero().flatten()
        owner = root_flat[members]
        order = torch.sort(owner, stable=True).indices  # members ascending within each output
        members, owner = members[order], owner[order]
        sizes = torch.bincount(torch.searchsorted(outputs, owner), minlength=outputs.numel())
        groups = tuple(torch.split(members, sizes.tolist()))
        weights = tuple(torch.split(coef[members].to(torch.float32), sizes.tolist()))
        return groups, weights
