"""What a model family has to tell the generic cut, and nothing more.

An adapter answers: which model classes it serves, where the vision tower and its layers are, how to capture a
declared signal there, how the visual tokens of each image are laid out (grid, prefix tokens), and how positions
are computed on the original sequence. Selection rules never live here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vtc.layout import PackedLayout
from vtc.signals import Signal, TowerInfo


@dataclass
class ImageLayout:
    grid: tuple[int, int]  # (rows, cols) of the spatial grid of this image's visual tokens (AnyRes: the base view)
    num_prefix_tokens: int = 0  # tokens before the grid (e.g. CLS under LLaVA's "full" strategy)
    #: AnyRes images (LLaVA-NeXT / OneVision): the packed base + crops + newlines layout; the image's features are
    #: then that packed sequence and its signals come per view (``EncodedImages.views``)
    packed: PackedLayout | None = None


@dataclass
class EncodedImages:
    """Output of the family's own ``get_image_features`` plus what vtc captured while it ran."""

    output: Any  # the model's BaseModelOutputWithPooling (pooler_output: one [N_i, D] tensor per image)
    features: list[torch.Tensor]
    layouts: list[ImageLayout]
    signals: list[dict[Signal, torch.Tensor]]  # per image, laid out like its features
    #: per image: further feature sets laid out like its features that the LLM also reads at the image's
    #: placeholder positions (Qwen3-VL deepstack levels); each gets the same selection as ``features``
    levels: list[list[torch.Tensor]] = field(default_factory=list)
    #: per image: for an AnyRes image (``layouts[i].packed`` set) its signals per view, each laid out like the view's
    #: visible grid (``PackedLayout.view_grid``); ``None`` for single-view images (their signals are in ``signals``)
    views: list[list[dict[Signal, torch.Tensor]] | None] = field(default_factory=list)


@dataclass
class EncodedVideos:
    """The videos of a call, encoded by the family's own ``get_video_features``, split into frames.

    A *frame* is one grid of visual tokens as the LLM receives them: a sampled frame (LLaVA-OneVision) or a temporal
    step of two fused frames (Qwen-VL, ``temporal_patch_size = 2``). Every video's placeholder run is its frames'
    tokens in order followed by ``suffix[v]`` layout tokens (OneVision's one newline per video), which are always
    kept.
    """

    output: Any  # the model's own video output (what ``shrink_video_output`` copies)
    frames: list[list[torch.Tensor]]  # per video: per frame [n_t, D]
    grids: list[list[tuple[int, int]]]  # per video: per frame (rows, cols)
    signals: list[list[dict[Signal, torch.Tensor]]]  # per video: per frame, laid out like the frame's tokens
    suffix: list[torch.Tensor] = field(default_factory=list)  # per video: [S, D] trailing layout tokens (kept)
    #: per video: further feature sets read at the video's placeholders (Qwen3-VL deepstack), each [N_video, D]
    levels: list[list[torch.Tensor]] = field(default_factory=list)
    #: seconds of each frame where the inputs say (Qwen: temporal step * seconds per step), else None
    timestamps: list[list[float] | None] = field(default_factory=list)


