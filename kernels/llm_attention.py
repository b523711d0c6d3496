"""Rows of an LLM layer's attention map from captured q/k projections, without eager attention.

In-LLM pruners (FastV, PyramidDrop, SparseVLM) read a few query rows of one decoder layer's softmax attention: the
last prompt token's (FastV, PyramidDrop) or the text raters' (SparseVLM). With SDPA / flash attention that map never
exists, so the rows are recomputed from the layer's ``q_proj`` (only the rows needed) and ``k_proj`` outputs and the
rotary ``(cos, sin)`` the model hands every layer: ``O(B * H * R * L)`` memory, never an ``L x L`` map, fp32.
The rotary helper is the rotate-half form Llama, Qwen2-VL / 2.5-VL / 3-VL share in transformers 5.x, whose
``(cos, sin)`` already carry M-RoPE's three sections.
"""

from __future__ import annotations

import torch

__all__ = ["rotate_half", "apply_rotary", "attention_rows", "attention_rows_reference"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, L, D] rotated by ``cos``/``sin`` [B, L, D] (the rows of ``x``'s tokens)."""
    cos, sin = cos.unsqueeze(1).to(torch.float32), sin.unsqueeze(1).to(torch.float32)
    x = x.to(torch.float32)
    return x * cos + rotate_half(x) * sin


def attention_rows(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, key_mask: torch.Tensor | None = None,
                   scale: float | None = None, chunk: int = 8) -> torch.Tensor:
    """Head-mean softmax attention of selected query rows over all keys: [B, R, L], fp32.

    ``q`` [B, H, R, D] and ``k`` [B, Hkv, L, D] are post-rotary (grouped-query heads: ``H`` a multiple of ``Hkv``,
    each KV head serves ``H / Hkv`` consecutive query heads, as ``repeat_kv`` does); ``query_index`` [B, R] is each
    query's position in the sequence (keys after it are causal-masked); ``key_mask`` [B, L] marks real (non-padding)
    keys. ``chunk`` query heads are scored at a time.
    """
    b, h, r, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads cannot share {hkv} key heads")
    scale = d ** -0.5 if scale is None else scale
    allowed = torch.arange(length, device=q.device)[None, None, :] <= query_index[:, :, None]  # [B, R, L]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    total = torch.zeros(b, r, length, dtype=torch.float32, device=q.device)
    group = h // hkv
    for start in range(0, h, chunk):
        heads = torch.arange(start, min(h, start + chunk), device=q.device)
        logits = torch.einsum("bhrd,bhld->bhrl", q[:, heads].float(), k[:, heads // group].float()) * scale
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(1)
    return total / h


def attention_rows_reference(q_all: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor,
                             key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The full causal map (every query row of ``q_all`` [B, H, L, D]), head-mean, then the rows ``query_index``."""
    b, h, length, d = q_all.shape
    keys = k.repeat_interleave(h // k.shape[1], dim=1).float()
    logits = q_all.float() @ keys.transpose(-1, -2) * d ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=q_all.device).tril()
    allowed = causal[None, None] & (key_mask.bool()[:, None, None, :] if key_mask is not None else True)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).mean(1)  # [B, L, L]
    return torch.stack([probs[i, query_index[i]] for i in range(b)])
