"""The papers' table (``vtc eval``'s ``vtc_table.md`` / ``.csv``): golden relative averages by hand, the headline
metric of each benchmark, bootstrap standard errors; and ``vtc eval --standin`` end to end on every stand-in task
for a LLaVA-style and a Qwen-style tiny model, keep-all equal to ``compressor=none``."""

from __future__ import annotations

import csv
import io
import json
import pathlib

import pytest

from vtc import cli
from vtc import testing as tiny
from vtc.eval.lmms import table


def _run(compressor, budget, values, ses=None, n=10):
    return {"compressor": compressor, "budget": budget,
            "headline": {t: {"metric": table.HEADLINES[t][0], "value": v, "se": (ses or {}).get(t), "n": n}
                         for t, v in values.items()}}


def test_relative_average_golden():
    """By hand: MME 1200 / 1500 = 80 %, GQA 0.54 / 0.60 = 90 %, POPE 0.80 / 0.80 = 100 % -> 90.0 %; a benchmark
    whose all-tokens score is 0 is left out of the mean (DocVQA); the baseline row is 100 %."""
    result = {"tasks": ["mme", "gqa", "pope_full", "docvqa_val"], "runs": [
        _run("none", None, {"mme": 1500.0, "gqa": 0.60, "pope_full": 0.80, "docvqa_val": 0.0}, {"gqa": 0.05}),
        _run("hiprune", 64, {"mme": 1200.0, "gqa": 0.54, "pope_full": 0.80, "docvqa_val": 0.1}, {"gqa": 0.04}),
        _run("random", 64, {"mme": 750.0, "gqa": 0.30, "pope_full": 0.40, "docvqa_val": 0.0}),
    ]}
    rows = table.standard_table(result)
    assert [c["title"] for c in rows["columns"]] == ["MME", "GQA", "POPE F1", "DocVQA"]
    base, hiprune, rand = rows["rows"]
    assert base["relative"] == pytest.approx(100.0) and base["benchmarks"] == 3
    assert hiprune["relative"] == pytest.approx((80 + 90 + 100) / 3) and hiprune["benchmarks"] == 3
    assert rand["relative"] == pytest.approx(50.0)
    assert hiprune["cells"]["gqa"].value == pytest.approx(54.0) and hiprune["cells"]["gqa"].se == pytest.approx(4.0)
    assert hiprune["cells"]["mme"].value == pytest.approx(1200.0)  # MME is printed on its own 0-2000 scale
    markdown = table.to_markdown(rows)
    assert "| hiprune | 64 | 1200.0 ± n/a | 54.0 ± 4.0 | 80.0 ± n/a | 10.0 ± n/a | 90.0 % |" in markdown
    assert "GQA (n=10)" in markdown and "avg % of all tokens" in markdown
    parsed = list(csv.DictReader(io.StringIO(table.to_csv(rows))))
    assert parsed[1]["compressor"] == "hiprune" and float(parsed[1]["relative_avg_percent"]) == pytest.approx(90.0)
    assert parsed[1]["gqa:exact_match"] == "54" and parsed[1]["gqa:se"] == "4" and parsed[1]["gqa:n"] == "10"


def test_headline_metric_per_benchmark():
    assert table.headline("vtc_standin_mme", {"mme_perception_score,none": 1234.0, "mme_cognition_score,none": 300.0}
                          ) == ("mme_perception_score", 1234.0)
    assert table.headline("pope_adv", {"pope_accuracy,none": 0.9, "pope_f1_score,none": 0.88}) == ("pope_f1_score", 0.88)
    assert table.headline("docvqa_val", {"anls,none": 0.5, "anls_stderr,none": 0.1}) == ("anls", 0.5)
    assert table.headline("some_new_task", {"exact_match,none": 0.25}) == ("exact_match", 0.25)
    assert table.headline("some_new_task", {"bleu,none": 0.25}) is None


def test_bootstrap_se_keeps_a_printing_aggregation_quiet(capsys):
    """MMMU's aggregation prints its breakdown on every call: the 200 resamples must not flood the terminal (a
    stand-in llava15-table run printed hundreds of dicts); what the caller prints itself still shows."""
    def loud_mean(v):
        print({"Overall": {"num": len(v)}})
        return sum(v) / len(v)

    print("before")
    assert table.bootstrap_se([0.0, 1.0, 1.0, 0.0, 1.0], loud_mean) > 0
    print("after")
    assert capsys.readouterr().out == "before\nafter\n"


def test_bootstrap_se_of_a_mean_matches_the_formula_and_refuses_what_breaks():
    values = [1.0] * 30 + [0.0] * 70
    se = table.bootstrap_se(values, lambda v: sum(v) / len(v), iterations=2000)
    assert se == pytest.approx((0.3 * 0.7 / 100) ** 0.5, rel=0.1)

    def paired(v):  # like MME: refuses a resample that breaks its pairs
        raise AssertionError("two answers per question expected")

    assert table.bootstrap_se(values, paired) is None
    assert table.bootstrap_se([1.0], lambda v: 1.0) is None


def test_every_preset_names_real_tasks_and_budgets():
    for name, preset in table.PRESETS.items():
        assert preset["tasks"] and preset["budgets"] and preset["what"]
        assert all(t in table.HEADLINES for t in preset["tasks"]), name


