"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, 2x2 merge units, M-RoPE.

As Qwen2.5-VL (``qwen2_5_vl.py``, whose ``QwenVLAdapter`` this reuses) but without window attention: every ViT
block attends over each whole image (one ``cu_seqlens`` span per image), so the patches come out in plain
merge-unit order and need no un-permuting. One LLM token per 2x2 merge unit, raster order over the
``(h/2) x (w/2)`` merged grid; no CLS token (compressors use received attention); kept tokens keep their original
M-RoPE ``(t, h, w)`` ids. Videos in the same call pass through untouched.
"""

from __future__ import annotations

from ..adapter import TinyModel, register_adapter, register_tiny
from .qwen2_5_vl import (
    QWEN_SPECIALS,
    QWEN_TEMPLATE,
    TINY_IMAGE_SIZES,
    TINY_PATCH,
    QwenVLAdapter,
    qwen_processor,
    qwen_text_config,
    qwen_token_ids,
)


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    display_name = "Qwen2-VL"
    tower_name = "qwen2_vit"
    modeling_module = "transformers.models.qwen2_vl.modeling_qwen2_vl"

    @classmethod
    def model_classes(cls):
        from transformers import Qwen2VLForConditionalGeneration

        return (Qwen2VLForConditionalGeneration,)


def build_tiny(tok):
    """Tiny Qwen2-VL: full-attention vision blocks, 2x2 patch merging, M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=qwen_text_config(tok),
        # Qwen2-VL names the ViT width embed_dim; its hidden_size is the merger output (= the LLM width).
        vision_config=dict(
            depth=3,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=TINY_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **qwen_token_ids(tok),
    )
    return Qwen2VLForConditionalGeneration(config), qwen_processor(Qwen2VLProcessor, tok)


register_tiny(Qwen2VLAdapter, TinyModel(build=build_tiny, placeholders=QWEN_SPECIALS, chat_template=QWEN_TEMPLATE,
                                        image_sizes=TINY_IMAGE_SIZES))
