import pytest

from vtc.cli import main


def test_main_job_runs_on_the_default_model(capsys):
    assert main(["run", "--budget", "4", "--compressor", "fastervlm", "--compressor", "pool"]) == 0
    out = capsys.readouterr().out
    assert "tiny random-weight llava" in out  # says it is not a trained model
    lines = [line.split() for line in out.splitlines() if line.startswith(("fastervlm ", "pool "))]
    assert [(row[0], row[1], row[2]) for row in lines] == [("fastervlm", "36", "4"), ("pool", "36", "4")]


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
