"""Image input: one loader for every entry point (``vtc run``, the demo, the lmms-eval plugin, video frames).

    image = load_image("photo.png")        # a path, bytes, a binary file object or a PIL image -> RGB PIL image
    image = to_rgb(pil_image)              # an image already open, in any mode -> RGB PIL image

Why: ``Image.open(path).convert("RGB")`` is wrong for several common files -- a 16-bit PNG (mode ``I;16``) comes
out all white, a phone photo ignores its EXIF rotation, a transparent logo gets whatever colour hides under its
transparent pixels -- and the model then answers confidently about a picture the user never sent. The rules:

* **EXIF orientation** is applied (``ImageOps.exif_transpose``), so the model sees what an image viewer shows.
* **High bit depth** -- ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit unsigned), ``I`` (32-bit signed) and
  ``F`` (32-bit float) -- is scaled to 8 bits by the data's **real range**: ``(x - min) * 255 / (max - min)``,
  rounded, with ``min`` / ``max`` over the image's finite values. Nothing is clipped, so a 12-bit camera image
  (values 0..4095 in a 16-bit file) uses the whole 0..255 range instead of being nearly black (``/257``), or white
  (``convert``'s clipping). An image that uses the full 0..65535 range maps exactly like ``/257``
  (``v * 257 -> v``). A **constant** image has no range to stretch: it maps by its mode's nominal range, clipped
  (``I;16*`` and ``I``: 0..65535, ``F``: 0..1), so an all-zero image stays black and an all-65535 one white.
  Non-finite floats: NaN and -inf become 0, +inf 255.
* **Transparency** (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, ``P`` / ``L`` / ``RGB`` with a
  ``transparency`` key) is composited **on white**: transparent logos, icons, diagrams and scans are drawn for
  light pages (a browser shows them on white), and dropping alpha instead shows whatever colour the transparent
  pixels happen to hold -- often black, which hides black text. transformers' own ``convert_rgb`` also uses white.
* ``P`` (palette) via its palette, ``1`` (bilevel) as 0 / 255, ``L`` as grey, ``CMYK`` / ``YCbCr`` / ``RGBX`` /
  ``HSV`` by PIL's conversion; anything PIL cannot convert raises ``ValueError`` naming the mode.
* **Animated** images (GIF, APNG, WebP with more than one frame) give their **first frame**, with an
  ``AnimatedImageWarning`` (once per image) saying that the file can be passed as a video instead. Callers that
  show notes themselves (the demo) pass ``notes=[]`` and get the text there instead of a warning.

This module imports only PIL and numpy (no model library).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["AnimatedImageWarning", "load_image", "to_rgb", "WHITE"]

#: background that transparent pixels are composited on
WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_NOMINAL = {"F": (0.0, 1.0)}  # constant images: the value's place in this range (default 0..65535)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class AnimatedImageWarning(UserWarning):
    """An animated image was given where one picture is expected: its first frame is used."""


def _note(notes: list | None, text: str) -> None:
    if notes is None:
        warnings.warn(text, AnimatedImageWarning, stacklevel=3)
    else:
        notes.append(text)


def _scale_real_range(image: Image.Image) -> Image.Image:
    """A high-bit-depth single-channel image as 8-bit grey, stretched linearly over the data's real range."""
    data = np.asarray(image).astype(np.float64)
    finite = np.isfinite(data)
    if finite.any():
        low, high = float(data[finite].min()), float(data[finite].max())
    else:
        low = high = 0.0
    if high > low:
        scaled = (data - low) * (255.0 / (high - low))
    else:  # constant: no contrast to stretch; its place in the mode's nominal range
        lo, hi = _NOMINAL.get(image.mode, (0.0, 65535.0))
        scaled = np.full_like(data, (min(max(low, lo), hi) - lo) * 255.0 / (hi - lo))
    scaled = np.where(np.isnan(data), 0.0, scaled)
    scaled = np.where(np.isposinf(data), 255.0, np.where(np.isneginf(data), 0.0, scaled))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, *, notes: list | None = None, name: str | None = None) -> Image.Image:
    """``image`` (a PIL image in any mode) as an RGB image, by the rules in the module docstring.

    Returns ``image`` itself when it is already a still RGB image without an EXIF rotation, else a new image (an
    animated image is first moved to its first frame). ``notes``: a list to append notes to (an animated image)
    instead of issuing warnings; ``name``: how notes refer to the image (default: its file name, if any).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}; use load_image for files and paths")
    if getattr(image, "n_frames", 1) > 1:
        label = name or os.path.basename(getattr(image, "filename", "") or "") or "the image"
        _note(notes, f"{label} is animated ({image.n_frames} frames): only its first frame is used; pass it as a "
                     "video (e.g. converted to MP4) to use every frame")
        image.seek(0)
    image.load()  # a truncated or corrupt file fails here, as an OSError
    try:
        image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
        mode = image.mode
        if mode == "RGB" and "transparency" not in image.info:
            return image
        if mode in _SIXTEEN_BIT or mode in ("I", "F"):
            return _scale_real_range(image).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _on_white(image)
        if mode == "1":
            return image.convert("L").convert("RGB")  # bilevel: 0 / 255
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB ({exc}); save it as an 8-bit "
                         "PNG or JPEG") from exc


def load_image(source: Any, *, notes: list | None = None) -> Image.Image:
    """An RGB image from a path (``str`` / ``os.PathLike``), ``bytes``, a binary file object or a PIL image.

    The pixels are read completely (the file is closed on return). Raises ``FileNotFoundError`` /
    ``IsADirectoryError`` for a bad path and ``ValueError`` for data that is not an image PIL can read (or
    convert); see ``to_rgb`` for ``notes`` and the conversion rules.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, notes=notes)
    name = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path!r} (check the path)")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path!r} is a folder; pass the path of one image file")
        source, name = path, os.path.basename(path)
    elif not hasattr(source, "read"):
        raise TypeError(f"an image must be a path, bytes, a binary file object or a PIL image, got "
                        f"{type(source).__name__}")
    try:
        with Image.open(source) as image:
            rgb = to_rgb(image, notes=notes, name=name)
            return rgb.copy() if rgb is image else rgb  # the file's image is unusable once it is closed
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name or 'the image'} is too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, EOFError) as exc:  # UnidentifiedImageError is an OSError; truncated files too
        what = repr(name) if name else "the data"
        raise ValueError(f"{what} is not an image PIL can read ({exc}); pass a PNG, JPEG, WebP, BMP, TIFF or GIF "
                         "file") from exc
