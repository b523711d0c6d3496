"""Selections a researcher can inspect: typed ``Selection.details`` per compressor, and the dry run ``vtc.select``.

The backbone is equality: ``vtc.select(model, **inputs)`` returns exactly the records (indices, features, groups,
scores, weights, details, budgets) that a wrapped ``generate`` on the same inputs leaves in ``vtc.last_selection`` /
``vtc.last_video_selection`` / ``vtc.last_prompt_lengths``, and it never calls the language model. The details are
then checked against each compressor's rule (HiPrune's anchors / buffers / registers, VisionZip's split, DivPrune's
pick order, QuoTA's frame scores, the resolved layers).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtc
from helpers import QUESTIONS, greedy, make_inputs, video_inputs
from vtc.compressor import VisualTokens, run_compressor
from vtc.compressors.cls_attention import ClsAttentionDetails
from vtc.compressors.divprune import DivPruneDetails, divprune_order, nearest_neighbour_distance
from vtc.compressors.hiprune import HiPruneDetails, num_anchors
from vtc.compressors.progressive import ProgressiveDetails
from vtc.compressors.quota import QuotaDetails, ResizeDetails
from vtc.compressors.visionzip import VisionZipDetails
from vtc import testing as tiny
from vtc.integrations.transformers import get_state
from vtc.multiview import MultiViewDetails
from vtc.selection import Details, Selection
from vtc.signals import Signal, SignalKind

#: compressor -> options for the tests (quota's cheap scorer needs no processor; HiPrune with anchors at small k)
OPTIONS = {"quota": {"scorer": "similarity"}, "hiprune": {"alpha": 1.0}}


# -- helpers ---------------------------------------------------------------------------------------------------------

def assert_same(a, b, path: str = "record") -> None:
    """Deep equality of records: tensors exactly (NaN == NaN), dataclasses field by field, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True, path
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) if a.is_floating_point() else torch.equal(a, b), \
            path
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def count_llm_calls(model) -> list[int]:
    """A counter of calls to the language model and the LM head (forward pre-hooks)."""
    calls = [0]

    def bump(*_):
        calls[0] += 1

    model.model.language_model.register_forward_pre_hook(bump)
    model.lm_head.register_forward_pre_hook(bump)
    return calls


def single_view_details(record) -> list[tuple[Details | None, int, int]]:
    """``(details, budget, tokens)`` of each selection inside an image record (one, or one per AnyRes view)."""
    details = record.selection.details
    if isinstance(details, MultiViewDetails):
        sizes = record.layout.view_sizes
        return [(d, b, n) for d, b, n in zip(details.views, record.view_budgets, sizes) if b > 0]
    return [(details, record.budget, record.num_tokens)]


def check_details(compressor, tower, details: Details, k: int, n: int, prefix: int = 0) -> None:
    """One selection's details against its compressor's rule and its declared signals."""
    assert isinstance(details, Details)
    declared = set(compressor.signals(tower))
    assert set(details.signals) <= declared
    assert set(details.layers) == {s.layer for s in declared}  # every record answers "which layers"
    if isinstance(details, ClsAttentionDetails):
        assert set(details.signals) == declared
        assert details.uses_received_attention == (not tower.has_cls)
    elif isinstance(details, HiPruneDetails):
        assert (details.object_layer, details.deep_layer) == compressor.layers(tower)
        assert details.anchors.numel() == min(num_anchors(k, compressor.alpha), k)
        assert details.parts.indices().numel() == k and details.object_scores.shape == (n,)
    elif isinstance(details, VisionZipDetails):
        d, c = compressor.split(k, n, prefix)
        assert (details.dominant.numel(), details.contextual.numel()) == (d, c)
    elif isinstance(details, DivPruneDetails):
        assert details.signals == () and details.pick_order.numel() == k


def check_record(compressor, tower, record) -> None:
    """An image record: its details (per view on AnyRes images) tell the same tokens as its indices."""
    assert isinstance(record.details, Details)
    views = single_view_details(record)
    if isinstance(record.details, MultiViewDetails):
        assert len(record.details.views) == record.layout.num_views
        for (d, k, n), by in zip(views, [by for by, b in zip(record.details.selected_by, record.view_budgets) if b]):
            assert by == f"compressor {compressor.name!r}"
            check_details(compressor, tower, d, k, n)
        assert set(record.details.signals) <= set(compressor.signals(tower))
        return
    (details, k, n), = views
    check_details(compressor, tower, details, k, n, record.num_prefix_tokens)
    indices = record.indices
    if isinstance(details, HiPruneDetails):
        assert torch.equal(details.parts.indices(), indices)
    elif isinstance(details, VisionZipDetails):
        assert torch.equal(torch.sort(torch.cat([details.dominant, details.contextual])).values, indices)
    elif isinstance(details, DivPruneDetails):
        assert torch.equal(torch.sort(details.pick_order).values, indices)


