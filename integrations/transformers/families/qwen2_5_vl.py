"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native-resolution ViT, 2x2 merge units, M-RoPE.

Layout: one LLM token per 2x2 merge unit, raster order over the ``(h/2) x (w/2)`` merged grid of each image.
The ViT has no CLS token (compressors use received attention instead) and runs in window-permuted order; signals
are captured per ``cu_seqlens`` span, averaged over the 4 patches of each merge unit and un-permuted with
``argsort(window_index)``, so compressors only ever see merged-token raster order. Received attention is a sum over
the queries of each span (every patch of a window of any size averages 1, see ``SignalKind.RECEIVED_ATTENTION``);
windows are whole merge units, so the 4 patches of a unit share one window and the merged tokens of every window
also average 1 -- the 2x2 mean does not bring back a window-size dependence.

Positions: kept tokens keep their original M-RoPE ``(t, h, w)`` ids (as every Qwen port of these methods does);
row 0, the text row transformers uses for masks, is renumbered contiguously. There is no "reindex" for Qwen: a
partial grid has no M-RoPE numbering of its own.

Videos: each temporal step (``temporal_patch_size = 2`` fused frames) is one frame of the video's budget
(``encode_videos``); kept video tokens keep their original M-RoPE ids too (Qwen2.5-VL's are time-aligned through
``second_per_grid_ts``), so a dropped frame leaves a gap in time, never a renumbering.

Pixels (``image_token_boxes`` / ``video_token_boxes``): the whole image (frame) resized to ``image_grid_thw``
(``video_grid_thw``) patches; one token per ``spatial_merge_size``-square unit of patches (``unit = (2, 2)``), raster
order. A video's LLM frame is one temporal step (``temporal_patch_size`` fused frames share the same boxes). The
boxes hold for any resize of the user's picture handed to the processor.

FLOPs: one tower pass of ``h*w`` patches per temporal step (each step is its own ``cu_seqlens`` span), the merger(s)
on every patch; Qwen2.5-VL's attention windows are counted exactly.

``QwenVLAdapter`` holds what Qwen2-VL (``qwen2_vl.py``), Qwen2.5-VL and Qwen3-VL (``qwen3_vl.py``) share; a family
names its classes and tower, and Qwen2.5-VL adds the window permutation.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import ClassVar

import torch

from vtc.flops import TransformerDims, VisionDims, VLMDims
from vtc.signals import Signal, TowerInfo

