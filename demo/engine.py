"""The demo's engine: uploads, models, one request with and without compression. Pure Python (no Gradio).

Why a separate layer: everything that can go wrong for a user (a bad upload, a budget, an unknown option, a model
that does not load) and everything that must be safe between users (one model instance, mutated in place by
``vtc.apply``) lives here, where it is unit-tested without a browser; ``vtc.demo.app`` only lays it out.

* ``load_media`` accepts an image or a video file and rejects anything else, files over ``Limits.max_bytes`` and
  videos longer than ``Limits.max_video_seconds`` / ``max_source_frames``, with a message saying what is accepted.
* ``Engine`` serves an allowlist of models (``models``; default: the embedded model), each checked at start with
  ``preflight.resolve_model_ref`` (a missing folder or an unreachable hub id fails there, not in a request). Any
  other reference is refused at once, without touching the file system or the network, unless
  ``allow_any_model`` (for a loopback host only: ``check_host``). Labels never show server paths (a folder's base
  name).
* ``Engine.model`` loads a model once and keeps the last few in an LRU; each has a lock held for the whole
  apply -> generate -> read selection -> remove sequence, so two users' selections never cross. A model is loaded
  in a background thread of its own (``Engine.load``), never in a request's slot: requests for it wait for that one
  load (``Engine.wait_for_model`` without holding a thread), each other request goes on, and a load that takes
  longer than ``load_timeout`` fails its waiters with one message. Failed loads are not cached (the next request
  tries again).
* ``Engine.run`` answers a question with all visual tokens and with one or two compressors, and returns what each
  kept (drawn on the model's real token geometry), visual tokens in -> out, time to first token (a median of
  ``timing_runs`` runs that take turns between the variants) and FLOPs. The
  question, budgets, compressor names and options (names and types) are checked before a model is loaded; words of
  the question the model does not know are returned as ``Result.notes`` for the status box.
* Images are read by ``vtc.image_io`` (EXIF orientation, 16-bit / float scaled by their real range, transparency
  on white); an animated image gives its first frame and a note in ``Media.notes``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import pathlib
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

import vtc
from vtc.eval.default_model import synthetic
from vtc.eval.measure import FirstTokenClock
from vtc.options import parse_literal
from vtc.image_io import to_rgb
from vtc.integrations.transformers.default import unknown_words_message
from vtc.integrations.transformers.flops import request_flops
from vtc.integrations.transformers.geometry import image_token_boxes, video_token_boxes
from vtc.integrations.transformers.preflight import check_request, coerce_request_options

from . import render

log = logging.getLogger(__name__)

MB = 2**20
#: video containers accepted (FFmpeg demuxer names); FFmpeg also "opens" text files (tty) and images (image2)
VIDEO_FORMATS = frozenset({"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpeg", "mpegts",
                           "flv", "ogg", "asf", "h264", "hevc", "m4v", "mpegvideo", "gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv",
                            ".ogv", ".wmv", ".3gp"})
EMBEDDED = "embedded default"
STRIP_COLUMNS = 4  # frames per row of a strip: 8 frames stay readable in a third of the page


class DemoError(Exception):
    """Something the user can fix (upload, question, budget, option, model); the message is shown as it is."""


@dataclass(frozen=True)
class Limits:
    """What the demo accepts; a public server needs bounds on upload size and decoding work."""

    max_bytes: int = 25 * MB
    max_video_seconds: float = 600.0
    max_source_frames: int = 36_000  # 10 minutes at 60 fps
    max_frames: int = 32  # frames sampled from a video for the model
    max_image_pixels: int = 50_000_000
    max_new_tokens: int = 64


@dataclass
class Media:
    """One validated upload: an image (one frame) or the frames sampled from a video."""

    kind: str  # "image" or "video"
    frames: list[Image.Image]
    name: str
    sha256: str
    timestamps: list[float] | None = None  # video: seconds of each sampled frame
    duration: float | None = None  # video: seconds
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. an animation's first frame)

    @property
    def image(self) -> Image.Image:
        return self.frames[0]


@dataclass(frozen=True)
class Example:
    """A bundled held-out sample of the synthetic test split, with its known answers."""

    label: str
    kind: str
    path: str
    question: str
    answer: str
    answers: dict[str, str]  # every question of the sample -> its answer


@dataclass(frozen=True)
class Spec:
    """One compressor as the user configured it: name, budget (text or value) and options (text or dict)."""

    compressor: str
    budget: str | int | float = "0.25"
    options: str | dict = ""


@dataclass
class FrameInfo:
    """One frame of a video as the LLM received it: its budget, score and kept tokens."""

    frame: int
    tokens: int
    kept: int
    budget: int | None = None
    score: float | None = None
    timestamp: float | None = None


@dataclass
class RunResult:
    """One answer: with all visual tokens (``compressor is None``) or with one compressor."""

    label: str
    compressor: str | None
    budget: int | float | None  # as the user gave it (parsed)
    options: dict
    answer: str
    visual_in: int  # visual placeholder tokens of the prompt
    visual_out: int  # visual tokens the LLM received (AnyRes: kept newlines included)
    kept: int  # visual tokens kept, newlines excluded (== the resolved budget)
    budget_tokens: int  # the resolved budget in tokens (visual_in for all tokens)
    prefill_seconds: float | None  # time to first token: the median of ``timing_runs`` runs (see ``Engine.run``)
    generate_seconds: float
    flops: int  # analytic prefill FLOPs (vtc.flops)
    picture: Image.Image  # the overlay (image) or the frame strip (video)
    frames: list[FrameInfo] = field(default_factory=list)
    selections: list = field(default_factory=list)  # vtc.ImageSelection records
    videos: list = field(default_factory=list)  # vtc.video.VideoRecord records
    positions: str | None = None  # the position mode of the run (``vtc.position_modes``); None for all tokens
    title: str = ""  # what the picture shows: "cls_attention @ 25 % → 49 tokens", "all 196 tokens"
    timing_runs: int = 1  # runs behind ``prefill_seconds``


@dataclass
class Result:
    kind: str
    media_name: str
    question: str
    expected: str | None  # the known answer of a bundled example, else None
    model_label: str
    baseline: RunResult
    runs: list[RunResult]
    notes: list[str] = field(default_factory=list)  # warnings for the status box (words the model does not know)

    @property
    def all_runs(self) -> list[RunResult]:
        return [self.baseline, *self.runs]


@dataclass
class Loading:
    """One model load in progress (``Engine.load``): every request for the model waits on ``future``, until
    ``started + timeout`` (monotonic seconds)."""

    key: str
    label: str
    started: float
    timeout: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def remaining(self) -> float:
        return max(0.0, self.started + self.timeout - time.monotonic())

    def timed_out(self) -> "DemoError":
        return DemoError(f"model {self.label} did not load within {self.timeout:g} s (the demo's time limit; a "
                         "large download or a slow disk); it goes on loading in the background: try again in a "
                         "few minutes, or choose another model")


@dataclass
class LoadedModel:
    key: str
    label: str
    model: Any
    processor: Any
    video_input: bool  # the family takes pixel_values_videos (else a video goes in as images_as_video)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ------------------------------------------------------------------------------------------------- uploads


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_image(path: str, name: str, limits: Limits, notes: list[str]) -> Image.Image | None:
    """The file as an RGB image (``vtc.image_io.to_rgb``: EXIF orientation, 16-bit and float images scaled by their
    real range, transparency on white, an animation's first frame with a note in ``notes``), or ``None`` when PIL
    does not recognise it as an image."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise DemoError(f"{name} is {image.width}x{image.height} pixels; the demo accepts images of at most "
                                f"{limits.max_image_pixels / 1e6:.0f} megapixels")
            rgb = to_rgb(image, notes=notes, name=name)
            return rgb.copy() if rgb is image else rgb  # the file's image is unusable once it is closed
    except Image.DecompressionBombError as exc:
        raise DemoError(f"{name} is too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError):  # UnidentifiedImageError is an OSError
        return None


def _not_media(name: str) -> DemoError:
    return DemoError(f"{name} is neither an image nor a video; upload an image (PNG, JPEG, WebP, ...) or a video "
                     f"(MP4, WebM, MOV, MKV, AVI)")


def _looks_like_video(path: str) -> bool:
    """Whether the file starts like a video container (MP4 / MOV ``ftyp``-style boxes, Matroska / WebM, AVI, FLV,
    MPEG-TS / PS): such a file that FFmpeg cannot open is a damaged video, not some other kind of file."""
    with open(path, "rb") as handle:
        head = handle.read(189)
    transport_stream = len(head) == 189 and head[0] == head[188] == 0x47  # a sync byte every 188 bytes
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip") or head[:4] == b"\x1a\x45\xdf\xa3"
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ") or head[:3] == b"FLV" or transport_stream
            or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"))


def _damaged_video(name: str, exc: Exception) -> DemoError:
    reason = " ".join(str(exc).split())[:120] or type(exc).__name__
    return DemoError(f"{name} looks like a video but cannot be read -- the file may be truncated or damaged "
                     f"({reason}); upload it again or re-encode it")


def _duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 120 else f"{seconds / 60:.3g} min"


def _too_long(name: str, seconds: float | None, frames: int | None, limits: Limits) -> DemoError | None:
    if seconds is not None and seconds > limits.max_video_seconds:
        return DemoError(f"{name} is {_duration(seconds)} long; the demo accepts videos of at most "
                         f"{_duration(limits.max_video_seconds)}")
    if frames is not None and frames > limits.max_source_frames:
        return DemoError(f"{name} has {frames} frames; the demo accepts videos of at most {limits.max_source_frames} "
                         "frames")
    return None


def _probe_video(path: str, name: str) -> tuple[float | None, int | None] | None:
    """Duration and frame count from the container, without decoding (``None`` without PyAV)."""
    try:
        import av
    except ImportError:
        if pathlib.Path(name).suffix.lower() not in VIDEO_SUFFIXES:
            raise _not_media(name) from None
        return None
    try:
        with av.open(path) as container:
            if not set(container.format.name.split(",")) & VIDEO_FORMATS or not container.streams.video:
                raise _not_media(name)
            stream = container.streams.video[0]
            seconds = None
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            frames = int(stream.frames or 0) or None
            if frames is None and seconds and stream.average_rate:
                frames = round(seconds * float(stream.average_rate))
            return seconds, frames
    except DemoError:
        raise
    except Exception as exc:  # av.error.FFmpegError and its subclasses: not a container FFmpeg can read
        if _looks_like_video(path):
            raise _damaged_video(name, exc) from exc
        raise _not_media(name) from exc


def load_media(path, *, num_frames: int = 8, limits: Limits = Limits(), name: str | None = None) -> Media:
    """Validate and decode an upload: an image, or ``num_frames`` frames sampled uniformly from a video.

    Raises ``DemoError`` with what is accepted for a missing or empty file, a file over ``limits.max_bytes``,
    anything that is neither an image nor a video, and videos over the duration / frame limits (checked on the
    container before any frame is decoded, and again on what the decoder reports).
    """
    if not path:
        raise DemoError("upload an image or a video, or pick one of the examples")
    path = os.fspath(path)
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise DemoError(f"{name}: file not found")
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise DemoError(f"{name} is {size / MB:.1f} MB; the demo accepts files of at most "
                        f"{limits.max_bytes / MB:g} MB")
    if size == 0:
        raise DemoError(f"{name} is empty (0 bytes)")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= limits.max_frames:
        raise DemoError(f"frames per video must be an integer from 1 to {limits.max_frames}, got {num_frames!r}")
    digest = _sha256(path)
    notes: list[str] = []
    image = _open_image(path, name, limits, notes)
    if image is not None:
        return Media("image", [image], name, digest, notes=notes)
    probed = _probe_video(path, name)
    if probed is not None and (error := _too_long(name, *probed, limits)):
        raise error
    try:
        clip = vtc.video_io.load_video(path, num_frames=num_frames)
    except ImportError as exc:
        raise DemoError(f"{name}: reading videos needs a decoder; install one with `pip install av`") from exc
    except (ValueError, OSError) as exc:
        if _looks_like_video(path):
            raise _damaged_video(name, exc) from exc
        raise DemoError(f"{name} could not be read as a video: {exc}") from exc
    if error := _too_long(name, clip.duration, clip.num_source_frames, limits):
        raise error
    return Media("video", list(clip.frames), name, digest, list(clip.timestamps), clip.duration)


# ------------------------------------------------------------------------------------------------- examples


def write_video(frames: Sequence[Image.Image], path, fps: float) -> None:
    """Lossless H.264 in YUV 4:4:4 (crf 0; RGB comes back within 1), so the model sees what the data drew."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        for frame in frames:
            array = np.asarray(to_rgb(frame))
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _pick(questions, kinds: Sequence[str]):
    for kind in kinds:
        for q in questions:
            if q.kind == kind:
                return q
    return questions[0]


def _atomic(path: pathlib.Path, write) -> None:
    """Write through a temporary file and rename, so concurrent starts never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_examples(folder=None) -> list[Example]:
    """Two held-out test images and one 8-frame test video of ``vtc.eval.default_model.synthetic``, with their known
    answers.

    Deterministic (the test split is a pure function of the index), written to ``folder`` (default: a folder in
    the system temp dir). The video needs PyAV; without it only the images are offered.
    """
    if folder is not None:
        root = pathlib.Path(folder)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = pathlib.Path(tempfile.gettempdir()) / "vtc-demo-examples"
        try:
            root.mkdir(exist_ok=True)
            if not os.access(root, os.W_OK):
                raise PermissionError(root)
        except OSError:  # another user's folder on a shared machine: a private one instead
            root = pathlib.Path(tempfile.mkdtemp(prefix="vtc-demo-examples-"))
    examples = []
    for index, kinds in ((0, ("count", "color_at")), (1, ("color_at", "count"))):
        sample = synthetic.make_image_sample("test", index)
        path = root / f"shapes_test_image_{index}.png"
        _atomic(path, lambda p, s=sample: s.image.save(p, format="PNG"))
        q = _pick(sample.questions, kinds)
        examples.append(Example(f"image {index + 1} (held-out test image #{index})", "image", str(path), q.text,
                                q.answer, {x.text: x.answer for x in sample.questions}))
    if importlib.util.find_spec("av") is None:
        log.warning("PyAV is not installed: the bundled video example is left out (pip install av)")
        return examples
    video = synthetic.make_video_sample("test", 0, num_frames=8)
    path = root / "shapes_test_video_0.mp4"
    _atomic(path, lambda p: write_video(video.frames, p, video.fps))
    q = _pick(video.questions, ("video_count", "disappeared_color"))
    examples.append(Example("video (held-out test video #0, 8 frames)", "video", str(path), q.text, q.answer,
                            {x.text: x.answer for x in video.questions}))
    return examples


# ------------------------------------------------------------------------------------------------- options


def _split_items(text: str) -> list[str]:
    """Split ``a=1, b=[1, 2]`` on commas and newlines outside brackets and quotes."""
    items, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch in ",\n;" and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _value(text: str):
    value = parse_literal(text)
    if value is not text:
        return value
    lowered = text.lower()
    if lowered in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(lowered)
    return text  # a bare word: a string option (mode=sample, allocation=hired)


def parse_options(text) -> dict:
    """Compressor / integration options from the UI: a JSON object, or ``key=value`` items separated by commas,
    semicolons or newlines (values read as JSON, then Python literals, else as plain strings). Whether a key is a
    valid option is for ``vtc.apply`` to say, in its own words."""
    if isinstance(text, dict):
        return dict(text)
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise DemoError(f"options are not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise DemoError("options must be a JSON object such as {\"seed\": 1}")
        return value
    options = {}
    for item in _split_items(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise DemoError(f"cannot read option {item!r}: write key=value (e.g. seed=1, mode=sample), or a JSON "
                            "object")
        options[key] = _value(value.strip())
    return options


@dataclass
class _Parsed:
    slot: str
    compressor: str
    budget: int | float
    options: dict


def _parse_spec(spec: Spec, slot: str) -> _Parsed:
    name = (spec.compressor or "").strip()
    if not name:
        raise DemoError(f"compressor {slot}: choose a compressor")
    try:
        budget = vtc.parse_budget(spec.budget.strip()) if isinstance(spec.budget, str) else \
            vtc.validate_budget(spec.budget)
    except (ValueError, TypeError) as exc:
        raise DemoError(f"budget {slot}: {exc}") from exc
    try:
        options = parse_options(spec.options)
    except DemoError as exc:
        raise DemoError(f"options {slot}: {exc}") from exc
    if "budget" in options:
        raise DemoError(f"options {slot}: set the budget in the budget box, not as an option")
    return _Parsed(slot, name, budget, options)


# ------------------------------------------------------------------------------------------------- the engine


def _load_model(ref: str | None):
    """``((model, processor), label)`` through ``vtc.cli._load`` (embedded default, local folder or hub id; a
    missing folder or an unreachable hub id fails within seconds: ``preflight.resolve_model_ref``)."""
    from vtc.cli import _load

    try:
        return _load(ref)
    except SystemExit as exc:  # _load reports a model that does not load this way, with the fix
        raise DemoError(str(exc).removeprefix("error: ")) from None


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.1 and the rest of 127/8, ::1, localhost)."""
    host = (host or "").strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str | None, allow_any_model: bool, share: bool = False) -> None:
    """``DemoError`` when ``allow_any_model`` would let people on the network name any server path or hub id:
    a host other than a loopback address, or a public share link."""
    if not allow_any_model:
        return
    if share:
        raise DemoError("--allow-any-model cannot be combined with a public share link: any visitor could load any "
                        "folder or hub id on this server; list the models to serve with --model instead")
    if not is_loopback(host):
        raise DemoError(f"--allow-any-model is only allowed on a loopback host (127.0.0.1, ::1 or localhost), not "
                        f"{host!r}: on a network address any visitor could load any folder or hub id on this server; "
                        "list the models to serve with --model instead")


def _is_embedded(ref) -> bool:
    return ref is None or (isinstance(ref, str) and ref.strip() in ("", EMBEDDED))


def _key_of(ref) -> str:
    return EMBEDDED if _is_embedded(ref) else ref.strip()


def model_label(ref: str | None, source: str | None = None) -> str:
    """What the page shows for a model: the embedded model's name, a folder's base name (never its absolute path),
    or a hub id as it is."""
    if _is_embedded(ref):
        from vtc.integrations.transformers.default import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    ref = ref.strip()
    if source == "folder" or (source is None and os.path.isdir(os.path.expanduser(ref))):
        return os.path.basename(os.path.normpath(os.path.expanduser(ref))) or ref
    return ref


def check_models(refs: Sequence[str | None]) -> dict[str, str]:
    """``{key: label}`` for the allowlist, in order, after resolving each reference
    (``preflight.resolve_model_ref``): a missing folder or an unreachable hub id raises ``DemoError`` now."""
    from vtc.integrations.transformers.preflight import ModelNotFoundError, resolve_model_ref

    labels: dict[str, str] = {}
    for ref in refs:
        key = _key_of(ref)
        if key in labels:
            continue
        if key == EMBEDDED:
            label = model_label(None)
        else:
            try:
                resolved = resolve_model_ref(key)
            except ModelNotFoundError as exc:
                raise DemoError(str(exc)) from None
            if resolved.note:
                log.warning("%s", resolved.note)
            label = model_label(key, resolved.source)
        base, n = label, 2
        while label in labels.values():  # two folders with one base name: both stay selectable
            label, n = f"{base} ({n})", n + 1
        labels[key] = label
    return labels


class Engine:
    """Models (an LRU of ``cache_size``, each loaded once, each with its own lock) and requests on them.

    ``models``: the references this engine serves (local folders, hub ids; ``None`` is the embedded default
    model), checked now with ``preflight.resolve_model_ref``; default ``[default_model]``. ``default_model``: the
    one used when a request names none (default: the first of ``models``). A request may name a model by its label
    (``labels``) or its reference; anything else is refused at once, unless ``allow_any_model`` (serve that only on
    a loopback host: ``check_host``). ``load_timeout``: seconds a model load may take before its waiters get an
    error (the load itself cannot be stopped; it is cached if it finishes later). ``timing_runs``: runs behind each
    time to first token a request reports (their median; ``Engine.run``). ``loader(ref) -> ((model, processor),
    label)`` is injectable for tests.
    """

    def __init__(self, default_model: str | None = None, *, models: Sequence[str | None] | None = None,
                 allow_any_model: bool = False, cache_size: int = 2, limits: Limits = Limits(), examples_dir=None,
                 loader=None, load_timeout: float = 600.0, timing_runs: int = 3):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if not load_timeout > 0:
            raise ValueError(f"load_timeout must be > 0 seconds, got {load_timeout}")
        if isinstance(timing_runs, bool) or not isinstance(timing_runs, int) or timing_runs < 1:
            raise ValueError(f"timing_runs must be an int >= 1, got {timing_runs!r}")
        refs = list(models) if models else [default_model]
        if default_model is not None and _key_of(default_model) not in map(_key_of, refs):
            refs.insert(0, default_model)
        #: ``{key: label}`` of the served models, in order (key: the reference, or ``EMBEDDED``)
        self.labels = check_models(refs)
        self._by_label = {label: key for key, label in self.labels.items()}
        default_key = next(iter(self.labels)) if default_model is None else _key_of(default_model)
        self.default_model = None if default_key == EMBEDDED else default_key
        self.allow_any_model = bool(allow_any_model)
        self.cache_size = cache_size
        self.load_timeout = float(load_timeout)
        self.timing_runs = timing_runs
        self.limits = limits
        self.loads = 0  # models loaded so far (cache misses)
        self._loader = loader or _load_model
        self._cache: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._loading: dict[str, Loading] = {}
        self.examples = write_examples(examples_dir)
        self._example_by_hash = {_sha256(e.path): e for e in self.examples}

    # -- models ---------------------------------------------------------------------------------------------
    @property
    def default_label(self) -> str:
        return self.labels[self.default_model or EMBEDDED]

    def _key(self, ref: str | None) -> str:
        """The served model a request names (its label or reference; empty: the default). Anything else raises
        ``DemoError`` at once -- the message names only the served models, never what was typed."""
        ref = (ref or "").strip()
        if not ref:
            return self.default_model or EMBEDDED
        if ref in self._by_label:
            return self._by_label[ref]
        key = EMBEDDED if ref == EMBEDDED else ref
        if key in self.labels or self.allow_any_model:
            return key
        raise DemoError("model not available: this demo serves only: " + ", ".join(self.labels.values()))

    def load(self, ref: str | None = None) -> LoadedModel | Loading:
        """The loaded model for ``ref`` if it is cached, else its load in progress -- started now in a thread of its
        own, or the one already running (concurrent requests share one load). Never blocks on a load."""
        key = self._key(ref)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if key in self._loading:
                return self._loading[key]
            loading = Loading(key, self.labels.get(key) or model_label(key), time.monotonic(), self.load_timeout)
            loading.future.set_running_or_notify_cancel()  # a waiter that gives up cannot cancel it for the rest
            self._loading[key] = loading
        threading.Thread(target=self._load_in_background, args=(loading,), name=f"vtc-demo-load-{loading.label}",
                         daemon=True).start()  # daemon: a load that never ends does not keep the server alive
        return loading

    def _load_in_background(self, loading: Loading) -> None:
        try:
            entry = self._load(loading.key)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter; not cached: the next request retries
            with self._cache_lock:
                if self._loading.get(loading.key) is loading:
                    del self._loading[loading.key]
            loading.future.set_exception(exc)
            return
        with self._cache_lock:  # cached and no longer loading in one step: nobody starts a second load
            self._cache[loading.key] = entry
            self._cache.move_to_end(loading.key)
            if self._loading.get(loading.key) is loading:
                del self._loading[loading.key]
            self.loads += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # a request still holding it finishes on its own reference
        loading.future.set_result(entry)

    def model(self, ref: str | None = None) -> LoadedModel:
        """The loaded model for ``ref``: cached, or waited for (``load``) until the load's time limit, after which
        ``DemoError`` says so. Blocks the calling thread; request handlers await ``wait_for_model`` first."""
        got = self.load(ref)
        if isinstance(got, LoadedModel):
            return got
        try:
            return got.future.result(timeout=got.remaining())
        except concurrent.futures.TimeoutError:
            raise got.timed_out() from None

    async def wait_for_model(self, ref: str | None = None) -> LoadedModel:
        """``model`` for an event loop: waits for the load without holding a thread or a request slot."""
        got = self.load(ref)
        if isinstance(got, LoadedModel):
            return got
        try:  # the load's future cannot be cancelled (it is running): giving up here leaves it to the others
            return await asyncio.wait_for(asyncio.wrap_future(got.future), got.remaining())
        except asyncio.TimeoutError:
            raise got.timed_out() from None

    def cached_models(self) -> list[str]:
        with self._cache_lock:
            return list(self._cache)

    def _load(self, key: str) -> LoadedModel:
        from vtc.integrations.transformers.adapter import adapter_for

        label = self.labels.get(key) or model_label(key)  # never an absolute server path
        try:
            (model, processor), _ = self._loader(None if key == EMBEDDED else key)
        except DemoError as exc:  # name the model by its label, not by the server path it was loaded from
            message = str(exc)
            for path in {key, os.path.expanduser(key), os.path.abspath(os.path.expanduser(key))} - {EMBEDDED}:
                message = message.replace(path, label)
            raise DemoError(message) from None
        try:
            adapter = adapter_for(model)
        except TypeError as exc:
            raise DemoError(f"{label}: {exc}") from None
        video_input = adapter.supports_video and adapter.video_token_id() is not None
        entry = LoadedModel(key, label, model, processor, video_input)
        # one throw-away answer, so the first user's time to first token is not the model's first call
        blank = Media("image", [Image.new("RGB", (224, 224), (128, 128, 128))], "warm-up", "")
        try:
            _generate(entry, _build_inputs(entry, blank, "warm up"), 1)
        except Exception:  # noqa: BLE001 - a model that cannot answer says so on the first real request
            log.warning("warming up %s failed", label, exc_info=True)
        return entry

    # -- examples -------------------------------------------------------------------------------------------
    def example_for(self, media: Media) -> Example | None:
        """The bundled example this upload is (by content, so a re-uploaded example file counts)."""
        return self._example_by_hash.get(media.sha256)

    def expected_answer(self, media: Media, question: str) -> str | None:
        example = self.example_for(media)
        return None if example is None else example.answers.get((question or "").strip())

    def load_media(self, path, num_frames: int = 8, name: str | None = None) -> Media:
        return load_media(path, num_frames=num_frames, limits=self.limits, name=name)

    def preview(self, media: Media) -> Image.Image:
        """The input as the "all tokens" column shows it before a run."""
        if media.kind == "image":
            return render.plain(media.image)
        return render.frame_strip(media.frames, [_frame_caption(t, media, None) for t in range(len(media.frames))],
                                  columns=STRIP_COLUMNS)

    # -- requests -------------------------------------------------------------------------------------------
    def check(self, question: str, specs: Sequence[Spec], max_new_tokens: int = 8) -> list[_Parsed]:
        """The question, budgets, compressor names and options (names and types) checked without a model:
        ``DemoError`` for the first problem, so a typo is reported before anyone waits for a model to load."""
        question = (question or "").strip()
        if not question:
            raise DemoError("type a question")
        if not specs:
            raise DemoError("choose a compressor")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise DemoError(f"max new tokens must be an integer from 1 to {self.limits.max_new_tokens}")
        parsed = [_parse_spec(spec, chr(ord("A") + i)) for i, spec in enumerate(specs)]
        for p in parsed:  # compressor names, options and their types: before a model is loaded (or waited for)
            try:
                p.options = coerce_request_options(p.compressor, p.options)
                check_request(p.compressor, p.budget, p.options)
            except (ValueError, TypeError) as exc:
                raise DemoError(f"compressor {p.slot} ({p.compressor}): {exc}") from exc
        return parsed

    def run(self, media: Media, question: str, specs: Sequence[Spec], *, model: str | None = None,
            max_new_tokens: int = 8) -> Result:
        """Answer ``question`` about ``media`` with all tokens and with each of ``specs`` (one or two compressors)."""
        parsed = self.check(question, specs, max_new_tokens)
        question = question.strip()
        entry = self.model(model)
        notes = list(media.notes)
        if (unknown := unknown_words_message(entry.processor, question)) is not None:
            notes.append(unknown)
        inputs = _build_inputs(entry, media, question)
        with entry.lock:  # vtc.apply mutates this model instance: nobody else may use it until remove
            vtc.remove(entry.model)
            for p in parsed:  # vtc's own errors (unknown compressor / option, bad layer) before any generate
                try:
                    vtc.apply(entry.model, p.compressor, budget=p.budget, **_apply_options(entry, media, p))
                except (ValueError, TypeError) as exc:
                    raise DemoError(f"compressor {p.slot} ({p.compressor}): {exc}") from exc
                finally:
                    vtc.remove(entry.model)
            base = _generate(entry, inputs, max_new_tokens)
            outcomes = []
            for p in parsed:
                vtc.apply(entry.model, p.compressor, budget=p.budget, **_apply_options(entry, media, p))
                try:
                    gen = _generate(entry, inputs, max_new_tokens)
                    records = (vtc.last_selection(entry.model), vtc.last_video_selection(entry.model),
                               vtc.last_prompt_lengths(entry.model), vtc.position_modes(entry.model)[0])
                except (ValueError, TypeError) as exc:  # vtc explains inputs it cannot compress
                    raise DemoError(f"compressor {p.slot} ({p.compressor}): {exc}") from exc
                finally:
                    vtc.remove(entry.model)
                outcomes.append((p, gen, records))
            firsts = self._time_first_token(entry, media, inputs, parsed, [base[1]] + [g[1] for _, g, _ in outcomes])
        base = (base[0], firsts[0], base[2])
        outcomes = [(p, (g[0], first, g[2]), records) for (p, g, records), first in zip(outcomes, firsts[1:])]
        # outside the lock: FLOPs and drawing read the inputs, the records and the model's config only
        result = self._result(entry, media, question, inputs, base, outcomes)
        result.notes = notes
        return result

    def _time_first_token(self, entry, media, inputs, parsed, firsts) -> list[float | None]:
        """Median time to first token of all tokens and of each compressor over ``timing_runs`` runs: the answer
        runs above count as the first, then rounds that take turns (all tokens, A, B, all tokens, ...) with one new
        token each, so that one slow moment of the machine does not decide the ratio the page prints. Runs with the
        model's lock held."""
        samples = [[] if first is None else [first] for first in firsts]
        for _ in range(self.timing_runs - 1):
            samples[0].append(_generate(entry, inputs, 1)[1])
            for j, p in enumerate(parsed, start=1):
                vtc.apply(entry.model, p.compressor, budget=p.budget, **_apply_options(entry, media, p))
                try:
                    samples[j].append(_generate(entry, inputs, 1)[1])
                finally:
                    vtc.remove(entry.model)
        return [statistics.median(s) if s and None not in s else None for s in samples]

    def _result(self, entry, media, question, inputs, base, outcomes) -> Result:
        visual_in = _visual_tokens(entry, inputs)
        boxes = _BoxCache(entry, inputs, media)
        sizes = _frame_sizes(media, outcomes)
        base_frames = [FrameInfo(t, tokens=n, kept=n, timestamp=_frame_timestamp(media, outcomes, t, len(sizes)))
                       for t, n in enumerate(sizes)]
        if media.kind == "image":  # the token grid, and the areas no token covers (center crop, padding) hatched
            picture = render.all_tokens(media.image, boxes.image(0))
        else:  # the same per frame, on the frames and token boxes the compressed strips use
            picture = _video_all_tokens(media, base_frames, outcomes, boxes)
        baseline = RunResult(
            label="all tokens", compressor=None, budget=None, options={}, answer=base[0], visual_in=visual_in,
            visual_out=visual_in, kept=visual_in, budget_tokens=visual_in, prefill_seconds=base[1],
            generate_seconds=base[2], flops=request_flops(entry.model, inputs)[0].total, picture=picture,
            frames=base_frames, title=run_title(None, None, visual_in), timing_runs=self.timing_runs)
        runs = []
        for p, (answer, first, total), (records, videos, lengths, positions) in outcomes:
            n_in, n_out = lengths[0]
            real_videos = videos if media.kind == "video" and entry.video_input else []
            kept = sum(r.num_kept_visual for r in records) + sum(v.num_kept for v in real_videos)
            budget_tokens = sum(r.budget for r in records) + sum(v.budget for v in real_videos)
            if media.kind == "image":
                record = records[0]
                picture = render.token_overlay(media.image, boxes.image(0), record.indices,
                                               record.selection.groups)
                frames = []
            else:
                picture, frames = _video_picture(media, records, videos, boxes)
            runs.append(RunResult(
                label=p.compressor, compressor=p.compressor, budget=p.budget, options=p.options, answer=answer,
                visual_in=visual_in, visual_out=visual_in - (n_in - n_out), kept=kept, budget_tokens=budget_tokens,
                prefill_seconds=first, generate_seconds=total,
                flops=request_flops(entry.model, inputs, [n for _, n in lengths])[0].total, picture=picture,
                frames=frames, selections=records, videos=videos, positions=positions,
                title=run_title(p.compressor, p.budget, kept), timing_runs=self.timing_runs))
        example = self.example_for(media)
        return Result(kind=media.kind, media_name=media.name, question=question,
                      expected=None if example is None else example.answers.get(question),
                      model_label=entry.label, baseline=baseline, runs=runs)


def _apply_options(entry: LoadedModel, media: Media, p: _Parsed) -> dict:
    options = dict(p.options)
    if media.kind == "video":
        options.setdefault("video_budget", p.budget)  # the budget of a video counts all its frames
        if not entry.video_input:
            options.setdefault("images_as_video", True)  # LLaVA-1.5-style models: the frames are images
    elif vtc.get_compressor_class(p.compressor).video_only and not entry.video_input:
        options.setdefault("images_as_video", True)  # a video method on one image: a one-frame video
    if options.get("scorer") == "self":  # QuoTA asks the model itself, which needs the processor
        options.setdefault("processor", entry.processor)
    return options


def _build_inputs(entry: LoadedModel, media: Media, question: str):
    processor = entry.processor
    text = {"type": "text", "text": question}
    if media.kind == "image":
        content, kwargs = [{"type": "image"}, text], {"images": [media.image]}
    elif entry.video_input:
        frames = np.stack([np.asarray(to_rgb(f)) for f in media.frames])
        content, kwargs = [{"type": "video"}, text], {"videos": [frames]}
    else:
        content, kwargs = [{"type": "image"} for _ in media.frames] + [text], {"images": [list(media.frames)]}
    try:
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=[prompt], return_tensors="pt", **kwargs)
    except (ValueError, TypeError) as exc:
        raise DemoError(f"{entry.label}: its processor cannot build this prompt ({exc})") from exc
    return inputs.to(entry.model.device)


def _generate(entry: LoadedModel, inputs, max_new_tokens: int) -> tuple[str, float | None, float]:
    """Greedy answer, time to first token (``FirstTokenClock``) and total generate seconds."""
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = entry.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    total = time.perf_counter() - start
    answer = entry.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    first = None if clock.first_token_at is None else clock.first_token_at - start
    return answer.strip(), first, total


def _visual_tokens(entry: LoadedModel, inputs) -> int:
    from vtc.integrations.transformers.adapter import adapter_for

    adapter = adapter_for(entry.model)
    ids = inputs["input_ids"]
    total = int((ids == adapter.image_token_id()).sum())
    if adapter.video_token_id() is not None:
        total += int((ids == adapter.video_token_id()).sum())
    return total


def _frame_sizes(media: Media, outcomes) -> list[int]:
    """Visual tokens per frame as the LLM receives them (from the first compressed run's records)."""
    if media.kind != "video" or not outcomes:
        return []
    records, videos = outcomes[0][2][:2]
    if videos:
        return [r * c for r, c in videos[0].grids]
    return [r.num_visual_tokens for r in records]


class _BoxCache:
    """Token boxes (``vtc.integrations.transformers.geometry``) per image / video of the request, computed once and
    shared by every compressor's picture. Read outside the model lock: they depend on the inputs and the config."""

    def __init__(self, entry: LoadedModel, inputs, media: Media):
        self.entry, self.inputs, self.media = entry, inputs, media
        self._images: dict[int, Any] = {}
        self._video: list | None = None

    def image(self, index: int):
        if index not in self._images:
            frame = self.media.frames[index] if self.media.kind == "video" else self.media.image
            self._images[index] = image_token_boxes(self.entry.model, self.entry.processor, self.inputs, index,
                                                    frame.size)
        return self._images[index]

    def video(self) -> list:
        """Per LLM frame of the request's one video input (the model's own video path, not images_as_video)."""
        if self._video is None:
            self._video = video_token_boxes(self.entry.model, self.entry.processor, self.inputs, 0,
                                            self.media.frames[0].size)
        return self._video


def run_title(compressor: str | None, budget, kept: int) -> str:
    """The heading of a result column: ``"cls_attention @ 25 % → 49 tokens"`` (a fraction budget),
    ``"random @ 20 tokens → 20 tokens"`` (a count), ``"all 196 tokens"`` (``compressor`` None: the baseline)."""
    if compressor is None:
        return f"all {kept} tokens"
    if isinstance(budget, float):
        spent = f"{round(budget * 100, 1):g} %"
    elif isinstance(budget, int):
        spent = f"{budget} tokens"
    else:
        spent = str(budget)
    return f"{compressor} @ {spent} → {kept} tokens"


def _frame_caption(t: int, media: Media, info: FrameInfo | None) -> str:
    stamp = info.timestamp if info is not None else (media.timestamps[t] if media.timestamps else None)
    head = f"frame {t}" + (f" · {stamp:.1f} s" if stamp is not None else "")
    if info is None:
        return head
    if info.budget is None:
        return f"{head}\n{info.tokens} tokens (all)"
    if info.budget == 0:
        return f"{head}\ndropped (budget 0)"
    # short lines: the strip is shown at about half size, so the font is large and a line holds ~16 characters
    lines = [head, f"kept {info.kept}/{info.tokens}", f"budget {info.budget}"]
    if info.score is not None:  # only frame-scoring compressors score frames: no score, no line
        lines.append(f"score {info.score:.3f}")
    return "\n".join(lines)


def _source_frame(media: Media, t: int, n: int) -> int:
    """The sampled frame shown for LLM frame ``t`` of ``n`` (Qwen fuses 2 sampled frames per LLM frame)."""
    return min(len(media.frames) - 1, t * len(media.frames) // n)


def _frame_timestamp(media: Media, outcomes, t: int, n: int) -> float | None:
    """Seconds of LLM frame ``t`` of ``n``, as the compressed strips caption it (the video record's own times, else
    the sampled frame's), so the all-tokens strip and theirs agree."""
    videos = outcomes[0][2][1] if outcomes else []
    if videos and videos[0].timestamps:
        return videos[0].timestamps[t]
    return media.timestamps[_source_frame(media, t, n)] if media.timestamps else None


def _video_all_tokens(media: Media, base_frames: list[FrameInfo], outcomes, boxes: _BoxCache) -> Image.Image:
    """The "all tokens" frame strip: each LLM frame with the model's token grid drawn and the areas it never sees
    hatched (``render.all_tokens``, as for an image), on the token boxes of the compressed runs' path (the model's
    own video input, or each frame as an image)."""
    records, videos = outcomes[0][2][:2] if outcomes else ([], [])
    n = len(base_frames)
    tiles = []
    for info in base_frames:
        source = _source_frame(media, info.frame, n)
        frame_boxes = boxes.video()[info.frame] if videos and not records else boxes.image(info.frame)
        tiles.append(render.all_tokens(media.frames[source], frame_boxes, side=256))
    return render.frame_strip(tiles, [_frame_caption(i.frame, media, i) for i in base_frames], columns=STRIP_COLUMNS)


def _video_picture(media: Media, records, videos, boxes: _BoxCache) -> tuple[Image.Image, list[FrameInfo]]:
    """The frame strip of one compressed video: each LLM frame with its kept tokens, budget and score."""
    infos, tiles = [], []
    if videos:  # a video record: frames of a real video input, or images_as_video
        video = videos[0]
        per_frame = boxes.video() if not records else None
        n = len(video.grids)
        for t, (frame_record, grid) in enumerate(zip(video.selection.frames, video.grids)):
            source = _source_frame(media, t, n)
            frame_boxes = per_frame[t] if per_frame is not None else boxes.image(t)
            stamp = (video.timestamps[t] if video.timestamps else
                     media.timestamps[source] if media.timestamps else None)
            sel = frame_record.selection
            infos.append(FrameInfo(t, grid[0] * grid[1], sel.num_kept, frame_record.budget, frame_record.score,
                                   stamp))
            tiles.append(render.token_overlay(media.frames[source], frame_boxes, sel.indices, sel.groups, side=256))
    else:  # images_as_video=False: each frame is an image with its own budget
        for t, record in enumerate(records):
            infos.append(FrameInfo(t, record.num_visual_tokens, record.num_kept_visual, record.budget, None,
                                   media.timestamps[t] if media.timestamps else None))
            tiles.append(render.token_overlay(media.frames[t], boxes.image(t), record.indices,
                                              record.selection.groups, side=256))
    strip = render.frame_strip(tiles, [_frame_caption(i.frame, media, i) for i in infos], columns=STRIP_COLUMNS)
    return strip, infos


__all__ = ["DemoError", "Engine", "Example", "FrameInfo", "Limits", "LoadedModel", "Loading", "Media", "Result",
           "RunResult", "Spec", "check_host", "check_models", "is_loopback", "load_media", "model_label",
           "parse_options", "run_title", "write_examples", "write_video"]
