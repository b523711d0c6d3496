"""Per-view budget allocation (vtc.allocation) and multi-view selection (vtc.multiview): pure tensor tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import Signal, SignalKind, TowerInfo, create_compressor, list_compressors, top_k_sorted
from vtc.allocation import (
    Even,
    GlobalCom2,
    HiRED,
    create_allocation,
    globalcom2_budgets,
    globalcom2_sigma,
    guided_scores,
    hired_budgets,
    list_allocations,
    region_sums,
    resize_map,
)
from vtc.budget_split import split_budget
from vtc.layout import CropCanvas, PackedLayout
from vtc.multiview import MultiViewTokens, select_views

CLIP = TowerInfo(name="clip", num_layers=4, feature_layer=2, has_cls=True)
SIGLIP = TowerInfo(name="siglip", num_layers=4, feature_layer=3, has_cls=False)


# ================================================================================================ HiRED
def two_crop_layout(box=(0, 4, 0, 8)) -> PackedLayout:
    return PackedLayout(base=(4, 4), canvas=CropCanvas(tiles=(1, 2), tile=(4, 4), box=box))


def test_hired_paper_rule_by_hand():
    """Base 4x4, crops 1x2: the left half of the base map corresponds to crop 1, the right half to crop 2.

    budget 12, alpha 0.5: base floor(6) = 6; crops share 6 by region sums 3 : 1 -> 4.5 / 1.5 -> largest remainder
    (tie 0.5 / 0.5 to the lower view) -> 5 / 1.
    """
    layout = two_crop_layout()
    scores = torch.tensor([[3.0, 3.0, 1.0, 1.0]] * 4).flatten() / 8
    regions = layout.base_regions("spatial")
    assert regions.view(4, 4).tolist() == [[1, 1, 2, 2]] * 4
    assert region_sums(scores, regions, 3).tolist() == [0.0, 3.0, 1.0]
    assert hired_budgets(12, layout.view_sizes, scores, regions, alpha=0.5) == [6, 5, 1]
    assert hired_budgets(12, layout.view_sizes, scores, regions, alpha=0.25) == [3, 7, 2]  # 9 * 3/4 = 6.75
    # budget below the number of views: base floor(0.5) = 0, the crop with more attention takes the token
    assert hired_budgets(1, layout.view_sizes, scores, regions) == [0, 1, 0]


def test_hired_spatial_regions_follow_the_padding():
    """With the canvas columns 2..6 unpadded, the base view (the whole image) maps onto columns 2..6: its left half
    to crop 1's visible columns 2..3, the right half to crop 2's 4..5 -- the same split; with rows cut, every base
    token still lands in the single tile row."""
    layout = two_crop_layout(box=(0, 4, 2, 6))
    assert layout.base_regions("spatial").view(4, 4).tolist() == [[1, 1, 2, 2]] * 4
    lopsided = two_crop_layout(box=(0, 4, 1, 5))  # image spans columns 1..5: 3/4 of it lies in crop 1
    assert lopsided.base_regions("spatial").view(4, 4).tolist() == [[1, 1, 1, 2]] * 4


def test_hired_code_rule_counts_top_tokens_per_row_band():
    """Reference code: the top int(N * (1 - alpha)) = 8 base tokens, counted per consecutive chunk of the flat map
    (2 crops -> rows 0-1 and rows 2-3, not the left / right halves)."""
    layout = PackedLayout(base=(4, 4), canvas=CropCanvas(tiles=(1, 2), tile=(4, 4)))
    regions = layout.base_regions("bands")
    assert regions.view(4, 4).tolist() == [[1] * 4, [1] * 4, [2] * 4, [2] * 4]
    scores = torch.zeros(16)
    scores[:8] = torch.linspace(1.0, 2.0, 8)  # the top 8 are the first two rows: all in the first band
    assert hired_budgets(16, layout.view_sizes, scores, regions, alpha=0.5, rule="code") == [8, 8, 0]
    paper = hired_budgets(16, layout.view_sizes, scores, layout.base_regions("spatial"), alpha=0.5)
    left, right = scores.view(4, 4)[:, :2].sum(), scores.view(4, 4)[:, 2:].sum()  # read spatially: both halves
    assert paper == [8] + split_budget(8, [float(left), float(right)], [16, 16]) == [8, 4, 4]


def test_hired_overflow_goes_back_to_the_base():
    layout = PackedLayout(base=(4, 4), canvas=CropCanvas(tiles=(1, 2), tile=(4, 4), box=(0, 4, 3, 5)))
    assert layout.view_sizes == (16, 4, 4)
    # 20 tokens, alpha 0.25: base 5, crops can hold 8 of the 15 -> the base takes the other 7
    assert hired_budgets(20, layout.view_sizes, torch.ones(16), layout.base_regions("spatial"), 0.25) == [12, 4, 4]


# ================================================================================================ GlobalCom²
def test_globalcom2_sigma_and_budgets_by_hand():
    s = torch.tensor([10.0, 0.0])
    sigma = globalcom2_sigma(s, tau=10.0)
    assert torch.allclose(sigma, torch.softmax(torch.tensor([0.0, -1.0], dtype=torch.float64), 0))
    # ratios: thumbnail R, crops R(1 + sigma_i - 1/2) -> weights 16, 16 * (0.5 + 0.731), 16 * (0.5 + 0.269)
    budgets = globalcom2_budgets(20, [16, 16, 16], sigma)
    weights = [16, 16 * (0.5 + sigma[0].item()), 16 * (0.5 + sigma[1].item())]
    # shares of 20: 6.67 / 8.21 / 5.12 -> floors 6 + 8 + 5, the last token to the largest remainder (view 0)
    assert budgets == split_budget(20, weights, [16, 16, 16]) == [7, 8, 5]


def test_globalcom2_blocks_are_equal_blocks_of_the_base():
    layout = PackedLayout(base=(5, 5), canvas=CropCanvas(tiles=(2, 2), tile=(3, 3)))
    # 5 // 2 = 2 rows / cols per block, the remainder row / column joins the last block
    assert layout.base_regions("blocks").view(5, 5).tolist() == [
        [1, 1, 2, 2, 2], [1, 1, 2, 2, 2], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]


def _mv(layout, view_signals, tower=CLIP, dim=4, seed=0):
    features = torch.randn(layout.num_tokens, dim, generator=torch.Generator().manual_seed(seed))
    return MultiViewTokens(features=features, layout=layout, view_signals=view_signals, tower=tower)


def _signals_for(layout, signals, seed=0):
    """Random per-view values for ``signals`` (keys get a head dim of 3)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in layout.view_sizes:
        view = {}
        for signal in signals:
            shape = (n, 3) if signal.kind == SignalKind.KEYS else (n,)
            view[signal] = torch.rand(shape, generator=gen)
        out.append(view)
    return out


