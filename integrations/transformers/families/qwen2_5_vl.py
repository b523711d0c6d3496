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

``QwenVLAdapter`` holds what Qwen2-VL (``qwen2_vl.py``), Qwen2.5-VL and Qwen3-VL (``qwen3_vl.py``) share; a family
names its classes and tower, and Qwen2.5-VL adds the window permutation.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from vtc.signals import Signal, TowerInfo

from ..adapter import EncodedImages, EncodedVideos, FamilyAdapter, ImageLayout, register_adapter
from ..capture import QwenBlockCapture

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class QwenVLAdapter(FamilyAdapter):
    """Common code of the Qwen-VL adapters (not registered itself)."""

    position_modes = ("keep",)
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
