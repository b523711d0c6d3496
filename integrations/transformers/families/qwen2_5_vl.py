"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native-resolution ViT, 2x2 merge units, M-RoPE.

Layout: one LLM token per 2x2 merge unit, raster order over the ``(h/2) x (w/2)`` merged grid of each image.
The ViT has no CLS token (compressors use received attention instead) and runs in window-permuted order; signals
are captured per ``cu_seqlens`` span, averaged over the 4 patches of each merge unit and un-permuted with
``argsort(window_index)``, so compressors only ever see merged-token raster order.

Positions: kept tokens keep their original M-RoPE ``(t, h, w)`` ids (as every Qwen port of these methods does);
row 0, the text row transformers uses for masks, is renumbered contiguously. There is no "reindex" for Qwen: a
partial grid has no M-RoPE numbering of its own.

Videos in the same call are encoded with the model's own ``get_video_features`` and passed through untouched.
"""

from __future__ import annotations

import torch

from vtc.signals import Signal, TowerInfo

from ..adapter import EncodedImages, FamilyAdapter, ImageLayout, register_adapter
from ..capture import QwenBlockCapture

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@register_adapter
class Qwen2_5_VLAdapter(FamilyAdapter):
    family = "qwen2_5_vl"
    position_modes = ("keep",)

    @classmethod
    def model_classes(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    @property
    def visual(self):
        return self.model.model.visual

    def tower_info(self, inputs: dict | None = None) -> TowerInfo:
        depth = len(self.visual.blocks)
        full = tuple(int(i) for i in (self.visual.fullatt_block_indexes or ()))
        return TowerInfo(name="qwen2_5_vit", num_layers=depth, feature_layer=depth - 1, has_cls=False,
                         full_attention_layers=full)

    def _rotary(self):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.visual.spatial_merge_size, window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        return window_index

    def encode(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedImages:
        enc_kwargs = self.encoder_kwargs(inputs)
        grid_thw = enc_kwargs.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw next to pixel_values (the processor returns both)")
        capture = QwenBlockCapture(self.visual.blocks, signals, self._rotary())
        with capture:
            output = self.model.model.get_image_features(**enc_kwargs, return_dict=True)
        features = list(output.pooler_output)
        merge = self.visual.spatial_merge_size
        unit = merge * merge
        layouts = [ImageLayout(grid=(int(t) * int(h) // merge, int(w) // merge)) for t, h, w in grid_thw.tolist()]
        per_image: list[dict] = [{} for _ in features]
        if capture.results:
            restore = torch.argsort(self._window_index(grid_thw).to(grid_thw.device))
            sizes = [f.shape[0] for f in features]
            for signal, value in capture.results.items():
                merged = value.reshape(value.shape[0] // unit, unit, *value.shape[1:]).mean(dim=1)
                for i, part in enumerate(torch.split(merged[restore.to(merged.device)], sizes)):
                    per_image[i][signal] = part
            capture.results.clear()
        extra, position_inputs = {}, {"image_grid_thw": grid_thw}
        if inputs.get("pixel_values_videos") is not None:
            video_kwargs = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw") if k in inputs}
            extra["video"] = self.model.model.get_video_features(**video_kwargs, return_dict=True)
        for key in ("video_grid_thw", "second_per_grid_ts"):
            if inputs.get(key) is not None:
                position_inputs[key] = inputs[key]
        return EncodedImages(output=output, features=features, layouts=layouts, signals=per_image,
                             extra_outputs=extra, position_inputs=position_inputs)

    def original_positions(self, input_ids, attention_mask, encoded: EncodedImages) -> torch.Tensor:
        mm_token_type_ids = encoded.position_inputs.get("mm_token_type_ids")
        if mm_token_type_ids is None:  # the processor returns it; rebuild it for hand-made inputs
            config = self.model.config
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
            mm_token_type_ids[input_ids == config.image_token_id] = 1
            mm_token_type_ids[input_ids == config.video_token_id] = 2
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=encoded.position_inputs.get("image_grid_thw"),
            video_grid_thw=encoded.position_inputs.get("video_grid_thw"),
            second_per_grid_ts=encoded.position_inputs.get("second_per_grid_ts"),
            attention_mask=attention_mask,
        )
        return positions  # [3, B, L]

    def position_ids(self, kept_positions: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        text_row = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
        return torch.cat([text_row[None].to(kept_positions.device), kept_positions], dim=0)  # [4, B, L']
