import pytest

from vtc.cli import main


def test_main_job_runs_on_the_default_model(capsys):
    assert main(["run", "--budget", "4", "--compressor", "fastervlm", "--compressor", "pool"]) == 0
    out = capsys.readouterr().out
    assert "embedded default" in out and "synthetic test image #0" in out and "expected answer" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("fastervlm ", "pool "))]
    assert [(row[0], row[1], row[2]) for row in lines] == [("fastervlm", "196", "4"), ("pool", "196", "4")]
    full = next(line for line in out.splitlines() if line.startswith("none (all tokens)"))
    assert full.split()[3:5] == ["196", "196"] and full.rstrip().endswith(("(right)", "(wrong)"))


def test_run_says_which_position_mode_it_uses(capsys):
    assert main(["run", "--budget", "4", "--compressor", "random"]) == 0
    assert "positions: reindex (kept tokens renumbered" in capsys.readouterr().out
    assert main(["run", "--budget", "4", "--compressor", "random", "--option", "positions=keep"]) == 0
    out = capsys.readouterr().out
    assert "positions: keep (kept tokens keep their original position ids); also available: reindex" in out


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


def test_main_job_rejects_a_bad_budget(capsys):
    assert main(["run", "--budget", "0"]) == 2
    assert "budget must be" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    assert "cls_attention" in capsys.readouterr().out


def test_unreadable_image_is_reported(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["run", "--image", str(bad), "--compressor", "pool"])
