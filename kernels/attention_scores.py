"""Attention statistics from q and k, in fp32, without keeping an N x N attention map.

Shapes: ``q``, ``k`` are ``[H, S, d]`` (heads, tokens, head dim) for one attention call. ``segments`` lists the
``(start, end)`` spans that attend only among themselves (Qwen's windows / per-image blocks); ``None`` = one span.
"""

from __future__ import annotations

from typing import Sequence

import torch

Segments = Sequence[tuple[int, int]] | None


def cls_attention_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax attention of one query (the CLS token, ``q_cls: [..., H, d]``) over all ``S`` keys
    (``k: [..., H, S, d]``) -> ``[..., S]``; leading dims (a batch of images / views) go through in one op.

    Cost H*S*d per image: only the CLS row of the map is ever formed.
    """
    logits = torch.einsum("...hd,...hsd->...hs", q_cls.float(), k.float()) * scale
    return logits.softmax(dim=-1).mean(dim=-2)


def cls_logits_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean pre-softmax logits of one query (``q_cls: [..., H, d]``) over all ``S`` keys -> ``[..., S]``."""
    return (torch.einsum("...hd,...hsd->...hs", q_cls.float(), k.float()) * scale).mean(dim=-2)


def received_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, segments: Segments = None, chunk_size: int = 512,
    method: str = "auto",
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

    ``method``: ``"fused"`` runs two fused attention kernels per span (:func:`received_attention_fused`, no map
    formed, ~0.7x the time of ``"chunked"`` on a CPU at N = 2,305); ``"chunked"`` forms the map ``chunk_size``
    queries at a time (peak extra memory ``H * chunk_size * span`` floats); ``"auto"`` (default) is fused where this
    torch has the kernels for the device, else chunked. Both give the fp32 statistic of the given q and k (to float
    rounding; the fused route on CUDA half-precision inputs to ~1e-4).
    """
    if method not in ("auto", "fused", "chunked"):
        raise ValueError(f"method must be 'auto', 'fused' or 'chunked', got {method!r}")
    spans = list(segments) if segments is not None else [(0, q.shape[1])]
    if method == "fused" or (method == "auto" and fused_available(q.device)):
        return received_attention_fused(q, k, scale, spans)
    return _received_attention_chunked(q, k, scale, spans, chunk_size)


def _received_attention_chunked(q, k, scale, spans, chunk_size):
    heads, total, _ = q.shape
    out = torch.zeros(total, dtype=torch.float32, device=q.device)
    for start, end in spans:
        keys = k[:, start:end].float()
        acc = torch.zeros(end - start, dtype=torch.float32, device=q.device)
        for c0 in range(start, end, chunk_size):
            c1 = min(end, c0 + chunk_size)
            probs = (torch.einsum("hqd,hkd->hqk", q[:, c0:c1].float(), keys) * scale).softmax(dim=-1)
            acc += probs.sum(dim=(0, 1))
        out[start:end] = acc / heads
    return out


def fused_available(device: torch.device | str) -> bool:
    """Whether this torch has the fused attention kernels :func:`received_attention_fused` uses on ``device``
    (CPU: the flash kernel for CPU; CUDA: the memory-efficient kernel; both return log-sum-exps)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    if kind == "cuda":
        return hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")
    return False


def _attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``logsumexp_j(q_i k_j * scale)`` per query, fp32, from the fused attention kernel SDPA runs: ``[B, H, Sq]``.

    ``q: [B, H, Sq, d]``, ``k: [B, H, Sk, d]`` contiguous, fp32 (or bf16 / fp16 on CUDA). The kernel's output is
    discarded (the value tensor is ``k`` itself: any tensor of the right shape does).
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=scale)[1]
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True, 0.0, False, scale=scale)
    return out[1][..., : q.shape[2]]  # the CUDA kernel pads the log-sum-exps to a multiple of 32


