"""vtc.video_io: sampling rules (lmms-eval's), decord/PyAV agreement, frame order, and every bad input.

Test videos are written at test time with PyAV (32x32, H.264 yuv420p, lossless-ish crf 0): frame i's top half is a
distinct solid colour PALETTE[i] (checked with a tolerance for the YUV round trip), its bottom half a moving square.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtc import video_io
from vtc.video_io import VideoClip, clip_from_frames, load_video, sample_indices

SIZE = 32
FPS = 10
COLOUR_TOL = 12  # max abs difference per channel after RGB -> yuv420p -> RGB (measured: 3)
PALETTE = np.array([[(i * 37) % 256, (i * 91 + 40) % 256, (255 - i * 53) % 256] for i in range(64)], dtype=np.uint8)


def _frame(i: int) -> np.ndarray:
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[: SIZE // 2] = PALETTE[i]
    x = (3 * i) % (SIZE - 6)
    a[SIZE // 2 + 4 : SIZE // 2 + 10, x : x + 6] = 255
    return a


def _write_video(path, n: int, fps: int = FPS) -> str:
    av = pytest.importorskip("av", reason="PyAV writes the test videos: pip install av")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"} if codec == "libx264" else {"qscale": "1"}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _colour_index(frame: Image.Image) -> int:
    """Which PALETTE entry the frame's top half shows (nearest colour), asserting it is within tolerance."""
    mean = np.asarray(frame)[2 : SIZE // 2 - 2, 2:-2].reshape(-1, 3).astype(float).mean(0)
    distances = np.abs(PALETTE.astype(float) - mean).max(1)
    best = int(distances.argmin())
    assert distances[best] <= COLOUR_TOL, (mean, PALETTE[best])
    return best


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "clip": _write_video(root / "clip.mp4", 30),  # 30 frames at 10 fps = 3 s
        "one": _write_video(root / "one.mp4", 1),
        "mkv": _write_video(root / "clip.mkv", 30),  # no frame count in the container metadata
    }


@pytest.fixture(params=["pyav", "decord"])
def backend(request):
    pytest.importorskip("av", reason="pip install av")
    if request.param == "decord":
        pytest.importorskip("decord", reason="decord not installed (pip install decord, x86-64 only)")
    return request.param


# ----------------------------------------------------------------------------------------- sampling (no video)


def test_uniform_indices_golden():
    assert sample_indices(30, 10.0, num_frames=4) == [0, 9, 19, 29]
    assert sample_indices(30, 10.0, num_frames=1) == [0]
    assert sample_indices(1, 10.0, num_frames=8) == [0]


@pytest.mark.parametrize("total,n", [(30, 4), (1000, 32), (9001, 64), (64, 64), (123, 7)])
def test_uniform_matches_lmms_eval_linspace(total, n):
    # lmms-eval llava_onevision / llava_vid: np.linspace(0, total - 1, n, dtype=int)
    assert sample_indices(total, 30.0, num_frames=n) == np.linspace(0, total - 1, n, dtype=int).tolist()


def test_uniform_short_video_deduplicates():
    # linspace(0, 2, 8) cast to int repeats frames; they are dropped, so fewer than num_frames come back
    assert np.linspace(0, 2, 8, dtype=int).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert sample_indices(3, 10.0, num_frames=8) == [0, 1, 2]


def test_fps_sampling_and_cap():
    assert sample_indices(30, 10.0, fps=1.0) == [0, 10, 20]
    assert sample_indices(30, 10.0, fps=3.0) == list(range(0, 30, 3))  # stride round(10 / 3) = 3
    assert sample_indices(30, 10.0, fps=100.0) == list(range(30))  # faster than the video: every frame
    # 10 candidates > max_frames = 5: five uniform indices instead (lmms-eval's cap)
    assert sample_indices(30, 10.0, fps=3.0, max_frames=5) == [0, 7, 14, 21, 29]
    assert sample_indices(30, 10.0, fps=3.0, max_frames=10) == list(range(0, 30, 3))  # exactly at the cap
    assert sample_indices(3000, 30.0, fps=1.0) == np.linspace(0, 2999, 64, dtype=int).tolist()  # default cap 64


def test_default_is_one_fps_capped():
    assert sample_indices(30, 10.0) == [0, 10, 20]
    assert sample_indices(300, 10.0, max_frames=8) == np.linspace(0, 299, 8, dtype=int).tolist()


