"""Drawing what a compressor kept, on the image itself: PIL only, so it is testable without a browser.

Every token is drawn as the box of original-image pixels it covers (``TokenBoxes.boxes``, from the model's own
geometry), so the picture shows the real patch grid -- square CLIP patches, Qwen's 2x2 merge units, AnyRes crops --
not a grid guessed from the token count. Kept tokens stay bright, pruned ones are dimmed; a merged token's members
share one outline colour (its own slot outlined thicker), because for merging compressors "kept" is a group, not a
patch. AnyRes images get two panels, base view and crops, since their tokens overlap in the image. Pixels outside
every token box (the strips a center crop cuts off, padding) never reach the model: they are hatched grey, not dimmed,
so nobody mistakes them for tokens a compressor pruned.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

KEPT_COLOUR = (40, 230, 90)
#: outline colours of AnyRes crop views 1, 2, ... (view 0, the base view, uses ``KEPT_COLOUR``)
VIEW_COLOURS = ((255, 170, 0), (0, 190, 255), (255, 80, 200), (170, 120, 255), (255, 240, 60), (0, 230, 200))
#: outline colours of merged groups (cycled)
GROUP_COLOURS = ((255, 99, 71), (30, 144, 255), (255, 215, 0), (186, 85, 211), (0, 206, 209), (255, 140, 0),
                 (124, 252, 0), (255, 20, 147), (70, 130, 180), (240, 128, 128), (154, 205, 50), (238, 130, 238))
DIM_BRIGHTNESS = 0.35  # pruned tokens keep this much of their brightness (and little colour): visible, clearly off
MEMBER_SHOW = 170  # 0..255: how much of a merged (absorbed) token shows through
#: areas no token covers (never seen by the model): a light grey wash with diagonal stripes every ``HATCH_PERIOD``
#: pixels, ``HATCH_WIDTH`` wide -- brighter than a pruned token, and patterned, so the two are not confused
UNSEEN_COLOUR = (205, 205, 205)
HATCH_COLOUR = (120, 120, 120)
HATCH_PERIOD = 8
HATCH_WIDTH = 2
UNSEEN_SHOW = 0.2  # how much of the image shows through the grey wash
#: the token grid of the "all tokens" picture
GRID_COLOUR = (255, 255, 255)
#: frame captions: font size as a share of the tile width (a 4-column strip is shown at about half size)
CAPTION_SCALE = 0.115


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _array(values, width: int | None = None) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    out = np.asarray(values, dtype=np.float64)
    if width is not None and (out.ndim != 2 or out.shape[1] != width):
        raise ValueError(f"token boxes must be [N, {width}] (x0, y0, x1, y1), got shape {out.shape}")
    return out


def _indices(values) -> list[int]:
    if values is None:
        return []
    if hasattr(values, "detach"):
        values = values.detach().cpu().reshape(-1).tolist()
    return [int(v) for v in values]


def _scaled(image: Image.Image, side: int) -> tuple[Image.Image, float]:
    """The image at ``side`` pixels on its longer edge (small images are enlarged so 16-px patches are visible)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC), scale


def _rect(box, scale: float) -> list[float]:
    # whole pixels, rounded the same way on both sides of a shared edge: neighbouring boxes tile without gaps
    x0, y0, x1, y1 = (round(float(v) * scale) for v in box)
    return [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)]


def is_hatch(x, y):
    """Whether pixel (x, y) of a picture lies on a stripe of the "never seen" hatch pattern."""
    return (np.asarray(x) + np.asarray(y)) % HATCH_PERIOD < HATCH_WIDTH


def _unseen(base: Image.Image) -> Image.Image:
    """``base`` as an area outside every token box: washed-out grey with diagonal hatching."""
    wash = Image.blend(Image.new("RGB", base.size, UNSEEN_COLOUR), base.convert("L").convert("RGB"), UNSEEN_SHOW)
    pixels = np.array(wash)
    ys, xs = np.mgrid[0:base.height, 0:base.width]
    pixels[is_hatch(xs, ys)] = HATCH_COLOUR
    return Image.fromarray(pixels)


def _hatch_outside(picture: Image.Image, boxes: np.ndarray, show: np.ndarray, scale: float) -> Image.Image:
    """``picture`` with every pixel outside the boxes of the shown tokens hatched (unchanged when all is covered)."""
    seen = Image.new("L", picture.size, 0)
    mask = ImageDraw.Draw(seen)
    for i in np.flatnonzero(show):
        mask.rectangle(_rect(boxes[i], scale), fill=255)
    if min(seen.getextrema()) == 255:
        return picture
    return Image.composite(picture, _unseen(picture), seen)


