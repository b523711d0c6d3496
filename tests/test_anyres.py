"""LLaVA-NeXT and LLaVA-OneVision on tiny real-class models: AnyRes layouts, per-view allocation through
``vtc.apply(..., allocation=...)``, the newline rule, the no-CLS fallback on OneVision, and video pass-through.

(The registry x family equality tests of ``test_cut.py`` cover both families with the default allocation.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtc
from helpers import QUESTIONS, greedy, hand_built, image_token_id, make_inputs, prompt_ids
from vtc import SignalKind, create_compressor, top_k_sorted
from vtc.allocation import (
    GlobalCom2,
    HiRED,
    globalcom2_budgets,
    globalcom2_sigma,
    guided_scores,
    hired_budgets,
    region_sums,
    resize_map,
)
from vtc import testing as tiny
from vtc.integrations.transformers import get_state
from vtc.integrations.transformers.adapter import adapter_for
from vtc.integrations.transformers.cut import declared_signals
from vtc.testing import ANYRES_FAMILIES


@pytest.fixture(params=ANYRES_FAMILIES)
def anyres(request, tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs[request.param])
    return request.param, model, processor


def encode(model, inputs, signals):
    with torch.no_grad():
        return adapter_for(model).encode(dict(inputs), tuple(signals))


def visual_indices(record) -> list[int]:
    return [i for i in record.indices.tolist() if not record.layout.locate(i).is_newline]


def check_newline_rule(record) -> None:
    kept = set(record.indices.tolist())
    visual = set(visual_indices(record))
    for index, span in record.layout.newline_spans():
        expected = bool(visual & set(span.tolist())) if span.numel() else bool(visual)
        assert (index in kept) == expected


def test_layouts_of_the_test_images(anyres):
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS, [1, 1])
    layouts = [layout.packed for layout in encode(model, inputs, ()).layouts]
    if family == "llava_next":  # 64x20: 1x2 crops, rows 1..2 of 4 kept; 48x48: 2x2 crops, nothing cut
        assert [lay.num_views for lay in layouts] == [3, 5]
        assert layouts[0].canvas.box == (1, 3, 0, 8) and layouts[0].view_sizes == (16, 8, 8)
        assert [lay.num_tokens for lay in layouts] == [34, 88] and [lay.num_newlines for lay in layouts] == [2, 8]
    else:  # 64x40: 2x2 crops, rows 1..6 of 8; 128x96: 4x4 crops, rows 2..13 of 16, downscaled to 10x13
        assert [lay.num_views for lay in layouts] == [5, 17]
        assert layouts[0].canvas.box == (1, 7, 0, 8) and not layouts[0].canvas.resized
        assert layouts[1].canvas.box == (2, 14, 0, 16) and layouts[1].canvas.shape == (10, 13)
        assert [lay.num_tokens for lay in layouts] == [70, 156]
    counts = (inputs["input_ids"] == image_token_id(model)).sum(dim=1).tolist()
    assert counts == [lay.num_tokens for lay in layouts]


def test_onevision_multi_image_prompt_is_base_views_with_one_newline(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava_onevision"])
    inputs = make_inputs(processor, "llava_onevision", QUESTIONS[:1], [2])
    assert inputs["batch_num_images"].tolist() == [2]
    vtc.apply(model, "fastervlm", budget=3)
    out = greedy(model, inputs)
    records = vtc.last_selection(model)
    for record in records:
        assert record.layout.base_newline and record.layout.num_views == 1 and record.num_tokens == 17
        assert record.view_budgets == (3,) and record.num_kept == 4  # the newline closes the whole view
    short, short_len = hand_built(model, inputs, "llava_onevision")
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()


ALLOCATIONS = ["hired", "globalcom2", "holov", HiRED(rule="code", alpha=0.25),
               GlobalCom2(select="compressor", regions="spatial")]


@pytest.mark.parametrize("allocation", ALLOCATIONS, ids=lambda a: a if isinstance(a, str) else repr(a))
@pytest.mark.parametrize("compressor", ["fastervlm", "visionzip", "pool", "hiprune"])
def test_allocations_generate_equals_hand_built_prompt(anyres, allocation, compressor):
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1], first_image=1)
    vtc.apply(model, compressor, budget=9, allocation=allocation)
    out = greedy(model, inputs, max_new_tokens=6)
    record = vtc.last_selection(model)[0]
    name = allocation if isinstance(allocation, str) else allocation.name
    assert record.allocation == name and sum(record.view_budgets) == record.budget == record.num_kept_visual == 9
    check_newline_rule(record)
    short, short_len = hand_built(model, inputs, family)
    vtc.remove(model)
    reference = greedy(model, short, max_new_tokens=6)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == reference[:, short_len:].tolist()


def test_fastervlm_with_hired_allocation_is_hired(anyres):
    """HiRED = HiRED's budgets (thumbnail alpha, crops by early-layer attention of the base view, paper region sums)
    + per view the top tokens by the final-layer CLS attention (FasterVLM); OneVision: received attention."""
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1], first_image=1)
    vtc.apply(model, "fastervlm", budget=12, allocation="hired")
    greedy(model, inputs, max_new_tokens=1)
    record = vtc.last_selection(model)[0]
    tower = adapter_for(model).tower_info()
    early, final = tower.attention_signal(0), tower.attention_signal(tower.feature_layer)
    expected_kind = SignalKind.CLS_ATTENTION if family == "llava_next" else SignalKind.RECEIVED_ATTENTION
    assert early.kind == final.kind == expected_kind
    encoded = encode(model, inputs, (early, final))
    layout, views = encoded.layouts[0].packed, encoded.views[0]
    budgets = hired_budgets(12, layout.view_sizes, views[0][early], layout.base_regions("spatial"))
    assert record.view_budgets == tuple(budgets) and budgets[0] == 6
    kept = []
    for view, b in enumerate(budgets):
        if b:
            kept += layout.view_indices(view)[top_k_sorted(views[view][final], b)].tolist()
    assert visual_indices(record) == sorted(kept)


def test_globalcom2_selects_by_thumbnail_guided_scores(anyres):
    """GlobalCom² on the padded-crop image: budgets from the last-layer CLS logits (OneVision: log received
    attention) of the thumbnail's equal blocks, the thumbnail's own top tokens, each crop's top guided scores --
    at their true packed positions."""
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])  # the image with padded crops
    vtc.apply(model, "random", budget=10, allocation="globalcom2")
    greedy(model, inputs, max_new_tokens=1)
    record = vtc.last_selection(model)[0]
    tower = adapter_for(model).tower_info()
    (signal,) = GlobalCom2().signals(tower)
    assert signal.layer == tower.num_layers - 1
    assert signal.kind == (SignalKind.CLS_LOGITS if family == "llava_next" else SignalKind.RECEIVED_ATTENTION)
    encoded = encode(model, inputs, (signal,))
    layout, views = encoded.layouts[0].packed, encoded.views[0]
    score = [views[v][signal].float() if family == "llava_next" else views[v][signal].float().log()
             for v in range(layout.num_views)]
    sigma = globalcom2_sigma(region_sums(score[0], layout.base_regions("blocks"), layout.num_views)[1:])
    budgets = globalcom2_budgets(10, layout.view_sizes, sigma)
    assert record.view_budgets == tuple(budgets)
    kept = layout.view_indices(0)[top_k_sorted(score[0], budgets[0])].tolist() if budgets[0] else []
    global_map = resize_map(score[0], layout.base, layout.canvas.shape)
    for view in range(1, layout.num_views):
        if budgets[view]:
            r0, r1, c0, c1 = layout.canvas_rect(view)
            guided = guided_scores(score[view], global_map[r0:r1, c0:c1])
            kept += layout.view_indices(view)[top_k_sorted(guided, budgets[view])].tolist()
    assert visual_indices(record) == sorted(kept)
    check_newline_rule(record)


@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_cls_compressors_fall_back_to_received_attention_on_onevision(tiny_dirs, compressor):
    """SigLIP has no CLS token: every compressor declares received attention (or keys) instead, and the
    single-layer CLS rankers then keep each view's top tokens by received attention."""
    model, processor = tiny.load_tiny(tiny_dirs["llava_onevision"])
    tower = adapter_for(model).tower_info()
    assert not tower.has_cls and tower.name == "siglip"
    declared = create_compressor(compressor).signals(tower)
    assert all(s.kind in (SignalKind.RECEIVED_ATTENTION, SignalKind.KEYS) for s in declared)
    inputs = make_inputs(processor, "llava_onevision", QUESTIONS[:1], [1])
    vtc.apply(model, compressor, budget=8)
    greedy(model, inputs, max_new_tokens=2)
    record = vtc.last_selection(model)[0]
    assert record.num_kept_visual == 8 and record.view_budgets == (2, 2, 2, 1, 1)
    if compressor in ("fastervlm", "cls_attention"):
        encoded = encode(model, inputs, declared)
        layout, views = encoded.layouts[0].packed, encoded.views[0]
        kept = []
        for view, b in enumerate(record.view_budgets):
            score = sum(views[view][s].float() for s in declared)
            kept += layout.view_indices(view)[top_k_sorted(score, b)].tolist()
        assert visual_indices(record) == sorted(kept)