STANDIN = ["mme", "pope_full", "gqa", "scienceqa_img", "textvqa_val", "mmbench_en_dev_static", "chartqa",
           "docvqa_val", "videomme", "mvbench_moving_direction"]


@pytest.fixture(scope="module")
def standin_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("standard_tiny")
    return {family: tiny.save_tiny(family, root / family, seed=0) for family in ("llava", "qwen2_vl")}


def _responses(folder):
    out = {}
    for path in folder.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            out[(task, sample["doc_id"])] = sample["filtered_resps"]
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vtc_eval_standin_every_task_keep_all_equals_none(family, standin_models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["eval", "--model", str(standin_models[family]), "--standin", "--tasks", ",".join(STANDIN),
                   "--compressor", "fastervlm", "--budget", "1.0", "--budget", "0.5", "--standin-docs", "2",
                   "--out", str(out)])
    printed = capsys.readouterr()
    if rc != 0:  # a random-weight model may say nothing at all (EOS first): vtc eval must then fail, and say where
        error = printed.err.strip().splitlines()[-1]
        assert error.startswith("error: empty answers:") and "videomme" in error, printed.err[-3000:]
    result = json.loads((out / "vtc_eval.json").read_text())
    assert [result["task_names"][t] for t in result["tasks"]] == STANDIN
    runs = {(r["compressor"], r["budget"]): r for r in result["runs"]}
    for task in result["tasks"]:  # each benchmark scored with its own headline metric
        assert runs[("none", None)]["headline"][task]["metric"] == table.known_headline(task)[0]
    assert runs[("none", None)]["headline"]["vtc_standin_pope_full"]["n"] == 6  # three splits of 2
    folders = {p.name.rsplit("__", 1)[1]: p for p in out.iterdir() if p.is_dir() and "__" in p.name}
    assert set(folders) == {"none", "fastervlm_1.0", "fastervlm_0.5"}
    base, keep_all = _responses(folders["none"]), _responses(folders["fastervlm_1.0"])
    assert len(base) == sum(runs[("none", None)]["samples"].values()) >= 2 * 9 + 6
    assert keep_all == base  # budget 1.0 answers exactly as compressor=none, on every document of every task
    half = runs[("fastervlm", 0.5)]
    assert all(v["out"] < v["in"] for v in half["visual_tokens_by_task"].values())
    rows = list(csv.DictReader(io.StringIO((out / "vtc_table.csv").read_text())))
    assert [(r["compressor"], r["budget"]) for r in rows] == [("none", ""), ("fastervlm", "1.0"), ("fastervlm", "0.5")]
    relative = rows[1]["relative_avg_percent"]  # empty when every all-tokens score is 0 (a random tiny model)
    assert relative == "" or float(relative) == pytest.approx(100.0)
    assert not (pathlib.Path.cwd() / "submissions").exists()  # MMBench / TextVQA submission files stay under OUT
    assert list(out.glob("*/submissions/*"))
    assert "avg % of all tokens" in (out / "vtc_table.md").read_text()


def test_standin_task_without_data_says_so_before_loading(tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "never_loaded"), "--standin", "--tasks", "mme,mmbench_en_dev",
                   "--compressor", "random", "--budget", "4", "--out", str(tmp_path / "out")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "mmbench_en_dev" in err and "OpenAI judge" in err and "cannot load" not in err


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lmms_eval_command_line_runs_every_standin_task(family, standin_models, tmp_path):
    """The path users take without vtc eval: ``python -m lmms_eval --model vtc`` on every stand-in task (a budget,
    per-sample counts in the sample lines, each benchmark's own metric in the results, its own output folder)."""
    import os
    import subprocess
    import sys

    from vtc.eval.lmms import standin

    written = standin.write_standins(tmp_path / "standin", STANDIN, n_docs=2)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **written.env)
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args",
         f"pretrained={standin_models[family]},compressor=fastervlm,budget=0.5",
         *written.lmms_eval_args(), "--device", "cpu", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    # lmms-eval's own --output_path/<model name>/ layout (named after pretrained=), plus the submission files some
    # tasks write (MMBench, TextVQA) under --output_path/submissions
    folders = [p for p in out.iterdir() if p.is_dir() and p.name != "submissions"] if out.exists() else []
    assert len(folders) == 1 and folders[0].name.endswith(family), proc.stderr[-3000:]
    results = json.loads(next(folders[0].glob("*_results.json")).read_text())["results"]
    for task in STANDIN:
        spec = standin.STANDIN_TASKS[task]
        leaves = [standin.PREFIX + t for t in spec.subtasks] or [spec.standin]
        for leaf in leaves:
            assert table.headline(leaf, results[leaf]) is not None, (leaf, results.get(leaf))
    for path in folders[0].glob("*_samples_*.jsonl"):
        for line in path.read_text().splitlines():
            counts = json.loads(line)["token_counts"][0]
            assert counts["compressor"] == "fastervlm" and counts["visual_tokens_out"] < counts["visual_tokens_in"]


def test_bad_standin_docs_is_refused_before_anything_is_written(tmp_path, capsys):
    rc = cli.main(["eval", "--standin", "--tasks", "mme", "--standin-docs", "0", "--compressor", "random",
                   "--budget", "4", "--out", str(tmp_path / "out")])
    assert rc != 0 and "--standin-docs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
