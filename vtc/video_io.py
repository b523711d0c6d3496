"""Video input: decode a video file into the frames a video LLM sees, the way the reference evaluations do.

    clip = load_video("clip.mp4", num_frames=32)   # LLaVA-OneVision / LLaVA-Video (force_sample) style
    clip = load_video("clip.mp4", fps=1.0)         # LLaVA-Video's 1-fps candidates, capped at max_frames=64
    clip.frames, clip.indices, clip.timestamps     # RGB PIL images, source frame numbers, seconds
    clip = clip_from_frames(frames, fps=2.0)       # already decoded frames -> the same VideoClip

Why: the frames a video compressor sees must be the frames the published numbers were measured on. The sampling
rules reproduce lmms-eval's ``llava_onevision.load_video`` / ``llava_vid.load_video`` (decord ``VideoReader`` on
``cpu(0)`` with ``num_threads=1``, ``get_batch``):

* ``num_frames=N`` (uniform): ``numpy.linspace(0, total - 1, N, dtype=int)``. When the video has fewer than ``N``
  frames the repeated indices are dropped (lmms-eval would feed duplicate frames), so fewer than ``N`` frames come
  back. ``max_frames`` does not apply.
* ``fps=f``: every ``round(avg_fps / f)``-th frame (at least every frame) starting at 0; if that gives more than
  ``max_frames`` candidates, ``max_frames`` uniform indices as above instead (lmms-eval's cap).
* neither: ``fps=1.0`` capped at ``max_frames`` (LLaVA-Video's rule; its standard evaluation forces 64 uniform frames,
  i.e. ``num_frames=64``).

Times are defined on the container's *average* frame rate: ``timestamp = index / avg_fps`` seconds (lmms-eval's
frame times, without its 1-fps branch dividing by the stride) and ``duration = num_source_frames / avg_fps``. The
frame count is decord's ``len(reader)``; PyAV takes the container's count and, where there is none (mkv, webm) or it
over-counts, counts the decodable frames.

Backends: ``"decord"`` (the reference), ``"pyav"`` (sequential decode, keeping only the wanted frames) and ``"auto"``
(decord when importable, else PyAV; a file decord cannot open is retried with PyAV when PyAV is installed; the clip's
``backend`` says which one decoded it). On H.264 / MPEG-4 files both return the same indices and bit-identical
RGB pixels (both use FFmpeg's decoder and its default YUV->RGB conversion; see tests/test_video_io.py). Frames keep
the video's resolution: resizing is the model processor's job. This module never imports transformers.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .image_io import to_rgb

__all__ = ["VideoClip", "load_video", "clip_from_frames", "sample_indices", "BACKENDS", "DEFAULT_FPS"]

BACKENDS = ("auto", "decord", "pyav")
DEFAULT_FPS = 1.0  # sampling rate when neither num_frames nor fps is given (capped at max_frames)


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one video, with where they came from.

    ``frames``: RGB ``PIL.Image`` per sampled frame, in time order; ``indices``: their source frame numbers;
    ``timestamps``: seconds, ``index / fps``; ``fps``: the source's average frame rate; ``num_source_frames`` and
    ``duration`` (``num_source_frames / fps`` seconds) describe the whole source; ``backend``: ``"decord"``,
    ``"pyav"`` or ``"frames"`` (built by ``clip_from_frames``); ``path``: the file, ``None`` for in-memory frames.
    Frames may differ in size only when given so to ``clip_from_frames`` (see ``sizes``/``uniform_size``).
    """

    frames: list[Image.Image]
    indices: list[int]
    timestamps: list[float]
    fps: float
    num_source_frames: int
    duration: float
    backend: str
    path: str | None = None

    def __post_init__(self):
        if not (len(self.frames) == len(self.indices) == len(self.timestamps)):
            raise ValueError(
                f"VideoClip needs one index and one timestamp per frame, got {len(self.frames)} frames, "
                f"{len(self.indices)} indices and {len(self.timestamps)} timestamps"
            )

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each frame."""
        return [frame.size for frame in self.frames]

    @property
    def uniform_size(self) -> bool:
        """Whether all frames have the same size (always true for decoded videos)."""
        return len(set(self.sizes)) <= 1

    def to_tensor(self) -> torch.Tensor:
        """The frames as one uint8 tensor ``[T, H, W, 3]`` (channels last, RGB)."""
        if not self.uniform_size:
            raise ValueError(
                f"cannot stack frames of different sizes {sorted(set(self.sizes))} (width, height) into one tensor; "
                "resize them to one size first (a model's processor resizes frames itself, so pass clip.frames)"
            )
        return torch.from_numpy(np.stack([np.asarray(to_rgb(frame), dtype=np.uint8) for frame in self.frames]))


# --------------------------------------------------------------------------------------------------- sampling


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fps(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number (frames per second), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (frames per second), got {value}")
    return value


def _check_sampling(num_frames, fps, max_frames) -> tuple[int | None, float | None, int]:
    if num_frames is not None and fps is not None:
        raise ValueError(
            f"give either num_frames (uniform sampling) or fps (time-based sampling), not both "
            f"(got num_frames={num_frames!r}, fps={fps!r})"
        )
    max_frames = _check_int("max_frames", max_frames, 1)
    if num_frames is not None:
        return _check_int("num_frames", num_frames, 1), None, max_frames
    return None, _check_fps("fps", DEFAULT_FPS if fps is None else fps), max_frames


def _uniform(total: int, count: int) -> list[int]:
    # lmms-eval: np.linspace(0, total_frame_num - 1, n, dtype=int); duplicates (total < n) dropped, order kept
    return list(dict.fromkeys(int(i) for i in np.linspace(0, total - 1, count, dtype=int)))


def sample_indices(
    total: int, avg_fps: float, *, num_frames: int | None = None, fps: float | None = None, max_frames: int = 64
) -> list[int]:
    """Source frame indices to decode from a ``total``-frame video at ``avg_fps`` (the rule in the module docstring)."""
    num_frames, fps, max_frames = _check_sampling(num_frames, fps, max_frames)
    total = _check_int("total", total, 1)
    if num_frames is not None:
        return _uniform(total, num_frames)
    stride = max(1, round(_check_fps("avg_fps", avg_fps) / fps))
    candidates = list(range(0, total, stride))
    if len(candidates) > max_frames:
        return _uniform(total, max_frames)
    return candidates


# --------------------------------------------------------------------------------------------------- backends


def _import_decord():
    try:
        import decord
    except (ImportError, OSError) as error:
        raise ImportError(
            f"the decord backend needs decord, which is not importable ({error}); install it with "
            "`pip install decord` (x86-64 only), or use backend='pyav' after `pip install av`"
        ) from error
    return decord


def _import_av():
    try:
        import av
    except (ImportError, OSError) as error:
        raise ImportError(
            f"the pyav backend needs PyAV, which is not importable ({error}); install it with `pip install av`, "
            "or use backend='decord' after `pip install decord`"
        ) from error
    return av


def _decoder_message(error: BaseException) -> str:
    """The useful part of a decoder's error text (decord prefixes '[hh:mm:ss] /src/file.cc:N: ')."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    lines = [line for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    first = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", first)  # decord's log prefix
    return re.sub(r"^Check failed: .*?\(-?\d+ vs\. -?\d+\)\s*", "", first).strip()  # its assertion text