def test_globalcom2_guided_selection_uses_true_positions_in_padded_crops():
    """Crop 1 shows only its columns 1..3 (column 0 is padding). Its kept token must be the visible cell with the
    best combined score, at that cell's packed index -- not the cell at the same position of the raw crop list."""
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 4), box=(0, 2, 1, 7)))
    assert layout.view_grids == ((2, 2), (2, 3), (2, 3))
    logits = Signal(SignalKind.CLS_LOGITS, CLIP.num_layers - 1)
    base = torch.tensor([0.0, 0.0, 0.0, 5.0])  # the thumbnail looks at its bottom-right
    local1 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 9.0])  # crop 1: its own score peaks at visible (1, 2)
    local2 = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    image = _mv(layout, [{logits: base}, {logits: local1}, {logits: local2}])
    allocation = GlobalCom2()
    selection = allocation.select_view(image, 1, 1)
    global_map = resize_map(base, (2, 2), layout.canvas.shape)
    expected = guided_scores(local1, global_map[0:2, 0:3])
    assert torch.allclose(selection.scores, expected)
    assert selection.indices.tolist() == [int(torch.argmax(expected))] == [5]
    packed = layout.view_indices(1)[selection.indices]
    assert packed.tolist() == [layout.index_of((1, 1, 2))]
    # the reference's bug would put it at raw crop position 5 = (1, 1), i.e. visible (1, 0)
    assert packed.tolist() != [layout.index_of((1, 1, 0))]
    # the thumbnail keeps its own top tokens in raster order (the reference keeps them in score order)
    assert allocation.select_view(image, 0, 2).indices.tolist() == [0, 3]


