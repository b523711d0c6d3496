"""vtc.image_io: every image mode becomes the RGB picture a viewer shows, through every entry point.

Each mode is built from a known 8-bit picture and must come back as that picture's 8-bit equivalent; the entry
points (``vtc run``, the demo, the lmms-eval plugin and its tasks, video frames) must hand the model that picture.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import vtc
from vtc.image_io import AnimatedImageWarning, load_image, to_rgb

# an 8-bit grey picture that uses the whole 0..255 range, and an RGB one
GREY = np.arange(256, dtype=np.uint8).reshape(16, 16)
RGB = np.stack([GREY, GREY[::-1], GREY.T], axis=-1)


def _rgb_of_grey(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _sixteen_bit(mode: str, values: np.ndarray) -> Image.Image:
    order = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(order).tobytes())


# ------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B"])
def test_sixteen_bit_equals_its_eight_bit_picture(mode):
    image = _sixteen_bit(mode, GREY.astype(np.int64) * 257)
    assert image.mode == mode
    assert np.array_equal(_pixels(to_rgb(image)), _rgb_of_grey(GREY))


def test_sixteen_bit_png_file_round_trip(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray((GREY.astype(np.uint16) * 257)).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # a real 16-bit PNG
    assert np.array_equal(_pixels(load_image(path)), _rgb_of_grey(GREY))


def test_twelve_bit_camera_image_is_scaled_by_its_real_range_not_white():
    twelve = np.rint(GREY.astype(np.float64) * 4095 / 255).astype(np.uint16)  # values 0..4095 in a 16-bit file
    image = Image.fromarray(twelve)
    assert image.mode == "I;16"
    out = _pixels(to_rgb(image))
    assert np.abs(out - _rgb_of_grey(GREY)).max() <= 1
    assert out.mean() < 200  # convert("RGB") clips every value above 255 to white


def test_partial_range_is_stretched_linearly():
    data = (GREY.astype(np.int64) * 2 + 1000).astype(np.uint16)  # 1000..1510
    out = _pixels(to_rgb(Image.fromarray(data)))
    assert out.min() == 0 and out.max() == 255 and np.array_equal(out, _rgb_of_grey(GREY))


def test_int32_with_a_factor_and_an_offset():
    image = Image.fromarray(GREY.astype(np.int32) * 1000 - 70_000)
    assert image.mode == "I"
    assert np.array_equal(_pixels(to_rgb(image)), _rgb_of_grey(GREY))


def test_float_zero_to_one():
    image = Image.fromarray(GREY.astype(np.float32) / 255.0)
    assert image.mode == "F"
    assert np.abs(_pixels(to_rgb(image)) - _rgb_of_grey(GREY)).max() <= 1


def test_float_non_finite_values():
    data = GREY.astype(np.float32) / 255.0
    data[0, 3], data[0, 4], data[0, 5] = np.nan, np.inf, -np.inf  # the finite range stays 0..1
    out = _pixels(to_rgb(Image.fromarray(data)))
    assert out[0, 3, 0] == 0 and out[0, 4, 0] == 255 and out[0, 5, 0] == 0
    assert np.abs(out[1:] - _rgb_of_grey(GREY)[1:]).max() <= 1


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 0, 0), ("I;16", 65535, 255), ("I;16", 257 * 40, 40), ("I", 300 * 257, 255 * 300 // 255),
    ("F", 0.5, 128), ("F", 7.0, 255), ("F", -1.0, 0),
])
def test_constant_images_use_the_modes_nominal_range(mode, value, expected):
    if mode == "F":
        image = Image.fromarray(np.full((4, 4), value, np.float32))
    elif mode == "I":
        image = Image.fromarray(np.full((4, 4), value, np.int32))
    else:
        image = Image.fromarray(np.full((4, 4), value, np.uint16))
    assert image.mode == mode
    assert np.unique(_pixels(to_rgb(image))).tolist() == [min(expected, 255)]


def test_bilevel_is_zero_or_255():
    bits = GREY >= 128
    image = Image.fromarray(bits)
    assert image.mode == "1"
    assert np.array_equal(_pixels(to_rgb(image)), _rgb_of_grey(np.where(bits, 255, 0)))


def test_palette_without_and_with_transparency():
    palette = [(10 * i % 256, 37 * i % 256, 91 * i % 256) for i in range(256)]
    indices = GREY.copy()
    image = Image.fromarray(indices, "P")
    image.putpalette([c for colour in palette for c in colour])
    expected = np.array(palette)[indices]
    assert np.array_equal(_pixels(to_rgb(image)), expected)
    image.info["transparency"] = 0  # index 0 is transparent: white, as a browser on a white page shows it
    out = _pixels(to_rgb(image))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(out.reshape(-1, 3)[1:], expected.reshape(-1, 3)[1:])


def test_palette_with_transparency_from_a_gif_file(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    path = tmp_path / "transparent.gif"
    image.save(path, transparency=0)
    out = _pixels(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 30, 40]


def test_alpha_modes_composite_on_white():
    alpha = np.full_like(GREY, 255)
    alpha[0, :] = 0
    alpha[1, :] = 128
    la = Image.fromarray(np.stack([GREY, alpha], axis=-1), "LA")
    out = _pixels(to_rgb(la))
    assert np.array_equal(out[2:], _rgb_of_grey(GREY)[2:])  # opaque: the picture itself
    assert (out[0] == 255).all()  # transparent: white
    blend = np.rint((GREY[1].astype(np.float64) * 128 + 255 * 127) / 255)
    assert np.abs(out[1, :, 0] - blend).max() <= 1
    rgba = Image.fromarray(np.concatenate([RGB, alpha[..., None]], axis=-1), "RGBA")
    out = _pixels(to_rgb(rgba))
    assert np.array_equal(out[2:], RGB[2:].astype(np.int64)) and (out[0] == 255).all()
    pa = Image.fromarray(np.stack([GREY, alpha], axis=-1), "LA").convert("PA")
    assert np.abs(_pixels(to_rgb(pa))[2:] - _rgb_of_grey(GREY)[2:]).max() <= 1


def test_cmyk_and_grey_and_rgb():
    rgb = Image.fromarray(RGB)
    assert np.array_equal(_pixels(to_rgb(rgb.convert("CMYK"))), RGB)
    assert np.array_equal(_pixels(to_rgb(Image.fromarray(GREY))), _rgb_of_grey(GREY))
    assert to_rgb(rgb) is rgb  # already RGB: returned as is


# ------------------------------------------------------------------------------------------------- EXIF, animation


def _landscape() -> Image.Image:
    """64x32: left half red, right half blue -- any rotation or mirroring is visible."""
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = (220, 20, 20)
    array[:, 32:] = (20, 20, 220)
    return Image.fromarray(array)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt, tmp_path):
    picture = _landscape()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / f"rotated.{fmt.lower()}"
    picture.save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    loaded = load_image(path)
    assert loaded.size == (32, 64)  # portrait, as a viewer shows it
    expected = np.asarray(picture.transpose(Image.Transpose.ROTATE_270)).astype(np.int64)
    assert np.abs(_pixels(loaded) - expected).mean() < 4  # JPEG is lossy
    top, bottom = _pixels(loaded)[4, 16], _pixels(loaded)[60, 16]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, blue at the bottom


def _animated_gif(path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_animated_gif_gives_its_first_frame_and_one_warning(tmp_path):
    path = tmp_path / "spin.gif"
    _animated_gif(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    assert np.unique(_pixels(image).reshape(-1, 3), axis=0).tolist() == [[255, 0, 0]]
    animated = [w for w in caught if issubclass(w.category, AnimatedImageWarning)]
    assert len(animated) == 1
    assert "spin.gif" in str(animated[0].message) and "first frame" in str(animated[0].message)
    assert "video" in str(animated[0].message)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with notes=[] the note is returned, not warned
        load_image(path, notes=notes)
    assert len(notes) == 1 and "3 frames" in notes[0]


def test_sources_and_bad_input(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(GREY).save(path)
    data = path.read_bytes()
    for source in (str(path), path, data, io.BytesIO(data), Image.open(path)):
        assert np.array_equal(_pixels(load_image(source)), _rgb_of_grey(GREY))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError):
        load_image(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(bad)
    with pytest.raises(TypeError):
        load_image(42)


# ------------------------------------------------------------------------------------------------- entry points


@pytest.fixture
def sixteen_bit_png(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray((GREY.astype(np.uint16) * 257)).resize((64, 64), Image.Resampling.NEAREST).save(path)
    return path


def _expected_64() -> np.ndarray:
    return _rgb_of_grey(np.asarray(Image.fromarray(GREY).resize((64, 64), Image.Resampling.NEAREST)))


def test_cli_hands_the_model_the_eight_bit_picture(sixteen_bit_png, monkeypatch):
    """``vtc run --image sixteen.png``: the image the processor receives is the 8-bit picture, not white."""
    from vtc import cli

    seen = []

    class Stop(Exception):
        pass

    class Processor:
        def apply_chat_template(self, messages, **kwargs):
            return "prompt"

        def __call__(self, images, text, **kwargs):
            seen.extend(images)
            raise Stop

    monkeypatch.setattr(cli, "_load", lambda ref: ((object(), Processor()), "stub"))
    with pytest.raises(Stop):
        cli.main(["run", "--image", str(sixteen_bit_png), "--compressor", "pool", "--question", "what"])
    assert len(seen) == 1 and np.array_equal(_pixels(seen[0]), _expected_64())


def test_demo_reads_the_eight_bit_picture_and_notes_animations(sixteen_bit_png, tmp_path):
    from vtc.demo.engine import load_media

    media = load_media(sixteen_bit_png)
    assert media.kind == "image" and np.array_equal(_pixels(media.image), _expected_64()) and not media.notes
    gif = tmp_path / "spin.gif"
    _animated_gif(gif)
    media = load_media(gif)
    assert media.kind == "image" and len(media.notes) == 1 and "first frame" in media.notes[0]


def test_lmms_plugin_converts_task_images_and_its_tasks_read_files(sixteen_bit_png):
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms import tasks as lmms_tasks
    from vtc.eval.lmms.model import VtcModel

    [image] = lmms_tasks.doc_to_image({"image": str(sixteen_bit_png)})
    assert np.array_equal(_pixels(image), _expected_64())
    model, processor = vtc.load_default()
    lm = VtcModel(model=model, processor=processor, progress=False, device="cpu")
    seen = []
    real = lm.processor

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kwargs):
            seen.extend(kwargs.get("images", []))
            return real(**kwargs)

    lm.processor = Recorder()
    with Image.open(sixteen_bit_png) as task_image:  # what a task's doc_to_visual may hand over: mode I;16
        assert task_image.mode.startswith("I")
        lm._encode(["what color is the shape at the center ?"], [[task_image]])
    assert len(seen) == 1 and np.array_equal(_pixels(seen[0]), _expected_64())


def test_video_frames_use_the_same_conversion():
    frames = [_sixteen_bit("I;16", GREY.astype(np.int64) * 257), Image.fromarray(GREY.astype(np.float32) / 255)]
    clip = vtc.video_io.clip_from_frames(frames, fps=1.0)
    tensor = clip.to_tensor().numpy().astype(np.int64)
    assert np.array_equal(tensor[0], _rgb_of_grey(GREY)) and np.abs(tensor[1] - _rgb_of_grey(GREY)).max() <= 1
