import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc.kernels import (
    cls_attention_row,
    cls_attention_row_reference,
    cls_logits_row,
    cls_logits_row_reference,
    received_attention,
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
    fast = received_attention(q, k, scale, segments, chunk_size=chunk)
    ref = received_attention_reference(q, k, scale, segments)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)
    # column sums of row-stochastic rows: each span's tokens share its number of queries (they average 1 per token)
    for start, end in segments:
        assert abs(float(fast[start:end].sum()) - (end - start)) < 1e-5 * (end - start)