def test_no_cls_fallbacks():
    """SigLIP (no CLS): HiRED reads received attention at its layer; GlobalCom² the log of received attention."""
    assert HiRED().signals(SIGLIP) == (Signal(SignalKind.RECEIVED_ATTENTION, 0),)
    assert HiRED().signals(CLIP) == (Signal(SignalKind.CLS_ATTENTION, 0),)
    assert GlobalCom2().signals(SIGLIP) == (Signal(SignalKind.RECEIVED_ATTENTION, 3),)
    assert GlobalCom2().signals(CLIP) == (Signal(SignalKind.CLS_LOGITS, 3),)
    for name in list_compressors("encoder"):  # every CLS-based compressor falls back too
        kinds = {s.kind for s in create_compressor(name).signals(SIGLIP)}
        assert not kinds & {SignalKind.CLS_ATTENTION, SignalKind.CLS_LOGITS}, name
    layout = two_crop_layout()
    received = Signal(SignalKind.RECEIVED_ATTENTION, 3)
    signals = _signals_for(layout, [received])
    image = _mv(layout, signals, tower=SIGLIP)
    selection = GlobalCom2().select_view(image, 0, 3)
    assert torch.allclose(selection.scores, signals[0][received].log())


def test_allocation_registry_and_options():
    assert list_allocations() == ["even", "globalcom2", "hired", "holov"]
    assert isinstance(create_allocation(None), Even) and isinstance(create_allocation("hired"), HiRED)
    custom = HiRED(alpha=0.3, rule="code")
    assert create_allocation(custom) is custom
    with pytest.raises(ValueError, match="unknown allocation 'hird'; choose one of even, globalcom2, hired"):
        create_allocation("hird")
    with pytest.raises(TypeError, match="allocation must be one of"):
        create_allocation(3)
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        HiRED(alpha=1.5)
    with pytest.raises(ValueError, match="rule must be 'paper' or 'code'"):
        HiRED(rule="bands")
    with pytest.raises(ValueError, match="tau must be a number > 0"):
        GlobalCom2(tau=0)
    with pytest.raises(ValueError, match="select must be 'guided' or 'compressor'"):
        GlobalCom2(select="cls")
    with pytest.raises(ValueError, match="out of range"):
        HiRED(layer=9).signals(CLIP)


# ================================================================================================ select_views
ALLOCATIONS = [Even(), HiRED(), HiRED(rule="code"), GlobalCom2(), GlobalCom2(select="compressor", regions="spatial")]