def _panel(image: Image.Image, boxes: np.ndarray, views: np.ndarray, show: np.ndarray, kept: set[int],
           groups: Sequence[Sequence[int]] | None, side: int, grid: bool = False) -> Image.Image:
    """One picture: tokens with ``show[i]`` drawn (kept bright, the rest dimmed), others ignored; pixels outside
    every shown token hatched. ``grid``: the all-tokens view -- every token kept, outlined thinly in white."""
    base, scale = _scaled(image.convert("RGB"), side)
    if grid:
        out = _hatch_outside(base, boxes, show, scale)
        draw = ImageDraw.Draw(out)
        for i in np.flatnonzero(show):
            draw.rectangle(_rect(boxes[i], scale), outline=GRID_COLOUR, width=1)
        return out
    dim = ImageEnhance.Brightness(ImageEnhance.Color(base).enhance(0.25)).enhance(DIM_BRIGHTNESS)
    reveal = Image.new("L", base.size, 0)
    mask = ImageDraw.Draw(reveal)
    merged = [(slot, [m for m in members if show[m]]) for slot, members in (groups or []) if len(members) > 1]
    for _, members in merged:
        for m in members:
            if m not in kept:
                mask.rectangle(_rect(boxes[m], scale), fill=MEMBER_SHOW)
    for i in sorted(kept):
        if show[i]:
            mask.rectangle(_rect(boxes[i], scale), fill=255)
    out = _hatch_outside(Image.composite(base, dim, reveal), boxes, show, scale)
    draw = ImageDraw.Draw(out)
    width = max(1, round(scale / 2))
    # a partition (VisionZip clusters, pooled cells) outlines every member; overlapping groups (bilinear resizes)
    # would hide the picture under their outlines, so there only the slots get the group colour
    members_drawn = [m for _, members in merged for m in members]
    partition = len(members_drawn) == len(set(members_drawn))
    if partition:
        for g, (_, members) in enumerate(merged):
            for m in members:
                draw.rectangle(_rect(boxes[m], scale), outline=GROUP_COLOURS[g % len(GROUP_COLOURS)], width=width)
    grouped = {slot for slot, _ in merged}
    for i in sorted(kept):
        if show[i] and i not in grouped:
            view = int(views[i])
            colour = KEPT_COLOUR if view <= 0 else VIEW_COLOURS[(view - 1) % len(VIEW_COLOURS)]
            draw.rectangle(_rect(boxes[i], scale), outline=colour, width=width)
    for g, (slot, _) in enumerate(merged):
        if show[slot]:
            draw.rectangle(_rect(boxes[slot], scale), outline=GROUP_COLOURS[g % len(GROUP_COLOURS)], width=width + 2)
    return out


def _labelled(panels: list[tuple[Image.Image, str | None]], gap: int = 8) -> Image.Image:
    """Panels side by side, each with its label above it (none when there is a single unlabelled panel)."""
    labelled = any(label for _, label in panels)
    top = 22 if labelled else 0
    width = sum(p.width for p, _ in panels) + gap * (len(panels) - 1)
    height = max(p.height for p, _ in panels) + top
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for panel, label in panels:
        if label:
            draw.text((x + 2, 3), label, fill=(20, 20, 20), font=_font(15))
        out.paste(panel, (x, top))
        x += panel.width + gap
    return out


