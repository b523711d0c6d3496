"""Video in the core: a video is a sequence of frames, each a ``VisualTokens``; a video budget is shared by them all.

A *frame* here is what the host model encodes as one grid of visual tokens: a sampled frame for LLaVA-OneVision, a
temporal step (two fused frames, ``temporal_patch_size = 2``) for Qwen2-VL / Qwen2.5-VL / Qwen3-VL. The budget of a
video is the number of visual tokens the LLM receives for it over all its frames (``int``), or that fraction of
them (``float`` in (0, 1]) -- the same vocabulary as for images (``vtc.budget``).

Video compressors are registered in the one compressor registry (``vtc.register``) and implement
``select_video(video, budget) -> VideoSelection``; their ``select(tokens, k)`` treats a single image as a one-frame
video, so they run on images too. Image compressors run on videos frame by frame (each frame gets an equal share
of the budget) through ``select_frames_evenly``.

What a compressor decided is recorded at two levels: per frame in ``FrameRecord.selection.details`` (the image
compressor's own details, e.g. ``HiPruneDetails`` of that frame) and per video in ``VideoSelection.details``
(``QuotaDetails``: frame scores, weights and budgets; ``ProgressiveDetails``: keyframes, novelty and the budget
flow; for an image compressor run frame by frame, a plain ``Details`` with the signals its frames read).
``VideoSelection.flat()``, the selection the integration cuts, carries no details.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .budget import Budget, resolve_budget, validate_budget
from .budget_split import even_budgets
from .compressor import Compressor, VisualTokens, run_compressor
from .selection import Details, Selection
from .signals import Signal


@dataclass
class VideoTokens:
    """The visual tokens of one video, frame by frame, as the LLM would receive them."""

    frames: list[VisualTokens]
    #: seconds of each frame (``None``: unknown; frame order is still time order)
    timestamps: Sequence[float] | None = None
    #: [Q, D] text embeddings of the prompt in the LLM input space (query-aware methods; ``None`` otherwise)
    query: torch.Tensor | None = None
    #: [T] per-frame relevance in [0, 1] computed outside the core (e.g. QuoTA's "self" scorer runs the wrapped VLM)
    frame_scores: torch.Tensor | None = None

    def __post_init__(self):
        if not self.frames:
            raise ValueError("a video needs at least one frame; got none (check the frame sampling of the loader)")
        dims = {f.features.shape[-1] for f in self.frames}
        if len(dims) != 1:
            raise ValueError(f"all frames of a video must have the same feature size, got {sorted(dims)}")
        if self.timestamps is not None and len(self.timestamps) != len(self.frames):
            raise ValueError(f"{len(self.timestamps)} timestamps for {len(self.frames)} frames")
        if self.frame_scores is not None and tuple(self.frame_scores.shape) != (len(self.frames),):
            raise ValueError(f"frame_scores must have shape [{len(self.frames)}], got {tuple(self.frame_scores.shape)}")

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def frame_sizes(self) -> list[int]:
        return [f.num_tokens for f in self.frames]

    @property
    def num_tokens(self) -> int:
        return sum(self.frame_sizes)

    def offsets(self) -> list[int]:
        """Index of each frame's first token in the video's concatenated token order."""
        out, total = [], 0
        for n in self.frame_sizes:
            out.append(total)
            total += n
        return out


@dataclass
class FrameRecord:
    """What happened to one frame: the demo draws it, eval logs it."""

    frame: int
    budget: int  # tokens the frame was allotted (0: dropped)
    selection: Selection  # indices into the frame's own tokens (empty when dropped)
    score: float | None = None  # relevance / novelty mass that drove the budget, when the method has one
    weight: float | None = None  # the frame's share of the video budget before rounding
    keyframe: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def num_kept(self) -> int:
        return self.selection.num_kept


@dataclass
class VideoSelection:
    """Per-frame selections of one video whose kept counts sum exactly to the resolved video budget.

    A compressor that merges tokens *across* frames (``progressive`` folds a token into an output of an earlier
    frame) cannot state that merge in the per-frame ``FrameRecord.selection``, whose groups index the frame's own
    tokens (there they list the same-frame members only, and ``weights`` is ``None`` for a frame whose outputs
    absorbed tokens of other frames). Such a compressor fills ``flat_groups`` / ``flat_weights``: per output token
    of the video, in ``flat()`` order (frame by frame, ascending index), every token it absorbed as an index into
    the video's concatenated tokens (``VideoTokens.offsets()``), and the coefficients of its merge over them
    (``features == weights @ X_flat[groups]``). ``flat()`` then reports those; without them it assembles the groups
    and weights from the per-frame selections.
    """

    frames: list[FrameRecord]
    budget: int
    #: per output token, flat indices of every token merged into it, across frames (``None``: the per-frame groups)
    flat_groups: tuple[torch.Tensor, ...] | None = None
    #: per output token, its merge coefficients over ``flat_groups`` (``None``: from the per-frame weights)
    flat_weights: tuple[torch.Tensor, ...] | None = None
    #: what the compressor decided for the whole video (its ``Details`` subclass; see the module doc)
    details: Details | None = None

    @property
    def num_kept(self) -> int:
        return sum(r.num_kept for r in self.frames)

    def validate(self, video: VideoTokens, who: str = "compressor") -> "VideoSelection":
        if len(self.frames) != video.num_frames:
            raise RuntimeError(f"{who} returned records for {len(self.frames)} of {video.num_frames} frames")
        for record, frame in zip(self.frames, video.frames):
            record.selection.validate(frame.num_tokens, expected=record.budget, who=f"{who} (frame {record.frame})")
        if self.num_kept != self.budget:
            raise RuntimeError(f"{who} kept {self.num_kept} tokens of the video but its budget is {self.budget}")
        if self.flat_weights is not None and self.flat_groups is None:
            raise RuntimeError(f"{who} returned flat merge weights without flat groups")
        if self.flat_groups is not None:
            if len(self.flat_groups) != self.num_kept:
                raise RuntimeError(f"{who} returned {len(self.flat_groups)} flat groups for {self.num_kept} tokens")
            if self.flat_weights is not None and (len(self.flat_weights) != len(self.flat_groups) or any(
                    w.numel() != g.numel() for w, g in zip(self.flat_weights, self.flat_groups))):
                raise RuntimeError(f"{who} returned flat merge weights whose sizes differ from their groups")
        if self.details is not None and not isinstance(self.details, Details):
            raise RuntimeError(f"{who} returned video details of type {type(self.details).__name__}; details must "
                               "be a vtc.selection.Details or None")
        return self

    def flat(self, video: VideoTokens) -> Selection:
        """The selection as one ``Selection`` over the video's concatenated tokens (what the integration cuts).

        Groups and weights are ``flat_groups`` / ``flat_weights`` when the compressor filled them (cross-frame merges);
        otherwise the per-frame groups shifted by the frame offsets, and -- when the video has merged features --
        the per-frame weights when every merged frame has them (a gathered token counts as its own weight 1), else
        ``None``."""
        indices, features, groups, weights = [], [], [], []
        merged = any(r.selection.is_merged for r in self.frames)
        for record, frame, offset in zip(self.frames, video.frames, video.offsets()):
            sel = record.selection
            idx = sel.indices.to(torch.long)
            indices.append(idx + offset)
            if merged:
                features.append(sel.features if sel.is_merged else frame.features[sel.indices])
            if sel.groups is not None:
                frame_groups = list(sel.groups)
            else:
                frame_groups = [idx[i:i + 1] for i in range(sel.num_kept)]
            groups.extend(g + offset for g in frame_groups)
            if weights is not None:
                weights = _extend_weights(weights, sel, idx, frame_groups)
        cat = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        groups = tuple(groups) if self.flat_groups is None else self.flat_groups
        if self.flat_groups is not None:
            weights = self.flat_weights
        elif weights is not None:
            weights = tuple(weights)
        return Selection(indices=cat, features=torch.cat(features) if merged else None, groups=groups,
                         weights=weights if merged else None)


def frame_signals(records: Sequence[FrameRecord]) -> tuple[Signal, ...]:
    """The signals the frames' selections read (``Details.signals``), in first-seen order without repeats."""
    seen: dict[Signal, None] = {}
    for record in records:
        if record.selection.details is not None:
            seen.update(dict.fromkeys(record.selection.details.signals))
    return tuple(seen)