@st.composite
def anyres_layouts(draw):
    side = draw(st.integers(2, 4))
    if draw(st.integers(0, 4)) == 0:
        return PackedLayout(base=(side, side), base_newline=True)
    tiles = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    full_h, full_w = tiles[0] * side, tiles[1] * side
    if draw(st.booleans()):
        pad = draw(st.integers(0, full_h // 2))
        box = (pad, full_h - pad, 0, full_w)
    else:
        pad = draw(st.integers(0, full_w // 2))
        box = (0, full_h, pad, full_w - pad)
    size = None
    rows, cols = box[1] - box[0], box[3] - box[2]
    if rows > 1 and cols > 1 and draw(st.booleans()):
        size = (draw(st.integers(1, rows)), draw(st.integers(1, cols)))
    return PackedLayout(base=(side, side), canvas=CropCanvas(tiles=tiles, tile=(side, side), box=box, size=size))


@settings(max_examples=120, deadline=None)
@given(anyres_layouts(), st.integers(1, 200), st.sampled_from(ALLOCATIONS),
       st.sampled_from(["fastervlm", "pool", "random", "visionzip", "hiprune", "divprune"]), st.integers(0, 10))
def test_select_views_property(layout, budget, allocation, compressor_name, seed):
    """For every allocation and compressor: view budgets sum exactly to the budget and respect the view sizes, the
    kept visual tokens are exactly the budget, and the newlines kept are exactly those of the kept rows."""
    compressor = create_compressor(compressor_name)
    declared = set(compressor.signals(CLIP))
    signals = _signals_for(layout, declared | set(allocation.signals(CLIP)), seed)
    image = _mv(layout, signals, seed=seed)
    result = select_views(compressor, allocation, image, budget, declared)
    k = min(budget, layout.num_visual_tokens)
    assert result.budget == sum(result.view_budgets) == k
    assert all(0 <= b <= n for b, n in zip(result.view_budgets, layout.view_sizes))
    indices = result.selection.indices
    is_newline = layout.is_newline()
    visual = indices[~is_newline[indices]]
    assert visual.numel() == k
    assert sorted(layout.kept_newlines(visual).tolist()) == indices[is_newline[indices]].tolist()
    for view, b in enumerate(result.view_budgets):  # each view keeps exactly its budget, inside itself
        inside = set(layout.view_indices(view).tolist())
        assert len(inside & set(visual.tolist())) == b
        if b == 0:
            assert result.view_selections[view] is None  # dropped cleanly


def test_select_views_even_fastervlm_is_per_view_top_k():
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2), box=(0, 2, 1, 4)))
    compressor = create_compressor("fastervlm")
    signal = compressor.signals(CLIP)[0]
    signals = _signals_for(layout, [signal], seed=3)
    result = select_views(compressor, Even(), _mv(layout, signals), 5, {signal})
    assert result.view_budgets == (2, 2, 1)  # 5 / 3 views: the remainder to the first views
    expected = []
    for view, b in enumerate(result.view_budgets):
        expected += layout.view_indices(view)[top_k_sorted(signals[view][signal], b)].tolist()
    visual = [i for i in result.selection.indices.tolist() if not layout.locate(i).is_newline]
    assert visual == sorted(expected)
    assert result.selection.scores is not None and bool(result.selection.scores[layout.newline_indices()].isnan().all())


def test_select_views_merges_map_groups_to_packed_indices():
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2)))
    image = _mv(layout, [{} for _ in range(3)])
    result = select_views(create_compressor("pool"), Even(), image, 3, set())
    selection = result.selection
    assert selection.features is not None and selection.groups is not None
    for index, group, feature in zip(selection.indices.tolist(), selection.groups, selection.features):
        assert index in group.tolist()
        assert torch.allclose(feature, image.features[group].mean(dim=0), atol=1e-6)
        assert {layout.locate(i).view for i in group.tolist()} == {layout.locate(index).view}


def test_select_views_ratio_budget_excludes_newlines():
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2)))  # 12 tokens + 2 newlines
    result = select_views(create_compressor("random"), Even(), _mv(layout, [{} for _ in range(3)]), 0.5)
    assert result.budget == 6 == round(0.5 * layout.num_visual_tokens)
    keep_all = select_views(create_compressor("random"), Even(), _mv(layout, [{} for _ in range(3)]), 1.0)
    assert keep_all.selection.indices.tolist() == list(range(layout.num_tokens))


def test_bad_allocation_is_named():
    class Broken(Even):
        name = "broken"

        def budgets(self, image, k):
            return [k, 1, 0]

    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2)))
    with pytest.raises(RuntimeError, match="allocation 'broken' returned view budgets \\[3, 1, 0\\] summing to 4"):
        select_views(create_compressor("random"), Broken(), _mv(layout, [{} for _ in range(3)]), 3)


def test_math_sanity_of_resize_map():
    assert torch.allclose(resize_map(torch.arange(4.0), (2, 2), (2, 2)), torch.arange(4.0).view(2, 2))
    assert resize_map(torch.ones(4), (2, 2), (0, 3)).shape == (0, 3)
    assert math.isclose(float(resize_map(torch.tensor([0.0, 1.0]), (1, 2), (1, 4))[0, 1]), 0.25)
