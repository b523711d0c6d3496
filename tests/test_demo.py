"""The web demo's engine and drawing without a browser: uploads, limits, options, models, locking, pictures."""

from __future__ import annotations

import dataclasses
import fractions
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import vtc
from vtc.demo import render
from vtc.demo.engine import (DemoError, Engine, FrameInfo, Limits, Media, Spec, load_media, parse_options,
                             run_title, write_examples)
from vtc.demo.engine import _frame_caption
from vtc.eval.default_model import synthetic
from vtc import testing as tiny
from vtc.integrations.transformers.geometry import TokenBoxes

pytest.importorskip("av")  # the bundled video example and the video tests write H.264 files


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(examples_dir=tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def image(engine):
    return engine.load_media(engine.examples[0].path)


@pytest.fixture(scope="module")
def video(engine):
    return engine.load_media(engine.examples[2].path)


def _brightness(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("L"), dtype=np.float64)


def _write_video(path, frames: int, rate, size: int = 32) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 10 * i % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------------------------- uploads


def test_examples_are_the_held_out_test_split(engine, tmp_path):
    assert [e.kind for e in engine.examples] == ["image", "image", "video"]
    for index, example in enumerate(engine.examples[:2]):
        sample = synthetic.make_image_sample("test", index)
        assert np.array_equal(np.asarray(Image.open(example.path).convert("RGB")), np.asarray(sample.image))
        assert example.answers[example.question] == example.answer
        assert example.answers == {q.text: q.answer for q in sample.questions}
    clip = load_media(engine.examples[2].path)
    frames = synthetic.make_video_sample("test", 0, num_frames=8).frames
    assert len(clip.frames) == 8
    for a, b in zip(clip.frames, frames):  # lossless in YUV 4:4:4: RGB comes back within rounding
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    again = write_examples(tmp_path)  # deterministic: the same files and questions
    for a, b in zip(engine.examples[:2], again[:2]):
        assert open(a.path, "rb").read() == open(b.path, "rb").read() and a.question == b.question


def test_rejects_files_that_are_neither_image_nor_video(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n" * 20)
    disguised = tmp_path / "clip.mp4"
    disguised.write_text("not a video either\n" * 20)
    for path in (text, disguised):
        with pytest.raises(DemoError, match="neither an image nor a video"):
            load_media(path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DemoError, match="empty"):
        load_media(empty)
    with pytest.raises(DemoError, match="upload an image or a video"):
        load_media(None)


def test_rejects_oversize_files_before_reading_them(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as handle:
        handle.truncate(26 * 2**20)  # sparse: 26 MB without writing them
    with pytest.raises(DemoError, match=r"26\.0 MB; the demo accepts files of at most 25 MB"):
        load_media(big)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    with pytest.raises(DemoError, match="megapixels"):
        load_media(small, limits=Limits(max_image_pixels=1000))


def test_rejects_long_videos(tmp_path):
    long = tmp_path / "long.mp4"
    _write_video(long, frames=21, rate=fractions.Fraction(1, 30))  # one frame every 30 s: 10.5 minutes
    with pytest.raises(DemoError, match="10.5 min long; the demo accepts videos of at most 10 min"):
        load_media(long)
    many = tmp_path / "many.mp4"
    _write_video(many, frames=40, rate=10)
    with pytest.raises(DemoError, match="has 40 frames; the demo accepts videos of at most 30 frames"):
        load_media(many, limits=Limits(max_source_frames=30))
    clip = load_media(many, num_frames=4)
    assert clip.kind == "video" and len(clip.frames) == 4 and clip.duration == pytest.approx(4.0)
    with pytest.raises(DemoError, match="frames per video"):
        load_media(many, num_frames=0)


def test_options_parse_key_values_and_json():
    assert parse_options("") == {}
    assert parse_options("seed=3, mode=sample") == {"seed": 3, "mode": "sample"}
    assert parse_options("layers=[16, 17]; alpha=0.2\nmerge='mean'") == {"layers": [16, 17], "alpha": 0.2,
                                                                          "merge": "mean"}
    assert parse_options("flag=true, other=None") == {"flag": True, "other": None}
    assert parse_options('{"start_layer": 2}') == {"start_layer": 2}
    for bad in ("seed", "1x=2", "{not json", "[1, 2]"):
        with pytest.raises(DemoError):
            parse_options(bad)


# ------------------------------------------------------------------------------------------------- requests


def test_image_run_keeps_the_budget_and_draws_it(engine, image):
    example = engine.examples[0]
    result = engine.run(image, example.question, [Spec("cls_attention", "49")])
    base, run = result.baseline, result.runs[0]
    assert result.expected == example.answer and result.kind == "image"
    assert (base.visual_in, base.visual_out, base.kept) == (196, 196, 196)
    assert (run.visual_in, run.visual_out, run.kept, run.budget_tokens) == (196, 49, 49, 49)
    assert run.selections[0].compressor == "cls_attention" and run.selections[0].num_kept == 49
    assert 0 < run.prefill_seconds and 0 < base.prefill_seconds and run.timing_runs == base.timing_runs == 3
    assert 0 < run.flops < base.flops
    assert run.answer and base.answer
    # the overlay is the input at the same size with the pruned 3/4 dimmed
    assert run.picture.size == base.picture.size == render.plain(image.image).size
    assert (base.title, run.title) == ("all 196 tokens", "cls_attention @ 49 tokens → 49 tokens")
    plain, overlay = _brightness(base.picture), _brightness(run.picture)
    assert np.abs(plain - overlay).mean() > 20 and overlay.mean() < plain.mean()
    assert not vtc.is_applied(engine.model().model)


def test_compare_mode_runs_two_compressors_on_one_input(engine, image):
    result = engine.run(image, "how many shapes are there ?",
                        [Spec("visionzip", "0.25"), Spec("random", 20, "seed=1")])
    a, b = result.runs
    assert (a.compressor, a.kept, a.visual_out) == ("visionzip", 49, 49)
    assert (b.compressor, b.kept, b.options) == ("random", 20, {"seed": 1})
    assert (a.title, b.title) == ("visionzip @ 25 % → 49 tokens", "random @ 20 tokens → 20 tokens")
    assert a.selections[0].selection.groups is not None  # visionzip merges: its groups are drawn
    assert b.flops < a.flops < result.baseline.flops
    assert np.abs(_brightness(a.picture) - _brightness(b.picture)).mean() > 5


def test_time_to_first_token_is_a_median_of_runs_that_take_turns(engine, image, monkeypatch):
    """The page's time to first token (and its "x faster / slower") is the median of ``timing_runs`` runs per
    variant, the answer run first, then rounds taking turns: all tokens, A, B, all tokens, ..."""
    from vtc.demo import engine as engine_module
    from vtc.demo.app import stats_markdown, table_markdown

    real = engine_module._generate
    calls, times = [], iter([0.9, 0.4, 0.3, 0.5, 0.2, 0.35, 0.7, 0.6, 0.1, 0.8, 0.25, 0.45])

    def timed(entry, inputs, max_new_tokens):
        answer, _, total = real(entry, inputs, max_new_tokens)
        records = vtc.last_selection(entry.model) if vtc.is_applied(entry.model) else []
        calls.append((records[0].compressor if records else None, max_new_tokens))
        return answer, next(times), total

    monkeypatch.setattr(engine_module, "_generate", timed)
    monkeypatch.setattr(engine, "timing_runs", 4)
    result = engine.run(image, "how many shapes are there ?", [Spec("random", "20"), Spec("fastervlm", "49")])
    assert calls == [(None, 8), ("random", 8), ("fastervlm", 8)] + [(None, 1), ("random", 1), ("fastervlm", 1)] * 3
    base, a, b = result.all_runs
    # all tokens 0.9, 0.5, 0.7, 0.8; random 0.4, 0.2, 0.6, 0.25; fastervlm 0.3, 0.35, 0.1, 0.45 (medians of four)
    assert base.prefill_seconds == pytest.approx(0.75) and a.prefill_seconds == pytest.approx(0.325)
    assert b.prefill_seconds == pytest.approx(0.325) and {r.timing_runs for r in result.all_runs} == {4}
    assert "median of 4 runs): 325.0 ms (2.31× faster)" in stats_markdown(a, base, None)
    assert "time to first token (median of 4)" in table_markdown(result)
    with pytest.raises(ValueError, match="timing_runs must be an int >= 1"):
        Engine(timing_runs=0)  # checked before anything is loaded or written


def test_each_run_says_its_position_mode(engine, image):
    from vtc.demo.app import stats_markdown

    result = engine.run(image, "how many shapes are there ?",
                        [Spec("random", "20"), Spec("random", "20", "positions=keep")])
    a, b = result.runs
    assert (result.baseline.positions, a.positions, b.positions) == (None, "reindex", "keep")
    assert "positions: `reindex` (kept tokens renumbered" in stats_markdown(a, result.baseline, None)
    assert "positions: `keep` (kept tokens keep their original" in stats_markdown(b, result.baseline, None)
    assert "positions" not in stats_markdown(result.baseline, result.baseline, None)


def test_vtc_errors_are_shown_in_vtcs_own_words(engine, image):
    model = engine.model().model
    with pytest.raises(TypeError) as direct:
        vtc.apply(model, "random", budget=4, not_an_option=1)
    assert not vtc.is_applied(model)
    with pytest.raises(DemoError) as shown:
        engine.run(image, "how many shapes are there ?", [Spec("random", "4", "not_an_option=1")])
    assert str(direct.value) in str(shown.value) and str(shown.value).startswith("compressor A (random): ")
    with pytest.raises(DemoError, match="compressor B"):
        engine.run(image, "q ?", [Spec("random", "4"), Spec("no_such_compressor", "4")])
    for budget, message in (("0", "budget A"), ("1.5", "budget A"), ("many", "budget A")):
        with pytest.raises(DemoError, match=message):
            engine.run(image, "q ?", [Spec("random", budget)])
    with pytest.raises(DemoError, match="type a question"):
        engine.run(image, "  ", [Spec("random", "4")])
    assert not vtc.is_applied(model)


def test_video_strip_shows_each_frames_budget_and_score(engine, video):
    example = engine.examples[2]
    result = engine.run(video, example.question, [Spec("quota", "0.25"), Spec("cls_attention", "0.25")])
    assert result.expected == example.answer and result.kind == "video"
    assert result.baseline.visual_in == 8 * 196 and [f.tokens for f in result.baseline.frames] == [196] * 8
    for run in result.runs:
        record = run.videos[0]  # the default model has no video input: the frames went in as images_as_video
        assert run.kept == run.budget_tokens == round(0.25 * 8 * 196) == sum(f.kept for f in run.frames)
        assert [f.budget for f in run.frames] == record.frame_budgets == [f.kept for f in run.frames]
        assert [f.score for f in run.frames] == [r.score for r in record.selection.frames]
        assert run.picture.width > run.picture.height and run.picture.width >= 4 * 176  # 2 rows of 4 frames
    quota = result.runs[0]
    assert all(f.score is not None for f in quota.frames)  # quota scores the frames' relevance
    assert result.runs[0].title == "quota @ 25 % → 392 tokens"
    assert result.runs[1].title == "cls_attention @ 25 % → 392 tokens"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_other_families_real_video_input_and_anyres_panels(video, image, tmp_path, family):
    folder = tiny.save_tiny(family, tmp_path / family)
    engine = Engine(models=[None, str(folder)], examples_dir=tmp_path / "examples")  # served: embedded + tiny
    if family == "qwen2_vl":  # a model with a video input: LLM frames are temporal steps of 2 sampled frames
        result = engine.run(video, "how many shapes ?", [Spec("cls_attention", "0.25")], model=str(folder),
                            max_new_tokens=2)
        run = result.runs[0]
        assert len(run.frames) == len(run.videos[0].grids) == 4 and not run.selections
        assert run.kept == run.budget_tokens == run.videos[0].budget
        # the all-tokens strip shows the same 4 LLM frames, at the same times, as the compressed one
        assert [f.timestamp for f in result.baseline.frames] == [f.timestamp for f in run.frames]
        assert result.baseline.picture.width == run.picture.width
    else:  # AnyRes: base view and crops are drawn as two panels
        result = engine.run(image, "how many shapes ?", [Spec("cls_attention", 20)], model=str(folder),
                            max_new_tokens=2)
        run = result.runs[0]
        assert run.kept == 20 and run.visual_out > 20  # kept newlines are layout, not budget
        assert run.picture.width > 1.8 * run.picture.height


# ------------------------------------------------------------------------------------------------- models


def test_concurrent_users_get_their_own_selections(engine, image):
    """vtc.apply mutates the shared model: without the per-model lock these two would read each other's records."""
    jobs = {"fastervlm": 30, "divprune": 12, "pool": 0.5, "random": 7}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def user(name, budget):
        try:
            barrier.wait()
            for _ in range(2):
                result = engine.run(image, "how many shapes are there ?", [Spec(name, budget)], max_new_tokens=2)
                results.setdefault(name, []).append(result.runs[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for name, budget in jobs.items():
        want = budget if isinstance(budget, int) else 98
        for run in results[name]:
            assert (run.compressor, run.kept, run.visual_out) == (name, want, want)
            assert {r.compressor for r in run.selections} == {name}
    assert not vtc.is_applied(engine.model().model)


def test_models_load_once_and_are_cached_lru(tmp_path):
    folder = tiny.save_tiny("llava", tmp_path / "llava")
    calls = []

    def loader(ref):
        from vtc.demo.engine import _load_model

        calls.append(ref)
        return _load_model(ref)

    engine = Engine(models=[None, str(folder)], cache_size=1, examples_dir=tmp_path / "examples", loader=loader)
    entries = []
    threads = [threading.Thread(target=lambda: entries.append(engine.model(str(folder)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [str(folder)] and engine.loads == 1 and len({id(e) for e in entries}) == 1
    assert engine.model(f"  {folder} ") is entries[0]
    default = engine.model()  # the embedded model evicts the tiny one (cache of one)
    assert default.label.startswith("vtc-shapes") and engine.cached_models() == ["embedded default"]
    assert engine.model("") is default and engine.loads == 2
    engine.model(str(folder))
    assert calls == [str(folder), None, str(folder)]
    assert engine.model("llava") is engine.model(str(folder))  # by its label too, loaded once
    with pytest.raises(DemoError, match="this demo serves only"):
        engine.model(str(tmp_path / "missing"))
    assert calls == [str(folder), None, str(folder)]


def _never(ref):
    raise AssertionError(f"loaded {ref!r}")


def test_only_the_served_models_are_offered_and_anything_else_is_refused_at_once(tmp_path, monkeypatch):
    first, second = tmp_path / "srv" / "first-model", tmp_path / "srv" / "org" / "second-model"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    engine = Engine(models=[str(first), str(second)], examples_dir=tmp_path / "examples", loader=_never)
    assert list(engine.labels.values()) == ["first-model", "second-model"]  # base names, never server paths
    assert engine.default_model == str(first) and engine.default_label == "first-model"
    assert engine._key("second-model") == engine._key(f" {second} ") == str(second)
    assert engine._key("") == str(first)

    from vtc.integrations.transformers import preflight

    def no_probe(*args, **kwargs):
        raise AssertionError("a refused model must not touch the file system or the network")

    monkeypatch.setattr(preflight, "resolve_model_ref", no_probe)
    monkeypatch.setattr("os.path.isdir", no_probe)
    media = load_media(engine.examples[0].path)
    for typed in ("/etc", str(tmp_path / "srv"), "llava-hf/llava-1.5-7b-hf", "embedded default"):
        start = time.perf_counter()
        with pytest.raises(DemoError) as caught:
            engine.run(media, "how many shapes are there ?", [Spec("random", "4")], model=typed)
        assert time.perf_counter() - start < 0.5
        message = str(caught.value)
        assert message == "model not available: this demo serves only: first-model, second-model"
        assert str(tmp_path) not in message and typed not in message
    assert engine.loads == 0


def test_a_missing_served_folder_fails_at_start(tmp_path):
    with pytest.raises(DemoError, match="cannot load model .*no such folder"):
        Engine(models=[None, str(tmp_path / "missing")], examples_dir=tmp_path / "examples", loader=_never)


def test_any_model_only_on_a_loopback_host(tmp_path):
    from vtc.demo.engine import check_host, is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost", "[::1]", "127.0.1.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "example.org", ""]))
    for host in ("127.0.0.1", "::1", "localhost"):
        check_host(host, True)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        check_host(host, False)  # an allowlist is fine anywhere
        with pytest.raises(DemoError, match="only allowed on a loopback host"):
            check_host(host, True)
    with pytest.raises(DemoError, match="share link"):
        check_host("127.0.0.1", True, share=True)
    engine = Engine(allow_any_model=True, examples_dir=tmp_path / "examples")
    with pytest.raises(DemoError, match="cannot load model .*no such folder"):  # typed refs load as before
        engine.model(str(tmp_path / "missing") + "/")


# ------------------------------------------------------------------------------------------------- drawing


def _grid(rows: int, cols: int, cell: int, views: list[int] | None = None) -> TokenBoxes:
    boxes = torch.tensor([[c * cell, r * cell, (c + 1) * cell, (r + 1) * cell]
                          for r in range(rows) for c in range(cols)], dtype=torch.float32)
    view = torch.tensor(views if views is not None else [0] * (rows * cols))
    return TokenBoxes(boxes, view, (1, 1))


def test_overlay_dims_pruned_tokens_and_outlines_merges():
    picture = Image.new("RGB", (64, 64), (200, 200, 200))
    boxes = _grid(4, 4, 16)
    out = render.token_overlay(picture, boxes, torch.tensor([0, 5]), side=64)
    pixels = _brightness(out)
    assert out.size == (64, 64)
    assert pixels[4:12, 4:12].mean() == pytest.approx(200, abs=3)  # token 0 kept: untouched inside
    assert pixels[52:60, 52:60].mean() < 0.5 * 200  # token 15 pruned: dimmed
    merged = render.token_overlay(picture, boxes, [0, 10], groups=[torch.tensor([0, 1, 4]), torch.tensor([10])],
                                  side=64)
    rgb = np.asarray(merged)
    assert tuple(rgb[0, 20]) == render.GROUP_COLOURS[0]  # member 1 outlined in its group's colour
    assert tuple(rgb[32, 32]) == render.KEPT_COLOUR  # token 10 kept alone
    shade = _brightness(merged)
    kept, member, pruned = shade[4:12, 4:12].mean(), shade[20:28, 4:12].mean(), shade[20:28, 20:28].mean()
    assert pruned < member < kept  # token 4 was merged into token 0: shown, but less than a kept token
    with pytest.raises(ValueError, match="outside"):
        render.token_overlay(picture, boxes, [16])


def test_anyres_overlay_has_a_base_and_a_crops_panel():
    picture = Image.new("RGB", (64, 64), (180, 180, 180))
    base = _grid(2, 2, 32, [0] * 4)
    crops = _grid(4, 4, 16, [1 + (r // 2) * 2 + (c // 2) for r in range(4) for c in range(4)])
    nan = torch.full((1, 4), float("nan"))  # a newline token: no pixels
    boxes = TokenBoxes(torch.cat([base.boxes, nan, crops.boxes]),
                       torch.cat([base.views, torch.tensor([-1]), crops.views]), (1, 1))
    out = render.token_overlay(picture, boxes, [0, 4, 5, 20], side=64)
    assert out.width == 2 * 64 + 8 and out.height > 64
    strip = render.frame_strip([out, out, out], ["a", "b\nc", "d"], tile=50, columns=2)
    assert strip.size[0] == 2 * 50 + 6 and strip.size[1] > 2 * 50


def test_vtc_demo_command_line(tmp_path, capsys):
    from vtc.cli import build_parser, cmd_demo, main

    args = build_parser().parse_args(["demo", "--host", "0.0.0.0", "--port", "8123", "--share", "no"])
    assert (args.func, args.model, args.host, args.port, args.share) == (cmd_demo, None, "0.0.0.0", 8123, "no")
    assert build_parser().parse_args(["demo", "--model", "a", "--model", "b"]).model == ["a", "b"]
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 1  # fails before serving anything
    assert "cannot load model" in capsys.readouterr().err
    assert main(["demo", "--allow-any-model", "--host", "0.0.0.0"]) == 1  # refused before loading anything
    assert "--allow-any-model is only allowed on a loopback host" in capsys.readouterr().err
    assert main(["demo", "--timing-runs", "0"]) == 1  # refused before loading anything
    assert "--timing-runs must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("compressor", vtc.list_compressors("encoder"))
def test_options_placeholder_is_a_valid_input_for_its_compressor(compressor):
    """The options box's example follows the chosen compressor; typed in as shown, it must be accepted."""
    from vtc.demo.app import options_hint
    from vtc.demo.engine import parse_options

    hint = options_hint(compressor)
    if hint.endswith("has no options"):
        assert not dataclasses.fields(vtc.get_compressor_class(compressor))
        return
    assert hint.startswith("e.g. ")
    options = parse_options(hint[len("e.g. "):].split(" (key=")[0])
    vtc.create_compressor(compressor, **options)  # raises on an invalid example


def test_speed_is_called_slower_when_slower():
    from vtc.demo.app import speed_words

    assert speed_words(0.2, 0.1) == "2.00× faster"
    assert speed_words(0.1, 0.1) == "1.00× faster"
    assert speed_words(0.3, 0.4) == "1.33× slower"  # not "0.75× faster"


def test_a_truncated_video_is_called_damaged_not_unknown(tmp_path):
    """A cut-off MP4 (an interrupted upload or copy) is a damaged video: say so, not "neither an image nor a video"."""
    from vtc.demo.engine import write_video

    whole = tmp_path / "whole.mp4"
    frames = [Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    write_video(frames, whole, fps=4)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    assert load_media(whole, num_frames=2).kind == "video"
    with pytest.raises(DemoError, match="looks like a video but cannot be read -- the file may be truncated"):
        load_media(cut, num_frames=2)


def test_column_titles_say_what_each_picture_shows():
    assert run_title(None, None, 196) == "all 196 tokens"
    assert run_title("cls_attention", 0.25, 49) == "cls_attention @ 25 % → 49 tokens"
    assert run_title("random", 0.125, 25) == "random @ 12.5 % → 25 tokens"
    assert run_title("visionzip", 64, 64) == "visionzip @ 64 tokens → 64 tokens"


def _center_crop_boxes(width: int, height: int, grid: int) -> TokenBoxes:
    """What LLaVA's processor sees of a landscape image: the centre square, ``grid`` x ``grid`` tokens."""
    side = min(width, height)
    x_off, y_off, cell = (width - side) / 2, (height - side) / 2, side / grid
    boxes = torch.tensor([[x_off + c * cell, y_off + r * cell, x_off + (c + 1) * cell, y_off + (r + 1) * cell]
                          for r in range(grid) for c in range(grid)], dtype=torch.float32)
    return TokenBoxes(boxes, torch.zeros(grid * grid, dtype=torch.long), (1, 1))


def test_areas_the_model_never_sees_are_hatched_not_dimmed():
    picture = Image.new("RGB", (1200, 800), (200, 60, 60))  # 200-px strips left and right are cropped away
    boxes = _center_crop_boxes(1200, 800, 14)
    out = render.token_overlay(picture, boxes, list(range(0, 196, 4)), side=448)
    rgb = np.asarray(out).astype(int)
    assert out.size == (448, 299)
    scale = 448 / 1200
    # token 1 (row 0, column 1) is pruned; the strip left of x=200 is outside every token box
    px, py = round((200 + 1.5 * 800 / 14) * scale), round(0.5 * 800 / 14 * scale)
    pruned = rgb[py, px]
    assert pruned.max() < 100  # dimmed
    ys, xs = np.mgrid[0:out.height, 0:int(200 * scale) - 2]
    strip = rgb[:, :int(200 * scale) - 2]
    on = render.is_hatch(xs, ys)
    assert (strip[on] == render.HATCH_COLOUR).all()  # the hatch pattern, stripe by stripe
    assert (np.abs(strip[~on] - pruned).sum(axis=-1) > 150).all()  # between the stripes: light grey, not dimmed
    assert np.abs(strip[~on].mean() - strip[on].mean()) > 50
    inside = rgb[:, round(200 * scale) + 2:round(1000 * scale) - 2]
    iy, ix = np.mgrid[0:inside.shape[0], 0:inside.shape[1]]
    assert not (inside == render.HATCH_COLOUR).all(axis=-1).any()  # no hatching on tokens, even at their edges
    # the all-tokens view: the same strips hatched, the token grid drawn, the tokens themselves untouched
    full = np.asarray(render.all_tokens(picture, boxes, side=448)).astype(int)
    assert (full[:, :int(200 * scale) - 2][on] == render.HATCH_COLOUR).all()
    column = full[:, round(200 * scale) + 5]  # a vertical line through the first token column: crosses 13 edges
    assert (column == render.GRID_COLOUR).all(axis=-1).sum() >= 13
    assert tuple(full[py, px]) == (200, 60, 60)
    # a square image fully covered by tokens: nothing hatched
    square = render.token_overlay(Image.new("RGB", (64, 64), (200, 200, 200)), _grid(4, 4, 16), [0], side=64)
    assert not (np.asarray(square) == render.HATCH_COLOUR).all(axis=-1).any()


def test_frame_captions_are_legible_and_omit_missing_scores():
    media = Media("video", [Image.new("RGB", (32, 32))] * 2, "v.mp4", "0", timestamps=[0.0, 1.5])
    unscored = _frame_caption(1, media, FrameInfo(1, tokens=196, kept=49, budget=49, timestamp=1.5))
    assert unscored == "frame 1 · 1.5 s\nkept 49/196\nbudget 49"
    assert "n/a" not in unscored and "score" not in unscored
    scored = _frame_caption(0, media, FrameInfo(0, tokens=196, kept=49, budget=49, score=0.25, timestamp=0.0))
    assert scored.endswith("\nscore 0.250")
    # a 4-column strip is shown at about half size: its captions are drawn large enough to stay ~10 px on screen
    tiles = [Image.new("RGB", (64, 64), (0, 0, 0))] * 8
    captions = [scored] * 8
    strip = render.frame_strip(tiles, captions, tile=176, columns=4)
    size = render.caption_size(captions, 176)
    assert size * 350 / strip.width >= 9  # a 350-px column shows the strip at 350 / width of its size
    ink = np.asarray(strip.convert("L"))[176:, :176] < 128  # the first frame's caption
    rows = np.flatnonzero(ink.any(axis=1))
    assert rows.size and rows.max() - rows.min() >= 3 * size  # four lines of text, each about `size` tall


def test_video_captions_never_say_score_na(engine, video):
    result = engine.run(video, "how many shapes are there ?", [Spec("cls_attention", "0.25")])
    run = result.runs[0]
    captions = [_frame_caption(f.frame, video, f) for f in run.frames]
    assert all("n/a" not in c for c in captions)
    assert all(("score" in c) == (f.score is not None) for c, f in zip(captions, run.frames))


def test_a_new_input_or_question_clears_the_results_and_the_known_answer_follows_the_question(engine, tmp_path):
    from vtc.demo.app import build_app

    demo = build_app(engine)
    fns = {f.fn.__name__: f.fn for f in demo.fns.values() if f.fn is not None}
    example = engine.examples[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n")
    # a bad upload: every picture and word of the previous input is cleared; the error is the status
    *results, status, expected, answers = fns["on_file"](str(notes), example.question, 8)
    assert status.startswith("error: notes.txt is neither") and expected == "" and answers == {}
    assert [r["value"] if isinstance(r, dict) else r for r in results] == [None, "", None, "", None, "", ""]
    # a bundled example: its preview, its known answers, no results yet
    *results, status, expected, answers = fns["on_file"](example.path, example.question, 8)
    assert results[0]["value"] is not None
    assert [r["value"] if isinstance(r, dict) else r for r in results[1:]] == ["", None, "", None, "", ""]
    assert status.startswith("ready") and expected == f"known answer: **{example.answer}**"
    assert answers == example.answers
    # an edited question clears the answers shown and the known answer follows it
    *cleared, expected = fns["on_question"]("is there a purple unicorn?", answers)
    assert all((c["value"] if isinstance(c, dict) else c) in (None, "") for c in cleared) and expected == ""
    for question, answer in example.answers.items():
        assert fns["on_question"](f" {question} ", answers)[-1] == f"known answer: **{answer}**"


# ------------------------------------------------------------------------------------------------- slow model loads

SLOW = "org/slow-model"  # a hub id whose download hangs (no network: the loader is a fake that waits on an event)


def _hanging_loader(started: threading.Event, release: threading.Event, calls: list, outcome):
    """A loader for ``SLOW`` that signals ``started``, hangs until ``release`` and then returns ``outcome()`` (or
    raises it, for an exception); any other model loads for real."""
    from vtc.demo.engine import _load_model

    def loader(ref):
        calls.append(ref)
        if ref != SLOW:
            return _load_model(ref)
        started.set()
        assert release.wait(300)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome()

    return loader


def test_a_slow_model_load_blocks_nobody_else_and_fails_after_its_time_limit(tmp_path, image):
    from vtc.demo.engine import _load_model

    started, release, calls = threading.Event(), threading.Event(), []
    engine = Engine(allow_any_model=True, examples_dir=tmp_path / "examples",
                    loader=_hanging_loader(started, release, calls, lambda: _load_model(None)))
    engine.model()  # the default model, loaded
    engine.load_timeout = 0.5  # for loads started from now on
    with pytest.raises(DemoError) as caught:  # the load hangs: its waiter gets one message at the time limit
        engine.model(SLOW)
    message = str(caught.value)
    assert message.startswith(f"model {SLOW} did not load within 0.5 s (the demo's time limit")
    assert "try again in a few minutes, or choose another model" in message and str(tmp_path) not in message
    assert started.is_set() and calls.count(SLOW) == 1
    with pytest.raises(DemoError, match="did not load within 0.5 s"):  # still loading: fails at once, no 2nd load
        engine.model(SLOW)
    assert calls.count(SLOW) == 1
    result = engine.run(image, "how many shapes are there ?", [Spec("random", "4")], max_new_tokens=2)
    assert result.runs[0].kept == 4  # another model's request is not held up by the hanging load
    release.set()  # the load finishes after all: it is cached, and the next request gets it
    for _ in range(600):
        if SLOW in engine.cached_models():
            break
        time.sleep(0.1)
    assert engine.model(SLOW).label == SLOW and calls.count(SLOW) == 1


def test_a_failed_load_is_reported_to_every_waiter_and_not_cached(tmp_path):
    started, release, calls = threading.Event(), threading.Event(), []
    engine = Engine(allow_any_model=True, load_timeout=300, examples_dir=tmp_path / "examples", loader=_never)
    engine._loader = _hanging_loader(started, release, calls, DemoError(f"cannot load model {SLOW!r}: interrupted"))
    errors = []

    def user():
        try:
            engine.model(SLOW)
        except DemoError as exc:
            errors.append(str(exc))

    users = [threading.Thread(target=user) for _ in range(3)]
    for thread in users:
        thread.start()
    assert started.wait(60)
    release.set()
    for thread in users:
        thread.join(timeout=60)
    assert errors == [f"cannot load model {SLOW!r}: interrupted"] * 3 and calls == [SLOW]  # one load, shared
    with pytest.raises(DemoError, match="interrupted"):  # not cached: the next request tries again
        engine.model(SLOW)
    assert calls == [SLOW, SLOW] and engine.loads == 0


def test_run_waits_for_a_loading_model_outside_the_request_slots(tmp_path, image):
    """More requests for a hanging model than there are slots: another user's request still completes, and the
    waiters get the loader's message once it fails."""
    import asyncio
    import inspect

    from vtc.demo.app import RUN_SLOTS, build_app

    started, release, calls = threading.Event(), threading.Event(), []
    failure = DemoError(f"cannot load model {SLOW!r}: it is neither a local folder nor reachable on the Hub")
    engine = Engine(allow_any_model=True, load_timeout=300, examples_dir=tmp_path / "examples",
                    loader=_hanging_loader(started, release, calls, failure))
    engine.model()
    demo = build_app(engine)
    block = next(f for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_run")
    assert block.concurrency_limit is None and inspect.isasyncgenfunction(block.fn)
    path = engine.examples[0].path

    async def request(model) -> list[str]:
        """The statuses the request shows, in order."""
        outputs = block.fn(path, "how many shapes are there ?", model, 8, 2, "random", "4", "", False, "random",
                           "4", "")
        return [out[-1] async for out in outputs]

    async def scenario():
        waiting = [asyncio.create_task(request(SLOW)) for _ in range(RUN_SLOTS + 2)]
        assert await asyncio.to_thread(started.wait, 60)
        other = await asyncio.wait_for(request(""), 300)
        assert len(other) == 1 and other[0].startswith("done: 1 compressor(s)"), other
        assert not any(task.done() for task in waiting)  # still waiting for the load
        release.set()
        return await asyncio.wait_for(asyncio.gather(*waiting), 300)

    statuses = asyncio.run(scenario())
    for shown in statuses:  # while it loads the status says so, then the loader's message
        assert len(shown) == 2 and shown[0].startswith(f"loading model {SLOW} (its first use; at most "), shown
        assert shown[1] == f"error: {failure}"
    assert calls.count(SLOW) == 1


def test_the_all_tokens_video_strip_draws_the_token_grid_and_hatches_what_is_never_seen(engine, tmp_path):
    """Wide frames: the model sees their centre square only. Like the image view, the all-tokens strip hatches the
    strips left and right (grey, striped) and draws the token grid in white over the centre."""
    from vtc.demo.engine import write_video

    frames = [Image.fromarray(np.full((120, 240, 3), (200, 60 + 20 * i, 60), np.uint8)) for i in range(4)]
    write_video(frames, tmp_path / "wide.mp4", fps=2)
    media = engine.load_media(tmp_path / "wide.mp4", 4)
    result = engine.run(media, "how many shapes are there ?", [Spec("random", "0.25")], max_new_tokens=2)
    strips = {"all tokens": np.asarray(result.baseline.picture).astype(int),
              "random": np.asarray(result.runs[0].picture).astype(int)}
    tile, gap, height = 176, 6, 88  # 4 frames of 240x120 in one row, each 176 px wide
    for name, strip in strips.items():
        for t in range(4):
            x = t * (tile + gap)
            side = strip[2:height - 2, x + 2:x + 40]  # left of the centre square (x < 60 of 240)
            assert np.abs(side[..., 0] - side[..., 1]).max() <= 3, (name, t)  # grey: the frame's red is washed out
            assert side.std() > 15, (name, t)  # striped, not a flat dim
    grid = strips["all tokens"]
    for t in range(4):
        x = t * (tile + gap)
        rows = grid[height // 2 - 4:height // 2 + 4, x + 46:x + 130]  # across the centre square: 14 token columns
        row = rows[rows[..., 1].mean(axis=1).argmin()]  # a row through the tokens, not along a horizontal line
        lines = np.flatnonzero(row[:, 1] > 180)  # white grid lines over the frame's colour (green <= 120)
        assert len(np.unique(lines // 4)) >= 12, (t, row[:, 1].tolist())
        inside = np.median(row[row[:, 1] < 130], axis=0)  # between the lines (bicubic rings a little at them)
        assert np.abs(inside - [200, 60 + 20 * t, 60]).max() <= 12  # the tokens themselves untouched
