"""Synthetic visual question answering data: coloured shapes, glyphs and short videos, deterministic from a seed.

The embedded default model (``vtc.load_default()``) is trained and evaluated on this data, so that pruning the wrong
visual tokens visibly costs accuracy with no download. Every sample is a pure function of ``(split, index)``:
``sample_seed`` derives a NumPy ``SeedSequence`` from a split code and the index, so the train, validation and test
splits are disjoint by construction and any sample can be regenerated alone.

Images (224x224 by default) place 1-5 shapes -- each a unique (colour, shape) pair -- in distinct cells of a 3x3
grid, on a plain, noisy or cluttered background, sometimes with one capital letter glyph in another cell. Questions
have one-word answers: colour or shape at a described cell, counting (all / by colour / by shape), existence,
relative position (left of / above), and reading the glyph.

Videos (8-32 frames) share one background; 1-4 shapes move (left, right, up or down) or stand still, and each lives
over its own span of frames, so shapes appear and disappear. Questions need the right frames: the colour or shape
of the one that appeared last, the colour of the one that disappeared, how many frames show a given shape, which
way a shape moves, how many shapes the video has, whether a given shape occurs.

Besides pixels, every sample carries its ground truth (``objects``) and, for images, a per-pixel object-id map, so
training can derive dense labels (which object covers which patch) and tests can reason about what a compressor
must keep.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORS",
    "SHAPES",
    "LETTERS",
    "CELLS",
    "NUMBER_WORDS",
    "SPLITS",
    "Question",
    "SceneObject",
    "ImageSample",
    "VideoSample",
    "sample_seed",
    "make_image_sample",
    "make_video_sample",
    "image_samples",
    "video_samples",
    "vocabulary",
]

IMAGE_SIZE = 224
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 180),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
#: Glyph alphabet: visually distinct capitals (answers are the lower-case letter).
LETTERS = ("a", "e", "h", "k", "r", "t", "x", "z")
#: The 3x3 cells, row-major; a scene places at most one thing per cell.
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty", "twenty-one", "twenty-two", "twenty-three", "twenty-four", "twenty-five", "twenty-six",
                "twenty-seven", "twenty-eight", "twenty-nine", "thirty", "thirty-one", "thirty-two")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = {"train": 0, "validation": 1, "test": 2}
MAX_OBJECTS = 5
MAX_VIDEO_OBJECTS = 4
#: Side of a shape as a fraction of the image side (images, videos): large enough to span 3-4 patches of 16 px.
IMAGE_SIDES = (0.14, 0.25)
VIDEO_SIDES = (0.14, 0.22)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str


@dataclass(frozen=True)
class SceneObject:
    """One shape (or the glyph, ``shape == "letter"``). Boxes are (x0, y0, x1, y1) in pixels of frame 0."""

    color: str
    shape: str
    cell: int
    box: tuple[int, int, int, int]
    letter: str | None = None
    # video only: frames [first, last] it is visible in, and its motion
    first: int = 0
    last: int = 0
    direction: str | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class ImageSample:
    image: Image.Image
    questions: list[Question]
    objects: list[SceneObject]
    id_map: np.ndarray  # [H, W] int16: -1 background, else index into objects
    seed: tuple[int, int]


@dataclass
class VideoSample:
    frames: list[Image.Image]
    questions: list[Question]
    objects: list[SceneObject]
    visible: np.ndarray  # [num_frames, num_objects] bool
    seed: tuple[int, int]
    fps: float = 2.0
    timestamps: list[float] = field(default_factory=list)


def sample_seed(split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``; splits never share a seed (the split code is in the key)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([20261122, SPLITS[split], int(index)])))


# -- drawing ------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(205, 250)
    tint = rng.integers(-8, 9, size=3)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[...] = np.clip(base + tint, 0, 255)
    style = rng.choice(["plain", "noise", "clutter"], p=[0.4, 0.3, 0.3])
    if style == "noise":
        img += rng.normal(0, 7, size=(size, size, 1))
    elif style == "clutter":
        canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(10, 30))):
            gray = int(rng.integers(120, 190))
            x, y = (int(v) for v in rng.integers(0, size, size=2))
            if rng.random() < 0.5:
                r = int(rng.integers(1, 3))
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(gray, gray, gray))
            else:
                dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
                draw.line([x, y, x + dx, y + dy], fill=(gray, gray, gray), width=1)
        img = np.asarray(canvas, dtype=np.float32)
    return img.clip(0, 255).astype(np.uint8)


def _shape_polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = w * 0.32, h * 0.32
        return [(cx - a / 2, y0), (cx + a / 2, y0), (cx + a / 2, cy - b / 2), (x1, cy - b / 2), (x1, cy + b / 2),
                (cx + a / 2, cy + b / 2), (cx + a / 2, y1), (cx - a / 2, y1), (cx - a / 2, cy + b / 2),
                (x0, cy + b / 2), (x0, cy - b / 2), (cx - a / 2, cy - b / 2)]
    return None


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, box, fill) -> None:
    if obj.shape == "letter":
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), obj.letter.upper(), fill=fill,
                  font=_font(box[3] - box[1]), anchor="mm", stroke_width=2, stroke_fill=fill)
    elif obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, box), fill=fill)


def _cell_box(rng: np.random.Generator, cell: int, size: int, side: int) -> tuple[int, int, int, int]:
    """A ``side``-pixel box lying wholly inside ``cell`` (so things in different cells never touch)."""
    step = size / 3
    row, col = divmod(cell, 3)
    half = min(side, step - 6) / 2
    lo_x, hi_x = col * step + half + 3, (col + 1) * step - half - 3
    lo_y, hi_y = row * step + half + 3, (row + 1) * step - half - 3
    cx = rng.uniform(lo_x, max(lo_x, hi_x))
    cy = rng.uniform(lo_y, max(lo_y, hi_y))
    return (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))


def _pick_objects(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return [pairs[i] for i in chosen]


# -- images -------------------------------------------------------------------------------------------------


def make_image_sample(split: str, index: int, *, size: int = IMAGE_SIZE, glyph_probability: float = 0.3,
                      max_questions: int | None = None) -> ImageSample:
    """Image ``index`` of ``split`` with its questions (all applicable ones, shuffled; or ``max_questions``)."""
    if size < 96:
        raise ValueError(f"image size must be >= 96 pixels so shapes stay recognisable, got {size}")
    rng = sample_seed(split, index)
    canvas = Image.fromarray(_background(rng, size))
    ids = Image.new("I", (size, size), 0)  # object id + 1; 0 = background
    draw, id_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(ids)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    has_glyph = rng.random() < glyph_probability
    cells = rng.permutation(9)[: count + int(has_glyph)]
    objects: list[SceneObject] = []
    for (color, shape), cell in zip(_pick_objects(rng, count), cells[:count]):
        side = int(rng.integers(int(size * IMAGE_SIDES[0]), int(size * IMAGE_SIDES[1]) + 1))
        objects.append(SceneObject(color, shape, int(cell), _cell_box(rng, int(cell), size, side)))
    if has_glyph:
        letter = LETTERS[int(rng.integers(len(LETTERS)))]
        side = int(size * 0.2)
        objects.append(SceneObject("black", "letter", int(cells[-1]), _cell_box(rng, int(cells[-1]), size, side),
                                   letter=letter))
    for i, obj in enumerate(objects):
        fill = (20, 20, 20) if obj.shape == "letter" else COLORS[obj.color]
        _draw(draw, obj, obj.box, fill)
        _draw(id_draw, obj, obj.box, i + 1)
    id_map = np.asarray(ids, dtype=np.int32).astype(np.int16) - 1
    questions = _image_questions(rng, objects)
    if max_questions is not None:
        questions = questions[:max_questions]
    return ImageSample(canvas, questions, objects, id_map, (SPLITS[split], index))


def _image_questions(rng: np.random.Generator, objects: list[SceneObject]) -> list[Question]:
    shapes = [o for o in objects if o.shape != "letter"]
    glyphs = [o for o in objects if o.shape == "letter"]
    present = {(o.color, o.shape) for o in shapes}
    qs: list[Question] = []
    for o in shapes:
        qs.append(Question(f"what color is the shape at the {CELLS[o.cell]} ?", o.color, "color_at"))
        qs.append(Question(f"what shape is at the {CELLS[o.cell]} ?", o.shape, "shape_at"))
    qs.append(Question("how many shapes are there ?", NUMBER_WORDS[len(shapes)], "count"))
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    qs.append(Question(f"how many {color} shapes are there ?",
                       NUMBER_WORDS[sum(o.color == color for o in shapes)], "count_color"))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    qs.append(Question(f"how many {PLURALS[shape]} are there ?",
                       NUMBER_WORDS[sum(o.shape == shape for o in shapes)], "count_shape"))
    # existence, balanced: one present pair, one absent pair
    o = shapes[int(rng.integers(len(shapes)))]
    qs.append(Question(f"is there a {o.color} {o.shape} ?", "yes", "exists"))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    qs.append(Question(f"is there a {c} {s} ?", "no", "exists"))
    # relative position between two shapes in different columns / rows
    if len(shapes) >= 2:
        a, b = (shapes[i] for i in rng.choice(len(shapes), size=2, replace=False))
        if a.cell % 3 != b.cell % 3:
            qs.append(Question(f"is the {a.name} left of the {b.name} ?",
                               "yes" if a.cell % 3 < b.cell % 3 else "no", "left_of"))
        if a.cell // 3 != b.cell // 3:
            qs.append(Question(f"is the {a.name} above the {b.name} ?",
                               "yes" if a.cell // 3 < b.cell // 3 else "no", "above"))
    if glyphs:
        qs.append(Question("what letter is shown ?", glyphs[0].letter, "letter"))
        qs.append(Question("is there a letter ?", "yes", "letter_exists"))
    else:
        qs.append(Question("is there a letter ?", "no", "letter_exists"))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order]


# -- videos -------------------------------------------------------------------------------------------------


def make_video_sample(split: str, index: int, *, num_frames: int = 8, size: int = IMAGE_SIZE,
                      max_questions: int | None = None) -> VideoSample:
    """Video ``index`` of ``split``: ``num_frames`` frames (8-32) of moving, appearing and disappearing shapes."""
    if not 8 <= num_frames <= 32:
        raise ValueError(f"num_frames must be in [8, 32], got {num_frames}")
    if size < 96:
        raise ValueError(f"frame size must be >= 96 pixels, got {size}")
    rng = sample_seed(split, index)
    rng = np.random.Generator(np.random.PCG64(rng.integers(2**63) ^ 0x5EED))  # videos: own stream per index
    background = _background(rng, size)
    count = int(rng.integers(1, MAX_VIDEO_OBJECTS + 1))
    cells = rng.permutation(9)[:count]
    objects: list[SceneObject] = []
    for (color, shape), cell in zip(_pick_objects(rng, count), cells):
        side = int(rng.integers(int(size * VIDEO_SIDES[0]), int(size * VIDEO_SIDES[1]) + 1))
        box = _cell_box(rng, int(cell), size, side)
        # lifetime: at least a quarter of the video; some from the start, some to the end
        length = int(rng.integers(max(2, num_frames // 4), num_frames + 1))
        first = int(rng.integers(0, num_frames - length + 1))
        direction = None if rng.random() < 0.25 else list(DIRECTIONS)[int(rng.integers(4))]
        objects.append(SceneObject(color, shape, int(cell), box, first=first, last=first + length - 1,
                                   direction=direction))
    speed = size / (4.0 * num_frames)  # a mover crosses about a quarter of the frame over the video
    frames, visible = [], np.zeros((num_frames, count), dtype=bool)
    for t in range(num_frames):
        frame = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(frame)
        for i, o in enumerate(objects):
            if not o.first <= t <= o.last:
                continue
            dx, dy = DIRECTIONS[o.direction] if o.direction else (0, 0)
            shift = speed * (t - o.first)
            box = _shifted_inside(o.box, dx * shift, dy * shift, size)
            _draw(draw, o, box, COLORS[o.color])
            visible[t, i] = True
        frames.append(frame)
    questions = _video_questions(rng, objects, visible)
    if max_questions is not None:
        questions = questions[:max_questions]
    fps = 2.0
    return VideoSample(frames, questions, objects, visible, (SPLITS[split], index), fps,
                       [t / fps for t in range(num_frames)])


def _shifted_inside(box, dx: float, dy: float, size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    dx = min(max(dx, -x0), size - 1 - x1)
    dy = min(max(dy, -y0), size - 1 - y1)
    return (int(round(x0 + dx)), int(round(y0 + dy)), int(round(x1 + dx)), int(round(y1 + dy)))


def _video_questions(rng: np.random.Generator, objects: list[SceneObject], visible: np.ndarray) -> list[Question]:
    num_frames = visible.shape[0]
    qs: list[Question] = []
    firsts = [o.first for o in objects]
    latest = max(firsts)
    if latest > 0 and firsts.count(latest) == 1:
        o = objects[firsts.index(latest)]
        qs.append(Question("what color is the shape that appeared last ?", o.color, "appeared_last_color"))
        qs.append(Question("what shape appeared last ?", o.shape, "appeared_last_shape"))
    gone = [o for o in objects if o.last < num_frames - 1]
    if len(gone) == 1:
        qs.append(Question("what color is the shape that disappeared ?", gone[0].color, "disappeared_color"))
    shape = objects[int(rng.integers(len(objects)))].shape if rng.random() < 0.8 else \
        SHAPES[int(rng.integers(len(SHAPES)))]
    frames_with = int(sum(any(visible[t, i] and o.shape == shape for i, o in enumerate(objects))
                          for t in range(num_frames)))
    qs.append(Question(f"how many frames show a {shape} ?", NUMBER_WORDS[frames_with], "frames_with_shape"))
    movers = [o for o in objects if o.direction]
    if movers:
        o = movers[int(rng.integers(len(movers)))]
        qs.append(Question(f"which way does the {o.name} move ?", o.direction, "direction"))
    qs.append(Question("how many shapes are in the video ?", NUMBER_WORDS[len(objects)], "video_count"))
    present = {(o.color, o.shape) for o in objects}
    o = objects[int(rng.integers(len(objects)))]
    qs.append(Question(f"is there a {o.name} in the video ?", "yes", "video_exists"))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    qs.append(Question(f"is there a {c} {s} in the video ?", "no", "video_exists"))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order]


# -- datasets -----------------------------------------------------------------------------------------------


def image_samples(split: str, count: int, start: int = 0, **kwargs):
    """Samples ``start .. start+count-1`` of ``split`` (a generator: nothing is held in memory)."""
    for index in range(start, start + count):
        yield make_image_sample(split, index, **kwargs)


def video_samples(split: str, count: int, start: int = 0, **kwargs):
    for index in range(start, start + count):
        yield make_video_sample(split, index, **kwargs)


def vocabulary() -> list[str]:
    """Every word a question or answer can contain, in a fixed order (the default model's tokenizer uses it)."""
    words = ["what", "color", "is", "the", "shape", "at", "how", "many", "shapes", "are", "there", "of", "left",
             "above", "letter", "shown", "a", "in", "video", "that", "appeared", "last", "disappeared", "frames",
             "show", "which", "way", "does", "move", "?", "yes", "no"]
    words += list(COLORS) + list(SHAPES) + [PLURALS[s] for s in SHAPES] + list(LETTERS) + list(NUMBER_WORDS)
    words += [w for cell in CELLS for w in cell.split()] + list(DIRECTIONS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)
