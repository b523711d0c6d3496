"""Smoke test of the prefill-speedup benchmark script (eval/bench/prefill.py) on a tiny-width LLaVA: it runs, writes
sane JSON, and vtc@k really hands the LLM text + k tokens.

No timing assertions and no thresholds on speedups: the figures depend on the machine.
"""

from __future__ import annotations

import json
import math

import pytest

from vtc.eval.bench import prefill as bench_prefill

TINY = ["--vision-width", "64", "--vision-mlp", "128", "--vision-layers", "2", "--vision-heads", "4",
        "--image-size", "56", "--patch-size", "14",  # 4 x 4 patches -> 16 visual tokens
        "--llm-width", "64", "--llm-mlp", "128", "--llm-layers", "1", "--llm-heads", "4", "--vocab", "256"]


def test_build_model_shape():
    shape = bench_prefill.Shape(vision_width=64, vision_mlp=128, vision_layers=2, vision_heads=4, image_size=56,
                                llm_width=64, llm_mlp=128, llm_layers=1, llm_heads=4, vocab_size=256)
    model = bench_prefill.build_model(shape)
    config = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert config.image_token_id == shape.image_token_id == 192  # vocab - 64, as <image> = 32000 of 32064
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.text_config._attn_implementation == "sdpa"
    assert config.vision_config.hidden_act == "quick_gelu"
    assert len(model.model.language_model.layers) == 1 and shape.image_tokens == 16
    # the defaults are LLaVA-1.5-7B's shape
    full = bench_prefill.Shape()
    assert (full.image_tokens, full.image_token_id, full.pad_token_id) == (576, 32000, 32001)
    assert (full.vision_width, full.vision_layers, full.llm_width, full.llm_mlp, full.llm_heads) == (
        1024, 24, 4096, 11008, 32)


def test_bench_prefill_smoke(tmp_path, capsys):
    out = tmp_path / "bench_prefill.json"
    rc = bench_prefill.main(TINY + ["--budgets", "4,8", "--rounds", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target >= 0.90 x ideal" in printed and "LLM input lengths as expected" in printed
    report = json.loads(out.read_text())

    assert report["budgets"] == [4, 8] and report["compressor"] == "fastervlm"
    assert report["rounds"] == 1 and report["warmup"] == 1 and report["target_ratio"] == 0.9
    assert report["model"]["class"] == "LlavaForConditionalGeneration"
    assert report["model"]["shape"]["llm_layers"] == 1 and report["model"]["parameters"] > 0
    prompt = report["prompt"]
    assert prompt["text_tokens"] == 40 and prompt["image_tokens"] == 16 and prompt["sequence_length"] == 56
    text = prompt["text_tokens"]

    variants = report["variants"]
    assert list(variants) == ["full", "tower", "llm@16", "vtc@4", "ideal@4", "vtc@8", "ideal@8"]
    for name, v in variants.items():
        assert v["median_ms"] > 0 and v["min_ms"] > 0 and len(v["times_ms"]) == 1
        assert v["llm_tokens"] == v["expected_llm_tokens"]
    # what the pre-hook on the language model saw: the full prompt, or text + k
    assert variants["tower"]["llm_tokens"] is None
    assert variants["full"]["llm_tokens"] == variants["llm@16"]["llm_tokens"] == text + 16
    for k in (4, 8):
        assert variants[f"vtc@{k}"]["llm_tokens"] == text + k
        assert variants[f"ideal@{k}"]["llm_tokens"] == text + k

    assert set(report["speedups"]) == {"4", "8"}
    for k, s in report["speedups"].items():
        assert s["kept"] == int(k) and s["llm_tokens"] == text + int(k) and s["llm_tokens_ok"] is True
        for key in ("measured_speedup", "ideal_speedup", "ratio", "min_ratio", "overhead_ms"):
            assert math.isfinite(s[key])
        assert math.isclose(s["ratio"], s["measured_speedup"] / s["ideal_speedup"])
        assert s["within_target"] == (s["ratio"] >= 0.9)
    parts = report["parts"]
    assert parts["tower_ms"] > 0 and parts["llm_ms"] > 0 and parts["tower_share"] > 0 and parts["llm_share"] > 0

    sanity = report["sanity"]
    assert sanity["llm_lengths_ok"] is True
    # the hand-built prompt reproduces the model's splice, and vtc@k runs exactly the LLM on its kept tokens
    assert set(sanity["max_abs_logit_diff"]) == {"full_vs_llm", "vtc@4", "vtc@8"}
    assert all(d < 1e-4 for d in sanity["max_abs_logit_diff"].values())
    assert report["cpu_share"] is not None and report["wall_s"] > 0


def test_bench_prefill_rejects_bad_budget(capsys):
    with pytest.raises(SystemExit):
        bench_prefill.main(TINY + ["--budgets", "16"])  # not fewer than the image's 16 tokens
    assert "--budgets" in capsys.readouterr().err