from ..adapter import (
    EncodedImages,
    EncodedVideos,
    FamilyAdapter,
    ImageLayout,
    TinyModel,
    register_adapter,
    register_tiny,
)
from ..capture import QwenBlockCapture
from ..flops import TowerPasses, linear_shapes, llm_dims, positive_int, vocab_size
from ..geometry import TokenBoxes, check_index, copy_boxes, finish_boxes, grid_boxes

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class QwenVLAdapter(FamilyAdapter):
    """Common code of the Qwen-VL adapters (not registered itself)."""

    position_modes = ("keep",)
    supports_video = True
    mrope = True
    #: the family's name in error messages, e.g. "Qwen2.5-VL"
    display_name: ClassVar[str] = "Qwen-VL"
    #: ``TowerInfo.name`` of its ViT
    tower_name: ClassVar[str] = "qwen_vit"
    #: the transformers module holding the family's ``apply_rotary_pos_emb_vision``
    modeling_module: ClassVar[str] = ""

    @property
    def visual(self):
        return self.model.model.visual

    def full_attention_layers(self) -> tuple[int, ...] | None:
        """Blocks attending over whole images; ``None`` when every block does (no window attention)."""
        return None

    def tower_info(self, inputs: dict | None = None) -> TowerInfo:
        depth = len(self.visual.blocks)
        return TowerInfo(name=self.tower_name, num_layers=depth, feature_layer=depth - 1, has_cls=False,
                         full_attention_layers=self.full_attention_layers())

    def _rotary(self):
        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb_vision

    def _restore_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation from the ViT's merge-unit order to merged-token raster order (``None``: already in order)."""
        return None

    def _check_inputs(self, pixel_values, grid_thw, what: str = "image") -> None:
        name = self.display_name
        pv, grid_name = ("pixel_values", "image_grid_thw") if what == "image" else ("pixel_values_videos",
                                                                                  "video_grid_thw")
        if grid_thw is None:
            raise ValueError(f"{name} needs {grid_name} next to {pv} (the processor returns both)")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"{name} expects {pv} as flattened patches [num_patches, C*T*P*P] (what its processor "
                f"returns), got {shape}; build inputs with the model's own processor"
            )
        if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
            shape = tuple(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else type(grid_thw).__name__
            raise ValueError(f"{grid_name} must be a [num_{what}s, 3] tensor (t, h, w in patches), got {shape}")
        cfg = self.visual.config
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        if pixel_values.shape[1] != width:
            raise ValueError(
                f"{pv} rows have {pixel_values.shape[1]} values but this {name} tower takes patches of "
                f"{cfg.in_channels}x{cfg.temporal_patch_size}x{cfg.patch_size}x{cfg.patch_size} = {width}; use the "
                "processor saved with this model (patch_size / temporal_patch_size must match the model)"
            )
        merge = self.visual.spatial_merge_size
        patches = int(grid_thw.prod(-1).sum())
        if patches != pixel_values.shape[0]:
            raise ValueError(
                f"{grid_name} describes {patches} patches but {pv} has {pixel_values.shape[0]} rows; "
                f"pass the {pv} and {grid_name} of the same processor call"
            )
        if bool(((grid_thw[:, 1:] % merge) != 0).any()):
            raise ValueError(
                f"{grid_name} {grid_thw.tolist()} has sides not divisible by the spatial merge size {merge}; "
                "build inputs with the model's own processor (it rounds image sides to patch * merge)"
            )

    def encode(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedImages:
        enc_kwargs = self.encoder_kwargs(inputs)
        grid_thw = enc_kwargs.get("image_grid_thw")
        self._check_inputs(enc_kwargs.get("pixel_values"), grid_thw)
        capture = QwenBlockCapture(self.visual.blocks, signals, self._rotary())
        with capture:
            output = self.model.model.get_image_features(**enc_kwargs, return_dict=True)
        features = list(output.pooler_output)
        merge = self.visual.spatial_merge_size
        layouts = [ImageLayout(grid=(int(t) * int(h) // merge, int(w) // merge)) for t, h, w in grid_thw.tolist()]
        per_image = self._merged_signals(capture.results, grid_thw, [f.shape[0] for f in features])
        return EncodedImages(output=output, features=features, layouts=layouts, signals=per_image)

    def position_inputs(self, inputs: dict) -> dict:
        keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        return {key: inputs[key] for key in keys if inputs.get(key) is not None}

    def _merged_signals(self, results: dict, grid_thw: torch.Tensor, sizes: list[int]) -> list[dict]:
        """Captured per-patch signals -> per merged token, raster order, split by ``sizes``."""
        unit = self.visual.spatial_merge_size ** 2
        out: list[dict] = [{} for _ in sizes]
        restore = self._restore_order(grid_thw) if results else None
        for signal, value in results.items():
            merged = value.reshape(value.shape[0] // unit, unit, *value.shape[1:]).mean(dim=1)
            if restore is not None:
                merged = merged[restore.to(merged.device)]
            for i, part in enumerate(torch.split(merged, sizes)):
                out[i][signal] = part
        results.clear()
        return out

    def encode_videos(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedVideos:
        """Each temporal step of a video (``temporal_patch_size`` fused frames) is one frame of ``(h/2) x (w/2)``
        merged tokens; the ViT attends within each step (one ``cu_seqlens`` span), so signals are per frame."""
        pixel_values, grid_thw = inputs.get("pixel_values_videos"), inputs.get("video_grid_thw")
        self._check_inputs(pixel_values, grid_thw, what="video")
        capture = QwenBlockCapture(self.visual.blocks, signals, self._rotary())
        with capture:
            output = self.model.model.get_video_features(pixel_values_videos=pixel_values, video_grid_thw=grid_thw,
                                                         return_dict=True)
        merge = self.visual.spatial_merge_size
        videos = [f for f in output.pooler_output]
        per_video = self._merged_signals(capture.results, grid_thw, [v.shape[0] for v in videos])
        seconds = inputs.get("second_per_grid_ts")
        frames, grids, frame_signals, stamps = [], [], [], []
        for v, ((t, h, w), feats) in enumerate(zip(grid_thw.tolist(), videos)):
            n = (h // merge) * (w // merge)
            frames.append(list(torch.split(feats, [n] * t)))
            grids.append([(h // merge, w // merge)] * t)
            frame_signals.append([{sig: val[k * n:(k + 1) * n] for sig, val in per_video[v].items()}
                                  for k in range(t)])
            step = float(seconds[v]) if seconds is not None else None
            stamps.append([k * step for k in range(t)] if step is not None else None)
        return EncodedVideos(output=output, frames=frames, grids=grids, signals=frame_signals,
                             suffix=[feats[:0] for feats in videos], timestamps=stamps)

    def original_positions(self, input_ids, attention_mask, position_inputs: dict) -> torch.Tensor:
        mm_token_type_ids = position_inputs.get("mm_token_type_ids")
        if mm_token_type_ids is None:  # the processor returns it; rebuild it for hand-made inputs
            config = self.model.config
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
            mm_token_type_ids[input_ids == config.image_token_id] = 1
            mm_token_type_ids[input_ids == config.video_token_id] = 2
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=position_inputs.get("image_grid_thw"),
            video_grid_thw=position_inputs.get("video_grid_thw"),
            second_per_grid_ts=position_inputs.get("second_per_grid_ts"),
            attention_mask=attention_mask,
        )
        return positions  # [3, B, L]

    def position_ids(self, kept_positions: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        text_row = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
        return torch.cat([text_row[None].to(kept_positions.device), kept_positions], dim=0)  # [4, B, L']

    # -- the pre-encoder stage: resizing the pictures ------------------------------------------------------------
    can_resize_inputs = True

    def token_grids(self, inputs: dict, what: str) -> list[tuple[int, int, int]]:
        key = "image_grid_thw" if what == "image" else "video_grid_thw"
        grid = inputs.get(key)
        if grid is None:
            return []
        merge = int(self.visual.spatial_merge_size)
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in _grid_rows(grid, key)]

    def resize_inputs(self, inputs: dict, image_grids, video_grids, pixels: bool = True) -> dict:
        """Unflatten each picture's patches into its (normalised) image, resize it bicubically (antialiased) to
        ``rows * merge * patch`` x ``cols * merge * patch`` pixels and flatten it again in the processor's patch
        order -- the processor's own resize of a smaller picture, up to its rounding to 8-bit pixels (the
        normalisation is affine per channel and the resize linear, so the order of the two does not matter)."""
        out = {}
        for pixels_key, grid_key, grids in (("pixel_values", "image_grid_thw", image_grids),
                                            ("pixel_values_videos", "video_grid_thw", video_grids)):
            if grids is None or inputs.get(grid_key) is None:
                continue
            grid_thw = torch.as_tensor(inputs[grid_key])
            merge = self.visual.spatial_merge_size
            new_grid = [[int(t), int(rows) * merge, int(cols) * merge]
                        for (t, _, _), (rows, cols) in zip(grid_thw.tolist(), grids)]
            out[grid_key] = torch.tensor(new_grid, dtype=grid_thw.dtype, device=grid_thw.device)
            if not pixels:
                continue
            pixel_values = inputs.get(pixels_key)
            self._check_inputs(pixel_values, grid_thw, "image" if grid_key == "image_grid_thw" else "video")
            sizes = [int(t) * int(h) * int(w) for t, h, w in grid_thw.tolist()]
            out[pixels_key] = torch.cat([self._resize_patches(part, int(t), int(h), int(w), int(rows), int(cols))
                                         for part, (t, h, w), (rows, cols)
                                         in zip(torch.split(pixel_values, sizes), grid_thw.tolist(), grids)])
        return out

    def _resize_patches(self, patches: torch.Tensor, t: int, h: int, w: int, rows: int, cols: int) -> torch.Tensor:
        cfg = self.visual.config
        c, tp, p, m = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, self.visual.spatial_merge_size
        if (rows * m, cols * m) == (h, w):
            return patches
        # rows are [t, h/m, w/m, m, m] patches of [C, tp, p, p] values (the processor's patchify)
        x = patches.reshape(t, h // m, w // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        images = x.reshape(t * tp, c, h * p, w * p)
        resized = torch.nn.functional.interpolate(images.float(), size=(rows * m * p, cols * m * p), mode="bicubic",
                                                  align_corners=False, antialias=True).to(patches.dtype)
        y = resized.reshape(t, tp, c, rows, m, p, cols, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return y.reshape(t * rows * m * cols * m, c * tp * p * p)

    # -- pixels ------------------------------------------------------------------------------------------------
    def image_token_counts(self, inputs: dict) -> list[int]:
        grid = torch.as_tensor(inputs.get("image_grid_thw"))
        merge = int(self.visual.spatial_merge_size)
        return [int(t) * int(h) * int(w) // merge**2 for t, h, w in grid.tolist()]

    def image_token_boxes(self, processor, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
        t, gh, gw = _grid_of(inputs, "image_grid_thw", "pixel_values", image_index, "image")
        boxes = self._frame_boxes(gh, gw, width, height)
        return TokenBoxes(boxes.boxes.repeat(t, 1), boxes.views.repeat(t), boxes.unit)

    def video_token_boxes(self, processor, inputs: dict, video_index: int, width: int, height: int,
                          offset: int = 0) -> list[TokenBoxes]:
        t, gh, gw = _grid_of(inputs, "video_grid_thw", "pixel_values_videos", video_index, "video", offset=offset)
        boxes = self._frame_boxes(gh, gw, width, height)
        return [copy_boxes(boxes) for _ in range(t)]

    def _frame_boxes(self, grid_h: int, grid_w: int, width: int, height: int) -> TokenBoxes:
        """One frame of ``grid_h x grid_w`` patches: the whole picture resized, one token per merge x merge unit."""
        merge = int(self.visual.spatial_merge_size)
        if grid_h % merge or grid_w % merge:
            raise ValueError(f"a grid of {grid_h}x{grid_w} patches does not split into {merge}x{merge} merge units; "
                             "build inputs with the model's own processor")
        rows, cols = grid_h // merge, grid_w // merge
        ys = [(r * merge * height / grid_h, (r + 1) * merge * height / grid_h) for r in range(rows)]
        xs = [(c * merge * width / grid_w, (c + 1) * merge * width / grid_w) for c in range(cols)]
        return finish_boxes(grid_boxes(ys, xs), torch.zeros(rows * cols, dtype=torch.long), (merge, merge))

    # -- dimensions --------------------------------------------------------------------------------------------
    def _vision_windows(self) -> tuple[int | None, tuple[int, ...] | None]:
        """(merged-token patches per attention window, full-attention blocks) of the tower; (None, None): every block
        attends over whole images."""
        return None, None

    def _window_sizes(self, h: int, w: int) -> tuple[int, ...] | None:
        """Patches of every attention window of one temporal step of an ``h x w`` patch grid (None: no windows)."""
        return None

    def model_dims(self, vision_tokens_per_image: int | None = None, views_per_image: int | None = None) -> VLMDims:
        model = self.model
        visual = model.model.visual
        vcfg = model.config.vision_config
        unit = vcfg.spatial_merge_size**2
        if vision_tokens_per_image is None:
            raise ValueError(
                f"{type(model).__name__} encodes each image at its own resolution; pass vision_tokens_per_image, the "
                f"image's patch count before the {vcfg.spatial_merge_size}x{vcfg.spatial_merge_size} merge "
                "(int(image_grid_thw[i].prod()) from the processor; a video counts as grid_t images of grid_h*grid_w)"
            )
        patches = positive_int("vision_tokens_per_image", vision_tokens_per_image)
        if patches % unit:
            raise ValueError(
                f"vision_tokens_per_image={patches} is not a multiple of {unit}: Qwen merges "
                f"{vcfg.spatial_merge_size}x{vcfg.spatial_merge_size} patches into one LLM token, so the patch count "
                "is grid_h*grid_w with both sides even (image_grid_thw[i].prod())"
            )
        if views_per_image not in (None, 1):
            raise ValueError(f"views_per_image={views_per_image!r}: Qwen VLMs have no AnyRes views; leave it unset")
        block = visual.blocks[0]
        hidden = block.attn.qkv.in_features
        heads = vcfg.num_heads
        gated = hasattr(block.mlp, "gate_proj")  # Qwen2.5-VL: SwiGLU; Qwen2-VL / Qwen3-VL: fc1/fc2
        intermediate = block.mlp.gate_proj.out_features if gated else linear_shapes(block.mlp)[0][1]
        window, full_layers = self._vision_windows()
        mergers = [visual.merger]
        mergers += list(getattr(visual, "deepstack_merger_list", None) or ())  # Qwen3-VL: one per deepstack level
        vision = VisionDims(
            transformer=TransformerDims(
                num_layers=len(visual.blocks),
                hidden=hidden,
                intermediate=intermediate,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                gated_mlp=gated,
            ),
            tokens_per_image=patches,
            patch_embed_in=math.prod(visual.patch_embed.proj.weight.shape[1:]),
            window=window,
            full_attention_layers=full_layers,
        )
        return VLMDims(
            vision=vision,
            projector=tuple(layer for merger in mergers for layer in linear_shapes(merger)),
            projector_tokens_per_image=patches // unit,
            llm=llm_dims(model),
            vocab_size=vocab_size(model),
        )

    def image_passes(self, inputs: dict) -> list[TowerPasses]:
        grid = inputs.get("image_grid_thw")
        return [] if grid is None else self._passes(_grid_rows(grid, "image_grid_thw"))

    def video_passes(self, inputs: dict) -> list[TowerPasses]:
        grid = inputs.get("video_grid_thw")
        return [] if grid is None else self._passes(_grid_rows(grid, "video_grid_thw"))

    def _passes(self, grids: list[tuple[int, int, int]]) -> list[TowerPasses]:
        """Images / videos of ``t`` temporal steps of ``h x w`` patches, each step its own attention span in the
        tower (``cu_seqlens`` repeats ``h*w`` ``t`` times), ``t*h*w / merge^2`` tokens in the LLM."""
        unit = self.model.config.vision_config.spatial_merge_size ** 2
        out = []
        for t, h, w in grids:
            dims = self.model_dims(h * w)
            window_sizes = self._window_sizes(h, w)
            if window_sizes is not None:
                dims = dataclasses.replace(dims, vision=dataclasses.replace(dims.vision, window_sizes=window_sizes))
            out.append(TowerPasses(t * h * w // unit, dims, t))
        return out


def _grid_of(inputs: dict, key: str, pixels_key: str, index: int, what: str, offset: int = 0) -> tuple[int, ...]:
    """Row ``index`` of the call's ``key`` grid (``t, h, w`` in patches), checked (``offset``: for messages)."""
    grid = inputs.get(key)
    if grid is None:
        raise ValueError(f"Qwen-VL token boxes need the call's {key} (the processor returns it next to {pixels_key}); "
                         "pass the inputs the model was called with")
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"{key} must be [num_{what}s, 3] (t, h, w in patches), got shape {tuple(grid.shape)}")
    index = check_index(index, f"{what}_index")
    if index >= grid.shape[0]:
        raise IndexError(f"{what}_index {index + offset} is out of range: {key} of this call holds {grid.shape[0]} "
                         f"{what}(s)" + (f" (after {offset} image sequence(s))" if offset else ""))
    return tuple(int(v) for v in grid[index].tolist())


def _grid_rows(value, key: str) -> list[tuple[int, int, int]]:
    """A ``[n, 3]`` grid input (``image_grid_thw`` / ``video_grid_thw``) as ``(t, h, w)`` tuples."""
    grid = torch.as_tensor(value)
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"{key} must be [n, 3] (t, h, w patches per image / video), got shape {tuple(grid.shape)}")
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    tower_name = "qwen2_5_vit"
    modeling_module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    @classmethod
    def model_classes(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in (self.visual.fullatt_block_indexes or ()))

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.visual.spatial_merge_size, window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        return window_index

    def _restore_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        return torch.argsort(self._window_index(grid_thw).to(grid_thw.device))

    def _vision_windows(self) -> tuple[int, tuple[int, ...]]:
        vcfg = self.model.config.vision_config
        # get_vision_window_index: windows of (window_size // merge // patch) merged tokens per side
        side = vcfg.window_size // vcfg.spatial_merge_size // vcfg.patch_size * vcfg.spatial_merge_size
        return side * side, tuple(int(i) for i in (vcfg.fullatt_block_indexes or ()))

    def _window_sizes(self, h: int, w: int) -> tuple[int, ...]:
        """``get_vision_window_index``: windows of ``window_size // merge // patch`` merged tokens per side from the
        top left, the last row / column of windows partial where the merged grid does not divide."""
        vcfg = self.model.config.vision_config
        merge = vcfg.spatial_merge_size
        side = vcfg.window_size // merge // vcfg.patch_size

        def spans(n: int) -> list[int]:
            return [side] * (n // side) + ([n % side] if n % side else [])

        return tuple(r * c * merge * merge for r in spans(h // merge) for c in spans(w // merge))


# ---------------------------------------------------------------------------------------- tiny checkpoint (tests)
#: the Qwen-VL placeholder and chat tokens of the tiny tokenizers
QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
#: a minimal Qwen-VL chat template (images and videos); it takes list-of-items and plain string content
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_PATCH = 8
#: test images of the tiny Qwen-VL models: sides rounded to multiples of 16 (patch 8 x merge 2), pixel count bounded
#: to [16*16, 128*128]; tokens = (H/16)*(W/16): 64x48 -> 12, 96x64 -> 24, 96x96 -> 36, 128x128 -> 64
TINY_IMAGE_SIZES = ((96, 96), (64, 48))
#: the vision tower of the tiny Qwen2.5-VL and Qwen3-VL: 4 blocks of width 32, merged to the LLM width 64
TINY_VIT = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)


def qwen_text_config(tok, **overrides) -> dict:
    """The tiny Qwen LLM config (2 layers, width 64, M-RoPE sections summing to head_dim / 2) as a dict."""
    from ..testing import tiny_text_config

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}
    rope.update(overrides.pop("rope_parameters", {}))
    return tiny_text_config(dict, tok, rope_parameters=rope, **overrides)


def qwen_token_ids(tok) -> dict:
    """The config's image / video / vision start and end token ids in ``tok``."""
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def qwen_processor(processor_cls, tok, video_processor_cls=None):
    """A Qwen-VL processor of the tiny geometry (8 px patches, 2x2 merge, 2 fused frames)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # size = pixel-count bounds: shortest_edge = min_pixels, longest_edge = max_pixels.
    common = dict(
        patch_size=TINY_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 128 * 128},
    )
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tok,
        video_processor=(video_processor_cls or Qwen2VLVideoProcessor)(**common),
        chat_template=QWEN_TEMPLATE,
    )


def build_tiny_qwen(tok, model_cls, processor_cls, vision: dict, video_processor_cls=None, **text):
    """``(model, processor)`` of a tiny Qwen-VL checkpoint of ``model_cls``: ``vision`` (the family's vision_config
    fields) on ``TINY_PATCH`` px patches, 2x2 merge units and 2 fused frames; the tiny LLM (``text``: overrides of
    ``qwen_text_config``); the Qwen-VL token ids and processor (``qwen_processor``). Shared by the Qwen-VL families."""
    config = model_cls.config_class(
        text_config=qwen_text_config(tok, **text),
        vision_config=dict(vision, patch_size=TINY_PATCH, spatial_merge_size=2, temporal_patch_size=2),
        **qwen_token_ids(tok),
    )
    return model_cls(config), qwen_processor(processor_cls, tok, video_processor_cls)


def qwen_tiny_model(build, image_sizes=TINY_IMAGE_SIZES) -> TinyModel:
    """The ``TinyModel`` of a Qwen-VL family: its ``build`` with the Qwen-VL placeholders and chat template."""
    return TinyModel(build=build, placeholders=QWEN_SPECIALS, chat_template=QWEN_TEMPLATE, image_sizes=image_sizes)


def build_tiny(tok):
    """Tiny Qwen2.5-VL: windowed and full-attention vision blocks (32 px windows = 2x2 merged tokens, so images above
    32x32 use several windows), 2x2 patch merging, M-RoPE."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return build_tiny_qwen(tok, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                           dict(TINY_VIT, window_size=32, fullatt_block_indexes=[1, 3]))


register_tiny(Qwen2_5_VLAdapter, qwen_tiny_model(build_tiny))
