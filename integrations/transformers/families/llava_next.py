"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP tower, AnyRes base view + crops packed with newlines.

Layout (transformers' ``LlavaNextModel.pack_image_features``, checked against it in ``tests/test_layout.py``): the
processor picks a crop grid ``nph x npw`` from ``image_grid_pinpoints`` (``get_anyres_image_grid_shape``) and hands
the tower ``1 + nph*npw`` views of ``image_size`` px (``pixel_values [num_images, max_views, 3, H, W]``, padded per
image). After the projector each view is an ``s x s`` grid (``s = image_size / patch_size``; the "default" strategy
drops CLS). The packed image is the base view (no newline), then the crops tiled into one canvas, unpadded with
``unpad_image`` (the padding the processor added around the resized image), with one ``image_newline`` after every
canvas row. ``vtc.layout.PackedLayout`` describes this; the adapter builds it from ``image_sizes`` with
transformers' own ``get_anyres_image_grid_shape`` / ``unpad_image`` and checks its length against the features.

Budget and selection: the budget counts visual tokens over all views, newlines excluded; it is split over the views
by the ``allocation`` strategy (``vtc.allocation``: ``"even"`` default, ``"hired"``, ``"globalcom2"``) and each view
is selected on its own visible grid with its own signals (captured on every view in one tower pass: the tower's
batch is the views). A newline is kept iff a token of its canvas row is kept (``vtc.layout``).

``vision_feature_select_strategy="full"`` keeps CLS in every view, which ``pack_image_features`` cannot tile; it is
refused with a clear error (as is a CLS-less tower with "default", which would drop a real patch).

Positions: 1-D, as LLaVA-1.5 (``llava.py``): ``"reindex"`` (default, contiguous) or ``"keep"``.

Pixels (``image_token_boxes``): view 0 (the base) is the whole image squashed to the view size; the crops come from
the image resized to the best pinpoint keeping its aspect ratio, padded (centred) to the pinpoint, and cut into
view-sized crops (views ``1..``, tile raster order). The packed order unpads the canvas and, for OneVision's
``anyres_max_N``, bilinearly downscales it: a downscaled token's box is its *footprint*, the part of the unpadded
canvas its output cell covers (``align_corners=False``: cell ``i`` of ``n`` covers ``[i, i + 1) * L / n``), which is
centred on the point the bilinear resize samples. Newline tokens have no pixels. OneVision images of a multi-image
prompt are a single base view: the image padded to a square (centred), then resized. The boxes hold for any resize
of the user's picture handed to the processor (the size it saw is read from ``image_sizes`` and scaled). AnyRes
crops at the padded edges keep a token row / column that is partly padding (by less than one patch); clipping to
the image removes it. When the view is not a multiple of the patch (384 px views of 14 px patches) the tower never
sees the last pixels of each view, so neither does any box; on a OneVision canvas downscaled by ``anyres_max_N``
the bilinear resize then mixes two crops across that strip near crop seams, and the pixels such a token sees centre
up to ~0.2 patch off its footprint's centre (everything else is exact up to resampling).

FLOPs: one tower pass per view (``num_views``), the packed length in the LLM.

``AnyResAdapter`` holds what LLaVA-NeXT and LLaVA-OneVision (``llava_onevision.py``) share.
"""

from __future__ import annotations

import importlib
import math
from fractions import Fraction
from typing import ClassVar

import numpy as np
import torch

from vtc.layout import CropCanvas, PackedLayout
from vtc.signals import Signal

from ..adapter import EncodedImages, ImageLayout, TinyModel, register_adapter, register_tiny
from ..capture import ProjectionCapture
from ..flops import TowerPasses, positive_int
from ..geometry import (
    Affine,
    TokenBoxes,
    check_image_index,
    clip_span,
    finish_boxes,
    grid_boxes,
    image_processor_of,
    pixel_span,
    size_field,
    view_chain,
)
from .llava import LLAVA_TEMPLATE, LlavaAdapter, build_tiny_llava, square_views, tiny_tower_config


class AnyResAdapter(LlavaAdapter):
    """Common code of the AnyRes LLaVA adapters (not registered itself)."""

    multi_view = True
    #: the family's name in error messages
    display_name: ClassVar[str] = "LLaVA-NeXT"
    #: the transformers module holding the family's ``get_anyres_image_grid_shape`` / ``unpad_image``
    modeling_module: ClassVar[str] = "transformers.models.llava_next.modeling_llava_next"

    def fixed_image_tokens(self) -> int | None:
        return None  # AnyRes: the views, and so the tokens, follow each image's size

    def _module(self):
        return importlib.import_module(self.modeling_module)

    # -- layout ------------------------------------------------------------------------------------------------
    @property
    def view_side(self) -> int:
        cfg = self.vision.config
        return cfg.image_size // cfg.patch_size

    def _pinpoints(self):
        return self.model.config.image_grid_pinpoints

    def _needs_crops(self, inputs: dict, num_images: int) -> list[bool]:
        """Which images are encoded as base + crops (all of them for LLaVA-NeXT)."""
        return [True] * num_images

    def _aspect_limit(self, inputs: dict) -> int | None:
        """OneVision's ``anyres_max_N``: the canvas is downscaled above N tiles' worth of tokens (None: never)."""
        return None

    def num_views(self, image_size, crops: bool) -> int:
        if not crops:
            return 1
        return int(self._module().image_size_to_num_patches(
            image_size=list(image_size), grid_pinpoints=self._pinpoints(), patch_size=self.vision.config.image_size
        ))

    def packed_layout(self, image_size, crops: bool, aspect_limit: int | None = None) -> PackedLayout:
        """The packed layout of one image of ``image_size`` (height, width) as this model packs it."""
        side = self.view_side
        if not crops:
            return PackedLayout(base=(side, side), base_newline=True)
        module = self._module()
        nph, npw = module.get_anyres_image_grid_shape(list(image_size), self._pinpoints(),
                                                      self.vision.config.image_size)
        full_h, full_w = nph * side, npw * side
        # transformers' own unpad arithmetic: it trims the same number of rows (or columns) from both sides
        rows, cols = module.unpad_image(torch.empty(1, full_h, full_w), list(image_size)).shape[1:]
        top, left = (full_h - rows) // 2, (full_w - cols) // 2
        size = None
        if aspect_limit is not None:  # LlavaOnevisionModel.pack_image_features
            ratio = math.sqrt(rows * cols / (aspect_limit * side**2))
            if ratio > 1.1:
                size = (int(rows // ratio), int(cols // ratio))
        canvas = CropCanvas(tiles=(nph, npw), tile=(side, side), box=(top, top + rows, left, left + cols), size=size)
        return PackedLayout(base=(side, side), canvas=canvas)

    # -- inputs ------------------------------------------------------------------------------------------------
    def _check_strategy(self, inputs: dict) -> int:
        """Tokens to drop from the front of every view's tower output (1: the CLS under "default")."""
        strategy = self._strategy(inputs)
        has_cls = self.has_cls()
        if strategy == "full" and has_cls:
            raise ValueError(
                f"{self.display_name} with vision_feature_select_strategy='full' keeps the CLS token of every view, "
                "which the AnyRes packing cannot place on the crop grid; use 'default' (what the checkpoints use)"
            )
        if strategy == "default" and not has_cls:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the first token of every view, but this "
                f"{self.display_name} tower has no CLS token, so it would drop a real patch and the views no longer "
                "tile; use 'full' (what the checkpoints use)"
            )
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        return 1 if strategy == "default" else 0

    def _image_sizes(self, enc_kwargs: dict) -> list[tuple[int, int]]:
        sizes = enc_kwargs.get("image_sizes")
        name = self.display_name
        if sizes is None:
            raise ValueError(f"{name} needs image_sizes next to pixel_values (the processor returns both); build "
                             "inputs with the model's own processor")
        sizes_t = torch.as_tensor(sizes)
        if sizes_t.dim() != 2 or sizes_t.shape[-1] != 2:
            raise ValueError(f"image_sizes must be [num_images, 2] (height, width of each original image), got shape "
                             f"{tuple(sizes_t.shape)}")
        out = [(int(h), int(w)) for h, w in sizes_t.tolist()]
        bad = [s for s in out if min(s) < 1]
        if bad:
            raise ValueError(f"image_sizes {bad} are not image sizes (height and width must be >= 1 pixel); pass the "
                             "image_sizes the processor returned")
        return out

    def _check_pixels(self, pixel_values, views: list[int]) -> None:
        name = self.display_name
        cfg = self.vision.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (4, 5):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"{name} expects pixel_values of shape [num_images, num_views, 3, H, W] (what its processor returns) "
                f"or the views stacked as [total_views, 3, H, W], got {shape}"
            )
        size = cfg.image_size
        if tuple(pixel_values.shape[-3:]) != (cfg.num_channels, size, size):
            raise ValueError(
                f"{name} views must be {cfg.num_channels}x{size}x{size} (the tower's image_size), got "
                f"{tuple(pixel_values.shape[-3:])}; build inputs with the processor saved with this model"
            )
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(views) or pixel_values.shape[1] < max(views):
                raise ValueError(
                    f"pixel_values {tuple(pixel_values.shape)} does not hold the views of the {len(views)} images in "
                    f"image_sizes (views per image: {views}); pass pixel_values and image_sizes of the same "
                    "processor call"
                )
        elif pixel_values.shape[0] != sum(views):
            raise ValueError(
                f"pixel_values stacks {pixel_values.shape[0]} views but image_sizes implies {sum(views)} "
                f"(views per image: {views}); pass pixel_values and image_sizes of the same processor call"
            )

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedImages:
        enc_kwargs = self.encoder_kwargs(inputs)
        sizes = self._image_sizes(enc_kwargs)
        crops = self._needs_crops(inputs, len(sizes))
        views = [self.num_views(size, c) for size, c in zip(sizes, crops)]
        self._check_pixels(enc_kwargs.get("pixel_values"), views)
        drop = self._check_strategy(inputs)
        limit = self._aspect_limit(inputs)
        layouts = [self.packed_layout(size, c, limit) for size, c in zip(sizes, crops)]

        heads = self.vision.config.num_attention_heads
        capture = ProjectionCapture(self.layers, signals, heads, cls_index=0 if self.has_cls() else None)
        with capture:
            output = self.model.model.get_image_features(**enc_kwargs, return_dict=True)
        features = list(output.pooler_output)
        results = {signal: value[:, drop:] for signal, value in capture.results.items()}
        capture.results.clear()

        image_layouts, per_view, offset = [], [], 0
        for i, (feats, layout, n) in enumerate(zip(features, layouts, views)):
            if feats.shape[0] != layout.num_tokens:
                raise NotImplementedError(
                    f"image {i} ({sizes[i][1]}x{sizes[i][0]} px) has {feats.shape[0]} packed visual tokens but vtc's "
                    f"AnyRes layout gives {layout.num_tokens}; this transformers version packs {self.display_name} "
                    "features differently from what the adapter supports"
                )
            signal_views: list[dict] = [{} for _ in range(layout.num_views)]
            for signal, value in results.items():
                rows = value[offset : offset + n]
                parts = layout.view_values(rows[0], rows[1:] if layout.canvas is not None else None)
                for v, part in enumerate(parts):
                    signal_views[v][signal] = part
            per_view.append(signal_views)
            image_layouts.append(ImageLayout(grid=layout.base, packed=layout))
            offset += n
        return EncodedImages(output=output, features=features, layouts=image_layouts,
                             signals=[{} for _ in features], views=per_view)

    # -- pixels ------------------------------------------------------------------------------------------------
    def image_token_counts(self, inputs: dict) -> list[int]:
        sizes = self._image_sizes(inputs)
        crops = self._needs_crops(inputs, len(sizes))
        limit = self._aspect_limit(inputs)
        return [self.packed_layout(size, crop, limit).num_tokens for size, crop in zip(sizes, crops)]

    def image_token_boxes(self, processor, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension

        ip = image_processor_of(processor)
        name = self.display_name
        sizes = self._image_sizes(self.encoder_kwargs(inputs))
        image_index = check_image_index(image_index, len(sizes), "image_sizes")
        crops = self._needs_crops(inputs, len(sizes))[image_index]
        self._check_strategy(inputs)  # the same refusal as encode ("full" with a CLS tower)
        layout = self.packed_layout(sizes[image_index], crops, self._aspect_limit(inputs))
        in_h, in_w = sizes[image_index]
        cfg = self.vision.config
        view_px, token_px, side = cfg.image_size, cfg.patch_size, self.view_side
        # processor input pixels -> the user's pixels (the same picture, maybe resized before the processor)
        to_user_y, to_user_x = Affine(height / in_h), Affine(width / in_w)

        def view_axes(src_h: int, src_w: int) -> tuple[int, int, Affine, Affine]:
            out_h, out_w, ay, ax = view_chain(ip, src_h, src_w)
            if (out_h, out_w) != (view_px, view_px):
                raise ValueError(
                    f"{name}'s image processor makes {out_w}x{out_h} views but the tower takes {view_px}x{view_px}; "
                    "pass the processor saved with this model"
                )
            return out_h, out_w, ay, ax

        boxes = torch.full((layout.num_tokens, 4), float("nan"), dtype=torch.float64)
        views = torch.full((layout.num_tokens,), -1, dtype=torch.long)

        # view 0: the whole image squashed to the base size (or, base-only OneVision images, padded to a square first)
        if crops:
            (base_h, base_w), crop_px = _anyres_processor_geometry(ip)
            src_y, src_x = Affine(in_h / base_h), Affine(in_w / base_w)
        else:
            base_h = base_w = max(in_h, in_w)
            src_y, src_x = Affine(1.0, -((base_h - in_h) // 2)), Affine(1.0, -((base_w - in_w) // 2))
        out_h, out_w, ay, ax = view_axes(base_h, base_w)
        ay, ax = ay.then(src_y).then(to_user_y), ax.then(src_x).then(to_user_x)
        rows, cols = layout.base
        ys = [pixel_span(r * token_px, (r + 1) * token_px, out_h, ay, height) for r in range(rows)]
        xs = [pixel_span(c * token_px, (c + 1) * token_px, out_w, ax, width) for c in range(cols)]
        base_index = layout.view_indices(0)
        boxes[base_index] = grid_boxes(ys, xs)
        views[base_index] = 0

        canvas = layout.canvas
        if canvas is None:
            return finish_boxes(boxes, views, (1, 1))

        # the crops: the image resized into the best pinpoint keeping its aspect ratio, pasted centred, cut in crops
        pinpoints = getattr(ip, "image_grid_pinpoints", None) or self._pinpoints()
        best_h, best_w = select_best_resolution((in_h, in_w), pinpoints)
        tiles = (best_h // crop_px, best_w // crop_px)
        if tiles != canvas.tiles or best_h % crop_px or best_w % crop_px:
            raise ValueError(
                f"{name}'s image processor cuts a {in_w}x{in_h} image into {tiles[0]}x{tiles[1]} crops of {crop_px} "
                f"px (pinpoint {best_w}x{best_h}) but the model packs {canvas.tiles[0]}x{canvas.tiles[1]}; the "
                "processor's image_grid_pinpoints / crop size must match the model config -- pass the processor saved "
                "with the model"
            )
        dummy = np.broadcast_to(np.zeros((), np.uint8), (1, in_h, in_w))
        new_h, new_w = get_patch_output_size(dummy, (best_h, best_w), ChannelDimension.FIRST)
        paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
        crop_h, crop_w, cy, cx = view_axes(crop_px, crop_px)
        # padded-pinpoint pixels -> processor input pixels -> the user's pixels
        back_y = Affine(in_h / new_h, -paste_y * in_h / new_h).then(to_user_y)
        back_x = Affine(in_w / new_w, -paste_x * in_w / new_w).then(to_user_x)

        def canvas_edge(t: Fraction, tiles_n: int, chain: Affine, valid: int, end: bool) -> float:
            """A token-canvas coordinate (in tokens, full canvas before unpadding) -> padded-pinpoint pixels."""
            tile = math.ceil(t / side) - 1 if end else math.floor(t / side)
            tile = min(max(tile, 0), tiles_n - 1)
            local = min(max(float(t - tile * side) * token_px, 0.0), float(valid))
            return tile * crop_px + chain(local)

        def spans(count: int, start: int, length: int, tiles_n: int, chain: Affine, valid: int, back: Affine,
                  limit: int) -> list:
            out = []
            for i in range(count):  # output cell i covers [i, i + 1) * length / count of the unpadded canvas
                t0 = start + Fraction(i * length, count)
                t1 = start + Fraction((i + 1) * length, count)
                p0 = canvas_edge(t0, tiles_n, chain, valid, end=False)
                p1 = canvas_edge(t1, tiles_n, chain, valid, end=True)
                out.append(clip_span(back(p0), back(p1), limit))
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
            boxes[index] = grid_boxes(row_spans[r0:r1], col_spans[c0:c1])
            views[index] = view
        return finish_boxes(boxes, views, (1, 1))

    # -- dimensions --------------------------------------------------------------------------------------------
    def _views(self, views_per_image: int | None) -> int:
        if views_per_image is None:
            raise ValueError(
                f"{type(self.model).__name__} runs its tower once per AnyRes view (base view + crops), a number that "
                "depends on the image size; pass views_per_image, e.g. 5 for a 2x2 crop grid (for one image: the "
                "processor's pixel_values.shape[1]; transformers' image_size_to_num_patches gives it from the image "
                "size)"
            )
        return positive_int("views_per_image", views_per_image)

    def image_passes(self, inputs: dict) -> list[TowerPasses]:
        """The views and the packed length of each image as the model computes them from ``image_sizes``
        (``image_size_to_num_patches``, ``pack_image_features``)."""
        if inputs.get("pixel_values") is None:
            return []
        sizes = self._image_sizes(inputs)
        crops = self._needs_crops(inputs, len(sizes))
        limit = self._aspect_limit(inputs)
        out = []
        for size, crop in zip(sizes, crops):
            dims = self.model_dims(views_per_image=self.num_views(size, crop))
            out.append(TowerPasses(self.packed_layout(size, crop, limit).num_tokens, dims))
        return out


def _anyres_processor_geometry(ip) -> tuple[tuple[int, int], int]:
    """(height, width) of the base squash and the crop side in pixels, as the AnyRes image processors read them."""
    size = getattr(ip, "size", None)
    h, w = (size_field(size, "height"), size_field(size, "width")) if size else (None, None)
    shortest = size_field(size, "shortest_edge") if size else None
    base = (h, w) if (h and w) else (shortest, shortest)
    crop = getattr(ip, "crop_size", None)
    side = (size_field(crop, "height") if crop else None) or h or shortest
    if not (base[0] and base[1] and side):
        raise ValueError(f"the AnyRes image processor's size {size!r} / crop_size {crop!r} do not say the view size; "
                         "use the processor saved with the model")
    return base, side


@register_adapter
class LlavaNextAdapter(AnyResAdapter):
    family = "llava_next"
    display_name = "LLaVA-NeXT"
    modeling_module = "transformers.models.llava_next.modeling_llava_next"

    @classmethod
    def model_classes(cls):
        from transformers import LlavaNextForConditionalGeneration

        return (LlavaNextForConditionalGeneration,)


# ---------------------------------------------------------------------------------------- tiny checkpoint (tests)
TINY_VIEW = 32  # the tiny AnyRes views: 32 px, 4x4 patches of 8 px
_TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_tiny(tok):
    """Tiny LLaVA-NeXT: a CLIP tower of 32 px views (4x4 patches of 8 px), pinpoints 32x64 / 64x32 / 64x64, a 2-layer
    Llama LLM. An image is a base view of 16 tokens, then the unpadded crop canvas with one newline per row:
    64x20 (w x h) -> 1x2 crops, canvas 4x8 unpadded to 2x8: 16 + 16 + 2 = 34; 48x48 -> 2x2 crops, 8x8 canvas:
    16 + 64 + 8 = 88; 64x40 -> 2x2 crops, 8x8 unpadded to 6x8: 16 + 48 + 6 = 70."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    return build_tiny_llava(tok, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                            square_views(LlavaNextImageProcessor, TINY_VIEW, image_grid_pinpoints=_TINY_PINPOINTS),
                            tiny_tower_config(CLIPVisionConfig, TINY_VIEW),
                            image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=_TINY_PINPOINTS)


# 64x20 -> 1x2 crops with padded rows (3 views, 34 tokens), 48x48 -> 2x2 crops (5 views, 88 tokens)
register_tiny(LlavaNextAdapter, TinyModel(build=build_tiny, placeholders=("<image>",), chat_template=LLAVA_TEMPLATE,
                                          image_sizes=((64, 20), (48, 48))))
