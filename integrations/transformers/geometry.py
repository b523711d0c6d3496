"""Where every visual token comes from: its rectangle of the user's ORIGINAL image (or video frame), in pixels.

The demo draws the tokens a compressor kept on the picture the user gave, so it needs, for each visual token of an
image (``image_token_boxes``) or of each LLM frame of a video (``video_token_boxes``), the rectangle of original
pixels the vision tower turned into that token. Boxes are aligned index by index with vtc's records:
``image_token_boxes(...)[k]`` is token ``k`` of ``vtc.last_selection(model)[image_index]`` (``selection.indices``
index into the same ``num_tokens``), and ``video_token_boxes(...)[t][k]`` is token ``k`` of frame ``t`` of
``vtc.last_video_selection(model)[video_index]``.

How a family turns pixels into tokens is its adapter's business (``FamilyAdapter.image_token_boxes`` /
``video_token_boxes`` in ``families/``, which document their processors' steps); the geometry is read from the
processor's and the model's config, never from the pixels. This module holds the public entry points and the
building blocks the adapters share: a processor step as an affine map back to the original pixels (``Affine``,
``view_chain``), intervals of output pixels mapped back and clipped (``pixel_span``, ``clip_span``), and boxes
assembled per token grid (``grid_boxes``, ``finish_boxes``).

Box rule (what "inside the image" means): a box is the token's receptive rectangle -- the pixels of
``pixel_values`` it reads, mapped back through the resize / crop / pad steps -- **intersected with the image**, so
every finite box lies inside ``[0, width] x [0, height]``. Only padding sticks out of the image before clipping
(AnyRes crops at the padded edges, a center crop larger than the resized image, batch padding, pad-to-square);
clipping keeps exactly the part of the user's picture the token sees. A token whose rectangle holds no image pixel
at all has a NaN box and view -1, like tokens without pixels (CLS, newlines). Coordinates are continuous: pixel
``x`` spans ``[x, x + 1)``, so a full-image box is ``(0, 0, width, height)``.

``image_size`` / ``frame_size`` are ``(width, height)`` of the picture the user gave. Limits: the processor's
*saved* settings are read (a ``size=`` / ``crop_size=`` override passed to one processor call is not seen; where
the call's pixel tensors disagree with them, the adapters raise). Returned tensors are on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .adapter import adapter_for, placeholder_rows

__all__ = ["TokenBoxes", "image_token_boxes", "video_token_boxes"]


@dataclass(frozen=True)
class TokenBoxes:
    """Per visual token: its box in original pixels and the view it belongs to (see the module doc)."""

    boxes: torch.Tensor  # [N, 4] float32 (x0, y0, x1, y1); NaN rows for tokens without pixels
    views: torch.Tensor  # [N] int64: 0 = the base (or only) view, 1.. = AnyRes crops, -1 = no pixels
    unit: tuple[int, int]  # patches per token (rows, cols)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


# ------------------------------------------------------------------------------------------------------------ API
def image_token_boxes(model, processor, inputs: dict, image_index: int, image_size: tuple[int, int]) -> TokenBoxes:
    """Boxes of image number ``image_index`` of the call (row-major over the batch, the order of
    ``vtc.last_selection(model)[i].image_index``), aligned with that ``ImageSelection``'s token indices:
    ``N == record.num_tokens`` (prefix tokens first, e.g. CLS under LLaVA's "full" strategy; AnyRes: the packed
    order including newline tokens). ``image_size`` = (width, height) of the original image."""
    width, height = _check_size(image_size, "image_size")
    return adapter_for(model).image_token_boxes(processor, inputs, image_index, width, height)


def video_token_boxes(model, processor, inputs: dict, video_index: int,
                      frame_size: tuple[int, int]) -> list[TokenBoxes]:
    """Per LLM frame of video ``video_index`` (the order of ``vtc.last_video_selection(model)[v].grids``; a Qwen
    temporal step of fused frames is one frame), the boxes of that frame's tokens in the sampled frame's pixels,
    aligned with the indices of that frame's selection (``VideoSelection.frames[t]``). ``frame_size`` = (width,
    height) of the sampled frames.

    With ``vtc.apply(..., images_as_video=True)`` the first records of ``last_video_selection`` are the image
    sequences of the prompts (one per prompt with images); their frames are images, boxed like
    ``image_token_boxes`` in ``frame_size`` pixels."""
    width, height = _check_size(frame_size, "frame_size")
    adapter = adapter_for(model)
    video_index = check_index(video_index, "video_index")
    sequences = _image_sequences(model, inputs)
    if video_index < len(sequences):
        return [image_token_boxes(model, processor, inputs, i, (width, height)) for i in sequences[video_index]]
    video_index -= len(sequences)
    if not adapter.supports_video:
        raise ValueError(
            f"{adapter.family} models have no video input, so the call has no video {video_index + len(sequences)}; "
            "a video given to such a model as a sequence of images is boxed image by image with image_token_boxes "
            "(or, with vtc.apply(..., images_as_video=True), by video_token_boxes over its image sequences)"
        )
    return adapter.video_token_boxes(processor, inputs, video_index, width, height, offset=len(sequences))


def _image_sequences(model, inputs: dict) -> list[list[int]]:
    """``images_as_video``: per image-sequence video record (one per prompt with images), its image indices."""
    from . import get_state, is_applied

    if not is_applied(model) or not get_state(model).images_as_video or inputs.get("pixel_values") is None:
        return []
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("with images_as_video the frames of a video are the images of a prompt; pass the call's "
                         "input_ids so the images can be assigned to their prompts")
    adapter = get_state(model).adapter
    rows = placeholder_rows(torch.as_tensor(input_ids), adapter.image_token_id(), adapter.image_token_counts(inputs))
    by_row: dict[int, list[int]] = {}
    for image, row in enumerate(rows):
        by_row.setdefault(row, []).append(image)
    return [members for _, members in sorted(by_row.items())]


# ------------------------------------------------------------------------------------------------------------ checks
def _check_size(size, what: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (width, height) of the original picture in pixels, got {size!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"{what} must be (width, height) >= 1 pixel, got {size!r}")
    return width, height


def check_index(index, what: str) -> int:
    """``index`` as an int >= 0 (``what`` names it in the error)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"{what} must be an int >= 0, got {index!r}")
    return int(index)


