"""Received attention is neutral to the size of the span (Qwen2.5-VL window) a token sits in (issue 14).

The statistic is the head-mean column **sum** over the queries of each span: every query spreads a total of 1 over
its span, so the tokens of a span of any size average exactly 1. The former column *mean* averaged ``1 / span``, so
tokens of small partial edge windows outranked the rest of the image whatever it showed, and the one full-attention
block of an ensemble counted ``~1 / N`` against the windowed blocks' ``~1 / 64``.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from transformers import AttentionInterface

import vtc
from vtc import Signal, SignalKind
from vtc import testing as tiny
from vtc.integrations.transformers.adapter import adapter_for
from vtc.kernels import received_attention, received_attention_reference

# spans of different sizes: a full 8x8-patch window, partial edge windows, a single token
SEGMENTS = [(0, 64), (64, 76), (76, 124), (124, 128), (128, 129)]
SCALE = 8 ** -0.5


def _both(q, k, segments=SEGMENTS):
    return (received_attention(q, k, SCALE, segments, chunk_size=5),
            received_attention_reference(q, k, SCALE, segments))


# ---------------------------------------------------------------------------------------------------- kernel
def test_uniform_attention_scores_every_token_alike_whatever_its_span():
    """q = 0: every query attends uniformly to its span, so every token receives exactly 1 (one query's worth)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.zeros(3, 129, 8), torch.randn(3, 129, 8, generator=g)
    for scores in _both(q, k):
        assert torch.allclose(scores, torch.ones(129), atol=1e-6), scores


def test_every_span_averages_one_per_token():
    """For any attention, a span's tokens share exactly its number of queries: the per-token mean is 1 in every span."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 129, 8, generator=g) * 3, torch.randn(4, 129, 8, generator=g) * 3
    for scores in _both(q, k):
        for start, end in SEGMENTS:
            assert math.isclose(float(scores[start:end].mean()), 1.0, rel_tol=1e-5), (start, end)


def _planted(segments, salient: dict[int, float], dim: int = 8, heads: int = 2):
    """Every query is ``u``; keys are 0 except the planted ones, ``logit * u`` scaled so ``q . k * SCALE = logit``."""
    total = segments[-1][1]
    u = torch.zeros(dim)
    u[0] = 1.0
    q = u.expand(heads, total, dim).clone()
    k = torch.zeros(heads, total, dim)
    for token, logit in salient.items():
        k[:, token, 0] = logit / SCALE
    return q, k


def test_planted_patch_equally_salient_in_small_and_large_span_gets_the_same_score():
    """A patch that draws ``rho`` times the uniform share (``rho / w``) of every query of its span of ``w`` tokens
    scores ``rho`` in a partial 12-token window as in a full 64-token one (the mean gave ``rho / w``: 5x apart)."""
    rho = 6.0
    salient = {}
    for start, end in SEGMENTS[:2]:
        w = end - start
        salient[start + 3] = math.log(rho * (w - 1) / (w - rho))  # softmax share rho / w among w tokens
    q, k = _planted(SEGMENTS, salient)
    for scores in _both(q, k):
        big, small = float(scores[3]), float(scores[64 + 3])
        assert math.isclose(big, rho, rel_tol=1e-5) and math.isclose(small, rho, rel_tol=1e-5), (big, small)


@pytest.mark.parametrize("logit", [0.5, 1.0, 3.0])
def test_planted_patches_outrank_every_background_token_whatever_their_span(logit):
    """The same key planted in a 64-token and in a 12-token span (same logit advantage over the rest of its span):
    both planted tokens rank above every background token of every span. Column means let the background of the
    small span (``1 / (e^a + 11)``) outrank the planted token of the large one (``e^a / (e^a + 63)``) for small a."""
    q, k = _planted(SEGMENTS, {3: logit, 64 + 3: logit})
    for scores in _both(q, k):
        top2 = torch.sort(scores, descending=True, stable=True).indices[:2]
        assert sorted(top2.tolist()) == [3, 67], scores
        background = torch.ones(129, dtype=torch.bool)
        background[[3, 67]] = False
        assert float(scores[background].max()) <= 1.0 + 1e-6 < min(float(scores[3]), float(scores[67]))


# ---------------------------------------------------------------------------------------------------- tiny Qwen2.5-VL
#: 176x144 (w x h) with 64 px windows: a 9x11 merged grid, 4x4-token windows, so the right column holds 4x3
#: windows, the bottom row 1x4 / 1x3 ones (the issue's repro)
WIDTH, HEIGHT, WINDOW_PX, WINDOW = 176, 144, 64, 4


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tiny.save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("neutral") / "qwen2_5_vl", seed=0)


def _load(qwen_dir, uniform: bool = False, attn: str | None = None):
    model, processor = tiny.load_tiny(qwen_dir)
    visual = model.model.visual
    visual.window_size = WINDOW_PX
    processor.image_processor.size = {"shortest_edge": 16 * 16, "longest_edge": 256 * 256}
    if uniform:  # q = 0 in every block: each query attends uniformly to its cu_seqlens span
        with torch.no_grad():
            for block in visual.blocks:
                dim = block.attn.qkv.in_features
                block.attn.qkv.weight[:dim].zero_()
                block.attn.qkv.bias[:dim].zero_()
    if attn is not None:
        model.set_attn_implementation({"vision_config": attn})
    inputs = processor(text=[tiny.build_prompt(processor, "what is it ?")],
                       images=[tiny.random_image(WIDTH, HEIGHT, seed=0)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 18, 22]]  # 9 x 11 merged tokens
    return model, inputs


def _window_ids() -> torch.Tensor:
    """Window of every merged token (raster order): 4x4 blocks from the top-left corner, as Qwen2.5-VL pads."""
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(11), indexing="ij")
    return ((rows // WINDOW) * math.ceil(11 / WINDOW) + cols // WINDOW).flatten()


def _encode(model, inputs, layers):
    adapter = adapter_for(model)
    signals = tuple(Signal(SignalKind.RECEIVED_ATTENTION, layer) for layer in layers)
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs), signals)
    return {s.layer: encoded.signals[0][s] for s in signals}


def test_capture_uniform_attention_scores_full_and_partial_windows_alike(qwen_dir):
    """Uniform attention in every block: every merged token receives 1 at every block, windowed or full, in full
    4x4 windows, in the 4x3 right-column windows and in the 1x4 / 1x3 bottom-row windows alike."""
    model, inputs = _load(qwen_dir, uniform=True)
    visual = model.model.visual
    windowed = [i for i in range(len(visual.blocks)) if i not in visual.fullatt_block_indexes]
    assert windowed and visual.fullatt_block_indexes
    for layer, value in _encode(model, inputs, range(len(visual.blocks))).items():
        assert value.shape == (99,)
        assert torch.allclose(value, torch.ones(99), atol=1e-5), (layer, value.view(9, 11))


def test_capture_every_window_averages_one_per_token_for_any_weights(qwen_dir):
    """Random weights: at a windowed block each window's merged tokens average exactly 1 (each of its queries gives
    out 1, shared by its tokens), whatever the window's size; at a full block the whole image averages 1."""
    model, inputs = _load(qwen_dir)
    visual = model.model.visual
    windows = _window_ids()
    sizes = torch.bincount(windows)
    assert sorted(set(sizes.tolist())) == [3, 4, 12, 16]
    for layer, value in _encode(model, inputs, range(len(visual.blocks))).items():
        if layer in visual.fullatt_block_indexes:
            assert math.isclose(float(value.mean()), 1.0, rel_tol=1e-5), layer
        else:
            per_window = torch.zeros(len(sizes)).index_add_(0, windows, value.float()) / sizes
            assert torch.allclose(per_window, torch.ones(len(sizes)), atol=1e-5), (layer, per_window)