class FamilyAdapter:
    """Base class of the per-family adapters in ``families/``."""

    #: human name used in error messages and the support matrix
    family: ClassVar[str] = ""
    #: position policies this family supports; the first is the default
    position_modes: ClassVar[tuple[str, ...]] = ("reindex", "keep")
    #: whether images can have several views (AnyRes base + crops), so that ``allocation`` strategies apply
    multi_view: ClassVar[bool] = False
    #: input keys the cut drops once the images (and other modalities) are encoded, besides ``encoder_kwargs``
    consumed_keys: ClassVar[tuple[str, ...]] = (
        "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "image_grid_thw", "image_sizes",
    )

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, cls.model_classes())

    def __init__(self, model):
        self.model = model

    # -- the tower -----------------------------------------------------------------------------------------
    def tower_info(self, inputs: dict | None = None) -> TowerInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def video_token_id(self) -> int | None:
        """The placeholder id of video tokens (``None``: the family has no video input)."""
        config = self.model.config
        value = getattr(config, "video_token_id", None)
        if value is None:
            value = getattr(config, "video_token_index", None)
        return None if value is None else int(value)

    def position_inputs(self, inputs: dict) -> dict:
        """What ``original_positions`` needs from the call's inputs besides ids and mask (Qwen: the grids)."""
        return {}

    def encode_videos(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedVideos:
        """Encode the call's videos with the model's own ``get_video_features``, capturing ``signals`` per frame."""
        raise NotImplementedError(
            f"vtc cannot compress the videos of {self.family} models yet; pass the frames as images instead"
        )

    def shrink_video_output(self, encoded: EncodedVideos, kept: list[torch.Tensor],
                            kept_levels: list[list[torch.Tensor]]) -> Any:
        """A copy of the video output holding, per video, only its kept (or merged) tokens and its suffix;
        ``kept_levels[v]``: video ``v``'s ``levels`` with its selection applied."""
        return type(encoded.output)(pooler_output=tuple(kept))

    def encoder_kwargs(self, inputs: dict) -> dict:
        """The entries of ``inputs`` that ``get_image_features`` takes (as generate itself selects them)."""
        params = inspect.signature(self.model.model.get_image_features).parameters
        return {key: inputs[key] for key in params if key != "kwargs" and key in inputs}

    def encode(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedImages:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- positions -----------------------------------------------------------------------------------------
    def original_positions(self, input_ids, attention_mask, position_inputs: dict) -> torch.Tensor:
        """Positions of the original sequence as ``[R, B, L]`` (R = 1 for 1-D RoPE, 3 for M-RoPE);
        ``position_inputs``: what ``position_inputs`` took from the call, plus its ``mm_token_type_ids`` if given."""
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 1)[None]

    def position_ids(self, kept_positions: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """``position_ids`` for the shrunk prompt from the kept tokens' original positions ``[R, B, L']``.

        Only called when positions are kept; with ``positions="reindex"`` the model numbers the prompt itself.
        """
        return kept_positions[0]

    def shrink_output(self, encoded: EncodedImages, kept_features: list[torch.Tensor],
                      kept_levels: list[list[torch.Tensor]]) -> Any:
        """A copy of the encoder output holding only the kept (or merged) features; ``kept_levels[i]``: image
        ``i``'s ``levels`` with its selection applied."""
        return type(encoded.output)(pooler_output=tuple(kept_features))


_ADAPTERS: list[type[FamilyAdapter]] = []


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    _ADAPTERS.append(cls)
    return cls


def supported_families() -> list[str]:
    _load_builtin_adapters()
    return [adapter.family for adapter in _ADAPTERS]


def adapter_for(model) -> FamilyAdapter:
    _load_builtin_adapters()
    for adapter in _ADAPTERS:
        try:
            if adapter.matches(model):
                return adapter(model)
        except ImportError:  # a transformers build without this family
            continue
    raise TypeError(
        f"vtc does not support {type(model).__name__}; supported model classes: "
        + ", ".join(
            f"{a.family} ({', '.join(c.__name__ for c in _safe_classes(a))})" for a in _ADAPTERS
        )
        + ". Load the model with AutoModelForImageTextToText (the ...ForConditionalGeneration class)."
    )


def _safe_classes(adapter: type[FamilyAdapter]) -> tuple[type, ...]:
    try:
        return adapter.model_classes()
    except ImportError:
        return ()


_LOADED = False


def _load_builtin_adapters() -> None:
    global _LOADED
    if not _LOADED:
        from .families import (  # noqa: F401  (registration side effect, in this order)
            llava,
            llava_next,
            llava_onevision,
            qwen2_5_vl,
            qwen2_vl,
            qwen3_vl,
        )

        _LOADED = True
