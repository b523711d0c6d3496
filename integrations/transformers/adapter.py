"""What a model family has to tell the generic code, and the registry of families.

An adapter answers: which model classes it serves, where the vision tower and its layers are, how to capture a
declared signal there, how the visual tokens of each image are laid out (grid, prefix tokens), how positions are
computed on the original sequence, and -- for ``geometry``, ``flops`` and the demo -- where each token comes from in
the user's pixels, what the model's dimensions are and whether it takes videos. Selection rules never live here, and
nothing outside ``families/`` knows a family: a new family is one file there (its adapter, registered with
``register_adapter``, and the tiny checkpoint ``vtc.testing`` builds for it, registered with ``register_tiny``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from vtc.layout import PackedLayout
from vtc.signals import Signal, TowerInfo

if TYPE_CHECKING:
    from vtc.flops import VLMDims

    from .flops import TowerPasses
    from .geometry import TokenBoxes


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
    #: whether vtc compresses this family's videos (``pixel_values_videos``): ``encode_videos`` is implemented
    supports_video: ClassVar[bool] = False
    #: positions are M-RoPE ``(t, h, w)`` ids from the model's ``get_rope_index`` (``original_positions`` is
    #: ``[3, B, L]``), which kept tokens keep; otherwise 1-D positions (``[1, B, L]``)
    mrope: ClassVar[bool] = False

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

    # -- the pre-encoder stage (``Compressor.input_grid``: ``downsample``) ---------------------------------------
    #: whether the tower takes inputs of any size, so an image can be resized before it (``resize_inputs``)
    can_resize_inputs: ClassVar[bool] = False

    def token_grids(self, inputs: dict, what: str) -> list[tuple[int, int, int]]:
        """Per image (``what="image"``) or video (``"video"``) of the call: ``(steps, rows, cols)`` of its LLM token
        grid -- ``steps`` grids of ``rows x cols`` tokens, in placeholder order (families with
        ``can_resize_inputs``)."""
        raise NotImplementedError(f"{self.family} images cannot be resized before the encoder")

    def resize_inputs(self, inputs: dict, image_grids: list[tuple[int, int]] | None,
                      video_grids: list[tuple[int, int]] | None, pixels: bool = True) -> dict:
        """The call's pixel inputs with image ``i`` resized to ``image_grids[i]`` (``(rows, cols)`` LLM tokens) and
        every frame of video ``v`` to ``video_grids[v]``: the entries of ``inputs`` to replace (pixels and grids),
        as the processor would have given them for the smaller pictures (``None``: that modality unchanged;
        ``pixels=False``: the grids only, e.g. to count FLOPs)."""
        raise NotImplementedError(f"{self.family} images cannot be resized before the encoder")

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

    # -- the LLM (LLM-side compressors, ``llm_cut``) ----------------------------------------------------------
    def language_model(self):
        """The decoder stack the visual tokens run through (``.layers``, ``.norm``, ``.config``)."""
        inner = getattr(self.model, "model", None)
        lm = getattr(inner, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise NotImplementedError(f"vtc cannot find the decoder layers of {self.family} models; implement "
                                      "language_model in its adapter")
        return lm

    def fixed_image_tokens(self) -> int | None:
        """Visual tokens of every image when the family gives all images the same count (LLaVA-1.5), else ``None``
        (lets ``apply`` check a budget against the images before any call)."""
        return None

    def llm_first_layer(self) -> int:
        """The earliest decoder layer an LLM-side compressor may drop visual tokens at: layer 0 must see them all
        (layers before the drop produce the signals, and the model reads positions from layer 0's cache)."""
        return 1

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

    # -- pixels (``geometry``) ---------------------------------------------------------------------------------
    def image_token_counts(self, inputs: dict) -> list[int]:
        """Per image of the call (row-major over the batch): its visual tokens as the LLM receives them uncompressed,
        i.e. the length of its placeholder run."""
        raise NotImplementedError(f"vtc cannot count the visual tokens of {self.family} images yet")

    def image_token_boxes(self, processor, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
        """``geometry.image_token_boxes`` of image ``image_index`` of the call; ``width`` x ``height`` is the original
        image (already checked), ``processor`` the one that built ``inputs``."""
        raise NotImplementedError(
            f"vtc has no token geometry for {self.family} models yet; implement image_token_boxes in its adapter"
        )

    def video_token_boxes(self, processor, inputs: dict, video_index: int, width: int, height: int,
                          offset: int = 0) -> list[TokenBoxes]:
        """``geometry.video_token_boxes`` of video ``video_index`` of the call's video input (``supports_video``
        families); ``offset`` image-sequence records come before it (for messages only)."""
        raise NotImplementedError(
            f"vtc has no video token geometry for {self.family} models yet; implement video_token_boxes in its adapter"
        )

    # -- dimensions (``flops``) --------------------------------------------------------------------------------
    def model_dims(self, vision_tokens_per_image: int | None = None, views_per_image: int | None = None) -> VLMDims:
        """``flops.model_dims`` of this model (the arguments as documented there)."""
        raise NotImplementedError(
            f"vtc.flops has no dimensions for {self.family} models yet; implement model_dims in its adapter"
        )

    def image_passes(self, inputs: dict) -> list[TowerPasses]:
        """Per image of the call, how the model encodes it (tower passes, their dims, placeholder tokens)."""
        raise NotImplementedError(
            f"vtc.flops cannot count the images of {self.family} models yet; implement image_passes in its adapter"
        )

    def video_passes(self, inputs: dict) -> list[TowerPasses]:
        """Per video of the call, as ``image_passes`` (this default: the family takes no videos)."""
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError(f"inputs hold pixel_values_videos, but {type(self.model).__name__} takes no videos")
        return []


# ---------------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class TinyModel:
    """How ``vtc.testing`` builds a tiny random-weight checkpoint of a family (tests and benchmarks, no downloads).

    ``build(tokenizer)`` returns ``(model, processor)`` of the family's real classes, weights drawn from torch's global
    generator (seeded by ``vtc.testing.build_tiny``); the tokenizer is the test vocabulary plus ``placeholders``
    (the family's image / video placeholder tokens), with ``chat_template``. ``image_sizes``: the ``(width, height)``
    of the images tests give it, in turn (sizes that exercise its layouts).
    """

    build: Callable[[Any], tuple[Any, Any]]
    placeholders: tuple[str, ...]
    chat_template: str
    image_sizes: tuple[tuple[int, int], ...]


_ADAPTERS: list[type[FamilyAdapter]] = []
_TINY: dict[type[FamilyAdapter], TinyModel] = {}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register a family adapter (usable as a class decorator); ``unregister_adapter`` undoes it.

    A model is served by the registered adapter whose model class is nearest in the model's class hierarchy, so an
    adapter for a subclass of a supported model class takes precedence over the one of its base class.
    """
    if not (isinstance(cls, type) and issubclass(cls, FamilyAdapter)):
        raise TypeError(f"register_adapter takes a FamilyAdapter subclass, got {cls!r}")
    if not cls.family:
        raise ValueError(f"{cls.__name__} has no family name (set the class attribute family)")
    if cls.supports_video and cls.encode_videos is FamilyAdapter.encode_videos:
        raise TypeError(f"{cls.__name__} sets supports_video but does not implement encode_videos")
    other = next((a for a in _ADAPTERS if a.family == cls.family and a is not cls), None)
    if other is None:
        if cls not in _ADAPTERS:
            _ADAPTERS.append(cls)
    elif (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__):  # its module was reloaded
        _ADAPTERS[_ADAPTERS.index(other)] = cls
        _TINY.pop(other, None)
    else:
        raise ValueError(f"family {cls.family!r} is already registered by {other.__name__}")
    return cls


def unregister_adapter(cls: type[FamilyAdapter]) -> None:
    """Remove a registered adapter (and its tiny model); a no-op for one that is not registered."""
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)
    _TINY.pop(cls, None)


def register_tiny(cls: type[FamilyAdapter], tiny: TinyModel) -> None:
    """Register how ``vtc.testing`` builds a tiny checkpoint of the (registered) family of ``cls``."""
    if cls not in _ADAPTERS:
        raise ValueError(f"register {cls.__name__} with register_adapter before its tiny model")
    if not isinstance(tiny, TinyModel):
        raise TypeError(f"register_tiny takes a TinyModel, got {type(tiny).__name__}")
    _TINY[cls] = tiny


def supported_families() -> list[str]:
    """The registered family names, in registration order."""
    return [adapter.family for adapter in _ADAPTERS]


def adapter_class(family: str) -> type[FamilyAdapter]:
    """The registered adapter class of ``family``."""
    for adapter in _ADAPTERS:
        if adapter.family == family:
            return adapter
    raise ValueError(f"unknown family {family!r}; registered families: {supported_families()}")


def tiny_families() -> list[str]:
    """The registered families with a tiny model (``register_tiny``), in registration order."""
    return [adapter.family for adapter in _ADAPTERS if adapter in _TINY]


def tiny_model(family: str) -> TinyModel:
    """The registered ``TinyModel`` of ``family``."""
    adapter = next((a for a in _ADAPTERS if a.family == family and a in _TINY), None)
    if adapter is None:
        raise ValueError(f"unknown family {family!r}; expected one of {tiny_families()}")
    return _TINY[adapter]


def adapter_for(model) -> FamilyAdapter:
    """The adapter of ``model``: the registered one whose model class is nearest in ``type(model).__mro__``."""
    mro = type(model).__mro__
    best, best_distance = None, None
    for adapter in _ADAPTERS:
        try:
            if not adapter.matches(model):
                continue
            distance = min((mro.index(c) for c in adapter.model_classes() if c in mro), default=len(mro))
        except ImportError:  # a transformers build without this family
            continue
        if best is None or distance < best_distance:
            best, best_distance = adapter, distance
    if best is not None:
        return best(model)
    raise TypeError(
        f"vtc does not support {type(model).__name__}; supported model classes: {describe_families()}. Load the "
        "model with AutoModelForImageTextToText (the ...ForConditionalGeneration class)."
    )


def describe_families() -> str:
    """The registered families and their model classes, for error messages: ``"llava (LlavaFor...), ..."``."""
    return ", ".join(f"{a.family} ({', '.join(c.__name__ for c in _safe_classes(a))})" for a in _ADAPTERS)


def _safe_classes(adapter: type[FamilyAdapter]) -> tuple[type, ...]:
    try:
        return adapter.model_classes()
    except ImportError:
        return ()


def placeholder_rows(input_ids: torch.Tensor, token_id: int | None, sizes: list[int], what: str = "image") -> list[int]:
    """The batch row of each image (video) of a call, in order: row ``b`` of ``input_ids`` ``[B, L]`` holds the next
    images whose placeholder runs (``sizes[i]`` tokens of ``token_id`` each) fill its placeholder count exactly."""
    if token_id is None:
        counts = [0] * input_ids.shape[0]
    else:
        counts = [int(n) for n in (input_ids == token_id).sum(dim=-1).tolist()]
    rows, i = [], 0
    for b, count in enumerate(counts):
        left = count
        while left > 0 and i < len(sizes):
            left -= sizes[i]
            rows.append(b)
            i += 1
        if left != 0:
            raise ValueError(
                f"row {b} of input_ids has {count} {what} placeholder tokens, which the {what}s of the inputs do not "
                f"fill exactly ({what} tokens in order: {list(sizes)}); pass a processor output unchanged (input_ids "
                "with the expanded placeholders, and the pixel inputs of the same call)"
            )
    if i != len(sizes):
        raise ValueError(
            f"the inputs hold {len(sizes)} {what}s but input_ids has placeholders for only {i} of them; pass the "
            "input_ids and pixel inputs of the same processor call"
        )
    return rows
