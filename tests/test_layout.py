"""The packed AnyRes layout (vtc.layout): index <-> slot bijection, newline rule, and the layout facts checked
against transformers' own ``pack_image_features`` for LLaVA-NeXT and LLaVA-OneVision."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc.layout import CANVAS, NEWLINE, CropCanvas, PackedLayout, Slot


def small_layouts():
    """Every small layout shape: base grids, tile counts and sizes, unpad boxes (rows or columns), resizes."""
    out = [PackedLayout(base=(2, 3), base_newline=True), PackedLayout(base=(1, 1), base_newline=True),
           PackedLayout(base=(2, 2))]
    for tiles, tile in itertools.product([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1)], [(1, 1), (2, 2), (2, 3)]):
        full_h, full_w = tiles[0] * tile[0], tiles[1] * tile[1]
        boxes = {(0, full_h, 0, full_w)}
        for pad in range(0, full_h // 2 + 1):  # unpad_image trims the same count from both sides
            boxes.add((pad, full_h - pad, 0, full_w))
        for pad in range(0, full_w // 2 + 1):
            boxes.add((0, full_h, pad, full_w - pad))
        for box in sorted(boxes):
            rows, cols = box[1] - box[0], box[3] - box[2]
            sizes = [None]
            if rows > 1 and cols > 1:
                sizes += [(rows - 1, cols - 1), (max(1, rows // 2), cols)]
            for size, newlines in itertools.product(sizes, (True, False)):
                canvas = CropCanvas(tiles=tiles, tile=tile, box=box, size=size, newlines=newlines)
                out.append(PackedLayout(base=(2, 2), canvas=canvas))
    return out


LAYOUTS = small_layouts()


def check_bijection(layout: PackedLayout) -> None:
    slots = layout.slots()
    assert len(slots) == layout.num_tokens == len(set(slots))
    for index, slot in enumerate(slots):
        assert layout.index_of(slot) == index
        assert layout.locate(layout.index_of(slot)) == slot
    # every token of every view appears exactly once, newlines are the rest
    view_indices = [layout.view_indices(v) for v in range(layout.num_views)]
    assert [int(v.numel()) for v in view_indices] == list(layout.view_sizes)
    everything = torch.cat(view_indices + [layout.newline_indices()])
    assert sorted(everything.tolist()) == list(range(layout.num_tokens))
    for view, indices in enumerate(view_indices):
        rows, cols = layout.view_grid(view)
        expected = [Slot(view, r, c) for r in range(rows) for c in range(cols)]
        assert [slots[i] for i in indices.tolist()] == expected  # raster order inside the view
    assert sum(layout.view_sizes) == layout.num_visual_tokens == layout.num_tokens - layout.num_newlines
    assert all(slots[i].is_newline for i in layout.newline_indices().tolist())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.base}-{lay.canvas}-{lay.base_newline}")
def test_slots_roundtrip_exhaustively(layout):
    check_bijection(layout)


def test_known_layout_by_hand():
    """Base 2x2, crops 1x2 of 2x2 tokens, first column cut: canvas 2x3 + newlines.

    packed: b b b b | v1(0,0) v2(0,0) v2(0,1) NL | v1(1,0) v2(1,0) v2(1,1) NL
    """
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2), box=(0, 2, 1, 4)))
    assert layout.num_tokens == 12 and layout.num_newlines == 2 and layout.view_grids == ((2, 2), (2, 1), (2, 2))
    assert layout.slots()[4:] == [Slot(1, 0, 0), Slot(2, 0, 0), Slot(2, 0, 1), Slot(CANVAS, 0, NEWLINE),
                                  Slot(1, 1, 0), Slot(2, 1, 0), Slot(2, 1, 1), Slot(CANVAS, 1, NEWLINE)]
    assert layout.view_indices(2).tolist() == [5, 6, 9, 10]
    assert layout.canvas_rect(1) == (0, 2, 0, 1)
    with pytest.raises(IndexError, match="out of range"):
        layout.locate(12)
    with pytest.raises(IndexError, match="outside the 2x1 visible grid"):
        layout.index_of(Slot(1, 0, 1))
    with pytest.raises(IndexError, match="not a newline"):
        layout.index_of(Slot(CANVAS, 2, NEWLINE))


def test_empty_views_and_zero_width_canvas():
    # a very tall image: the canvas keeps its rows but no column -> empty crops, newlines with empty rows
    tall = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2), box=(0, 2, 2, 2)))
    assert tall.view_sizes == (4, 0, 0) and tall.num_tokens == 4 + 2 and tall.num_newlines == 2
    check_bijection(tall)
    # rows without tokens close the whole image: kept as soon as the image keeps anything (always)
    assert tall.kept_newlines(torch.tensor([0])).tolist() == [4, 5]
    wide = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2), box=(1, 1, 0, 4)))
    assert wide.view_sizes == (4, 0, 0) and wide.num_tokens == 4 and wide.num_newlines == 0
    check_bijection(wide)


def test_newline_rule():
    layout = PackedLayout(base=(2, 2), canvas=CropCanvas(tiles=(1, 2), tile=(2, 2), box=(0, 2, 1, 4)))
    # kept: a base token and the second-row token of crop 2 -> only the second canvas row's newline
    assert layout.kept_newlines(torch.tensor([0, 9])).tolist() == [11]
    assert layout.kept_newlines(torch.tensor([0, 1])).tolist() == []
    assert layout.kept_newlines(torch.tensor([4, 10])).tolist() == [7, 11]
    everything = torch.cat([layout.view_indices(v) for v in range(layout.num_views)])
    assert layout.kept_newlines(everything).tolist() == layout.newline_indices().tolist()
    base_only = PackedLayout(base=(2, 2), base_newline=True)
    assert base_only.newline_indices().tolist() == [4]
    assert base_only.kept_newlines(torch.tensor([3])).tolist() == [4]  # closes the whole view
    assert base_only.locate(4) == Slot(0, 1, NEWLINE)


@st.composite
def layouts(draw):
    base = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    if draw(st.booleans()):
        return PackedLayout(base=base, base_newline=draw(st.booleans()))
    tiles = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    tile = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    full_h, full_w = tiles[0] * tile[0], tiles[1] * tile[1]
    top = draw(st.integers(0, full_h))
    bottom = draw(st.integers(top, full_h))
    left = draw(st.integers(0, full_w))
    right = draw(st.integers(left, full_w))
    size = None
    if bottom > top and right > left and draw(st.booleans()):
        size = (draw(st.integers(1, 2 * (bottom - top))), draw(st.integers(1, 2 * (right - left))))
    canvas = CropCanvas(tiles=tiles, tile=tile, box=(top, bottom, left, right), size=size, newlines=draw(st.booleans()))
    return PackedLayout(base=base, canvas=canvas)


@settings(max_examples=150, deadline=None)
@given(layouts(), st.data())
def test_slots_roundtrip_property(layout, data):
    check_bijection(layout)
    # the newline rule: a newline is kept iff its span has a kept token (empty spans: iff anything is kept)
    kept = data.draw(st.sets(st.integers(0, layout.num_tokens - 1), max_size=layout.num_tokens))
    kept = sorted(i for i in kept if not layout.locate(i).is_newline)
    got = set(layout.kept_newlines(torch.tensor(kept, dtype=torch.long)).tolist())
    for index, span in layout.newline_spans():
        expected = bool(set(span.tolist()) & set(kept)) if span.numel() else bool(kept)
        assert (index in got) == expected


def test_rects_are_the_centre_rule():
    """Downscaled canvas: each output cell belongs to the crop holding its centre (align_corners=False)."""
    canvas = CropCanvas(tiles=(4, 4), tile=(4, 4), box=(2, 14, 0, 16), size=(10, 13))
    layout = PackedLayout(base=(4, 4), canvas=canvas)
    for index in range(layout.num_base, layout.num_tokens):
        slot = layout.locate(index)
        if slot.is_newline:
            continue
        row, col = divmod(index - layout.num_base, layout.canvas_row_length)
        centre_y = 2 + (row + 0.5) * 12 / 10
        centre_x = (col + 0.5) * 16 / 13
        assert slot.view == 1 + int(centre_y // 4) * 4 + int(centre_x // 4)


# ------------------------------------------------------------------------------------------- vs transformers
SIZES = [(20, 64), (48, 48), (40, 64), (96, 128), (64, 40), (1, 1), (400, 1), (1, 400), (300, 2), (33, 97),
         (128, 128), (64, 20), (7, 100)]  # (height, width)


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres(request):
    from vtc import testing as tiny
    from vtc.integrations.transformers.adapter import adapter_for

    model, _ = tiny.build_tiny(request.param)
    return request.param, model, adapter_for(model)


def _pack(family, model, feats, size, newline):
    sizes = torch.tensor([list(size)])
    if family == "llava_next":
        packed, _ = model.model.pack_image_features([feats], sizes, "default", image_newline=newline)
    else:
        packed, _ = model.model.pack_image_features([feats], sizes, image_newline=newline,
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0]


@pytest.mark.parametrize("size", SIZES)
def test_layout_matches_pack_image_features(anyres, size):
    """Coded per-view features packed by transformers equal vtc's layout: same length, same newline positions,
    same values (tiling, unpadding and OneVision's bilinear downscale), and every token in its view."""
    family, model, adapter = anyres
    limit = adapter._aspect_limit({})
    layout = adapter.packed_layout(size, True, limit)
    views = adapter.num_views(size, True)
    assert views == layout.num_views
    side = adapter.view_side
    codes = (torch.arange(views)[:, None] * 1000 + torch.arange(side * side)[None]).float()
    feats = torch.stack([codes, -codes], dim=-1)  # [views, s*s, 2]
    newline = torch.tensor([-7.0, 7.0])
    packed = _pack(family, model, feats, size, newline)
    assert packed.shape[0] == layout.num_tokens
    ours = layout.pack(feats[0], feats[1:], newline)
    assert torch.allclose(ours, packed, atol=1e-4)
    is_newline = layout.is_newline()
    assert torch.equal(packed[is_newline], newline.expand(int(is_newline.sum()), 2))
    if layout.canvas is not None and not layout.canvas.resized:
        for index, slot in enumerate(layout.slots()):
            if not slot.is_newline:
                assert int(packed[index, 0]) // 1000 == slot.view
    # per-view values through the layout are the packed tokens of each view
    parts = layout.view_values(feats[0], feats[1:])
    for view, part in enumerate(parts):
        assert torch.allclose(packed[layout.view_indices(view)], part, atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_layout_length_matches_the_processor(anyres, size):
    family, model, adapter = anyres
    from vtc import testing as tiny

    _, processor = tiny.build_tiny(family)
    layout = adapter.packed_layout(size, True, adapter._aspect_limit({}))
    expected = processor._get_number_of_features(size[0], size[1], 32, 32)
    if family == "llava_next":
        expected -= 1  # the processor counts CLS and then removes it for the "default" strategy
    assert layout.num_tokens == expected


def test_onevision_base_only_layout_matches_pack(anyres):
    family, model, adapter = anyres
    layout = adapter.packed_layout((40, 64), False)
    feats = torch.randn(1, 16, 3)
    newline = torch.randn(3)
    packed = _pack(family, model, feats, (40, 64), newline)
    assert layout.num_tokens == packed.shape[0] == 17 and layout.base_newline
    assert torch.equal(layout.pack(feats[0], None, newline), packed)