@pytest.mark.parametrize("allocation", [None, "hired", "globalcom2"])
@pytest.mark.parametrize("budget", [1, 3])
def test_budget_smaller_than_the_number_of_views(anyres, allocation, budget):
    """The 5- / 17-view images with 1 or 3 tokens: the views that get no token are dropped cleanly."""
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1], first_image=1)
    vtc.apply(model, "fastervlm", budget=budget, allocation=allocation)
    out = greedy(model, inputs)
    record = vtc.last_selection(model)[0]
    assert record.num_kept_visual == sum(record.view_budgets) == budget
    assert sum(b > 0 for b in record.view_budgets) <= budget < len(record.view_budgets)
    if allocation is None:
        assert record.view_budgets[:budget] == (1,) * budget
    check_newline_rule(record)
    short, short_len = hand_built(model, inputs, family)
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()


def test_multi_image_prompt_images_of_different_sizes_each_get_the_budget(tiny_dirs):
    """LLaVA-NeXT, one prompt with a 3-view and a 5-view image: each keeps 7 visual tokens over its own views."""
    model, processor = tiny.load_tiny(tiny_dirs["llava_next"])
    inputs = make_inputs(processor, "llava_next", QUESTIONS[:1], [2])
    vtc.apply(model, "hiprune", budget=7)
    out = greedy(model, inputs)
    records = vtc.last_selection(model)
    assert [len(r.view_budgets) for r in records] == [3, 5]
    assert [r.view_budgets for r in records] == [(3, 2, 2), (2, 2, 1, 1, 1)]
    assert [r.num_kept_visual for r in records] == [7, 7]
    short, short_len = hand_built(model, inputs, "llava_next")
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()


