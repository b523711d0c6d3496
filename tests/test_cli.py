import re

import pytest
from PIL import Image

from vtc import cli
from vtc.cli import main

#: a small held-out set and one timed run: the tests check what is printed, not how fast
SMALL = ["--per-kind", "1", "--timing-runs", "1"]
#: a row of the held-out table: name, k/n, %, the difference (not on the all-tokens row), tokens in -> out, time
ROW = re.compile(r"^(?P<name>all tokens|\S+)\s+(?P<k>\d+)/(?P<n>\d+)\s+(?P<pct>\d+) %\s+"
                 r"(?:(?P<diff>[+-]\d+\.\d) pts \(±\d+\.\d\)\s+)?(?P<tin>\d+) -> (?P<tout>[\d.]+\*?)\s+"
                 r"(?P<time>\d+\.\d\dx (?:time(?: \(slower\))?|\(\d+ ms\)))$")


@pytest.fixture(scope="module")
def default_model():
    import vtc

    return vtc.load_default()


@pytest.fixture
def loaded_once(monkeypatch, default_model):
    """``cli._load`` hands out one loaded embedded model (vtc.remove restores it after every run)."""
    from vtc.integrations.transformers.default import DEFAULT_MODEL_NAME

    monkeypatch.setattr(cli, "_load", lambda ref: (default_model, DEFAULT_MODEL_NAME if ref is None else ref))


def _rows(out: str) -> dict[str, re.Match]:
    return {m["name"]: m for m in map(ROW.match, out.splitlines()) if m}


def test_held_out_set_follows_its_rule():
    from vtc.eval.default_model import synthetic

    pairs = cli.held_out_set()
    assert len(pairs) == cli.DEFAULT_PER_KIND * len(cli.HELD_OUT_KINDS) == 40
    assert [(i, q.text) for i, q in pairs] == [(i, q.text) for i, q in cli.held_out_set()]  # deterministic
    assert pairs[0][0] == 0 and pairs[0][1].kind == "color_at"  # question 1, the drawn example: a place in image 0
    for kind in cli.HELD_OUT_KINDS:  # per kind: its first question in each of the first 4 test images having one
        expected, index = [], 0
        while len(expected) < cli.DEFAULT_PER_KIND:
            questions = [q for q in synthetic.make_image_sample("test", index).questions if q.kind == kind]
            if questions:
                expected.append((index, questions[0].text))
            index += 1
        assert [(i, q.text) for i, q in pairs if q.kind == kind] == expected
    assert [q.kind for _, q in cli.held_out_set(2, start=5)] == [k for k in cli.HELD_OUT_KINDS for _ in range(2)]
    assert min(i for i, _ in cli.held_out_set(2, start=5)) >= 5
    kinds = {q.kind for i in range(30) for q in synthetic.make_image_sample("test", i).questions}
    assert kinds == set(cli.HELD_OUT_KINDS)  # every image question kind of the data, none invented
    with pytest.raises(ValueError, match="--per-kind must be"):
        cli.held_out_set(0)


def test_budget_words():
    assert cli.budget_words(0.25, 196) == "25 % of 196 = 49 tokens per image"
    assert cli.budget_words(0.11, 196) == "11 % of 196 = 22 tokens per image"
    assert cli.budget_words(0.333, 576) == "33.3 % of 576 = 192 tokens per image"
    assert cli.budget_words(1.0, 196) == "100 % of 196 = 196 tokens per image"
    assert cli.budget_words(64, 196) == "64 tokens per image"
    assert cli.budget_words(500, 196) == "500 tokens per image (the image has 196: all kept)"
    with pytest.raises(ValueError, match="budget must be"):
        cli.budget_words(0, 196)


def test_relative_time_says_slower():
    assert cli.relative_time(0.62) == "0.62x time"
    assert cli.relative_time(1.001) == "1.00x time"
    assert cli.relative_time(1.3) == "1.30x time (slower)"


