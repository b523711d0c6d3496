"""Signals captured by vtc's hooks equal those read off an eager run of the same tower (to 1e-5)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AttentionInterface

from helpers import make_inputs
from vtc import Signal, SignalKind
from vtc import testing as tiny
from vtc.integrations.transformers.adapter import adapter_for
from vtc.testing import QWEN_FAMILIES


def test_clip_signals_equal_eager_attentions(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    eager, _ = tiny.load_tiny(tiny_dirs["llava"])
    eager.set_attn_implementation({"vision_config": "eager"})
    inputs = make_inputs(processor, "llava", ["what is the color ?"] * 2, [1, 1])
    adapter = adapter_for(model)
    layers = range(len(adapter.layers))
    signals = tuple(Signal(kind, layer) for layer in layers
                    for kind in (SignalKind.CLS_ATTENTION, SignalKind.RECEIVED_ATTENTION, SignalKind.KEYS))
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs), signals)
        vision = eager.model.vision_tower
        out = vision(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    assert model.config.vision_config._attn_implementation == "sdpa"
    for i, per_image in enumerate(encoded.signals):
        for layer in layers:
            attn = out.attentions[layer][i].double()  # [H, S, S] with the CLS token first
            cls = attn[:, 0, 1:].mean(0)  # "default" strategy: patch tokens only
            received = attn.mean(dim=0).sum(dim=0)[1:]  # head mean, sum over the queries
            got_cls = per_image[Signal(SignalKind.CLS_ATTENTION, layer)]
            got_received = per_image[Signal(SignalKind.RECEIVED_ATTENTION, layer)]
            assert torch.allclose(got_cls.double(), cls, atol=1e-5)
            assert torch.allclose(got_received.double(), received, atol=1e-5)
            assert per_image[Signal(SignalKind.KEYS, layer)].shape == (36, 16)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_signals_equal_recorded_eager_attention(tiny_dirs, family):
    """Qwen ViT attention modules return no weights even when eager, so a recording attention function stands in."""
    recorded: list[torch.Tensor] = []
    recorded_keys: list[torch.Tensor] = []
    model, processor = tiny.load_tiny(tiny_dirs[family])
    adapter = adapter_for(model)
    eager_attention_forward = importlib.import_module(adapter.modeling_module).eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if getattr(module, "_vtc_test_record", False):
            recorded.append(weights.detach()[0])  # [H, n, n] for one cu_seqlens chunk
            recorded_keys.append(key.detach()[0])  # [H, n, d] post-RoPE keys of the chunk
        return output, weights

    AttentionInterface.register(f"vtc_test_recording_{family}", recording)
    reference, _ = tiny.load_tiny(tiny_dirs[family])
    reference.set_attn_implementation({"vision_config": f"vtc_test_recording_{family}"})
    inputs = make_inputs(processor, family, ["what is the color ?"], [2])  # two images of different sizes
    visual = reference.model.visual
    windowed = family == "qwen2_5_vl"
    # Qwen2.5-VL: a windowed block and the last full one; Qwen2-VL / Qwen3-VL attend globally in every block
    first_layer, last_layer = 0, (visual.fullatt_block_indexes[-1] if windowed else len(visual.blocks) - 1)
    signals = (Signal(SignalKind.RECEIVED_ATTENTION, first_layer), Signal(SignalKind.RECEIVED_ATTENTION, last_layer),
               Signal(SignalKind.KEYS, last_layer))
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs), signals)
        grid = inputs["image_grid_thw"]
        restore = torch.argsort(adapter._window_index(grid)) if windowed else None
        assert (adapter._restore_order(grid) is None) == (not windowed)
        sizes = [f.shape[0] for f in encoded.features]
        for layer in (first_layer, last_layer):
            recorded.clear()
            recorded_keys.clear()
            visual.blocks[layer].attn._vtc_test_record = True
            reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            visual.blocks[layer].attn._vtc_test_record = False
            chunks = [w.double().mean(dim=0).sum(dim=0) for w in recorded]  # per chunk: head mean, column sum
            if windowed and layer == first_layer:
                assert len(chunks) > len(sizes)  # several windows per image
            else:
                assert len(chunks) == len(sizes)  # one span per image
            per_patch = torch.cat(chunks)  # the ViT's own (for Qwen2.5-VL window-permuted) patch order
            per_token = per_patch.reshape(-1, 4).mean(dim=1)
            per_token = per_token[restore] if restore is not None else per_token
            for i, expected in enumerate(torch.split(per_token, sizes)):
                got = encoded.signals[i][Signal(SignalKind.RECEIVED_ATTENTION, layer)]
                assert torch.allclose(got.double(), expected, atol=1e-5)
            if layer == last_layer:  # head-mean keys, averaged per merge unit, in merged-token order
                keys = torch.cat([k.double().mean(dim=0) for k in recorded_keys])
                keys = keys.reshape(-1, 4, keys.shape[-1]).mean(dim=1)
                keys = keys[restore] if restore is not None else keys
                for i, expected in enumerate(torch.split(keys, sizes)):
                    got = encoded.signals[i][Signal(SignalKind.KEYS, layer)]
                    assert got.shape == (sizes[i], visual.blocks[layer].attn.head_dim)
                    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert model.config.vision_config._attn_implementation == "sdpa"


def _pack_views(model, family, per_view: torch.Tensor, image_size) -> torch.Tensor:
    """transformers' own packing of per-view values ``[views, s*s, D]`` (a NaN newline marks the layout's newlines)."""
    newline = torch.full((per_view.shape[-1],), float("nan"))
    sizes = torch.as_tensor([list(image_size)])
    if family == "llava_next":
        packed, _ = model.model.pack_image_features([per_view], sizes, "default", image_newline=newline)
    else:
        packed, _ = model.model.pack_image_features([per_view], sizes, image_newline=newline,
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("images_per_prompt", [[1, 1], [2]])
def test_anyres_signals_equal_eager_attentions(tiny_dirs, family, images_per_prompt):
    """Per-view signals of LLaVA-NeXT (CLIP) / OneVision (SigLIP) equal the eager attention maps of every view, laid
    out by transformers' own ``pack_image_features`` (tiling, unpadding, OneVision's downscale) and read back at each
    view's packed indices. CLS logits are checked against q/k recomputed from the eager hidden states."""
    model, processor = tiny.load_tiny(tiny_dirs[family])
    eager, _ = tiny.load_tiny(tiny_dirs[family])
    eager.set_attn_implementation({"vision_config": "eager"})
    inputs = make_inputs(processor, family, ["what is the color ?"] * len(images_per_prompt), images_per_prompt)
    adapter = adapter_for(model)
    has_cls = adapter.has_cls()
    kinds = (SignalKind.RECEIVED_ATTENTION, SignalKind.KEYS) + (
        (SignalKind.CLS_ATTENTION, SignalKind.CLS_LOGITS) if has_cls else ())
    layers = range(len(adapter.layers))
    signals = tuple(Signal(kind, layer) for layer in layers for kind in kinds)
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs), signals)
        sizes = inputs["image_sizes"].tolist()
        crops = adapter._needs_crops(dict(inputs), len(sizes))
        views = [adapter.num_views(size, c) for size, c in zip(sizes, crops)]
        pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], views)])
        out = eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert [layout.packed.num_views for layout in encoded.layouts] == views
    if images_per_prompt == [2]:  # OneVision encodes every image of a multi-image prompt as its base view only
        assert all(layout.packed.base_newline == (family == "llava_onevision") for layout in encoded.layouts)
    drop = 1 if has_cls else 0
    heads = adapter.vision.config.num_attention_heads
    for layer in layers:
        attn = out.attentions[layer].double()  # [T, H, S, S]
        expected = {
            SignalKind.RECEIVED_ATTENTION: attn.mean(dim=1).sum(dim=1)[:, drop:, None],  # head mean, query sum
        }
        block = eager.model.vision_tower.encoder.layers[layer]
        normed = block.layer_norm1(out.hidden_states[layer])
        keys = block.self_attn.k_proj(normed).double()
        t, s, _ = keys.shape
        keys = keys.view(t, s, heads, -1).transpose(1, 2)  # [T, H, S, d]
        expected[SignalKind.KEYS] = keys.mean(dim=1)[:, drop:]
        if has_cls:
            expected[SignalKind.CLS_ATTENTION] = attn[:, :, 0, 1:].mean(dim=1)[..., None]
            query = block.self_attn.q_proj(normed).double().view(t, s, heads, -1).transpose(1, 2)
            logits = torch.einsum("thd,thsd->ths", query[:, :, 0], keys) * keys.shape[-1] ** -0.5
            assert torch.allclose(logits.softmax(-1).mean(1), attn[:, :, 0].mean(1), atol=1e-6)  # the reference
            expected[SignalKind.CLS_LOGITS] = logits.mean(dim=1)[:, 1:, None]
        offset = 0
        for i, n in enumerate(views):
            layout = encoded.layouts[i].packed
            for kind, value in expected.items():
                packed = _pack_views(model, family, value[offset:offset + n].float(), sizes[i])
                assert packed.shape[0] == layout.num_tokens
                for view in range(layout.num_views):
                    got = encoded.views[i][view][Signal(kind, layer)]
                    want = packed[layout.view_indices(view)]
                    assert torch.allclose(got.double().reshape(want.shape), want.double(), atol=1e-5), (kind, view)
            offset += n