def test_num_frames_ignores_max_frames():
    assert sample_indices(100, 10.0, num_frames=16, max_frames=4) == np.linspace(0, 99, 16, dtype=int).tolist()


# ----------------------------------------------------------------------------------------- decoding


def test_load_uniform(videos, backend):
    clip = load_video(videos["clip"], num_frames=4, backend=backend)
    assert isinstance(clip, VideoClip) and clip.backend == backend and clip.path == videos["clip"]
    assert clip.indices == [0, 9, 19, 29]
    assert clip.fps == 10.0 and clip.num_source_frames == 30 and clip.duration == pytest.approx(3.0)
    assert clip.timestamps == [i / 10.0 for i in clip.indices]
    assert len(clip) == 4 and all(f.mode == "RGB" and f.size == (SIZE, SIZE) for f in clip.frames)
    assert [_colour_index(f) for f in clip.frames] == clip.indices
    tensor = clip.to_tensor()
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (4, SIZE, SIZE, 3)
    assert np.array_equal(tensor[2].numpy(), np.asarray(clip.frames[2]))


def test_every_frame_in_order(videos, backend):
    clip = load_video(videos["clip"], num_frames=30, backend=backend)
    assert clip.indices == list(range(30))
    assert [_colour_index(f) for f in clip.frames] == list(range(30))
    # the moving square is where frame i put it
    for i, frame in enumerate(clip.frames):
        row = np.asarray(frame)[SIZE // 2 + 7, :, 0].astype(int)
        x = (3 * i) % (SIZE - 6)
        assert row[x + 1 : x + 5].min() > 200 and np.delete(row, range(max(0, x - 2), min(SIZE, x + 8))).max() < 60


def test_load_fps_and_cap(videos, backend):
    clip = load_video(videos["clip"], fps=2.0, backend=backend)  # stride 5
    assert clip.indices == [0, 5, 10, 15, 20, 25]
    assert clip.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert [_colour_index(f) for f in clip.frames] == clip.indices
    capped = load_video(videos["clip"], fps=2.0, max_frames=4, backend=backend)
    assert capped.indices == [0, 9, 19, 29]
    assert load_video(videos["clip"], backend=backend).indices == [0, 10, 20]  # default: 1 fps


def test_one_frame_video(videos, backend):
    for kwargs in ({}, {"num_frames": 8}, {"fps": 30.0}):
        clip = load_video(videos["one"], backend=backend, **kwargs)
        assert clip.indices == [0] and clip.timestamps == [0.0] and clip.num_source_frames == 1
        assert _colour_index(clip.frames[0]) == 0


def test_mkv_without_frame_count(videos, backend):
    clip = load_video(videos["mkv"], num_frames=4, backend=backend)
    assert clip.num_source_frames == 30 and clip.indices == [0, 9, 19, 29]
    assert [_colour_index(f) for f in clip.frames] == clip.indices


def test_decord_and_pyav_agree(videos):
    pytest.importorskip("av", reason="pip install av")
    pytest.importorskip("decord", reason="decord not installed (pip install decord, x86-64 only)")
    for kwargs in ({"num_frames": 7}, {"fps": 3.0}, {"num_frames": 30}):
        a = load_video(videos["clip"], backend="decord", **kwargs)
        b = load_video(videos["clip"], backend="pyav", **kwargs)
        assert a.indices == b.indices and a.timestamps == b.timestamps
        assert (a.fps, a.num_source_frames, a.duration) == (b.fps, b.num_source_frames, b.duration)
        # same FFmpeg decoder and default YUV->RGB conversion: bit-identical pixels (measured; documented)
        assert torch.equal(a.to_tensor(), b.to_tensor())


def test_pyav_metadata_overcount(videos, monkeypatch):
    """The container says 30 frames but only 20 decode: PyAV resamples on the 20 it could decode."""
    pytest.importorskip("av", reason="pip install av")
    real = video_io._av_frames

    def first_20(av, path):
        for i, frame in enumerate(real(av, path)):
            if i == 20:
                return
            yield frame

    monkeypatch.setattr(video_io, "_av_frames", first_20)
    clip = load_video(videos["clip"], num_frames=4, backend="pyav")
    assert clip.num_source_frames == 20 and clip.indices == [0, 6, 12, 19]
    assert [_colour_index(f) for f in clip.frames] == clip.indices


def test_auto_falls_back_to_pyav(tmp_path):
    """decord 0.6 cannot open a still image (no duration metadata); auto retries with PyAV, which can."""
    pytest.importorskip("av", reason="pip install av")
    pytest.importorskip("decord", reason="decord not installed")
    path = tmp_path / "still.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
    with pytest.raises(ValueError, match="could not decode .*backend='pyav'"):
        load_video(path, backend="decord")
    clip = load_video(path)
    assert clip.backend == "pyav" and clip.indices == [0] and clip.to_tensor()[0, 0, 0].tolist() == [200, 10, 10]


def test_auto_prefers_decord(videos):
    pytest.importorskip("decord", reason="decord not installed (pip install decord, x86-64 only)")
    assert load_video(videos["clip"], num_frames=2).backend == "decord"


def test_auto_without_decord_uses_pyav(videos, monkeypatch):
    pytest.importorskip("av", reason="pip install av")
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    clip = load_video(videos["clip"], num_frames=2)
    assert clip.backend == "pyav" and clip.indices == [0, 29]
    with pytest.raises(ImportError, match="pip install decord"):
        load_video(videos["clip"], backend="decord")


def test_no_decoder_installed(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install decord.*pip install av"):
        load_video(videos["clip"])
    with pytest.raises(ImportError, match="pip install av"):
        load_video(videos["clip"], backend="pyav")


# ----------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(missing)


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_video(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a video\n" * 20], ids=["empty", "text"])
@pytest.mark.parametrize("which", ["auto", "pyav", "decord"])
def test_not_a_video(tmp_path, content, which):
    pytest.importorskip("av", reason="pip install av")
    if which == "decord":
        pytest.importorskip("decord", reason="decord not installed")
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"could not decode .*fake\.mp4.* as a video: "):
        load_video(path, backend=which)


def test_truncated_video(videos, tmp_path):
    data = Path(videos["clip"]).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])  # mp4 index (moov) is at the end: nothing left to find frames with
    with pytest.raises(ValueError, match="could not decode .* as a video: "):
        load_video(path)