def _extend_weights(weights: list, sel: Selection, idx: torch.Tensor, groups: list) -> list | None:
    """Append one frame's merge weights (``None`` when the frame has merged features but no weights, or a gathered
    token's group does not contain it)."""
    if sel.is_merged:
        if sel.weights is None:
            return None
        weights.extend(sel.weights)
        return weights
    for i, g in zip(idx.tolist(), groups):  # a gathered token: its own feature, coefficient 1 on itself
        hit = g == i
        if not bool(hit.any()):
            return None
        w = hit.to(torch.float32)
        weights.append(w / w.sum())
    return weights


def check_video_budget(budget) -> int:
    """A resolved video budget (``run_video_compressor`` passes one): an int >= 0, else a ``ValueError``."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise ValueError(f"video budget must be a resolved int >= 0, got {budget!r}")
    return int(budget)


class VideoCompressor(Compressor):
    """Base class of compressors that budget a whole video (frames compete for one budget)."""

    handles_video: ClassVar[bool] = True

    def select_video(self, video: VideoTokens, budget: int) -> VideoSelection:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        """An image is a one-frame video: its record is that frame's selection, details included (the video-level
        details of a one-frame video add nothing: the frame takes the whole budget)."""
        return self.select_video(VideoTokens([tokens], query=tokens.query), k).frames[0].selection


def run_video_compressor(compressor: Compressor, video: VideoTokens, budget: Budget) -> VideoSelection:
    """Resolve the video budget and run ``compressor`` on ``video``; image compressors go frame by frame."""
    total = resolve_budget(validate_budget(budget), video.num_tokens)
    if compressor.handles_video:
        result = compressor.select_video(video, total)
    else:
        result = select_frames_evenly(compressor, video, total)
    return result.validate(video, who=f"compressor {compressor.name!r}")


def select_frames_evenly(compressor: Compressor, video: VideoTokens, total: int) -> VideoSelection:
    """An image compressor on a video: every frame gets the same share (``even_budgets``: remainder to the first
    frames, capped at a frame's size, the excess shared by the others), then the compressor selects inside each
    frame."""
    budgets = even_budgets(total, video.frame_sizes)
    records = []
    for t, (frame, b) in enumerate(zip(video.frames, budgets)):
        sel = run_compressor(compressor, frame, b) if b > 0 else _empty_selection(frame)
        records.append(FrameRecord(frame=t, budget=b, selection=sel))
    return VideoSelection(records, budget=sum(budgets), details=Details(signals=frame_signals(records)))


def _empty_selection(frame: VisualTokens) -> Selection:
    return Selection(indices=torch.zeros(0, dtype=torch.long, device=frame.features.device))


@dataclass
class VideoRecord:
    """The record of one video of the last call, as returned by ``vtc.last_video_selection(model)``."""

    video_index: int  # order of the video in the call (row-major over the batch)
    batch_index: int  # which prompt of the batch the video belongs to
    grids: list[tuple[int, int]]  # (rows, cols) of each frame's token grid
    selection: VideoSelection  # per frame: budget, score, kept / merged tokens
    compressor: str = ""
    timestamps: list[float] | None = None  # seconds of each frame, where the inputs say
    num_suffix_tokens: int = 0  # layout tokens after the frames (OneVision's newline), always kept

    @property
    def num_frames(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        """Visual tokens the video had (suffix layout tokens excluded)."""
        return sum(r * c for r, c in self.grids)

    @property
    def budget(self) -> int:
        return self.selection.budget

    @property
    def num_kept(self) -> int:
        return self.selection.num_kept

    @property
    def frame_budgets(self) -> list[int]:
        return [r.budget for r in self.selection.frames]

    @property
    def details(self) -> Details | None:
        """What the compressor decided for the whole video (``VideoSelection.details``; per frame:
        ``selection.frames[t].selection.details``)."""
        return self.selection.details
