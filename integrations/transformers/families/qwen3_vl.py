"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL-style ViT plus DeepStack.

The tower adds learned position embeddings (bilinearly resampled to each image's patch grid) to the patch
embeddings and otherwise runs full-attention blocks like Qwen2-VL (one ``cu_seqlens`` span per image, no window
permutation), so capture, layout and positions are those of ``QwenVLAdapter`` (``qwen2_5_vl.py``): one LLM token per
2x2 merge unit in raster order, received attention instead of CLS attention, kept tokens keep their original
(interleaved) M-RoPE ``(t, h, w)`` ids.

DeepStack: ``get_image_features`` also returns ``deepstack_features``, one ``[N_i, D]`` tensor per image for each of
the ViT layers in ``deepstack_visual_indexes`` (each through its own merger). The LLM adds level ``j`` to the hidden
states at the image placeholder positions after decoder layer ``j``. Every level therefore gets the selection of
the main features -- the kept rows, or for merging compressors the same merge (the cut re-runs the compressor on
each level; see ``cut.reduce_level``) -- so the injected features stay aligned with the kept tokens.

Videos (``encode_videos``): every deepstack level of a video gets the video's selection, like images.
"""

from __future__ import annotations

from ..adapter import EncodedImages, EncodedVideos, register_adapter, register_tiny
from .qwen2_5_vl import TINY_VIT, QwenVLAdapter, build_tiny_qwen, qwen_tiny_model


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    display_name = "Qwen3-VL"
    tower_name = "qwen3_vit"
    modeling_module = "transformers.models.qwen3_vl.modeling_qwen3_vl"

    @classmethod
    def model_classes(cls):
        from transformers import Qwen3VLForConditionalGeneration

        return (Qwen3VLForConditionalGeneration,)

    def encode(self, inputs, signals) -> EncodedImages:
        encoded = super().encode(inputs, signals)
        levels = list(getattr(encoded.output, "deepstack_features", None) or [])
        for j, level in enumerate(levels):
            sizes = [tuple(f.shape) for f in level]
            if sizes != [tuple(f.shape) for f in encoded.features]:
                raise RuntimeError(
                    f"Qwen3-VL deepstack level {j} has per-image shapes {sizes} but the visual tokens have "
                    f"{[tuple(f.shape) for f in encoded.features]}; this transformers version lays deepstack "
                    "features out differently from what the qwen3_vl adapter supports"
                )
        # per image: its rows of every deepstack level, in level order
        encoded.levels = [[level[i] for level in levels] for i in range(len(encoded.features))]
        return encoded

    def llm_first_layer(self) -> int:
        """After the deepstack injections: the LLM adds level ``j`` to the visual tokens after layer ``j``, so a drop
        before ``len(deepstack_visual_indexes)`` would cut tokens that still receive features."""
        levels = getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ()
        return max(1, len(levels))

    def shrink_output(self, encoded: EncodedImages, kept_features, kept_levels):
        num_levels = len(encoded.levels[0]) if encoded.levels else 0
        deepstack = [tuple(levels[j] for levels in kept_levels) for j in range(num_levels)]
        return type(encoded.output)(pooler_output=tuple(kept_features), deepstack_features=deepstack)

    def encode_videos(self, inputs, signals) -> EncodedVideos:
        encoded = super().encode_videos(inputs, signals)
        levels = list(getattr(encoded.output, "deepstack_features", None) or [])
        sizes = [sum(f.shape[0] for f in frames) for frames in encoded.frames]
        for j, level in enumerate(levels):
            if [f.shape[0] for f in level] != sizes:
                raise RuntimeError(
                    f"Qwen3-VL deepstack level {j} of the videos has {[f.shape[0] for f in level]} rows per video but "
                    f"the videos have {sizes} visual tokens; this transformers version lays deepstack features out "
                    "differently from what the qwen3_vl adapter supports"
                )
        encoded.levels = [[level[v] for level in levels] for v in range(len(encoded.frames))]
        return encoded

    def shrink_video_output(self, encoded: EncodedVideos, kept, kept_levels):
        num_levels = len(encoded.levels[0]) if encoded.levels else 0
        deepstack = [tuple(levels[j] for levels in kept_levels) for j in range(num_levels)]
        return type(encoded.output)(pooler_output=tuple(kept), deepstack_features=deepstack)


def build_tiny(tok):
    """Tiny Qwen3-VL: interpolated learned position embeddings (an 8x8 grid, bilinearly resampled to each image's
    patch grid), interleaved M-RoPE and two deepstack levels (added after LLM layers 0 and 1 of 3)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return build_tiny_qwen(tok, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                           dict(TINY_VIT, num_position_embeddings=64, deepstack_visual_indexes=[1, 2]),
                           video_processor_cls=Qwen3VLVideoProcessor, num_hidden_layers=3, head_dim=16,
                           rope_parameters={"mrope_interleaved": True})


# (width, height): 8x12 and 6x8 patch grids, resampled from Qwen3's 8x8
register_tiny(Qwen3VLAdapter, qwen_tiny_model(build_tiny, image_sizes=((96, 64), (64, 48))))