def check_image_index(index, count: int, key: str) -> int:
    """``index`` as an image index of a call whose ``key`` input holds ``count`` images."""
    index = check_index(index, "image_index")
    if index >= count:
        raise IndexError(f"image_index {index} is out of range: {key} of this call holds {count} image(s)")
    return index


def _sub_processor(processor, attribute: str, what: str):
    """The processor's image / video processor (or ``processor`` itself when it is one)."""
    part = getattr(processor, attribute, None)
    part = processor if part is None else part
    if not hasattr(part, "do_resize"):
        raise TypeError(
            f"expected the model's processor (or its {what} processor), got {type(processor).__name__}; pass the "
            "AutoProcessor that built the inputs"
        )
    return part


def image_processor_of(processor):
    """The processor's image processor (or ``processor`` itself when it is one)."""
    return _sub_processor(processor, "image_processor", "image")


def video_processor_of(processor):
    """The processor's video processor (or ``processor`` itself when it is one)."""
    return _sub_processor(processor, "video_processor", "video")


# ------------------------------------------------------------------------------------------------------------ maps
@dataclass(frozen=True)
class Affine:
    """One axis of a processing step, backwards: source coordinate = scale * coordinate + shift."""

    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, u):
        return self.scale * u + self.shift

    def then(self, outer: "Affine") -> "Affine":
        """``outer(self(u))``: map further back towards the original."""
        return Affine(outer.scale * self.scale, outer.scale * self.shift + outer.shift)


