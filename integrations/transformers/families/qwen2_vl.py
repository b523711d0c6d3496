"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, 2x2 merge units, M-RoPE.

As Qwen2.5-VL (``qwen2_5_vl.py``, whose ``QwenVLAdapter`` this reuses) but without window attention: every ViT
block attends over each whole image (one ``cu_seqlens`` span per image), so the patches come out in plain
merge-unit order and need no un-permuting. One LLM token per 2x2 merge unit, raster order over the
``(h/2) x (w/2)`` merged grid; no CLS token (compressors use received attention); kept tokens keep their original
M-RoPE ``(t, h, w)`` ids. Videos in the same call pass through untouched.
"""

from __future__ import annotations

from ..adapter import register_adapter, register_tiny
from .qwen2_5_vl import QwenVLAdapter, build_tiny_qwen, qwen_tiny_model


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
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    # Qwen2-VL names the ViT width embed_dim; its hidden_size is the merger output (= the LLM width).
    vision = dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
    return build_tiny_qwen(tok, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision)


register_tiny(Qwen2VLAdapter, qwen_tiny_model(build_tiny))
