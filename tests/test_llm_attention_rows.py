"""``kernels.attention_rows`` (the in-LLM pruners' signal) equals the rows of eager attention's own map."""

import pytest
import torch

from vtc.kernels import apply_rotary, attention_rows, attention_rows_reference


def _capture(layer):
    """Hooks storing the layer's q/k projection outputs and the (cos, sin) it is given."""
    got = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("rope", kw["position_embeddings"]),
                                        with_kwargs=True),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: got.__setitem__("q", out)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: got.__setitem__("k", out)),
    ]
    return got, handles


def _heads(x, n, d):
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


@pytest.mark.parametrize("padded", [False, True])
def test_rows_equal_eager_attention_on_a_llama_with_grouped_heads(padded):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 50, (2, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0  # left padding
    layer_index, d = 1, config.hidden_size // config.num_attention_heads
    got, handles = _capture(model.model.layers[layer_index])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for h in handles:
        h.remove()
    eager = out.attentions[layer_index].float().mean(1)  # [B, L, L]
    cos, sin = got["rope"]
    q = apply_rotary(_heads(got["q"], 4, d), cos, sin)
    k = apply_rotary(_heads(got["k"], 2, d), cos, sin)
    rows = torch.tensor([[11, 7], [11, 6]])
    picked = q[torch.arange(2)[:, None], :, rows].transpose(1, 2)  # [B, H, R, D]
    ours = attention_rows(picked, k, rows, key_mask=mask, chunk=3)
    want = torch.stack([eager[i, rows[i]] for i in range(2)])
    assert torch.allclose(ours, want, atol=1e-5)
    assert torch.allclose(attention_rows_reference(q, k, rows, key_mask=mask), want, atol=1e-5)
    if padded:
        assert torch.all(ours[1, :, :4] == 0)  # padded keys get nothing
    assert torch.allclose(ours.sum(-1), torch.ones(2, 2))


def test_rows_equal_eager_attention_on_qwen2_5_vl_with_mrope():
    """Qwen2.5-VL's (cos, sin) already carry the three M-RoPE sections: the same helper applies."""
    from vtc.testing import build_prompt, build_tiny, random_image

    model, processor = build_tiny("qwen2_5_vl")
    model.set_attn_implementation("eager")
    inputs = processor(images=[random_image(64, 48)], text=[build_prompt(processor, "what is it ?")],
                       return_tensors="pt")
    lm = model.model.language_model
    cfg = lm.config
    d = cfg.hidden_size // cfg.num_attention_heads
    got, handles = _capture(lm.layers[0])
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    eager = out.attentions[0].float().mean(1)
    cos, sin = got["rope"]
    q = apply_rotary(_heads(got["q"], cfg.num_attention_heads, d), cos, sin)
    k = apply_rotary(_heads(got["k"], cfg.num_key_value_heads, d), cos, sin)
    length = inputs["input_ids"].shape[1]
    rows = torch.tensor([[length - 1, length // 2]])
    picked = q[:, :, rows[0]]
    ours = attention_rows(picked, k, rows)
    assert torch.allclose(ours[0], eager[0, rows[0]], atol=1e-5)
