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

``AnyResAdapter`` holds what LLaVA-NeXT and LLaVA-OneVision (``llava_onevision.py``) share.
"""

from __future__ import annotations

import importlib
import math
from typing import ClassVar

import torch

from vtc.layout import CropCanvas, PackedLayout
from vtc.signals import Signal

from ..adapter import EncodedImages, ImageLayout, register_adapter
from ..capture import ProjectionCapture
from .llava import LlavaAdapter


class AnyResAdapter(LlavaAdapter):
    """Common code of the AnyRes LLaVA adapters (not registered itself)."""

    multi_view = True
    #: the family's name in error messages
    display_name: ClassVar[str] = "LLaVA-NeXT"
    #: the transformers module holding the family's ``get_anyres_image_grid_shape`` / ``unpad_image``
    modeling_module: ClassVar[str] = "transformers.models.llava_next.modeling_llava_next"

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


@register_adapter
class LlavaNextAdapter(AnyResAdapter):
    family = "llava_next"
    display_name = "LLaVA-NeXT"
    modeling_module = "transformers.models.llava_next.modeling_llava_next"

    @classmethod
    def model_classes(cls):
        from transformers import LlavaNextForConditionalGeneration

        return (LlavaNextForConditionalGeneration,)
