"""The packed AnyRes layout of one image (LLaVA-NeXT, LLaVA-OneVision): pure index arithmetic, no model imports.

An AnyRes image reaches the LLM as one *packed* run of feature vectors (transformers' ``pack_image_features``):

1. the **base view** (the whole image squashed to one tile): a ``rows x cols`` grid in raster order -- with no
   newline when crops follow; an image encoded as its base view *only* (OneVision's multi-image prompts) gets one
   ``image_newline`` after the whole grid instead (``base_newline``);
2. the **crop canvas**: the ``nph x npw`` crops, each a ``h x w`` token grid, tiled into one
   ``(nph*h) x (npw*w)`` canvas; the padding the processor added around the resized image is cut off (``box``:
   the unpadded rows ``[top, bottom)`` and columns ``[left, right)``, transformers' ``unpad_image``); OneVision
   then bilinearly downscales the unpadded canvas when it has more than ``anyres_max_N`` tiles' worth of tokens
   (``size``); finally one ``image_newline`` follows *every row of the canvas* (``newlines``) and the canvas is
   read row-major. A canvas row runs through every crop of its tile row, so its newline belongs to the canvas, not
   to one crop.

Views: view 0 is the base, views ``1 .. nph*npw`` are the crops in tile raster order. A crop's *visible grid* is
the rectangle of packed-canvas cells that belong to it: without downscaling, the part of the crop left after
unpadding; with downscaling, the output cells whose centre maps (``align_corners=False``, as the bilinear resize)
into that crop -- a rectangle too, because the centre map is monotone. A crop cut off entirely (a very wide or
tall image) is an *empty view* (0 rows or 0 columns); it keeps its index so views are numbered the same for every
image with the same tiles.

Slots: every packed index is either a visual token ``Slot(view, row, col)`` (row/col in the view's visible grid)
or a newline: ``Slot(CANVAS, r, NEWLINE)`` ends packed-canvas row ``r``; ``Slot(0, rows - 1, NEWLINE)`` is the
trailing newline of a base-only image. ``locate`` and ``index_of`` map between the two and are inverse bijections
(``tests/test_layout.py`` checks every index of many layouts).

Newline rule (how the cut treats newline tokens): **newlines are layout, not budget.** The budget counts visual
tokens only; a newline is kept iff at least one token of the span it closes is kept -- its canvas row for a canvas
newline, the whole base view for a base-only image's trailing newline. A newline closing an empty span (the rows of
a canvas cut to zero width, e.g. a 1x400 image) closes the whole image and is always kept (every image keeps at
least one token). The LLM therefore receives ``budget + kept newlines`` tokens per image, and keeping every visual
token keeps every newline (keep-all is the unmodified packed sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: ``Slot.view`` of a newline that ends a row of the crop canvas
CANVAS = -1
#: ``Slot.col`` of a newline
NEWLINE = -1


class Slot(NamedTuple):
    """What one packed index holds: a visual token of a view, or a newline (``col == NEWLINE``)."""

    view: int
    row: int
    col: int

    @property
    def is_newline(self) -> bool:
        return self.col == NEWLINE


def _pair(value, what: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair of ints, got {value!r}") from None
    return a, b


@dataclass(frozen=True)
class CropCanvas:
    """The crops of an AnyRes image as transformers packs them (see the module doc)."""

    tiles: tuple[int, int]  # (nph, npw): crops per column / per row
    tile: tuple[int, int]  # (h, w): tokens per crop side
    box: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) kept by unpadding; None = all
    size: tuple[int, int] | None = None  # (rows, cols) after downscaling; None = the box's size
    newlines: bool = True  # one newline after every canvas row

    def __post_init__(self):
        object.__setattr__(self, "tiles", _pair(self.tiles, "tiles"))
        object.__setattr__(self, "tile", _pair(self.tile, "tile"))
        (nph, npw), (h, w) = self.tiles, self.tile
        if min(nph, npw, h, w) < 1:
            raise ValueError(f"crop canvas needs >= 1 tile of >= 1x1 tokens, got tiles {self.tiles}, tile {self.tile}")
        full_h, full_w = nph * h, npw * w
        box = (0, full_h, 0, full_w) if self.box is None else tuple(int(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"box must be (top, bottom, left, right), got {self.box!r}")
        top, bottom, left, right = box
        if not (0 <= top <= bottom <= full_h and 0 <= left <= right <= full_w):
            raise ValueError(f"box {box} is not inside the {full_h}x{full_w} canvas")
        object.__setattr__(self, "box", box)
        if self.size is not None:
            rows, cols = _pair(self.size, "size")
            if rows < 0 or cols < 0 or (rows and bottom == top) or (cols and right == left):
                raise ValueError(f"canvas size {self.size} cannot be resampled from the {bottom - top}x"
                                 f"{right - left} unpadded canvas")
            object.__setattr__(self, "size", (rows, cols))

    @property
    def full(self) -> tuple[int, int]:
        """(rows, cols) of the tiled canvas before unpadding."""
        return self.tiles[0] * self.tile[0], self.tiles[1] * self.tile[1]

    @property
    def unpadded(self) -> tuple[int, int]:
        top, bottom, left, right = self.box
        return bottom - top, right - left

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the packed canvas (after unpadding and downscaling)."""
        return self.size if self.size is not None else self.unpadded

    @property
    def resized(self) -> bool:
        return self.size is not None and self.size != self.unpadded

    def source_rows(self) -> list[int]:
        """For every packed-canvas row, the full-canvas row its centre falls in."""
        return _centres(self.shape[0], self.box[0], self.unpadded[0])

    def source_cols(self) -> list[int]:
        return _centres(self.shape[1], self.box[2], self.unpadded[1])