def _undecodable(path: str, detail: str, decord: bool = False) -> ValueError:
    hint = "; backend='pyav' may decode it or say more precisely why not" if decord else ""
    return ValueError(
        f"could not decode {path!r} as a video: {detail}; check that it is a complete, playable video file "
        f"(e.g. open it with ffprobe){hint}"
    )


def _no_frames(path: str) -> ValueError:
    return ValueError(
        f"{path!r} has a video stream but zero decodable frames (empty or truncated recording); "
        "re-encode or re-download the file"
    )


def _positive_rate(*rates) -> float | None:
    for rate in rates:
        if rate is not None and float(rate) > 0 and math.isfinite(float(rate)):
            return float(rate)
    return None


def _load_decord(path: str, sampling: dict) -> tuple[list[Image.Image], list[int], float, int]:
    decord = _import_decord()
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as error:  # decord raises RuntimeError / DECORDError for anything it cannot open
        raise _undecodable(path, _decoder_message(error), decord=True) from error
    try:
        total = len(reader)
        if total < 1:
            raise _no_frames(path)
        avg_fps = _positive_rate(reader.get_avg_fps())
        if avg_fps is None:
            raise _undecodable(path, "the video reports no frame rate")
        indices = sample_indices(total, avg_fps, **sampling)
        try:
            batch = reader.get_batch(indices)
        except Exception as error:
            raise _undecodable(path, _decoder_message(error), decord=True) from error
        array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge
        frames = [Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB") for frame in array]
    finally:
        del reader
    return frames, indices, avg_fps, total


def _open_av(av, path: str):
    try:
        container = av.open(path)
    except Exception as error:  # av.FFmpegError subclasses (InvalidDataError, ...)
        raise _undecodable(path, _decoder_message(error)) from error
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["none"]
        container.close()
        raise _undecodable(path, f"it contains no video stream (streams: {', '.join(kinds)})")
    return container


def _av_frames(av, path: str):
    """Yield the decoded frames of the first video stream, in presentation order (one sequential pass)."""
    container = _open_av(av, path)
    try:
        stream = container.streams.video[0]
        try:
            yield from container.decode(stream)
        except av.error.FFmpegError as error:
            raise _undecodable(path, _decoder_message(error)) from error
    finally:
        container.close()


def _load_pyav(path: str, sampling: dict) -> tuple[list[Image.Image], list[int], float, int]:
    av = _import_av()
    container = _open_av(av, path)
    try:
        stream = container.streams.video[0]
        total = int(stream.frames or 0)  # container metadata; 0 when unknown (mkv, webm, images)
        avg_fps = _positive_rate(stream.average_rate, stream.guessed_rate, stream.base_rate)
    finally:
        container.close()
    if avg_fps is None:
        raise _undecodable(path, "the video reports no frame rate")
    if total < 1:  # no frame count in the metadata: count by decoding (nothing kept)
        with contextlib.closing(_av_frames(av, path)) as decoder:
            total = sum(1 for _ in decoder)
    if total < 1:
        raise _no_frames(path)
    for _attempt in range(2):
        indices = sample_indices(total, avg_fps, **sampling)
        wanted, last = set(indices), indices[-1]
        kept: dict[int, Image.Image] = {}
        decoded = 0
        with contextlib.closing(_av_frames(av, path)) as decoder:
            for index, frame in enumerate(decoder):
                decoded = index + 1
                if index in wanted:
                    kept[index] = to_rgb(frame.to_image())  # only wanted frames are held
                if index >= last:
                    break
        if len(kept) == len(indices):
            return [kept[i] for i in indices], indices, avg_fps, total
        if decoded < 1:
            raise _no_frames(path)
        total = decoded  # the metadata over-counted the frames: resample on the decodable ones
    raise _undecodable(path, f"the frame count changed between two decoding passes ({total} frames)")


def _check_path(path) -> str:
    if isinstance(path, (bytes, bytearray)):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str or os.PathLike naming a video file, got {type(path).__name__}; "
            "for frames already in memory use clip_from_frames(frames, fps=...)"
        )
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r} (check the path; it must be a local file)")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a directory, not a video file; pass the path of one video file (for a folder of frame "
            "images, load them and use clip_from_frames)"
        )
    if os.path.getsize(path) == 0:
        raise _undecodable(path, "the file is empty (0 bytes)")
    return path


