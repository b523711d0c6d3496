"""What a compressor returns and what vtc records per image.

A ``Selection`` is a list of output tokens. Output token ``i`` sits in the placeholder slot (and so takes the
position) of original token ``indices[i]``; its feature is the original feature of that token, or ``features[i]``
when the compressor merges tokens. ``groups[i]`` then lists every original token folded into it (the demo draws
these). Indices are sorted and unique, so the LLM always sees visual tokens in the host model's own order.

``details`` says what the compressor decided and why, typed per compressor (a ``Details`` subclass documented on
it): the signals -- and so the resolved vision layers -- it read, and its own intermediate decisions.

``scores`` (``[N]``, one value per token of the image / view / frame, or ``None``) is what the compressor ranked
by; what it means per built-in compressor is under "Records" in docs/methods/<name>.md.

On an AnyRes image (``vtc.multiview``) ``scores`` is laid out over the packed sequence (``NaN`` at newlines and at
views nobody scored) and ``details`` is a ``vtc.multiview.MultiViewDetails`` holding each view's own details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .signals import Signal

if TYPE_CHECKING:  # pragma: no cover
    from .video import VideoRecord


@dataclass(frozen=True)
class Details:
    """What a compressor decided for one selection and why: the typed part of a record, for inspection and plots.

    Each compressor returns its own subclass (a frozen dataclass, fields documented with shapes on the class);
    indices in it index the same tokens as ``Selection.indices`` (the image's, view's or frame's own tokens). The
    one field every record has answers "which layers": ``signals``, the captured signals the selection read, each
    with its resolved absolute vision layer (``()`` for compressors that read none, e.g. ``random``).
    Tensors are compared with ``torch.equal``, not ``==``.
    """

    signals: tuple[Signal, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        """The absolute vision layers read, ascending and unique."""
        return tuple(sorted({s.layer for s in self.signals}))


@dataclass
class Selection:
    indices: torch.Tensor  # LongTensor [K], sorted, unique, into the image's N visual tokens
    features: torch.Tensor | None = None  # [K, D] replacement features (merging compressors); None = gather
    groups: tuple[torch.Tensor, ...] | None = None  # per output token: original indices it absorbed
    scores: torch.Tensor | None = None  # [N] the per-token score the compressor ranked by, for display
    #: per output token: the coefficients of its merge over ``groups[i]`` (``features[i] == weights[i] @
    #: X[groups[i]]``). A merge stated this way is replayed exactly on other feature sets of the same tokens
    #: (Qwen3-VL deepstack levels) even when the groups themselves were chosen from the features.
    weights: tuple[torch.Tensor, ...] | None = None
    #: what the compressor decided and why (its ``Details`` subclass); ``None`` when it records nothing more
    details: Details | None = None

    @property
    def num_kept(self) -> int:
        return int(self.indices.numel())

    @property
    def is_merged(self) -> bool:
        return self.features is not None

    def validate(self, num_tokens: int, expected: int | None = None, who: str = "compressor") -> "Selection":
        """Check the contract; a violation is a bug in the compressor, reported with its name."""
        idx = self.indices
        if idx.dtype != torch.long or idx.dim() != 1:
            raise RuntimeError(f"{who} returned indices of dtype {idx.dtype} / shape {tuple(idx.shape)}; need 1-D int64")
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= num_tokens:
                raise RuntimeError(f"{who} returned indices outside [0, {num_tokens})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise RuntimeError(f"{who} returned indices that are not sorted and unique")
        if expected is not None and idx.numel() != expected:
            raise RuntimeError(f"{who} kept {idx.numel()} tokens but the budget is {expected}")
        if self.features is not None and self.features.shape[0] != idx.numel():
            raise RuntimeError(f"{who} returned {self.features.shape[0]} merged features for {idx.numel()} indices")
        if self.groups is not None and len(self.groups) != idx.numel():
            raise RuntimeError(f"{who} returned {len(self.groups)} groups for {idx.numel()} indices")
        if self.weights is not None:
            if self.groups is None or len(self.weights) != len(self.groups):
                raise RuntimeError(f"{who} returned merge weights without one group per weight vector")
            if any(w.numel() != g.numel() for w, g in zip(self.weights, self.groups)):
                raise RuntimeError(f"{who} returned merge weights whose sizes differ from their groups")
        if self.details is not None and not isinstance(self.details, Details):
            raise RuntimeError(f"{who} returned details of type {type(self.details).__name__}; details must be a "
                               "vtc.selection.Details (a frozen dataclass subclass) or None")
        return self


@dataclass
class ImageSelection:
    """The record of one image of the last call, as returned by ``vtc.last_selection(model)``."""

    image_index: int  # order of the image in the call (row-major over the batch)
    batch_index: int  # which prompt of the batch the image belongs to
    num_tokens: int  # visual tokens the image had
    grid: tuple[int, int]  # (rows, cols) of its token grid
    budget: int  # tokens it was allowed (resolved from the user's int / ratio)
    selection: Selection
    compressor: str = ""
    num_prefix_tokens: int = 0  # tokens before the grid (indices count them; the grid starts after them)
    extra: dict = field(default_factory=dict)
    #: AnyRes images (LLaVA-NeXT / OneVision): the packed layout (``vtc.layout.PackedLayout``) the indices refer to;
    #: ``grid`` is then the base view's grid, ``num_tokens`` counts the newlines too and ``budget`` does not
    layout: Any = None
    #: AnyRes images: visual tokens allotted to each view of ``layout`` (they sum to ``budget``)
    view_budgets: tuple[int, ...] | None = None
    allocation: str = ""  # the allocation strategy that split ``budget`` over the views ("" for single-view images)

    @property
    def indices(self) -> torch.Tensor:
        return self.selection.indices

    @property
    def scores(self) -> torch.Tensor | None:
        return self.selection.scores

    @property
    def details(self) -> Details | None:
        """What the compressor decided and why (``Selection.details``)."""
        return self.selection.details

    @property
    def num_kept(self) -> int:
        """Tokens the LLM receives for this image (kept newlines included)."""
        return self.selection.num_kept

    @property
    def num_newlines(self) -> int:
        """Newline tokens among the image's ``num_tokens`` (0 unless the image has a packed AnyRes layout)."""
        return 0 if self.layout is None else int(self.layout.num_newlines)

    @property
    def num_visual_tokens(self) -> int:
        """Tokens the budget is taken from: ``num_tokens`` without newlines."""
        return self.num_tokens - self.num_newlines

    @property
    def num_kept_newlines(self) -> int:
        if self.layout is None:
            return 0
        is_newline = self.layout.is_newline()
        return int(is_newline[self.indices.cpu()].sum())

    @property
    def num_kept_visual(self) -> int:
        """Visual tokens kept (newlines excluded); equals ``budget``."""
        return self.num_kept - self.num_kept_newlines


@dataclass
class SelectionRecords:
    """The records of one call without running the LLM, as returned by ``vtc.select(model, **inputs)``.

    ``images`` and ``videos`` are what ``vtc.last_selection`` / ``vtc.last_video_selection`` report after a wrapped
    ``generate`` / ``forward`` on the same inputs; ``prompt_lengths`` what ``vtc.last_prompt_lengths`` reports.
    """

    images: list[ImageSelection]
    videos: list["VideoRecord"]
    prompt_lengths: list[tuple[int, int]]  # per prompt: (tokens it has, tokens the LLM would receive), no padding
