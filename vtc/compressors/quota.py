"""QuoTA (arXiv 2503.08689), hardened: frames share a video's budget by their relevance to the question.

Per frame a relevance ``s_t`` in [0, 1] (``scorer``), optionally smoothed, weights ``s^gamma / sum s^gamma``, integer
budgets summing exactly to the video budget with a cap at the frame's own size (``water_fill``; a frame may get 0 and
is dropped), then each frame reduced to its budget by resizing its grid (``reduce_grid``) or by an image compressor.
Every output sits in an original token's slot, so positions stay on the original grid. See docs/methods/quota.md
(scorers, exact budgets, positions and merge weights, deviations from QuoTA).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budget_split import water_fill
from ..compressor import VisualTokens, create_compressor, get_compressor_class, register, run_compressor, top_k_sorted
from ..selection import Details, Selection
from ..signals import Signal, TowerInfo
from ..video import FrameRecord, VideoCompressor, VideoSelection, VideoTokens, frame_signals

SCORERS = ("similarity", "self", "uniform")
GRID_MODES = ("resize", "pool")


# ==================================================================================================== records
@dataclass(frozen=True)
class ResizeDetails(Details):
    """One frame reduced by ``reduce_grid`` (``within="resize"`` / ``"pool"``); no signals.

    Fields:
      mode: ``"resize"`` (bilinear) or ``"pool"`` (adaptive average pooling).
      shape: ``(h, w)`` of the resized grid (the frame's own grid when it is kept whole, ``(0, 0)`` when only
        prefix tokens or nothing are kept).
      leftover: ``LongTensor [b - prefix - h * w]`` the original tokens added to reach the exact budget (those
        the resized grid reconstructs worst), ascending.
    """

    mode: str
    shape: tuple[int, int]
    leftover: torch.Tensor


@dataclass(frozen=True)
class QuotaDetails(Details):
    """What QuoTA decided for one video (``VideoSelection.details``); ``signals`` are those the frames' selections
    read (``within=`` an image compressor), else ``()``.

    Fields (one entry per frame, time order; float64 on the CPU):
      scorer, within: the options that produced them.
      scored: ``False`` for a one-frame video (its frame takes the whole budget; the scores are then 1).
      raw_scores: ``[T]`` relevance ``s_t`` in [0, 1] from the scorer, before smoothing.
      scores: ``[T]`` smoothed relevance ``s~_t`` (what drove the budgets; ``FrameRecord.score``).
      weights: ``[T]`` ``w_t = s~_t ** gamma / sum`` (``FrameRecord.weight``).
      budgets: ``T`` ints, tokens each frame was allotted (they sum to the video budget; 0: dropped).
    """

    scorer: str
    within: str
    scored: bool
    raw_scores: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    budgets: tuple[int, ...]


# ==================================================================================================== pure functions
def quota_shape(budget: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """QuoTA's ``(h, w)`` for a frame budget ``b``: ``h = w = floor(sqrt(b))``, then ``h + 1`` if ``(h+1)*w <= b``,
    else ``w + 1`` if ``h*(w+1) <= b`` (``h`` counts rows). With ``grid = (rows, cols)`` the shape is clamped so no
    axis is up-sampled: ``h <= rows`` (then ``w = min(cols, b // h)``) and ``w <= cols`` (then
    ``h = min(rows, b // w)``). Always ``h * w <= b``.
    """
    b = int(budget)
    if b <= 0:
        return 0, 0
    h = w = math.isqrt(b)
    if (h + 1) * w <= b:
        h += 1
    elif h * (w + 1) <= b:
        w += 1
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows <= 0 or cols <= 0:
            return 0, 0
        if h > rows:
            h, w = rows, min(cols, b // rows)
        if w > cols:
            w, h = cols, min(rows, b // cols)
    return h, w


def smooth_scores(scores: torch.Tensor, window: int, lam: float) -> torch.Tensor:
    """``s~_t = max(s_t, lam * max_{|k| <= window} s_{t+k})`` (frames outside the video do not exist)."""
    scores = scores.double().reshape(-1)
    if window <= 0 or scores.numel() == 0:
        return scores
    # scores are >= 0, so zero padding is the same as ignoring the frames beyond either end
    local = F.pad(scores, (window, window)).unfold(0, 2 * window + 1, 1).max(dim=-1).values
    return torch.maximum(scores, lam * local)


def similarity_scores(frames: list[torch.Tensor], query: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """``[T]`` relevance in (0, 1] of each frame (``[n_t, D]`` features) to ``query`` (``[Q, D]``):
    ``r_t = mean_q max_i cos(q, x_ti)``, ``s_t = exp((r_t - max r) / temperature)`` -- only differences between
    frames count, the best frame scores 1 (why: docs/methods/quota.md)."""
    q = F.normalize(query.detach().float().reshape(-1, query.shape[-1]), dim=-1)
    raw = []
    for features in frames:
        x = F.normalize(features.detach().float().to(q.device), dim=-1)
        raw.append((q @ x.T).max(dim=1).values.mean())
    r = torch.stack(raw).double().cpu()
    return torch.exp((r - r.max()) / temperature)


def _slots(size: int, parts: int) -> list[int]:
    # the original row (column) nearest the centre of each of ``parts`` cells: floor((i + 0.5) * size / parts)
    return [((2 * i + 1) * size) // (2 * parts) for i in range(parts)]


@functools.lru_cache(maxsize=256)
def _linear_support(size: int, parts: int) -> tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]:
    # per output row of a 1-D linear resize (align_corners=False): the source rows with a non-zero weight and those
    # weights; the 2-D bilinear resize of torch is the separable product of these
    eye = torch.eye(size, dtype=torch.float64)[None]  # [1, size (channels = one-hot sources), size]
    weights = F.interpolate(eye, size=parts, mode="linear", align_corners=False)[0]  # [source, output]
    out = []
    for i in range(parts):
        rows = torch.nonzero(weights[:, i] != 0).flatten()
        out.append((tuple(rows.tolist()), tuple(weights[rows, i].tolist())))
    return tuple(out)


def _pool_support(size: int, parts: int) -> list[tuple[range, tuple[float, ...]]]:
    # adaptive pooling regions, as torch: [floor(i * n / p), ceil((i + 1) * n / p)), each source weighted uniformly
    regions = [range((i * size) // parts, -((-(i + 1) * size) // parts)) for i in range(parts)]
    return [(r, (1.0 / len(r),) * len(r)) for r in regions]


def reduce_grid(tokens: VisualTokens, budget: int, mode: str = "resize") -> tuple[Selection, tuple[int, int]]:
    """Reduce one frame to exactly ``budget`` tokens by resizing its grid to ``quota_shape`` (``mode``: bilinear
    ``"resize"`` or adaptive-average ``"pool"``), plus the original tokens it reconstructs worst.

    Each output sits in the slot of the original token nearest its cell's centre; ``groups`` / ``weights`` state the
    merge (``features[i] == weights[i] @ x[groups[i]]``). Prefix tokens are kept first. Returns the selection and the
    ``(h, w)`` of the resized grid (``(0, 0)`` when only prefix tokens are kept). Details: docs/methods/quota.md.
    """
    if mode not in GRID_MODES:
        raise ValueError(f"grid reduction mode must be one of {GRID_MODES}, got {mode!r}")
    device = tokens.features.device
    n = tokens.num_tokens
    budget = max(0, min(int(budget), n))
    no_leftover = torch.zeros(0, dtype=torch.long, device=device)
    if budget == 0:
        details = ResizeDetails(signals=(), mode=mode, shape=(0, 0), leftover=no_leftover)
        return Selection(indices=no_leftover, details=details), (0, 0)
    rows, cols = tokens.grid
    if budget == n:  # nothing to reduce: keep the frame as it is
        details = ResizeDetails(signals=(), mode=mode, shape=(rows, cols), leftover=no_leftover)
        return Selection(indices=torch.arange(n, device=device), details=details), (rows, cols)
    prefix = min(tokens.num_prefix_tokens, budget)
    b_grid = budget - prefix
    base = tokens.num_prefix_tokens
    dtype = tokens.features.dtype
    # built as Python ints, moved to the device once (frames can have hundreds of cells)
    indices: list[int] = list(range(prefix))
    members: list[list[int]] = [[i] for i in range(prefix)]
    coefficients: list[list[float]] = [[1.0] for _ in range(prefix)]  # merge weights over ``members``
    feats: list[torch.Tensor] = [tokens.features[:prefix]]
    h, w = quota_shape(b_grid, (rows, cols))
    extra_index: list[int] = []
    if h * w > 0:
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        grid = tokens.features[base:base + rows * cols].to(work).reshape(rows, cols, -1).permute(2, 0, 1)[None]
        if mode == "resize":
            out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            row_sup, col_sup = _linear_support(rows, h), _linear_support(cols, w)
        else:
            out = F.adaptive_avg_pool2d(grid, (h, w))
            row_sup, col_sup = _pool_support(rows, h), _pool_support(cols, w)
        cells = out[0].permute(1, 2, 0).reshape(h * w, -1).to(dtype)
        row_slot, col_slot = _slots(rows, h), _slots(cols, w)
        # row-major cells have strictly increasing slots (slots increase along both axes)
        cell_index = [base + r * cols + c for r in row_slot for c in col_slot]
        cell_members = [[base + r * cols + c for r in row_sup[i][0] for c in col_sup[j][0]]
                        for i in range(h) for j in range(w)]
        # the separable taps: weight of source (r, c) in cell (i, j) is row weight x column weight
        cell_weights = [[a * b for a in row_sup[i][1] for b in col_sup[j][1]] for i in range(h) for j in range(w)]
        leftover = b_grid - h * w
        if leftover > 0:  # the original tokens the resized grid reconstructs worst, excluding the cells' slots
            recon = F.interpolate(out, size=(rows, cols), mode="bilinear", align_corners=False)
            residual = (grid - recon)[0].permute(1, 2, 0).reshape(rows * cols, -1).float().norm(dim=-1)
            residual[torch.tensor(cell_index, device=residual.device) - base] = -math.inf
            extra_index = (top_k_sorted(residual, leftover) + base).tolist()
        all_index = cell_index + extra_index
        all_members = cell_members + [[i] for i in extra_index]
        all_weights = cell_weights + [[1.0] for _ in extra_index]
        all_feats = torch.cat([cells, tokens.features[extra_index]]) if extra_index else cells
        order = sorted(range(len(all_index)), key=all_index.__getitem__)
        indices += [all_index[i] for i in order]
        members += [all_members[i] for i in order]
        coefficients += [all_weights[i] for i in order]
        feats.append(all_feats[torch.tensor(order, device=all_feats.device)] if extra_index else all_feats)
    index_tensor = torch.tensor(indices, dtype=torch.long, device=device)
    flat = torch.tensor([m for group in members for m in group], dtype=torch.long, device=device)
    groups = torch.split(flat, [len(group) for group in members])
    weights = torch.split(torch.tensor([c for group in coefficients for c in group], dtype=torch.float32,
                                       device=device), [len(group) for group in members])
    features = torch.cat([f.to(dtype) for f in feats])
    details = ResizeDetails(signals=(), mode=mode, shape=(h, w),
                            leftover=torch.tensor(sorted(extra_index), dtype=torch.long, device=device))
    return Selection(indices=index_tensor, features=features, groups=tuple(groups), weights=tuple(weights),
                     details=details), (h, w)


# ==================================================================================================== the compressor
def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@register
@dataclass
class Quota(VideoCompressor):
    """QuoTA (hardened): frames share the video budget by query relevance, then each is resized to its share
    (docs/methods/quota.md).

    Options (QuoTA's effective defaults unless noted):
      scorer: ``"similarity"`` (query-token / frame-token cosine, in the core; vtc's cheap default),
        ``"self"`` (``VideoTokens.frame_scores`` from the wrapped VLM -- QuoTA's rule, computed by the integration)
        or ``"uniform"`` (no scoring: the ablation).
      gamma: weights ``s ** gamma / sum s ** gamma``; QuoTA's ``(100 s)^2`` normalised is ``gamma = 2``.
      smooth_window, smooth_lambda: temporal smoothing ``max(s_t, lambda * max_{|k|<=w} s_{t+k})`` (vtc's addition,
        not in QuoTA; window 0 = off by default, lambda 0.5; w = 1-2 keeps a relevant frame's neighbours).
      floor: minimum tokens per frame; 0 (QuoTA) drops frames whose share rounds to 0. Caps: each frame's size.
      within: ``"resize"`` (QuoTA v1, bilinear), ``"pool"`` (QuoTA v2, adaptive average pooling) or the name of a
        registered image compressor that selects inside each frame.
      within_options: options of that image compressor (only with a compressor name).
      temperature: similarity scorer only: ``s_t = exp((r_t - max r) / temperature)``, cosine units (vtc's choice).
    """

    name: ClassVar[str] = "quota"
    uses_query: ClassVar[bool] = True

    scorer: str = "similarity"
    gamma: float = 2.0
    smooth_window: int = 0
    smooth_lambda: float = 0.5
    floor: int = 0
    within: str = "resize"
    within_options: dict | None = None
    temperature: float = 0.05

    @property
    def needs_frame_scores(self) -> bool:
        """``scorer="self"``: the integration rates the frames with the wrapped model (``frame_scorer``)."""
        return self.scorer == "self"

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"quota scorer must be one of {', '.join(map(repr, SCORERS))}, got {self.scorer!r}")
        if not _is_number(self.gamma) or not math.isfinite(self.gamma) or self.gamma <= 0:
            raise ValueError(f"quota gamma must be a finite number > 0 (QuoTA: 2.0), got {self.gamma!r}")
        if isinstance(self.smooth_window, bool) or not isinstance(self.smooth_window, int) or self.smooth_window < 0:
            raise ValueError(f"quota smooth_window must be an int >= 0 (frames each side; 0 = no smoothing), "
                             f"got {self.smooth_window!r}")
        if not _is_number(self.smooth_lambda) or not 0 <= self.smooth_lambda <= 1:
            raise ValueError(f"quota smooth_lambda must be a number in [0, 1] (default 0.5), "
                             f"got {self.smooth_lambda!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, int) or self.floor < 0:
            raise ValueError(f"quota floor must be an int >= 0 (tokens per frame; 0 lets frames be dropped), "
                             f"got {self.floor!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"quota temperature must be a finite number > 0 (cosine units, default 0.05), "
                             f"got {self.temperature!r}")
        if self.within_options is not None and not isinstance(self.within_options, dict):
            raise TypeError(f"quota within_options must be a dict of options or None, got {self.within_options!r}")
        if not isinstance(self.within, str):
            raise TypeError(f"quota within must be 'resize', 'pool' or a registered image compressor name, "
                            f"got {self.within!r}")
        if self.within in GRID_MODES:
            if self.within_options:
                raise ValueError(f"quota within_options only apply when within names an image compressor; "
                                 f"within={self.within!r} takes none")
            self._inner = None  # a plain attribute (not a dataclass field), so not an option
            return
        try:
            cls = get_compressor_class(self.within)
        except ValueError as error:
            raise ValueError(f"quota within must be 'resize', 'pool' or a registered image compressor; {error}") \
                from None
        if cls.handles_video:
            raise ValueError(f"quota within={self.within!r} is a video compressor; within must be 'resize', 'pool' "
                             f"or an image compressor that selects inside one frame")
        self._inner = create_compressor(self.within, **(self.within_options or {}))

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        return self._inner.signals(tower) if self._inner is not None else ()

    # ------------------------------------------------------------------------------------------------ scoring
    def frame_relevance(self, video: VideoTokens) -> torch.Tensor:
        """``[T]`` raw relevance ``s_t`` in [0, 1] of every frame (float64, CPU), by ``scorer``."""
        t = video.num_frames
        if self.scorer == "uniform":
            return torch.ones(t, dtype=torch.float64)
        if self.scorer == "self":
            scores = video.frame_scores
            if scores is None:
                raise ValueError("quota scorer='self' needs VideoTokens.frame_scores (per-frame relevance in [0, 1] "
                                 "from the wrapped VLM); the integration must supply them -- or use "
                                 "scorer='similarity' / 'uniform'")
            scores = scores.detach().double().cpu().reshape(-1)
            if bool(torch.isnan(scores).any()) or bool(((scores < 0) | (scores > 1)).any()):
                raise ValueError(f"quota frame_scores must be probabilities in [0, 1] without NaN, got "
                                 f"{scores.tolist()}; check how the integration computes them")
            return scores
        if video.query is None:
            raise ValueError("quota scorer='similarity' needs the prompt's text embeddings (VideoTokens.query, [Q, D]) "
                             "for videos of more than one frame; the integration must embed the prompt, or use "
                             "scorer='self' / 'uniform'")
        query = video.query
        dim = video.frames[0].features.shape[-1]
        if query.dim() not in (1, 2) or query.shape[-1] != dim or query.numel() == 0:
            raise ValueError(f"quota query must be [Q, {dim}] text embeddings (the LLM input space of the visual "
                             f"tokens), got shape {tuple(query.shape)}")
        return similarity_scores([f.features for f in video.frames], query, self.temperature)

    # ------------------------------------------------------------------------------------------------ selection
    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:
        sizes = video.frame_sizes
        t = video.num_frames
        if t == 1:  # an image / one-frame video: the only frame takes the whole budget, no scoring needed
            raw = smoothed = torch.ones(1, dtype=torch.float64)
            scored = False
        else:
            raw = self.frame_relevance(video)
            smoothed = smooth_scores(raw, self.smooth_window, float(self.smooth_lambda))
            scored = True
        mass = smoothed.pow(float(self.gamma))
        weights = mass / mass.sum() if float(mass.sum()) > 0 else torch.full((t,), 1.0 / t, dtype=torch.float64)
        budgets = water_fill(budget, weights, sizes, floor=self.floor)
        records = []
        for i, (frame, b) in enumerate(zip(video.frames, budgets)):
            extra: dict = {}
            if scored:
                extra["raw_score"] = float(raw[i])
            if self._inner is None:
                selection, shape = reduce_grid(frame, b, self.within)
                extra["shape"] = shape
                extra["leftover"] = b - min(b, frame.num_prefix_tokens) - shape[0] * shape[1]
            elif b > 0:
                selection = run_compressor(self._inner, frame, b)
            else:
                selection = Selection(indices=torch.zeros(0, dtype=torch.long, device=frame.features.device))
            records.append(FrameRecord(frame=i, budget=b, selection=selection,
                                       score=float(smoothed[i]) if scored else None,
                                       weight=float(weights[i]), extra=extra))
        details = QuotaDetails(signals=frame_signals(records), scorer=self.scorer, within=self.within, scored=scored,
                               raw_scores=raw.double().cpu(), scores=smoothed.double().cpu(),
                               weights=weights.double().cpu(), budgets=tuple(int(b) for b in budgets))
        return VideoSelection(records, budget=sum(budgets), details=details)
