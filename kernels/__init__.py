"""Scoring ops that turn captured q/k projections into attention signals without an N x N map.

Each op has a plain reference (``*_reference``, materialises the full map) and tests check that they agree.
"""

from .attention_scores import (
    cls_attention_row,
    cls_attention_row_reference,
    cls_logits_row,
    cls_logits_row_reference,
    fused_available,
    received_attention,
    received_attention_fused,
    received_attention_reference,
)
from .llm_attention import apply_rotary, attention_rows, attention_rows_reference, rotate_half

__all__ = [
    "apply_rotary",
    "attention_rows",
    "attention_rows_reference",
    "rotate_half",
    "cls_attention_row",
    "cls_attention_row_reference",
    "cls_logits_row",
    "cls_logits_row_reference",
    "fused_available",
    "received_attention",
    "received_attention_fused",
    "received_attention_reference",
]