def load_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = 64,
    backend: str = "auto",
) -> VideoClip:
    """Decode the sampled frames of a video file (sampling rule and times in the module docstring).

    Give at most one of ``num_frames`` (uniform, lmms-eval's ``force_sample``) and ``fps`` (every 1/fps seconds,
    capped at ``max_frames`` uniform frames); with neither, ``fps=1.0`` capped at ``max_frames``. ``backend`` is
    ``"auto"``, ``"decord"`` or ``"pyav"``. Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a bad path,
    ``ValueError`` for a file that is not a decodable video (or has no frames) and for bad arguments, ``ImportError``
    when no decoder is installed.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    num_frames, fps, max_frames = _check_sampling(num_frames, fps, max_frames)
    sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}
    path = _check_path(path)

    if backend == "auto":
        try:
            _import_decord()
            backend = "decord"
        except ImportError:
            try:
                _import_av()
                backend = "pyav"
            except ImportError:
                raise ImportError(
                    "load_video needs a video decoder and neither decord nor PyAV is importable; install one with "
                    "`pip install decord` (x86-64) or `pip install av`"
                ) from None
        if backend == "decord":
            try:
                result = _load_decord(path, sampling)
            except ValueError as decord_error:
                try:
                    _import_av()
                except ImportError:
                    raise decord_error from None
                backend = "pyav"  # decord could not open it: PyAV either decodes it or says precisely why not
                result = _load_pyav(path, sampling)
        else:
            result = _load_pyav(path, sampling)
    elif backend == "decord":
        result = _load_decord(path, sampling)
    else:
        result = _load_pyav(path, sampling)

    frames, indices, avg_fps, total = result
    return VideoClip(
        frames=frames,
        indices=list(indices),
        timestamps=[index / avg_fps for index in indices],
        fps=avg_fps,
        num_source_frames=total,
        duration=total / avg_fps,
        backend=backend,
        path=path,
    )


# --------------------------------------------------------------------------------------------------- in memory


def _to_rgb(item: Any, position: int) -> Image.Image:
    if isinstance(item, Image.Image):  # vtc.image_io: 16-bit / float by real range, transparency on white, EXIF
        try:
            return to_rgb(item, name=f"frame {position}")
        except ValueError as error:
            raise ValueError(f"frame {position}: {error}") from None
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if not isinstance(item, np.ndarray):
        raise TypeError(
            f"frame {position} is a {type(item).__name__}; frames must be PIL images or uint8 arrays [H, W, 3] "
            "(numpy or torch)"
        )
    if item.dtype != np.uint8:
        raise ValueError(
            f"frame {position} has dtype {item.dtype}; frames must be uint8 in 0..255 "
            "(for floats in [0, 1] use (x * 255).round().astype(np.uint8))"
        )
    if item.ndim == 3 and item.shape[-1] == 1:
        item = item[..., 0]
    if item.ndim == 2:
        return to_rgb(Image.fromarray(np.ascontiguousarray(item), "L"))
    if item.ndim == 3 and item.shape[-1] in (3, 4):
        mode = "RGB" if item.shape[-1] == 3 else "RGBA"
        return to_rgb(Image.fromarray(np.ascontiguousarray(item), mode))
    channels_first = item.ndim == 3 and item.shape[0] in (1, 3, 4)
    hint = " (channels first? use .transpose(1, 2, 0) / .permute(1, 2, 0))" if channels_first else ""
    raise ValueError(
        f"frame {position} has shape {tuple(item.shape)}; expected [H, W, 3] RGB, [H, W, 4] RGBA or [H, W] / "
        f"[H, W, 1] grey (channels last){hint}"
    )


def clip_from_frames(
    frames: Sequence[Any] | np.ndarray | torch.Tensor,
    *,
    fps: float = 1.0,
    timestamps: Sequence[float] | None = None,
) -> VideoClip:
    """A ``VideoClip`` from frames already in memory (``backend="frames"``, ``path=None``).

    ``frames``: a non-empty sequence of PIL images / uint8 arrays ``[H, W, 3]`` (numpy or torch; grey and RGBA are
    converted to RGB), or one uint8 array / tensor ``[T, H, W, 3]``. PIL images of any mode go through
    ``vtc.image_io.to_rgb`` (16-bit / float scaled by each frame's real range, transparency composited on white,
    EXIF orientation applied), as do grey and RGBA arrays. Frames are taken as the whole source, so
    ``indices = 0..T-1``, ``num_source_frames = T`` and ``duration = T / fps``; ``timestamps`` default to
    ``index / fps`` and may be given instead (non-decreasing seconds, one per frame). Frames of different sizes are
    kept as they are (``clip.uniform_size`` is then false and ``to_tensor`` refuses); the model's processor resizes.
    """
    fps = _check_fps("fps", fps)
    if isinstance(frames, (str, bytes, os.PathLike)):
        raise TypeError("clip_from_frames takes decoded frames; to read a video file use load_video(path)")
    if isinstance(frames, Image.Image):
        raise TypeError("clip_from_frames takes a sequence of frames; wrap a single image in a list: [image]")
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(
                f"a frame array must be [T, H, W, 3] (uint8, channels last), got shape {tuple(frames.shape)}; "
                "for one frame use frames[None] or a list"
            )
    try:
        frames = list(frames)
    except TypeError:
        raise TypeError(
            "frames must be a sequence of PIL images / uint8 arrays or a [T, H, W, 3] array, "
            f"got {type(frames).__name__}"
        ) from None
    if not frames:
        raise ValueError("clip_from_frames needs at least one frame, got an empty sequence")
    images = [_to_rgb(item, position) for position, item in enumerate(frames)]
    count = len(images)
    if timestamps is None:
        times = [index / fps for index in range(count)]
    else:
        times = [float(t) for t in timestamps]
        if len(times) != count:
            raise ValueError(f"timestamps has {len(times)} entries for {count} frames; give one per frame")
        if any(not math.isfinite(t) or t < 0 for t in times) or any(b < a for a, b in zip(times, times[1:])):
            raise ValueError(f"timestamps must be finite, >= 0 and non-decreasing seconds, got {times}")
    return VideoClip(
        frames=images,
        indices=list(range(count)),
        timestamps=times,
        fps=fps,
        num_source_frames=count,
        duration=count / fps,
        backend="frames",
        path=None,
    )
