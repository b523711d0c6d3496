import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc.kernels import (
    cls_attention_row,
    cls_attention_row_reference,
    cls_logits_row,
    cls_logits_row_reference,
    fused_available,
    received_attention,
    received_attention_fused,
    received_attention_reference,
)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), seq=st.integers(1, 40), dim=st.integers(1, 8), seed=st.integers(0, 999),
       chunk=st.integers(1, 16), cuts=st.lists(st.integers(1, 39), max_size=4))
def test_scores_match_full_map_reference(heads, seq, dim, seed, chunk, cuts):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(heads, seq, dim, generator=g) * 2, torch.randn(heads, seq, dim, generator=g) * 2
    scale = dim ** -0.5
    assert torch.allclose(cls_attention_row(q[:, 0], k, scale), cls_attention_row_reference(q, k, scale), atol=1e-6)
    assert torch.allclose(cls_logits_row(q[:, 0], k, scale), cls_logits_row_reference(q, k, scale), atol=1e-5)
    bounds = sorted({0, seq, *[c for c in cuts if c < seq]})
    segments = list(zip(bounds[:-1], bounds[1:]))
    fast = received_attention(q, k, scale, segments, chunk_size=chunk, method="chunked")
    ref = received_attention_reference(q, k, scale, segments)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)
    # column sums of row-stochastic rows: each span's tokens share its number of queries (they average 1 per token)
    for start, end in segments:
        assert abs(float(fast[start:end].sum()) - (end - start)) < 1e-5 * (end - start)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), seq=st.integers(1, 60), dim=st.sampled_from([1, 3, 8, 16]), seed=st.integers(0, 999),
       cuts=st.lists(st.integers(1, 59), max_size=5), equal=st.booleans(), spread=st.sampled_from([0.5, 2.0, 6.0]))
def test_fused_received_attention_matches_full_map(heads, seq, dim, seed, cuts, equal, spread):
    """The two-kernel route (log-sum-exps of q->k, then k->q with -lse as an extra feature) equals the full map, for
    one span, uneven spans, and many equal-length spans batched together (Qwen's windows), at large logits too."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(heads, seq, dim, generator=g) * spread, torch.randn(heads, seq, dim, generator=g) * spread
    scale = dim ** -0.5
    if equal:  # windows of one size and a short last one
        width = max(1, seq // 4)
        bounds = sorted({0, seq, *range(width, seq, width)})
    else:
        bounds = sorted({0, seq, *[c for c in cuts if c < seq]})
    segments = list(zip(bounds[:-1], bounds[1:]))
    ref = received_attention_reference(q, k, scale, segments)
    for method in ("fused", "auto"):
        got = received_attention(q, k, scale, segments, method=method)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), method
    assert torch.allclose(received_attention_fused(q, k, scale, segments), ref, rtol=1e-4, atol=1e-5)


def test_fused_received_attention_is_available_on_cpu_and_used_by_default():
    """``auto`` takes the fused route on this CPU (so its speed is what the benchmarks measure), and a bf16 input
    is scored in fp32 like the chunked route."""
    assert fused_available("cpu")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    ref = received_attention_reference(q, k, 0.3)
    got = received_attention(q.bfloat16(), k.bfloat16(), 0.3)
    assert got.dtype == torch.float32
    assert torch.allclose(got, received_attention_reference(q.bfloat16().float(), k.bfloat16().float(), 0.3), atol=1e-5)
    assert not torch.equal(ref, received_attention_reference(q.bfloat16().float(), k.bfloat16().float(), 0.3))


def test_received_attention_rejects_unknown_method():
    q = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="'auto', 'fused' or 'chunked'"):
        received_attention(q, q, 1.0, method="fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_route_matches_fp32_of_the_same_inputs(dtype):
    """The CUDA route for bf16 / fp16 models runs the kernels in the model's dtype: q.k products are exact in the
    kernels' fp32 accumulators, and -lse / scale travels as a high part plus a remainder, so the statistic equals
    the fp32 one of the same (half-precision) q and k to ~1e-4 -- where one half-precision feature would be off by
    percents. Run here through the CPU kernel with ``compute_dtype``."""
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(4, 300, 64, generator=g) * 3).to(dtype)
    k = (torch.randn(4, 300, 64, generator=g) * 3).to(dtype)
    segments = [(0, 64), (64, 128), (128, 192), (192, 300)]
    ref = received_attention_reference(q.float(), k.float(), 0.125, segments)
    got = received_attention_fused(q, k, 0.125, segments, compute_dtype=dtype)
    assert torch.allclose(got, ref, rtol=2e-3, atol=1e-4), (got - ref).abs().max()
    for start, end in segments:
        assert abs(float(got[start:end].sum()) - (end - start)) < 1e-2 * (end - start)


def test_cls_rows_take_a_batch_in_one_call():
    """A batch of images (AnyRes views) in one op equals one call per image."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 9, 4, generator=g), torch.randn(3, 2, 9, 4, generator=g)
    for kernel in (cls_attention_row, cls_logits_row):
        batched = kernel(q[:, :, 0], k, 0.5)
        assert batched.shape == (3, 9)
        assert torch.allclose(batched, torch.stack([kernel(q[b, :, 0], k[b], 0.5) for b in range(3)]), atol=1e-6)