# -- 1. the dry run equals the records of a full generate, on every family -------------------------------------------

@pytest.mark.parametrize("budget", [8])
def test_select_equals_generate_records_and_never_runs_the_llm(loaded, family, budget):
    model, processor = loaded
    inputs = make_inputs(processor, family, QUESTIONS, [1, 2])
    calls = count_llm_calls(model)
    video_input = has_video_input(model)
    for name in vtc.list_compressors("encoder"):
        options = dict(OPTIONS.get(name, {}))
        if vtc.get_compressor_class(name).video_only and not video_input:
            if family == "llava_next":  # AnyRes images are not frames: nothing a video method can run on here
                continue
            options["images_as_video"] = True  # refused otherwise: each prompt's images are one video's frames
        vtc.apply(model, name, budget=budget, **options)
        before = calls[0]
        dry = vtc.select(model, **inputs)
        assert calls[0] == before, f"{name}: vtc.select ran the language model"
        assert vtc.last_selection(model) == [] and vtc.last_prompt_lengths(model) == []  # state left untouched
        greedy(model, inputs, max_new_tokens=2)
        assert calls[0] > before
        assert_same(dry.images, vtc.last_selection(model), f"{family}/{name}")
        assert_same(dry.videos, vtc.last_video_selection(model), f"{family}/{name}")
        assert dry.prompt_lengths == vtc.last_prompt_lengths(model)
        state = get_state(model)
        tower = state.adapter.tower_info(inputs)
        for record in dry.images:
            check_record(state.compressor, tower, record) if name not in ("quota", "progressive") else \
                check_video_compressor_image(state.compressor, record)


def has_video_input(model) -> bool:
    from vtc.integrations.transformers.adapter import adapter_for

    return adapter_for(model).supports_video


def check_video_compressor_image(compressor, record) -> None:
    """A video compressor on an image (a one-frame video): the frame's own details."""
    if compressor.name == "quota":
        assert isinstance(record.details, (ResizeDetails, MultiViewDetails))
    else:
        assert type(record.details) in (Details, MultiViewDetails)