def test_audio_only(tmp_path):
    av = pytest.importorskip("av", reason="pip install av")
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for which in ("pyav", "auto"):
        with pytest.raises(ValueError, match="no video stream"):
            load_video(path, backend=which)


def _header_only_mkv(src: str, dst) -> bool:
    """Write the shortest prefix of an mkv that still opens with a video stream (header, no frames)."""
    import av

    data = Path(src).read_bytes()
    for n in range(64, len(data), 16):
        dst.write_bytes(data[:n])
        try:
            with av.open(str(dst)) as container:
                if container.streams.video:
                    return sum(1 for _ in container.decode(video=0)) == 0
        except Exception:
            continue
    return False


def test_zero_decodable_frames(videos, tmp_path):
    path = tmp_path / "header_only.mkv"
    if not _header_only_mkv(videos["mkv"], path):
        pytest.skip("could not cut a header-only mkv from this PyAV's output")
    for which in ("pyav", "auto"):
        with pytest.raises(ValueError, match="zero decodable frames"):
            load_video(path, backend=which)


def test_decord_zero_frames(videos, monkeypatch):
    decord = pytest.importorskip("decord", reason="decord not installed")

    class EmptyReader:
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 0

    monkeypatch.setattr(decord, "VideoReader", EmptyReader)
    with pytest.raises(ValueError, match="zero decodable frames"):
        load_video(videos["clip"], backend="decord")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_frames": 0}, ValueError, "num_frames must be >= 1"),
        ({"num_frames": -3}, ValueError, "num_frames must be >= 1"),
        ({"num_frames": 2.5}, TypeError, "num_frames must be an int"),
        ({"num_frames": True}, TypeError, "num_frames must be an int"),
        ({"fps": 0}, ValueError, "fps must be a finite number > 0"),
        ({"fps": -1.0}, ValueError, "fps must be a finite number > 0"),
        ({"fps": float("nan")}, ValueError, "fps must be a finite number > 0"),
        ({"fps": float("inf")}, ValueError, "fps must be a finite number > 0"),
        ({"fps": "2"}, TypeError, "fps must be a positive number"),
        ({"max_frames": 0}, ValueError, "max_frames must be >= 1"),
        ({"num_frames": 4, "fps": 1.0}, ValueError, "either num_frames .* or fps .*, not both"),
        ({"backend": "ffmpeg"}, ValueError, r"unknown backend 'ffmpeg'; choose one of 'auto', 'decord', 'pyav'"),
    ],
)
def test_bad_arguments(videos, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_video(videos["clip"], **kwargs)


def test_arguments_checked_before_the_file(tmp_path):
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        load_video(tmp_path / "missing.mp4", num_frames=0)


def test_path_type():
    with pytest.raises(TypeError, match="clip_from_frames"):
        load_video([np.zeros((4, 4, 3), np.uint8)])


# ----------------------------------------------------------------------------------------- in-memory frames


def test_clip_from_frames_roundtrip(videos, backend):
    clip = load_video(videos["clip"], num_frames=5, backend=backend)
    again = clip_from_frames(clip.to_tensor(), fps=clip.fps, timestamps=clip.timestamps)
    assert again.backend == "frames" and again.path is None
    assert torch.equal(again.to_tensor(), clip.to_tensor())
    assert again.timestamps == clip.timestamps and again.indices == list(range(5))
    assert again.num_source_frames == 5 and again.duration == pytest.approx(0.5)
    from_list = clip_from_frames(clip.frames, fps=clip.fps)
    assert torch.equal(from_list.to_tensor(), clip.to_tensor())


def test_clip_from_frames_inputs():
    frames = np.stack([_frame(i) for i in range(6)])
    for given in (frames, torch.from_numpy(frames), list(frames), [Image.fromarray(f) for f in frames]):
        clip = clip_from_frames(given, fps=2.0)
        assert torch.equal(clip.to_tensor(), torch.from_numpy(frames))
        assert clip.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5] and clip.fps == 2.0 and clip.duration == 3.0
    grey = clip_from_frames([np.full((4, 4), 7, np.uint8), Image.new("RGBA", (4, 4), (1, 2, 3, 4))])
    assert [f.mode for f in grey.frames] == ["RGB", "RGB"]
    # transparency is composited on white (vtc.image_io): alpha 4 of 255 leaves (1, 2, 3) barely visible
    assert grey.to_tensor()[0].unique().tolist() == [7] and grey.to_tensor()[1, 0, 0].tolist() == [251, 251, 251]