def _padded(x: torch.Tensor, index: torch.Tensor, spans: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``index`` of ``x: [H, S, d]`` as ``[spans, H, length, w]`` in ``dtype`` with ``w - d >= 2`` zero
    features (``w`` a multiple of 8, the kernels' alignment): room for the extra features of the second call; zeros
    add nothing to a dot product."""
    heads, _, dim = x.shape
    out = x.new_zeros(spans, heads, length, -(-(dim + 2) // 8) * 8, dtype=dtype)
    out[..., :dim] = x.index_select(1, index).reshape(heads, spans, length, dim).transpose(0, 1)
    return out


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, except half-precision inputs on CUDA, which stay in their dtype: the kernels multiply them exactly
    into fp32 accumulators (a product of two bf16 / fp16 numbers is exact in fp32) and return fp32 log-sum-exps, so
    the statistic is the fp32 one of the same q and k -- at tensor-core speed (about 8x the fp32 kernel's)."""
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return torch.float32


def received_attention_fused(
    q: torch.Tensor, k: torch.Tensor, scale: float, segments: Segments = None, max_tokens: int = 4096,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`received_attention` from two fused attention calls per group of equal-length spans, no map formed.

    ``received[j] = (1/H) sum_h sum_i exp(s_ij - lse_i)`` with ``s_ij = q_i k_j * scale`` and ``lse_i`` the log-sum-exp
    of query ``i``'s row. Call 1 (queries ``q``, keys ``k``) gives ``lse_i``; call 2 swaps the roles (queries ``k``,
    keys ``q``) and carries ``-lse_i`` as extra features (``[k_j, 1] . [q_i, -lse_i / scale] * scale =
    s_ij - lse_i``), so its log-sum-exp for query ``j`` is ``log sum_i exp(s_ij - lse_i)``: the log of what token
    ``j`` receives. Extra features, not an attention mask: the kernels run as fast as without one, a mask costs
    about 1.6x on a CPU. Both calls are the kernels SDPA runs (flash on CPU, memory-efficient on CUDA), in fp32
    (half-precision inputs on CUDA: in their dtype, see ``_kernel_dtype``; agrees with fp32 to ~1e-4 relative).
    Spans of equal length are batched (Qwen's windows), up to ``max_tokens`` tokens per call, so a windowed block
    costs a few calls, not one per window. Extra memory: two padded copies of q and k for one call (``2 * H * tokens
    * (d + 8)`` numbers, tokens = the larger of one span and ``max_tokens``); no map is formed. ``compute_dtype``
    overrides the kernels' dtype (tests run the half-precision route on a CPU with it).
    """
    heads, total, dim = q.shape
    dtype = compute_dtype or _kernel_dtype(q)
    spans = list(segments) if segments is not None else [(0, total)]
    out = torch.zeros(total, dtype=torch.float32, device=q.device)
    by_length: dict[int, list[int]] = {}
    for start, end in spans:
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        per_call = max(1, max_tokens // length)
        for first in range(0, len(starts), per_call):
            batch = torch.tensor(starts[first : first + per_call], device=q.device)
            index = (batch[:, None] + torch.arange(length, device=q.device)).reshape(-1)
            qs, ks = _padded(q, index, len(batch), length, dtype), _padded(k, index, len(batch), length, dtype)
            lse = _attention_lse(qs, ks, scale)  # the extra features are still zero: plain q -> k
            ks[..., dim : dim + 2] = 1.0
            # -lse / scale as a sum of two features: exact in fp32, and to ~2^-16 relative in bf16 (its high part
            # and the remainder), where one bf16 feature would shift each query's weights by up to ~3 %
            bias = -lse / scale
            high = bias.to(dtype)
            qs[..., dim] = high
            qs[..., dim + 1] = (bias - high.float()).to(dtype)
            received = _attention_lse(ks, qs, scale).exp()  # [spans, H, length]
            out[index] = received.mean(dim=1).reshape(-1)
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