def _boxes_and_views(token_boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = _array(token_boxes.boxes, 4)
    views = _array(token_boxes.views).astype(np.int64).reshape(-1)
    if views.shape[0] != boxes.shape[0]:
        raise ValueError(f"token boxes have {boxes.shape[0]} boxes but {views.shape[0]} views")
    return boxes, views, np.isfinite(boxes).all(axis=1)


def _views(image, boxes, views, drawable, kept_set, pairs, side, grid=False) -> Image.Image:
    if (views > 0).any():
        base = drawable & (views == 0)
        crops = drawable & (views > 0)
        return _labelled([(_panel(image, boxes, views, base, kept_set, pairs, side, grid), "base view"),
                          (_panel(image, boxes, views, crops, kept_set, pairs, side, grid), "crops")])
    return _panel(image, boxes, views, drawable, kept_set, pairs, side, grid)


def all_tokens(image: Image.Image, token_boxes, *, side: int = 448) -> Image.Image:
    """The "all tokens" picture: the input with the model's token grid drawn on it and the areas the model never
    sees (outside every token box) hatched; AnyRes images get the base view and crops panels like the overlay."""
    boxes, views, drawable = _boxes_and_views(token_boxes)
    return _views(image, boxes, views, drawable, set(np.flatnonzero(drawable).tolist()), None, side, grid=True)


def token_overlay(image: Image.Image, token_boxes, kept, groups=None, *, side: int = 448) -> Image.Image:
    """``image`` with the tokens in ``kept`` highlighted and every other token dimmed, on the model's patch grid.

    ``token_boxes`` has ``.boxes`` ([N, 4] x0, y0, x1, y1 in pixels of ``image``; NaN rows -- CLS, newlines -- are
    not drawn) and ``.views`` ([N]: 0 base view, 1.. AnyRes crops, -1 none). ``kept``: token indices the LLM
    receives. ``groups``: per kept token, in the order of ``kept``, the tokens merged into it
    (``Selection.groups``; ``None`` when nothing was merged). ``side``: the longer edge of each panel in pixels.
    """
    boxes, views, drawable = _boxes_and_views(token_boxes)
    kept_list = _indices(kept)
    bad = [i for i in kept_list if not 0 <= i < boxes.shape[0]]
    if bad:
        raise ValueError(f"kept token indices {bad[:5]} are outside the image's {boxes.shape[0]} tokens")
    pairs = None
    if groups is not None:
        if len(groups) != len(kept_list):
            raise ValueError(f"{len(groups)} merge groups for {len(kept_list)} kept tokens")
        pairs = [(slot, [m for m in _indices(g) if 0 <= m < boxes.shape[0] and drawable[m]])
                 for slot, g in zip(kept_list, groups)]
    kept_set = {i for i in kept_list if drawable[i]}
    return _views(image, boxes, views, drawable, kept_set, pairs, side)


def plain(image: Image.Image, *, side: int = 448) -> Image.Image:
    """The input at the overlay's display size (the "all tokens" picture)."""
    return _scaled(image.convert("RGB"), side)[0]


def side_by_side(panels: Sequence[tuple[Image.Image, str | None]], *, gap: int = 8) -> Image.Image:
    """Pictures left to right, each with its label above it (``vtc run``'s example: all tokens | kept tokens)."""
    if not panels:
        raise ValueError("side_by_side needs at least one picture")
    return _labelled(list(panels), gap)


def caption_size(captions: Sequence[str], tile: int) -> int:
    """The caption font size of a strip of ``tile``-wide frames: ``CAPTION_SCALE`` of the tile (at least 12), less
    where the longest line would not fit."""
    size = max(12, round(tile * CAPTION_SCALE))
    longest = [line for c in captions for line in c.splitlines()]
    while size > 9 and longest and max(_font(size).getlength(line) for line in longest) > tile - 4:
        size -= 1
    return size


def frame_strip(tiles: Sequence[Image.Image], captions: Sequence[str], *, tile: int = 176,
                columns: int = 8) -> Image.Image:
    """Frames left to right (wrapping after ``columns``), each ``tile`` pixels wide with its caption under it.

    The caption font grows with the tile (``CAPTION_SCALE``) so it stays legible when the page shows the strip at
    half size, and shrinks only as far as needed for the longest line to fit the tile."""
    if not tiles:
        raise ValueError("a frame strip needs at least one frame")
    if len(captions) != len(tiles):
        raise ValueError(f"{len(captions)} captions for {len(tiles)} frames")
    size = caption_size(captions, tile)
    font, line_h = _font(size), size + 4
    lines = max(len(c.splitlines()) for c in captions)
    scaled = [t.convert("RGB").resize((tile, max(1, round(t.height * tile / t.width))), Image.Resampling.BICUBIC)
              for t in tiles]
    cell_h = max(s.height for s in scaled) + 6 + line_h * lines
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    gap = 6
    out = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for n, (picture, caption) in enumerate(zip(scaled, captions)):
        r, c = divmod(n, cols)
        x, y = c * (tile + gap), r * (cell_h + gap)
        out.paste(picture, (x, y))
        for k, line in enumerate(caption.splitlines()):
            draw.text((x + 2, y + picture.height + 3 + line_h * k), line, fill=(20, 20, 20), font=font)
    return out