def test_clip_from_frames_mixed_sizes_kept():
    clip = clip_from_frames([Image.new("RGB", (8, 6)), Image.new("RGB", (4, 4))], fps=1.0)
    assert clip.sizes == [(8, 6), (4, 4)] and not clip.uniform_size
    with pytest.raises(ValueError, match="different sizes"):
        clip.to_tensor()


@pytest.mark.parametrize(
    "frames,kwargs,error,match",
    [
        ([], {}, ValueError, "at least one frame"),
        (np.zeros((0, 4, 4, 3), np.uint8), {}, ValueError, "at least one frame"),
        ([np.zeros((4, 4, 3), np.float32)], {}, ValueError, r"frame 0 has dtype float32.*uint8"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((3, 5, 6), np.uint8)], {}, ValueError, "frame 1 .*channels first"),
        ([np.zeros((4, 4, 2), np.uint8)], {}, ValueError, r"frame 0 has shape \(4, 4, 2\)"),
        (["a.png"], {}, TypeError, "frame 0 is a str"),
        (np.zeros((4, 4, 3), np.uint8), {}, ValueError, r"\[T, H, W, 3\]"),
        (Image.new("RGB", (4, 4)), {}, TypeError, "wrap a single image in a list"),
        ("video.mp4", {}, TypeError, "load_video"),
        (5, {}, TypeError, "sequence of PIL images"),
        ([Image.new("RGB", (4, 4))], {"fps": 0}, ValueError, "fps must be a finite number > 0"),
        ([Image.new("RGB", (4, 4))] * 2, {"timestamps": [0.0]}, ValueError, "1 entries for 2 frames"),
        ([Image.new("RGB", (4, 4))] * 2, {"timestamps": [1.0, 0.5]}, ValueError, "non-decreasing"),
    ],
)
def test_clip_from_frames_bad(frames, kwargs, error, match):
    with pytest.raises(error, match=match):
        clip_from_frames(frames, **kwargs)


def test_clip_is_frozen():
    clip = clip_from_frames([Image.new("RGB", (4, 4))])
    with pytest.raises(dataclasses.FrozenInstanceError):
        clip.fps = 3.0
    with pytest.raises(ValueError, match="one index and one timestamp per frame"):
        VideoClip([Image.new("RGB", (4, 4))], [0, 1], [0.0], 1.0, 2, 2.0, "frames")


def test_module_does_not_import_transformers():
    code = "import sys, vtc.video_io; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert "transformers" not in video_io.__dict__