def test_main_job_prints_accuracy_tokens_and_time_per_compressor(loaded_once, capsys, tmp_path):
    out_dir = tmp_path / "made" / "here"
    assert main(["run", "--budget", "4", "--compressor", "fastervlm", "--compressor", "fastv", *SMALL,
                 "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "embedded default" in out and "questions: 10 held-out, 1 of each of the 10 question kinds" in out
    assert "budget: 4 tokens per image" in out and "time to first token" in out.splitlines()[5]
    rows = _rows(out)
    assert list(rows) == ["all tokens", "fastervlm", "fastv"], out
    assert all(r["n"] == "10" and r["tin"] == "196" for r in rows.values())
    assert rows["all tokens"]["tout"] == "196" and rows["all tokens"]["diff"] is None
    assert rows["fastervlm"]["tout"] == "4" and rows["fastervlm"]["diff"] is not None
    assert rows["fastv"]["tout"].endswith("*") and "* inside the LLM" in out  # LLM-side: tokens per layer
    for r in rows.values():
        assert int(r["pct"]) == round(100 * int(r["k"]) / 10)
    assert "median of 1 warm runs" in out and "'#' kept" not in out  # ASCII grids only with --show-grid
    picture = out_dir / cli.EXAMPLE_PNG
    assert (f"picture: {picture} (904x470; left: all 196 tokens on the model's token grid, right: fastervlm: 4 of "
            "196 kept") in out
    with Image.open(picture) as png:
        assert png.format == "PNG" and png.size == (904, 470)  # two 448-px panels, 8 px apart, 22 px of labels
        png.verify()
    assert "example: question 1 of 10, synthetic test image #0: 'what color is the shape at the" in out
    tail = out[out.index("next steps:"):]
    assert "vtc demo" in tail and "vtc eval" in tail and 'vtc.apply(model, "hiprune", budget=64)' in tail


def test_video_only_methods_are_left_out_with_a_note(loaded_once, monkeypatch, capsys, tmp_path):
    import vtc

    monkeypatch.setattr(vtc, "list_compressors", lambda *a: ["dycoke", "random"])  # the default: every one
    assert main(["run", *SMALL, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "video methods (dycoke) compare frames, so they are left out on one image" in out
    assert list(_rows(out)) == ["all tokens", "random"]
    assert "budget: 25 % of 196 = 49 tokens per image" in out


def test_run_says_which_position_mode_it_uses(loaded_once, capsys, tmp_path):
    argv = ["run", "--budget", "4", "--compressor", "random", *SMALL, "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "positions: reindex (kept tokens renumbered" in capsys.readouterr().out
    assert main([*argv, "--option", "positions=keep"]) == 0
    out = capsys.readouterr().out
    assert "positions: keep (kept tokens keep their original position ids); also available: reindex" in out


def test_run_on_your_own_image(loaded_once, capsys, tmp_path):
    from vtc.eval.default_model import synthetic

    picture = tmp_path / "photo.png"
    synthetic.make_image_sample("test", 3).image.resize((300, 200)).save(picture)
    assert main(["run", "--image", str(picture), "--compressor", "pool", "--compressor", "fastv", "--show", "fastv",
                 "--timing-runs", "1", "--show-grid", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"image: {picture}\nquestion: 'what color is the shape at the center ?'\n" in out
    assert "budget: 25 % of 196 = 49 tokens per image" in out and "held-out" not in out
    lines = out.splitlines()
    assert re.match(r"pool\s+196 -> 49\s+\d+\.\d\dx time( \(slower\))?\s+'\w*'$", next(l for l in lines
                                                                                      if l.startswith("pool ")))
    assert re.match(r"all tokens\s+196 -> 196\s+1\.00x \(\d+ ms\)\s+'\w*'$", next(l for l in lines
                                                                                 if l.startswith("all tokens")))
    assert "(right)" not in out and "(wrong)" not in out  # nobody knows the answer about a user's picture
    assert "fastv: the last LLM layers see 49/196 tokens" in out and "pool: kept 49/196 tokens" in out  # grids
    with Image.open(tmp_path / cli.EXAMPLE_PNG) as png:
        assert png.size[0] == 904 and "right: fastv: the 49 of 196 the last LLM layers see" in out


def test_a_question_about_a_synthetic_image_knows_its_answer(loaded_once, capsys, tmp_path):
    assert main(["run", "--question", "how many shapes are there ?", "--sample", "2", "--compressor", "pool",
                 "--timing-runs", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "image: synthetic test image #2\nquestion: 'how many shapes are there ?' (expected answer: '" in out
    assert re.search(r"^pool .*'\w+'  \((right|wrong)\)$", out, re.MULTILINE)


def test_another_model_without_an_image_claims_no_answer(loaded_once, capsys, tmp_path):
    """--model and no --image: one question about a bundled synthetic image, its answer not claimed (the held-out
    set is the embedded model's task)."""
    assert main(["run", "--model", "my/checkpoint", "--compressor", "pool", "--timing-runs", "1",
                 "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model: my/checkpoint\nimage: synthetic test image #0\nquestion: 'what " in out
    assert "expected" not in out and "(right)" not in out and "(wrong)" not in out and "held-out" not in out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "budget must be"),
    (["--show", "pool", "--compressor", "random"], "--show 'pool' is not a compressor of this run \\(random\\)"),
    (["--per-kind", "0"], "--per-kind must be an integer >= 1"),
    (["--timing-runs", "0"], "--timing-runs must be an integer >= 1"),
    (["--sample", "-1"], "--sample must be an integer >= 0"),
    (["--per-kind", "2", "--question", "how many shapes are there ?"], "--per-kind sizes the held-out set"),
    (["--per-kind", "2", "--model", "my/checkpoint"], "--per-kind sizes the held-out set"),
    (["--out-dir", "FILE"], "--out-dir .* is not a folder this user can write to"),
    (["--out-dir", "FILE/below"], "--out-dir .* is not a folder this user can write to"),
])
def test_bad_arguments_fail_before_loading(argv, message, monkeypatch, capsys, tmp_path):
    def never(ref):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", never)
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err) and err.count("\n") == 1, err


def test_sample_is_refused_with_an_image(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_load", lambda ref: pytest.fail("the model was loaded"))
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["run", "--image", str(image), "--sample", "3"]) == 2
    assert "--sample picks a synthetic test image" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    assert "cls_attention" in capsys.readouterr().out


def test_position_modes_put_the_mode_in_use_first():
    import vtc
    from vtc.testing import build_tiny

    model, _ = build_tiny("qwen2_5_vl")
    assert vtc.position_modes(model) == ("keep",)
    model, _ = build_tiny("llava")
    assert vtc.position_modes(model) == ("reindex", "keep")
    vtc.apply(model, "random", budget=4, positions="keep")
    assert vtc.position_modes(model) == ("keep", "reindex")
    vtc.remove(model)
    assert vtc.position_modes(model) == ("reindex", "keep")


def test_unreadable_image_is_reported(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["run", "--image", str(bad), "--compressor", "pool"])
