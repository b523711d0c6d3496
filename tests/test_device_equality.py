"""The equality tests that matter on an accelerator, on ``--device`` (default cpu; ``make gpu-check`` runs them with
``--device cuda``): keep-all == unwrapped, compressed == the hand-built shortened prompt, batch of two == single runs,
for one LLaVA and one Qwen family and three compressors (CLS attention, received attention at two layers, a merge).

On a GPU the cut's index arithmetic, the captured statistics (the fused kernels of ``vtc.kernels``) and the batched
scatter run on the device; an index or dtype slip that a CPU hides (a CPU tensor indexing a CUDA one, an fp32
statistic cast back) shows here. Generated tokens must be equal; models and inputs live on the device.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from helpers import QUESTIONS, greedy, hand_built, make_inputs
from vtc import testing as tiny

FAMILIES = ("llava", "qwen2_5_vl")
COMPRESSORS = ("fastervlm", "hiprune", "visionzip")


@pytest.fixture(params=FAMILIES)
def on_device(request, tiny_dirs, device):
    model, processor = tiny.load_tiny(tiny_dirs[request.param])
    return request.param, model.to(device), processor, device


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_keep_all_equals_unwrapped_on_device(on_device, compressor):
    family, model, processor, device = on_device
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1]).to(device)
    baseline = greedy(model, inputs)
    vtc.apply(model, compressor, budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    assert all(r.num_kept == r.num_tokens for r in vtc.last_selection(model))
    vtc.remove(model)
    assert greedy(model, inputs).tolist() == baseline.tolist()


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_compressed_equals_hand_built_on_device(on_device, compressor):
    family, model, processor, device = on_device
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1]).to(device)
    vtc.apply(model, compressor, budget=5)
    out = greedy(model, inputs, max_new_tokens=8)
    assert all(r.num_kept_visual == 5 for r in vtc.last_selection(model))
    short, short_len = hand_built(model, inputs, family)
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=8)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == reference[:, short_len:].tolist()


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_batch_equals_single_runs_on_device(on_device, compressor):
    family, model, processor, device = on_device
    vtc.apply(model, compressor, budget=5)
    batch = make_inputs(processor, family, QUESTIONS, [1, 1]).to(device)
    batch_out = greedy(model, batch)
    batch_records = vtc.last_selection(model)
    length = batch["input_ids"].shape[1]
    for row in range(2):
        single = make_inputs(processor, family, [QUESTIONS[row]], [1], first_image=row).to(device)
        new = greedy(model, single)[0, single["input_ids"].shape[1]:].tolist()
        assert batch_out[row, length:length + len(new)].tolist() == new
        assert vtc.last_selection(model)[0].indices.tolist() == batch_records[row].indices.tolist()
