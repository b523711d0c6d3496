"""Where every visual token comes from: its rectangle of the user's ORIGINAL image (or video frame), in pixels.

The demo draws the tokens a compressor kept on the picture the user gave, so it needs, for each visual token of an
image (``image_token_boxes``) or of each LLM frame of a video (``video_token_boxes``), the rectangle of original
pixels the vision tower turned into that token. Boxes are aligned index by index with vtc's records:
``image_token_boxes(...)[k]`` is token ``k`` of ``vtc.last_selection(model)[image_index]`` (``selection.indices``
index into the same ``num_tokens``), and ``video_token_boxes(...)[t][k]`` is token ``k`` of frame ``t`` of
``vtc.last_video_selection(model)[video_index]``.

How each family turns pixels into tokens (the geometry is read from the processor's and the model's config, never
from the pixels):

* **LLaVA-1.5** (``CLIPImageProcessor`` or any image processor with the same steps): ``do_resize`` with ``size``
  (``shortest_edge`` keeps the aspect ratio; ``height``/``width`` squashes; ``shortest_edge`` + ``longest_edge`` and
  ``max_height``/``max_width`` as transformers computes them), then ``do_center_crop`` to ``crop_size`` (a crop larger
  than the resized image pads it, as transformers does), then ``do_pad`` (batch padding at the bottom / right). One
  token per ``patch_size`` patch of ``pixel_values``; under ``vision_feature_select_strategy="full"`` the CLS token
  comes first (no pixels). The parts of the image the center crop cuts away are in no token.
* **LLaVA-NeXT / LLaVA-OneVision** (AnyRes): view 0 (the base) is the whole image squashed to the view size; the
  crops come from the image resized to the best pinpoint keeping its aspect ratio, padded (centred) to the pinpoint,
  and cut into view-sized crops (views ``1..``, tile raster order). The packed order (``vtc.layout.PackedLayout``,
  built by the adapter exactly as the model packs its features) unpads the canvas and, for OneVision's
  ``anyres_max_N``, bilinearly downscales it: a downscaled token's box is its *footprint*, the part of the unpadded
  canvas its output cell covers (``align_corners=False``: cell ``i`` of ``n`` covers ``[i, i + 1) * L / n``), which is
  centred on the point the bilinear resize samples. Newline tokens have no pixels. OneVision images of a
  multi-image prompt are a single base view: the image padded to a square (centred), then resized.
* **Qwen2-VL / Qwen2.5-VL / Qwen3-VL**: the whole image (frame) resized to ``image_grid_thw`` (``video_grid_thw``)
  patches; one token per ``spatial_merge_size``-square unit of patches (``unit = (2, 2)``), raster order. A video's
  LLM frame is one temporal step (``temporal_patch_size`` fused frames share the same boxes).
* **LLaVA-OneVision videos**: every sampled frame resized by the video processor (``size``, ``crop_size``) and its
  patch grid bilinearly pooled to ``ceil(side / 2)`` per axis; a token's box is its footprint (about 2x2 patches).

Box rule (what "inside the image" means): a box is the token's receptive rectangle -- the pixels of
``pixel_values`` it reads, mapped back through the resize / crop / pad steps -- **intersected with the image**, so
every finite box lies inside ``[0, width] x [0, height]``. Only padding sticks out of the image before clipping:
AnyRes crops at the padded edges (the unpadding keeps a token row / column that is partly padding, by less than one
patch), a center crop larger than the resized image, batch padding, and OneVision's pad-to-square; clipping keeps
exactly the part of the user's picture the token sees. A token whose rectangle holds no image pixel at all has a NaN
box and view -1, like tokens without pixels (CLS, newlines): a token entirely in padding (OneVision's pad-to-square
base views of non-square images in multi-image prompts, batch padding). Coordinates are continuous: pixel ``x``
spans ``[x, x + 1)``, so a full-image box is ``(0, 0, width, height)``.

``image_size`` / ``frame_size`` are ``(width, height)`` of the picture the user gave. LLaVA's boxes assume the
processor got that picture; Qwen's and AnyRes's hold for any resize of it handed to the processor (Qwen resizes the
whole image; AnyRes reads the size the processor saw from ``image_sizes`` and scales).

Limits: the processor's *saved* settings are read (a ``size=`` / ``crop_size=`` override passed to one processor
call is not seen; LLaVA and OneVision videos raise when ``pixel_values`` disagree with them; Qwen and AnyRes read
the call's grids / sizes and are unaffected). When the view is not a multiple of the patch (384 px views of 14 px
patches) the tower never sees the last pixels of each view, so neither does any box; on a OneVision canvas
downscaled by ``anyres_max_N`` the bilinear resize then mixes two crops across that strip near crop seams, and the
pixels such a token sees centre up to ~0.2 patch off its footprint's centre (everything else is exact up to
resampling). Returned tensors are on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .adapter import adapter_for

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
    from .families.llava import LlavaAdapter
    from .families.llava_next import AnyResAdapter
    from .families.qwen2_5_vl import QwenVLAdapter

    width, height = _check_size(image_size, "image_size")
    adapter = adapter_for(model)
    if isinstance(adapter, AnyResAdapter):
        return _anyres_boxes(adapter, _image_processor(processor), inputs, image_index, width, height)
    if isinstance(adapter, LlavaAdapter):
        return _llava_boxes(adapter, _image_processor(processor), inputs, image_index, width, height)
    if isinstance(adapter, QwenVLAdapter):
        t, gh, gw = _qwen_grid(inputs, "image_grid_thw", "pixel_values", image_index, "image")
        boxes = _qwen_frame_boxes(adapter, gh, gw, width, height)
        return TokenBoxes(boxes.boxes.repeat(t, 1), boxes.views.repeat(t), boxes.unit)
    raise NotImplementedError(  # pragma: no cover - every registered adapter is handled above
        f"vtc has no token geometry for {adapter.family} models yet; add it to "
        "vtc.integrations.transformers.geometry"
    )


def video_token_boxes(model, processor, inputs: dict, video_index: int,
                      frame_size: tuple[int, int]) -> list[TokenBoxes]:
    """Per LLM frame of video ``video_index`` (the order of ``vtc.last_video_selection(model)[v].grids``; a Qwen
    temporal step of fused frames is one frame), the boxes of that frame's tokens in the sampled frame's pixels,
    aligned with the indices of that frame's selection (``VideoSelection.frames[t]``). ``frame_size`` = (width,
    height) of the sampled frames.

    With ``vtc.apply(..., images_as_video=True)`` the first records of ``last_video_selection`` are the image
    sequences of the prompts (one per prompt with images); their frames are images, boxed like
    ``image_token_boxes`` in ``frame_size`` pixels."""
    from .families.llava_onevision import LlavaOnevisionAdapter
    from .families.qwen2_5_vl import QwenVLAdapter

    width, height = _check_size(frame_size, "frame_size")
    adapter = adapter_for(model)
    video_index = _check_index(video_index, "video_index")
    sequences = _image_sequences(model, processor, inputs)
    if video_index < len(sequences):
        return [image_token_boxes(model, processor, inputs, i, (width, height)) for i in sequences[video_index]]
    video_index -= len(sequences)
    if isinstance(adapter, QwenVLAdapter):
        t, gh, gw = _qwen_grid(inputs, "video_grid_thw", "pixel_values_videos", video_index, "video",
                               offset=len(sequences))
        boxes = _qwen_frame_boxes(adapter, gh, gw, width, height)
        return [_copy(boxes) for _ in range(t)]
    if isinstance(adapter, LlavaOnevisionAdapter):
        return _onevision_video_boxes(adapter, _video_processor(processor), inputs, video_index, width, height,
                                      offset=len(sequences))
    raise ValueError(
        f"{adapter.family} models have no video input, so the call has no video {video_index + len(sequences)}; "
        "a video given to such a model as a sequence of images is boxed image by image with image_token_boxes "
        "(or, with vtc.apply(..., images_as_video=True), by video_token_boxes over its image sequences)"
    )


# ------------------------------------------------------------------------------------------------------------ checks
def _check_size(size, what: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (width, height) of the original picture in pixels, got {size!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"{what} must be (width, height) >= 1 pixel, got {size!r}")
    return width, height


def _check_index(index, what: str) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"{what} must be an int >= 0, got {index!r}")
    return int(index)


def _check_image_index(index, count: int, key: str) -> int:
    index = _check_index(index, "image_index")
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


def _image_processor(processor):
    return _sub_processor(processor, "image_processor", "image")


def _video_processor(processor):
    return _sub_processor(processor, "video_processor", "video")


# ------------------------------------------------------------------------------------------------------------ maps
@dataclass(frozen=True)
class _Affine:
    """One axis of a processing step, backwards: source coordinate = scale * coordinate + shift."""

    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, u):
        return self.scale * u + self.shift

    def then(self, outer: "_Affine") -> "_Affine":
        """``outer(self(u))``: map further back towards the original."""
        return _Affine(outer.scale * self.scale, outer.scale * self.shift + outer.shift)


def _size_field(size, key: str):
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _resized_size(height: int, width: int, size) -> tuple[int, int]:
    """(height, width) after the image processor's ``resize`` with ``size``, as transformers computes it."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    shortest, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        dummy = np.broadcast_to(np.zeros((), np.uint8), (1, height, width))  # only its shape is read
        return tuple(get_resize_output_image_size(dummy, size=shortest, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    max_h, max_w = _size_field(size, "max_height"), _size_field(size, "max_width")
    if max_h and max_w:
        return tuple(get_image_size_for_max_height_width((height, width), max_h, max_w))
    h, w = _size_field(size, "height"), _size_field(size, "width")
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


def _view_chain(ip, height: int, width: int) -> tuple[int, int, _Affine, _Affine]:
    """The resize + center crop of an image processor on an input of (height, width).

    Returns the output (height, width) and, per axis, the map from output pixels back to input pixels."""
    ay, ax = _Affine(), _Affine()
    out_h, out_w = height, width
    if getattr(ip, "do_resize", False) and getattr(ip, "size", None):
        out_h, out_w = _resized_size(height, width, ip.size)
        ay, ax = _Affine(height / out_h), _Affine(width / out_w)
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop:
        ch, cw = _size_field(crop, "height"), _size_field(crop, "width")
        if not (ch and cw):
            raise ValueError(f"the image processor's crop_size {crop!r} needs height and width")
        pil = getattr(ip, "backend", "torchvision") == "pil"
        ay = _Affine(1.0, _crop_offset(out_h, ch, pil)).then(ay)
        ax = _Affine(1.0, _crop_offset(out_w, cw, pil)).then(ax)
        out_h, out_w = ch, cw
    return out_h, out_w, ay, ax


def _span(a: float, b: float, valid: int, axis: _Affine, limit: float) -> tuple[float, float] | None:
    """Output pixels [a, b) -> source interval, keeping what is inside the output's image part ``[0, valid)`` and
    inside the source ``[0, limit]``; None when nothing is left."""
    a, b = max(a, 0.0), min(b, float(valid))
    if b <= a:
        return None
    s0, s1 = sorted((axis(a), axis(b)))
    s0, s1 = max(s0, 0.0), min(s1, float(limit))
    return (s0, s1) if s1 > s0 else None


def _grid_boxes(ys: list, xs: list) -> torch.Tensor:
    """Row intervals x column intervals -> ``[rows * cols, 4]`` boxes in raster order (NaN where either is None)."""
    out = torch.full((len(ys), len(xs), 4), float("nan"), dtype=torch.float64)
    for r, y in enumerate(ys):
        if y is None:
            continue
        for c, x in enumerate(xs):
            if x is not None:
                out[r, c] = torch.tensor([x[0], y[0], x[1], y[1]], dtype=torch.float64)
    return out.reshape(-1, 4)


def _finish(boxes: torch.Tensor, views: torch.Tensor, unit: tuple[int, int]) -> TokenBoxes:
    boxes = boxes.to(torch.float32)
    views = views.to(torch.long).clone()
    views[torch.isnan(boxes).any(dim=1)] = -1
    boxes[views < 0] = float("nan")
    return TokenBoxes(boxes=boxes, views=views, unit=unit)


def _copy(boxes: TokenBoxes) -> TokenBoxes:
    return TokenBoxes(boxes=boxes.boxes.clone(), views=boxes.views.clone(), unit=boxes.unit)


# ------------------------------------------------------------------------------------------------------------ LLaVA
def _llava_boxes(adapter, ip, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
    pixel_values = inputs.get("pixel_values")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError("LLaVA token boxes need the call's pixel_values [num_images, 3, H, W] (what its processor "
                         "returns); pass the inputs the model was called with")
    image_index = _check_image_index(image_index, pixel_values.shape[0], "pixel_values")
    tensor_h, tensor_w = pixel_values.shape[-2:]
    patch = adapter.vision.config.patch_size
    rows, cols = tensor_h // patch, tensor_w // patch
    out_h, out_w, ay, ax = _view_chain(ip, height, width)
    padded = bool(getattr(ip, "do_pad", False)) and out_h <= tensor_h and out_w <= tensor_w
    if (out_h, out_w) != (tensor_h, tensor_w) and not padded:
        raise ValueError(
            f"the image processor turns a {width}x{height} image into {out_w}x{out_h} pixels but pixel_values are "
            f"{tensor_w}x{tensor_h}: pass the processor that built the inputs (with the settings of that call) and "
            "the size of the image given to it"
        )
    ys = [_span(r * patch, (r + 1) * patch, out_h, ay, height) for r in range(rows)]
    xs = [_span(c * patch, (c + 1) * patch, out_w, ax, width) for c in range(cols)]
    grid = _grid_boxes(ys, xs)
    prefix = 1 if (adapter._strategy(inputs) == "full" and adapter.has_cls()) else 0
    boxes = torch.cat([torch.full((prefix, 4), float("nan"), dtype=torch.float64), grid])
    views = torch.cat([torch.full((prefix,), -1, dtype=torch.long), torch.zeros(rows * cols, dtype=torch.long)])
    return _finish(boxes, views, (1, 1))


# ------------------------------------------------------------------------------------------------------------ AnyRes
def _anyres_processor_geometry(ip) -> tuple[tuple[int, int], int]:
    """(height, width) of the base squash and the crop side in pixels, as the AnyRes image processors read them."""
    size = getattr(ip, "size", None)
    h, w = (_size_field(size, "height"), _size_field(size, "width")) if size else (None, None)
    shortest = _size_field(size, "shortest_edge") if size else None
    base = (h, w) if (h and w) else (shortest, shortest)
    crop = getattr(ip, "crop_size", None)
    side = (_size_field(crop, "height") if crop else None) or h or shortest
    if not (base[0] and base[1] and side):
        raise ValueError(f"the AnyRes image processor's size {size!r} / crop_size {crop!r} do not say the view size; "
                         "use the processor saved with the model")
    return base, side


def _anyres_boxes(adapter, ip, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    name = adapter.display_name
    sizes = adapter._image_sizes(adapter.encoder_kwargs(inputs))
    image_index = _check_image_index(image_index, len(sizes), "image_sizes")
    crops = adapter._needs_crops(inputs, len(sizes))[image_index]
    adapter._check_strategy(inputs)  # the same refusal as the adapter ("full" with a CLS tower)
    layout = adapter.packed_layout(sizes[image_index], crops, adapter._aspect_limit(inputs))
    in_h, in_w = sizes[image_index]
    cfg = adapter.vision.config
    view_px, token_px, side = cfg.image_size, cfg.patch_size, adapter.view_side
    # processor input pixels -> the user's pixels (the same picture, maybe resized before the processor)
    to_user_y, to_user_x = _Affine(height / in_h), _Affine(width / in_w)

    def view_axes(src_h: int, src_w: int) -> tuple[int, int, _Affine, _Affine]:
        out_h, out_w, ay, ax = _view_chain(ip, src_h, src_w)
        if (out_h, out_w) != (view_px, view_px):
            raise ValueError(
                f"{name}'s image processor makes {out_w}x{out_h} views but the tower takes {view_px}x{view_px}; pass "
                "the processor saved with this model"
            )
        return out_h, out_w, ay, ax

    boxes = torch.full((layout.num_tokens, 4), float("nan"), dtype=torch.float64)
    views = torch.full((layout.num_tokens,), -1, dtype=torch.long)

    # view 0: the whole image squashed to the base size (or, base-only OneVision images, padded to a square first)
    if crops:
        (base_h, base_w), crop_px = _anyres_processor_geometry(ip)
        src_y, src_x = _Affine(in_h / base_h), _Affine(in_w / base_w)
    else:
        base_h = base_w = max(in_h, in_w)
        src_y, src_x = _Affine(1.0, -((base_h - in_h) // 2)), _Affine(1.0, -((base_w - in_w) // 2))
    out_h, out_w, ay, ax = view_axes(base_h, base_w)
    ay, ax = ay.then(src_y).then(to_user_y), ax.then(src_x).then(to_user_x)
    rows, cols = layout.base
    ys = [_span(r * token_px, (r + 1) * token_px, out_h, ay, height) for r in range(rows)]
    xs = [_span(c * token_px, (c + 1) * token_px, out_w, ax, width) for c in range(cols)]
    base_index = layout.view_indices(0)
    boxes[base_index] = _grid_boxes(ys, xs)
    views[base_index] = 0

    canvas = layout.canvas
    if canvas is None:
        return _finish(boxes, views, (1, 1))

    # the crops: the image resized into the best pinpoint keeping its aspect ratio, pasted centred, cut in crops
    pinpoints = getattr(ip, "image_grid_pinpoints", None) or adapter._pinpoints()
    best_h, best_w = select_best_resolution((in_h, in_w), pinpoints)
    tiles = (best_h // crop_px, best_w // crop_px)
    if tiles != canvas.tiles or best_h % crop_px or best_w % crop_px:
        raise ValueError(
            f"{name}'s image processor cuts a {in_w}x{in_h} image into {tiles[0]}x{tiles[1]} crops of {crop_px} px "
            f"(pinpoint {best_w}x{best_h}) but the model packs {canvas.tiles[0]}x{canvas.tiles[1]}; the processor's "
            "image_grid_pinpoints / crop size must match the model config -- pass the processor saved with the model"
        )
    dummy = np.broadcast_to(np.zeros((), np.uint8), (1, in_h, in_w))
    new_h, new_w = get_patch_output_size(dummy, (best_h, best_w), ChannelDimension.FIRST)
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    crop_h, crop_w, cy, cx = view_axes(crop_px, crop_px)
    # padded-pinpoint pixels -> processor input pixels -> the user's pixels
    back_y = _Affine(in_h / new_h, -paste_y * in_h / new_h).then(to_user_y)
    back_x = _Affine(in_w / new_w, -paste_x * in_w / new_w).then(to_user_x)

    def canvas_edge(t: Fraction, tiles_n: int, chain: _Affine, valid: int, end: bool) -> float:
        """A token-canvas coordinate (in tokens, full canvas before unpadding) -> padded-pinpoint pixels."""
        tile = math.ceil(t / side) - 1 if end else math.floor(t / side)
        tile = min(max(tile, 0), tiles_n - 1)
        local = min(max(float(t - tile * side) * token_px, 0.0), float(valid))
        return tile * crop_px + chain(local)

    def spans(count: int, start: int, length: int, tiles_n: int, chain: _Affine, valid: int, back: _Affine,
              limit: int) -> list:
        out = []
        for i in range(count):  # output cell i covers [i, i + 1) * length / count of the unpadded canvas
            t0 = start + Fraction(i * length, count)
            t1 = start + Fraction((i + 1) * length, count)
            p0 = canvas_edge(t0, tiles_n, chain, valid, end=False)
            p1 = canvas_edge(t1, tiles_n, chain, valid, end=True)
            out.append(_clip(back(p0), back(p1), limit))
        return out

    top, bottom, left, right = canvas.box
    out_rows, out_cols = canvas.shape
    row_spans = spans(out_rows, top, bottom - top, canvas.tiles[0], cy, crop_h, back_y, height)
    col_spans = spans(out_cols, left, right - left, canvas.tiles[1], cx, crop_w, back_x, width)
    for view in range(1, layout.num_views):
        r0, r1, c0, c1 = layout.canvas_rect(view)
        if r1 == r0 or c1 == c0:
            continue
        index = layout.view_indices(view)
        boxes[index] = _grid_boxes(row_spans[r0:r1], col_spans[c0:c1])
        views[index] = view
    return _finish(boxes, views, (1, 1))


def _clip(a: float, b: float, limit: int) -> tuple[float, float] | None:
    a, b = sorted((a, b))
    a, b = max(a, 0.0), min(b, float(limit))
    return (a, b) if b > a else None


# ------------------------------------------------------------------------------------------------------------ Qwen
def _qwen_grid(inputs: dict, key: str, pixels_key: str, index: int, what: str, offset: int = 0) -> tuple[int, ...]:
    grid = inputs.get(key)
    if grid is None:
        raise ValueError(f"Qwen-VL token boxes need the call's {key} (the processor returns it next to {pixels_key}); "
                         "pass the inputs the model was called with")
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"{key} must be [num_{what}s, 3] (t, h, w in patches), got shape {tuple(grid.shape)}")
    index = _check_index(index, f"{what}_index")
    if index >= grid.shape[0]:
        raise IndexError(f"{what}_index {index + offset} is out of range: {key} of this call holds {grid.shape[0]} "
                         f"{what}(s)" + (f" (after {offset} image sequence(s))" if offset else ""))
    return tuple(int(v) for v in grid[index].tolist())


def _qwen_frame_boxes(adapter, grid_h: int, grid_w: int, width: int, height: int) -> TokenBoxes:
    """One frame of ``grid_h x grid_w`` patches: the whole picture resized, one token per merge x merge unit."""
    merge = int(adapter.visual.spatial_merge_size)
    if grid_h % merge or grid_w % merge:
        raise ValueError(f"a grid of {grid_h}x{grid_w} patches does not split into {merge}x{merge} merge units; "
                         "build inputs with the model's own processor")
    rows, cols = grid_h // merge, grid_w // merge
    ys = [(r * merge * height / grid_h, (r + 1) * merge * height / grid_h) for r in range(rows)]
    xs = [(c * merge * width / grid_w, (c + 1) * merge * width / grid_w) for c in range(cols)]
    return _finish(_grid_boxes(ys, xs), torch.zeros(rows * cols, dtype=torch.long), (merge, merge))


# ------------------------------------------------------------------------------------------------------------ videos
def _onevision_video_boxes(adapter, vp, inputs: dict, video_index: int, width: int, height: int,
                           offset: int = 0) -> list[TokenBoxes]:
    pixel_values = inputs.get("pixel_values_videos")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
        raise ValueError("LLaVA-OneVision video boxes need the call's pixel_values_videos [num_videos, frames, 3, H, "
                         "W]; pass the inputs the model was called with")
    if video_index >= pixel_values.shape[0]:
        raise IndexError(f"video_index {video_index + offset} is out of range: pixel_values_videos of this call holds "
                         f"{pixel_values.shape[0]} video(s)" + (f" (after {offset} image sequence(s))" if offset
                                                                else ""))
    cfg = adapter.vision.config
    token_px, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    out_h, out_w, ay, ax = _view_chain(vp, height, width)
    if (out_h, out_w) != tuple(pixel_values.shape[-2:]):
        raise ValueError(
            f"the video processor turns {width}x{height} frames into {out_w}x{out_h} pixels but pixel_values_videos "
            f"are {pixel_values.shape[-1]}x{pixel_values.shape[-2]}: pass the processor that built the inputs and "
            "the size of the sampled frames"
        )
    pooled = math.ceil(side / 2)  # LlavaOnevisionModel.apply_pooling: bilinear to ceil(side / 2) per axis

    def spans(valid: int, axis: _Affine, limit: int) -> list:
        return [_span(float(Fraction(i * side, pooled) * token_px), float(Fraction((i + 1) * side, pooled) * token_px),
                      valid, axis, limit) for i in range(pooled)]

    boxes = _finish(_grid_boxes(spans(out_h, ay, height), spans(out_w, ax, width)),
                    torch.zeros(pooled * pooled, dtype=torch.long), (round(side / pooled), round(side / pooled)))
    return [_copy(boxes) for _ in range(pixel_values.shape[1])]


def _tokens_per_image(adapter, inputs: dict) -> list[int]:
    """Visual tokens of every image of the call (the single-view families that ``images_as_video`` accepts)."""
    from .families.qwen2_5_vl import QwenVLAdapter

    if isinstance(adapter, QwenVLAdapter):
        grid = torch.as_tensor(inputs.get("image_grid_thw"))
        merge = int(adapter.visual.spatial_merge_size)
        return [int(t) * int(h) * int(w) // merge**2 for t, h, w in grid.tolist()]
    pixel_values = inputs["pixel_values"]
    patch = adapter.vision.config.patch_size
    prefix = 1 if (adapter._strategy(inputs) == "full" and adapter.has_cls()) else 0
    n = prefix + (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    return [n] * pixel_values.shape[0]


def _image_sequences(model, processor, inputs: dict) -> list[list[int]]:
    """``images_as_video``: per image-sequence video record (one per prompt with images), its image indices."""
    from . import is_applied, get_state
    from .cut import _image_slots

    if not is_applied(model) or not get_state(model).images_as_video or inputs.get("pixel_values") is None:
        return []
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("with images_as_video the frames of a video are the images of a prompt; pass the call's "
                         "input_ids so the images can be assigned to their prompts")
    adapter = get_state(model).adapter
    counts = _tokens_per_image(adapter, inputs)
    _, rows = _image_slots(torch.as_tensor(input_ids), adapter.image_token_id(), counts)
    by_row: dict[int, list[int]] = {}
    for image, row in enumerate(rows):
        by_row.setdefault(row, []).append(image)
    return [members for _, members in sorted(by_row.items())]