def size_field(size, key: str) -> int | None:
    """Entry ``key`` of a processor's ``size`` / ``crop_size`` (a dict or an object), None when unset."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _resized_size(height: int, width: int, size) -> tuple[int, int]:
    """(height, width) after the image processor's ``resize`` with ``size``, as transformers computes it."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    shortest, longest = size_field(size, "shortest_edge"), size_field(size, "longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        dummy = np.broadcast_to(np.zeros((), np.uint8), (1, height, width))  # only its shape is read
        return tuple(get_resize_output_image_size(dummy, size=shortest, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    max_h, max_w = size_field(size, "max_height"), size_field(size, "max_width")
    if max_h and max_w:
        return tuple(get_image_size_for_max_height_width((height, width), max_h, max_w))
    h, w = size_field(size, "height"), size_field(size, "width")
    if h and w:
        return h, w
    raise ValueError(
        f"the image processor's size {size!r} has none of height/width, shortest_edge, max_height/max_width; vtc "
        "cannot tell how it resizes -- use the processor saved with the model"
    )


def _crop_offset(length: int, crop: int, pil: bool) -> int:
    """Where a center crop of ``crop`` starts in an axis of ``length`` (negative: the crop pads that much first)."""
    if crop > length:  # torchvision pads floor((c - l) / 2) before; the PIL/NumPy backend pads ceil
        return -((crop - length + 1) // 2 if pil else (crop - length) // 2)
    return (length - crop) // 2


def view_chain(ip, height: int, width: int) -> tuple[int, int, Affine, Affine]:
    """The resize + center crop of an image processor on an input of (height, width).

    Returns the output (height, width) and, per axis, the map from output pixels back to input pixels."""
    ay, ax = Affine(), Affine()
    out_h, out_w = height, width
    if getattr(ip, "do_resize", False) and getattr(ip, "size", None):
        out_h, out_w = _resized_size(height, width, ip.size)
        ay, ax = Affine(height / out_h), Affine(width / out_w)
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop:
        ch, cw = size_field(crop, "height"), size_field(crop, "width")
        if not (ch and cw):
            raise ValueError(f"the image processor's crop_size {crop!r} needs height and width")
        pil = getattr(ip, "backend", "torchvision") == "pil"
        ay = Affine(1.0, _crop_offset(out_h, ch, pil)).then(ay)
        ax = Affine(1.0, _crop_offset(out_w, cw, pil)).then(ax)
        out_h, out_w = ch, cw
    return out_h, out_w, ay, ax


def pixel_span(a: float, b: float, valid: int, axis: Affine, limit: float) -> tuple[float, float] | None:
    """Output pixels [a, b) -> source interval, keeping what is inside the output's image part ``[0, valid)`` and
    inside the source ``[0, limit]``; None when nothing is left."""
    a, b = max(a, 0.0), min(b, float(valid))
    if b <= a:
        return None
    s0, s1 = sorted((axis(a), axis(b)))
    s0, s1 = max(s0, 0.0), min(s1, float(limit))
    return (s0, s1) if s1 > s0 else None


def grid_boxes(ys: list, xs: list) -> torch.Tensor:
    """Row intervals x column intervals -> ``[rows * cols, 4]`` boxes in raster order (NaN where either is None)."""
    out = torch.full((len(ys), len(xs), 4), float("nan"), dtype=torch.float64)
    for r, y in enumerate(ys):
        if y is None:
            continue
        for c, x in enumerate(xs):
            if x is not None:
                out[r, c] = torch.tensor([x[0], y[0], x[1], y[1]], dtype=torch.float64)
    return out.reshape(-1, 4)


def finish_boxes(boxes: torch.Tensor, views: torch.Tensor, unit: tuple[int, int]) -> TokenBoxes:
    """``TokenBoxes`` from ``[N, 4]`` boxes and ``[N]`` views: a token with a NaN box gets view -1 and vice versa."""
    boxes = boxes.to(torch.float32)
    views = views.to(torch.long).clone()
    views[torch.isnan(boxes).any(dim=1)] = -1
    boxes[views < 0] = float("nan")
    return TokenBoxes(boxes=boxes, views=views, unit=unit)


def copy_boxes(boxes: TokenBoxes) -> TokenBoxes:
    """An independent copy (frames sharing one geometry each get their own tensors)."""
    return TokenBoxes(boxes=boxes.boxes.clone(), views=boxes.views.clone(), unit=boxes.unit)


def clip_span(a: float, b: float, limit: int) -> tuple[float, float] | None:
    """The interval between ``a`` and ``b`` (either order) clipped to ``[0, limit]``; None when empty."""
    a, b = sorted((a, b))
    a, b = max(a, 0.0), min(b, float(limit))
    return (a, b) if b > a else None
