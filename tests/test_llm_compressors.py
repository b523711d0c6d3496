"""The four LLM-side compressors as pure rules (vtc/compressors/llm_side.py): schedules, defaults, selections from
hand-made signals -- no model."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.inllm import LLMSignal, LLMSignalKind, LLMTokens, Stage, average_tokens

LAST = LLMSignalKind.LAST_ATTENTION


def tokens(layer, visual, text=None, stage=0):
    n = next(iter(visual.values())).shape[0]
    return LLMTokens(num_tokens=n, stage=stage, layer=layer, visual=visual, text=text or {})


def test_registry_splits_encoder_and_llm_compressors():
    assert vtc.list_compressors("llm") == ["dart", "fastv", "pdrop", "sparsevlm"]
    assert set(vtc.list_compressors("encoder")) | set(vtc.list_compressors("llm")) == set(vtc.list_compressors())
    with pytest.raises(ValueError, match="where must be"):
        vtc.list_compressors("vision")


def test_fastv_schedule_defaults_and_rule():
    fastv = vtc.create_compressor("fastv")
    assert fastv.schedule(576, 32, 64) == (Stage(2, 64),)
    assert fastv.schedule(576, 32, 0.25) == (Stage(2, 144),)  # a ratio of the image's tokens
    assert fastv.schedule(576, 36, 64, first_layer=3) == (Stage(3, 64),)  # moved after Qwen3-VL's deepstack
    # equivalent budgets: (2 * 576 + 30 * k) / 32 = 192 / 128 / 64 -> k = 166 / 98 / 30
    eq = vtc.create_compressor("fastv", budget_mode="equivalent")
    assert [eq.schedule(576, 32, b)[0].keep for b in (192, 128, 64)] == [166, 98, 30]
    with pytest.raises(ValueError, match="comes before layer 3"):
        vtc.create_compressor("fastv", layer=2).schedule(576, 36, 64, first_layer=3)
    scores = torch.tensor([0.1, 0.4, 0.05, 0.4, 0.3])
    t = tokens(2, {LLMSignal(LAST, 1): scores})
    assert fastv.select_stage(t, 3).tolist() == [1, 3, 4]  # top 3, ties to the lower index, ascending
    assert torch.equal(fastv.stage_scores(t), scores)


def test_pdrop_layers_and_budgets():
    pdrop = vtc.create_compressor("pdrop")
    stages = pdrop.schedule(576, 32, 270)  # the paper's own setting: lambda 0.5 on [8, 16, 24]
    assert [s.layer for s in stages] == [8, 16, 24] and [s.keep for s in stages] == [288, 144, 72]
    low = pdrop.schedule(576, 32, 64)  # below what [8, 16, 24] reaches (144): the authors' earlier first stage
    assert [s.layer for s in low] == [2, 8, 16] and average_tokens(low, 576, 32) == pytest.approx(64, abs=0.5)
    assert pdrop.candidate_layers(6, first_layer=2) == [(2, 3, 4)]  # lifted past the deepstack, deduplicated
    kept = vtc.create_compressor("pdrop", budget_mode="kept").schedule(576, 32, 64)
    assert kept[-1].keep == 64 and [s.layer for s in kept] == [8, 16, 24]
    t = tokens(8, {LLMSignal(LAST, 8): torch.tensor([0.3, 0.1, 0.2])})
    assert pdrop.select_stage(t, 2).tolist() == [0, 2]


def test_sparsevlm_layers_rows_and_scores():
    sparse = vtc.create_compressor("sparsevlm")
    assert sparse.scoring_layers(32) == (2, 6, 15) and sparse.scoring_layers(28) == (2, 5, 13)
    assert sparse.schedule(576, 32, 64) == (Stage(3, 66), Stage(7, 30), Stage(16, 17))
    with pytest.raises(ValueError, match="budgets 192, 128, 96, 64"):
        sparse.schedule(576, 32, 0.5)  # 288: beyond the table
    # between rows: linear interpolation (144 = a quarter of the way from 128 to 192); a ratio names r * 576
    assert sparse.schedule(576, 32, 144) == sparse.schedule(576, 32, 0.25) == (Stage(3, 302), Stage(7, 132),
                                                                             Stage(16, 54))
    rows = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])  # two raters over three visual tokens
    t = tokens(3, {LLMSignal(LLMSignalKind.QUERY_ATTENTION, 2): rows})
    assert torch.allclose(sparse.stage_scores(t), torch.tensor([0.2, 0.4, 0.4]))
    assert sparse.select_stage(t, 2).tolist() == [1, 2]
    raters = sparse.text_queries(torch.eye(3, 4), torch.eye(4)[:2] * 5)  # relevance [0.5+, 0.5-] of two tokens
    assert raters.dtype == torch.bool and raters.shape == (2,)


def test_dart_counts_and_the_official_fallback():
    dart = vtc.create_compressor("dart")
    assert dart.schedule(576, 32, 128) == (Stage(2, 128),)
    official = vtc.create_compressor("dart", budget_mode="official")
    assert official.schedule(576, 32, 128) == (Stage(2, 132),)  # 4 + 8 * 16, the reference script's count
    torch.manual_seed(0)
    keys, hidden = LLMSignal(LLMSignalKind.KEYS, 1), LLMSignal(LLMSignalKind.HIDDEN, 2)
    visual = {keys: torch.randn(40, 8), hidden: torch.randn(40, 16)}
    few_text = {keys: torch.randn(2, 8), hidden: torch.randn(2, 16)}  # fewer text tokens than text pivots
    t = tokens(2, visual, few_text)
    for compressor in (dart, official):
        kept = compressor.select_stage(t, 28)
        assert kept.numel() == 28 and torch.equal(kept, kept.unique())
    assert dart.stage_scores(t) is None


@pytest.mark.parametrize("name, options, match", [
    ("fastv", {"layer": 0}, "layer must be an int >= 1"),
    ("fastv", {"budget_mode": "flops"}, "budget_mode must be one of"),
    ("pdrop", {"layers": (0, 4)}, "layers must be ints >= 1"),
    ("sparsevlm", {"layers": (2, 6)}, "three ints"),
    ("dart", {"image_pivots": 0, "text_pivots": 0}, "at least one pivot"),
    ("dart", {"budget_mode": "kept"}, "budget_mode must be one of"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        vtc.create_compressor(name, **options)


def test_llm_compressors_have_no_encoder_side_selection():
    with pytest.raises(TypeError, match="drops tokens inside the LLM"):
        vtc.create_compressor("fastv").select(None, 4)


def test_requests_are_checked_before_a_model_loads():
    from vtc.integrations.transformers.preflight import check_request

    with pytest.raises(ValueError, match="SparseVLM defines schedules"):
        check_request("sparsevlm", 300)
    with pytest.raises(ValueError, match="must be an encoder-side compressor"):
        check_request("fastv", 64, {"encoder": ("pdrop", 192)})
    assert check_request("sparsevlm", 0.25).name == "sparsevlm"