@pytest.mark.parametrize("allocation", ["hired", "globalcom2"])
def test_allocation_layers_are_hooked_and_nothing_else(anyres, allocation):
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    greedy(model, inputs, max_new_tokens=1)  # transformers installs its own lazy hooks first
    vtc.apply(model, "fastervlm", budget=5, allocation=allocation)
    state = get_state(model)
    tower_info = state.adapter.tower_info()
    declared = {signal.layer for signal in declared_signals(state, tower_info)}
    assert declared == {tower_info.feature_layer, 0 if allocation == "hired" else tower_info.num_layers - 1}
    layers = list(state.adapter.layers)
    count = lambda: [sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer.modules())  # noqa: E731
                     for layer in layers]
    before, seen = count(), []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args: seen.append({i for i, (a, b) in enumerate(zip(before, count())) if b > a}))
    greedy(model, inputs, max_new_tokens=2)
    handle.remove()
    assert seen and all(hooked == declared for hooked in seen)
    assert count() == before


def test_allocation_options_at_apply(tiny_dirs):
    model, _ = tiny.load_tiny(tiny_dirs["llava"])
    with pytest.raises(ValueError, match="allocation='hired' splits the budget of an AnyRes image over its views"):
        vtc.apply(model, "fastervlm", budget=8, allocation="hired")
    vtc.apply(model, "fastervlm", budget=8, allocation="even")  # the default: harmless on single-view families
    next_model, _ = tiny.load_tiny(tiny_dirs["llava_next"])
    with pytest.raises(ValueError, match="unknown allocation 'hird'"):
        vtc.apply(next_model, "fastervlm", budget=8, allocation="hird")
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        vtc.apply(next_model, "fastervlm", budget=8, allocation=HiRED(layer=7))
    assert not vtc.is_applied(next_model)
    vtc.apply(next_model, "fastervlm", budget=8, allocation=HiRED(alpha=0.25))
    assert get_state(next_model).allocation == HiRED(alpha=0.25)


def test_onevision_video_in_the_same_call_keeps_its_own_budget(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava_onevision"])
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    video = np.random.RandomState(7).randint(0, 256, size=(4, 40, 48, 3), dtype=np.uint8)
    inputs = processor(text=[text], images=[[tiny.random_image(64, 40, seed=0)]], videos=[video], return_tensors="pt")
    video_id = model.config.video_token_id
    num_video = int((inputs["input_ids"] == video_id).sum())
    assert num_video == 4 * 2 * 2 + 1  # frames x pooled 2x2 + one newline
    baseline = greedy(model, inputs)
    vtc.apply(model, "visionzip", budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    vtc.apply(model, "visionzip", budget=6, allocation="hired", video_budget=1.0)  # the video untouched
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(prompt_ids(args, kwargs)),
                                                 with_kwargs=True)
    out = greedy(model, inputs)
    hook.remove()
    record = vtc.last_selection(model)[0]
    assert int((seen[0] == image_token_id(model)).sum()) == record.num_kept == 6 + record.num_kept_newlines
    assert int((seen[0] == video_id).sum()) == num_video
    short, short_len = hand_built(model, inputs, "llava_onevision")
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()
    vtc.apply(model, "visionzip", budget=6, allocation="hired", video_budget=5)  # 5 video tokens + its newline
    seen.clear()
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(prompt_ids(args, kwargs)),
                                                 with_kwargs=True)
    greedy(model, inputs)
    hook.remove()
    assert int((seen[0] == video_id).sum()) == 5 + 1 and vtc.last_video_selection(model)[0].num_kept == 5
    vtc.remove(model)


def test_records_describe_the_views(anyres):
    family, model, processor = anyres
    inputs = make_inputs(processor, family, QUESTIONS[:1], [1])
    vtc.apply(model, "pool", budget=0.25)
    greedy(model, inputs, max_new_tokens=1)
    record = vtc.last_selection(model)[0]
    layout = record.layout
    assert record.grid == layout.base and record.num_tokens == layout.num_tokens
    assert record.budget == round(0.25 * layout.num_visual_tokens) == record.num_kept_visual
    assert record.num_newlines == layout.num_newlines
    assert record.selection.features is not None  # pool merges: its groups are packed indices of one view each
    for index, group in zip(record.indices.tolist(), record.selection.groups):
        assert {layout.locate(i).view for i in group.tolist()} == {layout.locate(index).view}
    check_newline_rule(record)
