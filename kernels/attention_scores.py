"""Attention statistics from q and k, in fp32, without keeping an N x N attention map.

Shapes: ``q``, ``k`` are ``[H, S, d]`` (heads, tokens, head dim) for one attention call. ``segments`` lists the
``(start, end)`` spans that attend only among themselves (Qwen's windows / per-image blocks); ``None`` = one span.
"""

from __future__ import annotations

from typing import Sequence

import torch

Segments = Sequence[tuple[int, int]] | None


def cls_attention_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax attention of one query (the CLS token, ``q_cls: [H, d]``) over all ``S`` keys -> ``[S]``.

    Cost H*S*d: only the CLS row of the map is ever formed.
    """
    logits = torch.einsum("hd,hsd->hs", q_cls.float(), k.float()) * scale
    return logits.softmax(dim=-1).mean(dim=0)


def cls_logits_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean pre-softmax logits of one query (``q_cls: [H, d]``) over all ``S`` keys -> ``[S]`` (cost H*S*d)."""
    return (torch.einsum("hd,hsd->hs", q_cls.float(), k.float()) * scale).mean(dim=0)


def received_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, segments: Segments = None, chunk_size: int = 512
) -> torch.Tensor:
    """Head-mean attention each token receives, **summed** over the queries of its span -> ``[S]``.

    ``out[j] = (1/H) sum_h sum_{i in span(j)} softmax_span(q_i k^T * scale)[h, i, j]`` -- HiPrune's "global
    attention" (paper Eq. 2, and its Qwen code). Every query gives out a total of 1 over its span, so the tokens of a
    span of ``w`` tokens share exactly ``w``: they average 1 **whatever the span's size**. That is why the sum is used
    and not the column mean: the mean averages ``1 / w``, which ranks the tokens of small spans (Qwen2.5-VL's partial
    edge windows) above the rest of the image regardless of content, and weighs a full-attention block (``1 / N``)
    far below a windowed one (``1 / 64``) when layers are summed. With one span (CLIP/SigLIP) the sum is ``S`` times
    the mean, so rankings are unchanged there. A uniform map gives exactly 1 everywhere; values above 1 mean "more
    than the span's average token".

    Queries are processed ``chunk_size`` at a time, so peak extra memory is ``H * chunk_size * span`` floats
    instead of ``H * S * S``.
    """
    heads, total, _ = q.shape
    out = torch.zeros(total, dtype=torch.float32, device=q.device)
    for start, end in segments if segments is not None else [(0, total)]:
        keys = k[:, start:end].float()
        acc = torch.zeros(end - start, dtype=torch.float32, device=q.device)
        for c0 in range(start, end, chunk_size):
            c1 = min(end, c0 + chunk_size)
            probs = (torch.einsum("hqd,hkd->hqk", q[:, c0:c1].float(), keys) * scale).softmax(dim=-1)
            acc += probs.sum(dim=(0, 1))
        out[start:end] = acc / heads
    return out


def cls_attention_row_reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Full-map reference: ``softmax(q k^T * scale)[:, 0].mean(heads)``."""
    attn = (torch.einsum("hqd,hkd->hqk", q.double(), k.double()) * scale).softmax(dim=-1)
    return attn[:, 0].mean(dim=0).float()


def cls_logits_row_reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Full-map reference: ``(q k^T * scale)[:, 0].mean(heads)``."""
    return (torch.einsum("hqd,hkd->hqk", q.double(), k.double()) * scale)[:, 0].mean(dim=0).float()


def received_attention_reference(q: torch.Tensor, k: torch.Tensor, scale: float, segments: Segments = None) -> torch.Tensor:
    """Full-map reference: a block-diagonal mask over ``segments``, then column sums over queries, mean over heads."""
    heads, total, _ = q.shape
    logits = torch.einsum("hqd,hkd->hqk", q.double(), k.double()) * scale
    if segments is not None:
        allowed = torch.zeros(total, total, dtype=torch.bool)
        for start, end in segments:
            allowed[start:end, start:end] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
    attn = logits.softmax(dim=-1)
    return attn.sum(dim=1).mean(dim=0).float()