def _recorded_reference(qwen_dir, layers) -> torch.Tensor:
    """The cls_attention ensemble computed by hand from the eager attention maps of every ``cu_seqlens`` chunk:
    head-mean column sums over queries, mean over each 2x2 merge unit, window order undone, summed over layers."""
    recorded: dict[int, list[torch.Tensor]] = {}
    model, inputs = _load(qwen_dir)
    eager_attention_forward = importlib.import_module(adapter_for(model).modeling_module).eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        recorded.setdefault(module._vtc_test_layer, []).append(weights.detach()[0].double())  # [H, n, n]
        return output, weights

    AttentionInterface.register("vtc_test_neutral_recording", recording)
    model.set_attn_implementation({"vision_config": "vtc_test_neutral_recording"})
    visual = model.model.visual
    for index, block in enumerate(visual.blocks):
        block.attn._vtc_test_layer = index
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    restore = torch.argsort(adapter_for(model)._window_index(inputs["image_grid_thw"]))
    total = torch.zeros(99, dtype=torch.float64)
    for layer in layers:
        per_patch = torch.cat([w.mean(dim=0).sum(dim=0) for w in recorded[layer]])  # window-permuted patch order
        total += per_patch.reshape(-1, 4).mean(dim=1)[restore]
    return total


def test_repro_cls_attention_on_partial_windows(qwen_dir):
    """The issue's repro: ``cls_attention`` with k = 20 on the 9x11 grid. The recorded scores equal the window-neutral
    ensemble computed by hand from the eager maps, each windowed block gives every window a mean of exactly 1 per
    token, and under uniform attention all 99 scores are equal (the column mean kept the whole bottom row)."""
    model, inputs = _load(qwen_dir)
    vtc.apply(model, "cls_attention", budget=20)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    (record,) = vtc.last_selection(model)
    assert record.grid == (9, 11) and record.num_kept == 20
    layers = range(len(model.model.visual.blocks))  # the default ensemble covers all 4 tiny blocks (0..3)
    expected = _recorded_reference(qwen_dir, layers)
    assert torch.allclose(record.scores.double(), expected, rtol=1e-5, atol=1e-6)
    # neutral: a bottom-row token scores about as much as the rest (the mean made it ~3.6x as much)
    bottom, rest = record.scores.view(9, 11)[8].mean(), record.scores.view(9, 11)[:8].mean()
    assert 0.5 < float(bottom / rest) < 2.0, (float(bottom), float(rest))
    assert not set(range(88, 99)) <= set(record.indices.tolist())

    uniform, inputs = _load(qwen_dir, uniform=True)
    vtc.apply(uniform, "cls_attention", budget=20)
    with torch.no_grad():
        uniform.generate(**inputs, max_new_tokens=1, do_sample=False)
    (record,) = vtc.last_selection(uniform)
    assert torch.allclose(record.scores, torch.full((99,), float(len(layers))), atol=1e-5), record.scores.view(9, 11)