def test_select_keeps_the_last_call_records_and_handles_text_only(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    vtc.apply(model, "hiprune", budget=8)
    first = make_inputs(processor, "llava", QUESTIONS[:1], [1])
    other = make_inputs(processor, "llava", QUESTIONS[:1], [1], first_image=1)
    greedy(model, first, max_new_tokens=2)
    records, lengths = vtc.last_selection(model), vtc.last_prompt_lengths(model)
    dry = vtc.select(model, **other)
    assert_same(vtc.last_selection(model), records)  # still the generate's
    assert vtc.last_prompt_lengths(model) == lengths
    text = processor(text=["hello there"], return_tensors="pt")
    empty = vtc.select(model, **text)
    assert empty.images == [] and empty.videos == []
    assert empty.prompt_lengths == [(int(text["input_ids"].shape[1]),) * 2]
    assert_same(vtc.last_selection(model), records)
    greedy(model, other, max_new_tokens=2)  # the dry run stood for exactly this call
    assert_same(dry.images, vtc.last_selection(model))


def test_select_needs_a_wrapped_model(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    inputs = make_inputs(processor, "llava", QUESTIONS[:1], [1])
    with pytest.raises(ValueError, match="vtc.apply"):
        vtc.select(model, **inputs)
    vtc.apply(model, "random", budget=4)
    vtc.remove(model)
    with pytest.raises(ValueError, match="vtc.apply"):
        vtc.select(model, **inputs)


def test_anyres_views_keep_their_own_details(tiny_dirs):
    """LLaVA-NeXT with GlobalCom²'s guided selection: views selected by the allocation name it and its signal."""
    model, processor = tiny.load_tiny(tiny_dirs["llava_next"])
    inputs = make_inputs(processor, "llava_next", QUESTIONS[:1], [1])
    vtc.apply(model, "hiprune", budget=12, allocation="globalcom2")
    dry = vtc.select(model, **inputs)
    greedy(model, inputs, max_new_tokens=2)
    assert_same(dry.images, vtc.last_selection(model))
    record = dry.images[0]
    details = record.details
    assert isinstance(details, MultiViewDetails) and len(details.views) == record.layout.num_views
    state = get_state(model)
    tower = state.adapter.tower_info(inputs)
    signal = state.allocation.signals(tower)
    for view, (d, by, b) in enumerate(zip(details.views, details.selected_by, record.view_budgets)):
        if b == 0:
            assert d is None and by == ""
            continue
        assert by == "allocation 'globalcom2'" and type(d) is Details and d.signals == signal
    assert set(details.signals) == set(signal)


# -- 2. videos: Qwen2.5-VL's video input and LLaVA's images_as_video ---------------------------------------------------

@pytest.mark.parametrize("compressor", ["quota", "progressive", "hiprune", "visionzip"])
def test_qwen_video_select_equals_generate(tiny_dirs, compressor):
    model, processor = tiny.load_tiny(tiny_dirs["qwen2_5_vl"])
    inputs = video_inputs(processor, "qwen2_5_vl", QUESTIONS)
    vtc.apply(model, compressor, budget=16, video_budget=20, **OPTIONS.get(compressor, {}))
    calls = count_llm_calls(model)
    dry = vtc.select(model, **inputs)
    assert calls[0] == 0
    greedy(model, inputs, max_new_tokens=2)
    assert_same(dry.videos, vtc.last_video_selection(model), compressor)
    assert dry.prompt_lengths == vtc.last_prompt_lengths(model) and dry.images == []
    state = get_state(model)
    tower = state.adapter.tower_info(inputs)
    for video in dry.videos:
        check_video_details(state.compressor, tower, video)


def check_video_details(compressor, tower, video) -> None:
    details, frames = video.details, video.selection.frames
    t = video.num_frames
    declared = set(compressor.signals(tower))
    assert isinstance(details, Details) and set(details.signals) <= declared
    if isinstance(details, QuotaDetails):
        assert details.scored == (t > 1)
        for field in (details.raw_scores, details.scores, details.weights):
            assert field.shape == (t,)
        assert list(details.budgets) == video.frame_budgets and sum(details.budgets) == video.budget
        assert details.weights.sum().item() == pytest.approx(1.0)
        assert details.scores.tolist() == [r.score if t > 1 else 1.0 for r in frames]
        assert details.weights.tolist() == [r.weight for r in frames]
        for record in frames:
            if record.budget:
                assert isinstance(record.selection.details, ResizeDetails)
                assert record.selection.details.shape == record.extra["shape"]
                assert record.selection.details.leftover.numel() == record.extra["leftover"]
    elif isinstance(details, ProgressiveDetails):
        assert details.signals == compressor.signals(tower)
        assert len(details.keyframes) == t and details.keyframes[0]
        assert list(details.novelty_mass) == [r.score for r in frames]
        assert [s + h for s, h in zip(details.spent, details.handed_back)] == video.frame_budgets
        assert list(details.base_budgets) == [r.extra["base_budget"] for r in frames]
        assert sum(details.base_budgets) == video.budget
    else:  # an image compressor frame by frame: per-frame details, the video's read signals
        assert type(details) is Details and set(details.layers) == {s.layer for s in declared}
        for record in frames:
            if record.budget:
                check_details(compressor, tower, record.selection.details, record.budget,
                              video.grids[record.frame][0] * video.grids[record.frame][1])


@pytest.mark.parametrize("compressor", ["quota", "progressive", "divprune"])
def test_images_as_video_select_equals_generate(tiny_dirs, compressor):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    inputs = make_inputs(processor, "llava", QUESTIONS[:1], [4])
    vtc.apply(model, compressor, budget=64, video_budget=10, images_as_video=True, **OPTIONS.get(compressor, {}))
    dry = vtc.select(model, **inputs)
    greedy(model, inputs, max_new_tokens=2)
    assert_same(dry.images, vtc.last_selection(model), compressor)
    assert_same(dry.videos, vtc.last_video_selection(model), compressor)
    (video,) = dry.videos
    state = get_state(model)
    check_video_details(state.compressor, state.adapter.tower_info(inputs), video)
    # each image record is its frame's selection, details included
    for record, frame in zip(dry.images, video.selection.frames):
        assert_same(record.selection, frame.selection)
    if compressor == "quota":
        assert video.details.raw_scores.shape == (4,)


# -- 3. the details follow each compressor's rule (core, synthetic tokens) -------------------------------------------

def synthetic(n_rows: int = 6, n_cols: int = 6, dim: int = 8, layers=(1, 3), prefix: int = 0) -> VisualTokens:
    generator = torch.Generator().manual_seed(0)
    n = prefix + n_rows * n_cols
    signals = {}
    for layer in layers:
        signals[Signal(SignalKind.RECEIVED_ATTENTION, layer)] = torch.rand(n, generator=generator)
        signals[Signal(SignalKind.KEYS, layer)] = torch.randn(n, 4, generator=generator)
    return VisualTokens(features=torch.randn(n, dim, generator=generator), grid=(n_rows, n_cols), signals=signals,
                        num_prefix_tokens=prefix)


@pytest.mark.parametrize("k", [1, 5, 12, 30, 36])
def test_hiprune_details_are_its_three_parts(k):
    tokens = synthetic(layers=(1, 3))
    selection = run_compressor(vtc.create_compressor("hiprune", alpha=1.0), tokens, k)
    d = selection.details
    assert isinstance(d, HiPruneDetails) and (d.object_layer, d.deep_layer) == (1, 3) and d.layers == (1, 3)
    parts = torch.cat([d.anchors, d.buffers, d.registers])
    assert torch.equal(torch.sort(parts).values, selection.indices) and parts.unique().numel() == k
    assert d.anchors.numel() == min(num_anchors(k, 1.0), k)
    obj = tokens.signal(Signal(SignalKind.RECEIVED_ATTENTION, 1))
    assert torch.equal(d.object_scores, obj)
    if d.anchors.numel():  # the anchors are the top object-layer tokens, best first
        assert torch.equal(d.anchors, torch.sort(obj, descending=True, stable=True).indices[:d.anchors.numel()])
    cols = tokens.grid[1]
    for b in d.buffers.tolist():  # every buffer is a 4-neighbour of an anchor on the grid
        assert any(abs(b // cols - a // cols) + abs(b % cols - a % cols) == 1 for a in d.anchors.tolist())


@pytest.mark.parametrize("k,prefix", [(1, 0), (8, 0), (20, 1), (37, 1)])
def test_visionzip_details_split_dominant_and_contextual(k, prefix):
    tokens = synthetic(layers=(2,), prefix=prefix)
    compressor = vtc.create_compressor("visionzip")
    selection = run_compressor(compressor, tokens, k)
    d = selection.details
    assert isinstance(d, VisionZipDetails) and d.layers == (2,) and d.merge == "mean"
    assert (d.dominant.numel(), d.contextual.numel()) == compressor.split(k, tokens.num_tokens, prefix)
    assert d.dominant.numel() + d.contextual.numel() == k
    assert torch.equal(torch.sort(torch.cat([d.dominant, d.contextual])).values, selection.indices)
    assert torch.equal(d.dominant[:min(prefix, k)], torch.arange(min(prefix, k)))  # prefix tokens are dominant
    slots = torch.searchsorted(selection.indices, d.dominant)
    for slot, token in zip(slots.tolist(), d.dominant.tolist()):  # dominant tokens are kept as they are
        assert selection.groups[slot].tolist() == [token]
        assert torch.equal(selection.features[slot], tokens.features[token]) if selection.is_merged else True


@pytest.mark.parametrize("k", [1, 4, 17, 36])
def test_divprune_details_are_the_pick_order(k):
    tokens = synthetic()
    selection = run_compressor(vtc.create_compressor("divprune"), tokens, k)
    d = selection.details
    order, _ = divprune_order(tokens.features, k)
    assert isinstance(d, DivPruneDetails) and d.signals == () and d.layers == ()
    assert torch.equal(d.pick_order, order) and torch.equal(torch.sort(d.pick_order).values, selection.indices)
    unit = torch.nn.functional.normalize(tokens.features, dim=-1)  # the first pick: farthest nearest neighbour
    assert int(d.pick_order[0]) == int(torch.argmax(nearest_neighbour_distance(unit)))


def test_signal_free_baselines_say_what_they_did():
    tokens = synthetic()
    random = run_compressor(vtc.create_compressor("random", seed=7), tokens, 5).details
    assert random.signals == () and random.seed == 7
    pool = run_compressor(vtc.create_compressor("pool", mode="sample"), tokens, 5).details
    assert pool.mode == "sample" and pool.shape[0] * pool.shape[1] >= 5


def test_details_must_be_typed():
    """A free-form dict is refused: details are a ``vtc.selection.Details`` (subclass) or ``None``."""

    class Sloppy(vtc.Compressor):
        name = "sloppy"

        def select(self, tokens, k):
            return Selection(indices=torch.arange(k), details={"why": "because"})

    with pytest.raises(RuntimeError, match="details must be a vtc.selection.Details"):
        run_compressor(Sloppy(), synthetic(), 3)