def _centres(out: int, start: int, length: int) -> list[int]:
    # centre of output cell i, align_corners=False: (i + 0.5) * length / out; exact in integers
    return [start + min((2 * i + 1) * length // (2 * out), length - 1) for i in range(out)]


@dataclass(frozen=True)
class PackedLayout:
    """Where every packed feature of one AnyRes image comes from (see the module doc)."""

    base: tuple[int, int]  # (rows, cols) of the base view
    canvas: CropCanvas | None = None
    base_newline: bool = False  # one newline after the base grid (an image encoded as its base view only)

    def __post_init__(self):
        object.__setattr__(self, "base", _pair(self.base, "base"))
        if min(self.base) < 1:
            raise ValueError(f"the base view needs a grid of at least 1x1 tokens, got {self.base}")
        if self.canvas is not None and self.base_newline:
            raise ValueError("a trailing base newline only exists when the image has no crops")

    # ---------------------------------------------------------------------------------------------- counts
    @property
    def num_views(self) -> int:
        return 1 + (self.canvas.tiles[0] * self.canvas.tiles[1] if self.canvas is not None else 0)

    @property
    def num_base(self) -> int:
        return self.base[0] * self.base[1] + int(self.base_newline)

    @property
    def canvas_row_length(self) -> int:
        """Packed entries per canvas row (its tokens plus its newline)."""
        if self.canvas is None:
            return 0
        return self.canvas.shape[1] + int(self.canvas.newlines)

    @property
    def num_tokens(self) -> int:
        """Packed length: visual tokens plus newlines (what the processor expands the placeholder to)."""
        rows = self.canvas.shape[0] if self.canvas is not None else 0
        return self.num_base + rows * self.canvas_row_length

    @property
    def num_newlines(self) -> int:
        rows = self.canvas.shape[0] if self.canvas is not None and self.canvas.newlines else 0
        return rows + int(self.base_newline)

    @property
    def num_visual_tokens(self) -> int:
        """Tokens that count against the budget (newlines excluded)."""
        return self.num_tokens - self.num_newlines

    # ---------------------------------------------------------------------------------------------- views
    @cached_property
    def _rects(self) -> tuple[tuple[int, int, int, int], ...]:
        """Per crop view: (r0, r1, c0, c1) of its visible rectangle in packed-canvas coordinates."""
        canvas = self.canvas
        if canvas is None:
            return ()
        (nph, npw), (h, w) = canvas.tiles, canvas.tile
        row_tiles = [r // h for r in canvas.source_rows()]
        col_tiles = [c // w for c in canvas.source_cols()]

        def spans(tiles: list[int], count: int) -> list[tuple[int, int]]:
            out = []
            for t in range(count):
                members = [i for i, x in enumerate(tiles) if x == t]
                out.append((members[0], members[-1] + 1) if members else (0, 0))
            return out

        rows, cols = spans(row_tiles, nph), spans(col_tiles, npw)
        return tuple((r0, r1, c0, c1) for (r0, r1) in rows for (c0, c1) in cols)

    def canvas_rect(self, view: int) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1): the packed-canvas rectangle of crop ``view`` (1-based view index)."""
        self._check_view(view)
        if view == 0:
            raise ValueError("view 0 is the base view, which is not on the crop canvas")
        return self._rects[view - 1]

    def view_grid(self, view: int) -> tuple[int, int]:
        """(rows, cols) of the visible grid of ``view`` (0 rows or cols: an empty view)."""
        self._check_view(view)
        if view == 0:
            return self.base
        r0, r1, c0, c1 = self._rects[view - 1]
        return r1 - r0, c1 - c0

    @property
    def view_grids(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.view_grid(v) for v in range(self.num_views))

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Visual tokens per view (newlines excluded); they sum to ``num_visual_tokens``."""
        return tuple(r * c for r, c in self.view_grids)

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} is out of range for an image with {self.num_views} views")

    def _canvas_index(self, row: int, col: int) -> int:
        return self.num_base + row * self.canvas_row_length + col

    @cached_property
    def _view_index_lists(self) -> tuple[tuple[int, ...], ...]:
        rows, cols = self.base
        out = [tuple(range(rows * cols))]
        for r0, r1, c0, c1 in self._rects:
            out.append(tuple(self._canvas_index(r, c) for r in range(r0, r1) for c in range(c0, c1)))
        return tuple(out)

    def view_indices(self, view: int) -> torch.Tensor:
        """Packed indices of the tokens of ``view``, in the view's raster order (``[rows * cols]``)."""
        self._check_view(view)
        return torch.tensor(self._view_index_lists[view], dtype=torch.long)

    # ---------------------------------------------------------------------------------------------- slots
    def locate(self, index: int) -> Slot:
        """The slot of packed index ``index``."""
        index = int(index)
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"packed index {index} is out of range for {self.num_tokens} packed tokens")
        rows, cols = self.base
        if index < rows * cols:
            return Slot(0, index // cols, index % cols)
        if index < self.num_base:  # the trailing newline of a base-only image
            return Slot(0, rows - 1, NEWLINE)
        row, col = divmod(index - self.num_base, self.canvas_row_length)
        if col == self.canvas.shape[1]:
            return Slot(CANVAS, row, NEWLINE)
        tile_r = self._row_tile[row]
        tile_c = self._col_tile[col]
        view = 1 + tile_r * self.canvas.tiles[1] + tile_c
        r0, _, c0, _ = self._rects[view - 1]
        return Slot(view, row - r0, col - c0)

    @cached_property
    def _row_tile(self) -> tuple[int, ...]:
        return tuple(r // self.canvas.tile[0] for r in self.canvas.source_rows())

    @cached_property
    def _col_tile(self) -> tuple[int, ...]:
        return tuple(c // self.canvas.tile[1] for c in self.canvas.source_cols())

    def index_of(self, slot: Slot | tuple[int, int, int]) -> int:
        """The packed index of ``slot`` (inverse of ``locate``)."""
        view, row, col = (int(v) for v in slot)
        if col == NEWLINE:
            if view == CANVAS and self.canvas is not None and self.canvas.newlines \
                    and 0 <= row < self.canvas.shape[0]:
                return self._canvas_index(row, self.canvas.shape[1])
            if view == 0 and self.base_newline and row == self.base[0] - 1:
                return self.base[0] * self.base[1]
            raise IndexError(f"{Slot(view, row, col)} is not a newline of this layout")
        self._check_view(view)
        rows, cols = self.view_grid(view)
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"({row}, {col}) is outside the {rows}x{cols} visible grid of view {view}")
        if view == 0:
            return row * cols + col
        r0, _, c0, _ = self._rects[view - 1]
        return self._canvas_index(r0 + row, c0 + col)

    def slots(self) -> list[Slot]:
        """Every packed index's slot, in packed order."""
        return [self.locate(i) for i in range(self.num_tokens)]

    # ---------------------------------------------------------------------------------------------- newlines
    @cached_property
    def _newline_spans(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        spans = []
        if self.base_newline:
            spans.append((self.base[0] * self.base[1], tuple(range(self.base[0] * self.base[1]))))
        if self.canvas is not None and self.canvas.newlines:
            width = self.canvas.shape[1]
            for row in range(self.canvas.shape[0]):
                spans.append((self._canvas_index(row, width), tuple(self._canvas_index(row, c) for c in range(width))))
        return tuple(spans)

    def newline_indices(self) -> torch.Tensor:
        return torch.tensor([index for index, _ in self._newline_spans], dtype=torch.long)

    def newline_spans(self) -> list[tuple[int, torch.Tensor]]:
        """Per newline: its packed index and the packed indices of the tokens of the span it closes.

        An empty span (a canvas row without tokens) is returned empty; ``kept_newlines`` treats it as the whole image.
        """
        return [(index, torch.tensor(span, dtype=torch.long)) for index, span in self._newline_spans]

    def is_newline(self) -> torch.Tensor:
        """``[num_tokens]`` bool: which packed indices are newlines."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        mask[self.newline_indices()] = True
        return mask

    def kept_newlines(self, kept: torch.Tensor) -> torch.Tensor:
        """The newlines kept along with the kept visual tokens ``kept`` (packed indices), by the module's rule."""
        kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1).cpu()
        is_kept = torch.zeros(self.num_tokens, dtype=torch.bool)
        is_kept[kept] = True
        any_kept = bool(is_kept.any())
        out = []
        for index, span in self._newline_spans:
            if (bool(is_kept[list(span)].any()) if span else any_kept):
                out.append(index)
        return torch.tensor(out, dtype=torch.long)

    # ---------------------------------------------------------------------------------------------- values
    def canvas_values(self, crops: torch.Tensor) -> torch.Tensor:
        """Per-crop values ``[nph*npw, h*w, *rest]`` laid out as the packed canvas ``[rows, cols, *rest]``.

        Tiling, unpadding and (OneVision) the bilinear downscale (``align_corners=False``, computed in fp32) are
        done as transformers does them to the features, so a per-token signal lines up with the packed tokens.
        """
        canvas = self.canvas
        if canvas is None:
            raise ValueError("this layout has no crop canvas")
        (nph, npw), (h, w) = canvas.tiles, canvas.tile
        if crops.shape[0] != nph * npw or crops.shape[1] != h * w:
            raise ValueError(f"expected per-crop values of shape [{nph * npw}, {h * w}, ...], got {tuple(crops.shape)}")
        rest = crops.shape[2:]
        grid = crops.reshape(nph, npw, h, w, *rest).transpose(1, 2).reshape(nph * h, npw * w, *rest)
        top, bottom, left, right = canvas.box
        grid = grid[top:bottom, left:right]
        if canvas.resized:
            rows, cols = canvas.shape
            flat = grid.reshape(grid.shape[0], grid.shape[1], -1).permute(2, 0, 1)[None].float()
            flat = F.interpolate(flat, size=[rows, cols], mode="bilinear")[0]
            grid = flat.permute(1, 2, 0).reshape(rows, cols, *rest)
        return grid

    def view_values(self, base: torch.Tensor, crops: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-view values laid out like each view's visible grid, from ``base [rows*cols, *rest]`` and the crops'."""
        out = [base]
        if self.canvas is not None:
            grid = self.canvas_values(crops)
            for r0, r1, c0, c1 in self._rects:
                part = grid[r0:r1, c0:c1]
                out.append(part.reshape(part.shape[0] * part.shape[1], *grid.shape[2:]))
        return out

    def pack(self, base: torch.Tensor, crops: torch.Tensor | None, newline: torch.Tensor) -> torch.Tensor:
        """The packed sequence ``[num_tokens, D]`` built from per-view features, as ``pack_image_features`` does.

        A reference for tests (and a statement of the layout facts): base, optional trailing newline, then every
        canvas row followed by its newline.
        """
        parts = [base]
        if self.base_newline:
            parts.append(newline[None].to(base))
        if self.canvas is not None:
            grid = self.canvas_values(crops).to(base.dtype)
            if self.canvas.newlines:
                grid = torch.cat([grid, newline.to(grid)[None, None].expand(grid.shape[0], 1, -1)], dim=1)
            parts.append(grid.reshape(-1, grid.shape[-1]))
        return torch.cat(parts, dim=0)

    # ---------------------------------------------------------------------------------------------- regions
    def base_regions(self, rule: str = "spatial") -> torch.Tensor:
        """``[rows*cols]`` long: the crop view (1-based) each base token corresponds to (-1: none).

        * ``"spatial"``: the base view shows the whole image; the image fills the unpadded box of the canvas, so
          the centre of base token (r, c) maps to canvas point ``top + (r + .5) / rows * (bottom - top)``
          (likewise for columns), and the token belongs to the crop containing that point (HiRED's "base tokens
          that spatially correspond to crop i", paper Eq. 1).
        * ``"blocks"``: equal blocks of the base grid, ``rows // nph`` x ``cols // npw`` with the remainder rows /
          columns in the last block, padding ignored (GlobalCom²'s ``generate_scale_for_crop_features``).
        * ``"bands"``: the flattened base grid cut into ``nph * npw`` consecutive chunks (``torch.tensor_split``),
          chunk ``i`` going to crop ``i`` -- HiRED's reference code (a reshape of the flat map; row bands, not the
          spatial quadrants).
        """
        rows, cols = self.base
        n = rows * cols
        if self.canvas is None:
            return torch.full((n,), -1, dtype=torch.long)
        (nph, npw), (h, w) = self.canvas.tiles, self.canvas.tile
        if rule == "spatial":
            top, bottom, left, right = self.canvas.box
            if bottom == top or right == left:
                return torch.full((n,), -1, dtype=torch.long)
            # exact in integers: floor(top + (2r + 1) * (bottom - top) / (2 rows))
            row_src = [min(top + (2 * r + 1) * (bottom - top) // (2 * rows), bottom - 1) for r in range(rows)]
            col_src = [min(left + (2 * c + 1) * (right - left) // (2 * cols), right - 1) for c in range(cols)]
            out = [1 + (rs // h) * npw + (cs // w) for rs in row_src for cs in col_src]
            return torch.tensor(out, dtype=torch.long)
        if rule == "blocks":
            bh, bw = max(rows // nph, 1), max(cols // npw, 1)
            out = [1 + min(r // bh, nph - 1) * npw + min(c // bw, npw - 1) for r in range(rows) for c in range(cols)]
            return torch.tensor(out, dtype=torch.long)
        if rule == "bands":
            out = torch.empty(n, dtype=torch.long)
            for i, chunk in enumerate(torch.tensor_split(torch.arange(n), nph * npw)):
                out[chunk] = 1 + i
            return out
        raise ValueError(f"unknown region rule {rule!r}; choose 'spatial', 'blocks' or 'bands'")
