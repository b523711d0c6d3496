"""Signals captured by vtc's hooks equal those read off an eager run of the same tower (to 1e-5)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from conftest import make_inputs
from vtc import Signal, SignalKind
from vtc.integrations.transformers import tiny
from vtc.integrations.transformers.adapter import adapter_for


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
            received = attn.mean(dim=(0, 1))[1:]
            got_cls = per_image[Signal(SignalKind.CLS_ATTENTION, layer)]
            got_received = per_image[Signal(SignalKind.RECEIVED_ATTENTION, layer)]
            assert torch.allclose(got_cls.double(), cls, atol=1e-5)
            assert torch.allclose(got_received.double(), received, atol=1e-5)
            assert per_image[Signal(SignalKind.KEYS, layer)].shape == (36, 16)


def test_qwen_signals_equal_recorded_eager_attention(tiny_dirs):
    """Qwen ViT attention modules return no weights even when eager, so a recording attention function stands in."""
    recorded: list[torch.Tensor] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if getattr(module, "_vtc_test_record", False):
            recorded.append(weights.detach()[0])  # [H, n, n] for one cu_seqlens chunk
        return output, weights

    AttentionInterface.register("vtc_test_recording", recording)
    model, processor = tiny.load_tiny(tiny_dirs["qwen2_5_vl"])
    reference, _ = tiny.load_tiny(tiny_dirs["qwen2_5_vl"])
    reference.set_attn_implementation({"vision_config": "vtc_test_recording"})
    inputs = make_inputs(processor, "qwen2_5_vl", ["what is the color ?"], [2])  # 96x96 + 64x48 images
    adapter = adapter_for(model)
    visual = reference.model.visual
    window_layer, full_layer = 0, visual.fullatt_block_indexes[-1]
    signals = (Signal(SignalKind.RECEIVED_ATTENTION, window_layer), Signal(SignalKind.RECEIVED_ATTENTION, full_layer))
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs), signals)
        window_index = adapter._window_index(inputs["image_grid_thw"])
        restore = torch.argsort(window_index)
        sizes = [f.shape[0] for f in encoded.features]
        for layer in (window_layer, full_layer):
            recorded.clear()
            visual.blocks[layer].attn._vtc_test_record = True
            reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            visual.blocks[layer].attn._vtc_test_record = False
            chunks = [w.double().mean(dim=(0, 1)) for w in recorded]  # per chunk: column mean over queries, heads
            assert len(chunks) > len(sizes) if layer == window_layer else len(chunks) == len(sizes)
            per_patch = torch.cat(chunks)  # window-permuted ViT order
            per_token = per_patch.reshape(-1, 4).mean(dim=1)[restore]
            for i, expected in enumerate(torch.split(per_token, sizes)):
                got = encoded.signals[i][Signal(SignalKind.RECEIVED_ATTENTION, layer)]
                assert torch.allclose(got.double(), expected, atol=1e-5)
    assert model.config.vision_config._attn_implementation == "sdpa"
