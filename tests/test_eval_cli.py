"""``vtc eval``: a real (small) sweep on the embedded model -- its JSON schema, plot and table -- and the loud
failures lmms-eval itself would exit 0 on."""

from __future__ import annotations

import json

import pytest

from vtc import cli
from vtc.eval.lmms import sweep
from vtc.eval.lmms.model import VtcModel

SMALL = ["--task-images", "2", "--task-videos", "1", "--task-questions", "1"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_tasks")


def test_sweep_writes_json_plot_and_table(tmp_path, tasks_dir, capsys):
    out = tmp_path / "out"
    rc = cli.main(["eval", "--compressor", "random", "--compressor", "fastervlm", "--budget", "0.5", "--budget", "16",
                   *SMALL, "--tasks-dir", str(tasks_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads((out / "vtc_eval.json").read_text())
    assert set(result) == set(sweep.RESULT_KEYS)
    assert result["tasks"] == list(sweep.DEFAULT_TASKS) and result["budgets"] == [0.5, 16]
    assert "2*h*vocab" in result["flops_formula"]
    runs = result["runs"]
    assert [(r["compressor"], r["budget"]) for r in runs] == [
        ("none", None), ("random", 0.5), ("random", 16), ("fastervlm", 0.5), ("fastervlm", 16)]
    for run in runs:
        assert set(run) == set(sweep.RUN_KEYS)
        assert set(run["accuracy"]) == set(sweep.DEFAULT_TASKS)
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
        assert run["samples"] == {"vtc_shapes_image": 2, "vtc_shapes_video": 1, "vtc_shapes_image_mc": 2}
        assert run["empty_answers"] == {}
        assert run["prefill_flops"] == pytest.approx(sum(v for k, v in run["prefill_flops_parts"].items()
                                                         if k != "total"))
        assert run["first_token_seconds"] > 0 and run["peak_memory_bytes"] is not None
    base = runs[0]
    assert base["visual_tokens_out"] == base["visual_tokens_in"] and base["relative"]["prefill_flops"] == 1.0
    sixteen = runs[2]
    assert sixteen["visual_tokens_out"] == 16  # every image, and every video over all its frames, kept 16
    assert sixteen["relative"]["prefill_flops"] < 1.0
    assert base["visual_tokens_by_task"]["vtc_shapes_image"] == {"in": 196, "out": 196}
    assert base["visual_tokens_by_task"]["vtc_shapes_video"] == {"in": 8 * 196, "out": 8 * 196}
    assert all(v["out"] == 16 for v in sixteen["visual_tokens_by_task"].values())
    assert runs[1]["visual_tokens_by_task"]["vtc_shapes_video"]["out"] == 8 * 196 // 2
    assert sixteen["relative"]["visual_tokens_out"] == pytest.approx(16 / base["visual_tokens_out"])
    assert (out / "vtc_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # lmms-eval's own layout, one folder per run named by model, compressor and budget (never shared by budgets)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "tasks")
    assert folders == sorted(f"vtc-shapes-llava-embedded-default__{name}" for name in (
        "none", "random_0.5", "random_16", "fastervlm_0.5", "fastervlm_16"))
    for folder in folders:
        assert len(list((out / folder).glob("*_results.json"))) == 1
        logged = list((out / folder).glob("*_samples_*.jsonl"))
        assert len(logged) == 3
        line = json.loads(logged[0].read_text().splitlines()[0])
        assert line["token_counts"][0]["visual_tokens_in"] > 0  # vtc's per-sample counts kept in the sample lines
    assert (out / "vtc_table.md").exists() and (out / "vtc_table.csv").exists()
    assert "avg % of all tokens" in printed
    assert "prefill FLOPs" in printed and "fastervlm" in printed
    assert result["positions"] == "reindex" and "positions: reindex (kept tokens renumbered" in printed


def test_positions_option_reaches_every_compressed_run(tmp_path, tasks_dir, capsys, monkeypatch):
    import vtc

    assert set(cli.POSITION_CHOICES) == set(vtc.POSITION_MODES)
    applied = []
    real_apply = vtc.apply
    monkeypatch.setattr(vtc, "apply", lambda model, *a, **k: applied.append(k.get("positions")) or
                        real_apply(model, *a, **k))
    out = tmp_path / "out"
    rc = cli.main(["eval", "--compressor", "random", "--budget", "16", "--positions", "keep", *SMALL,
                   "--tasks", "vtc_shapes_image", "--tasks-dir", str(tasks_dir), "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "vtc_eval.json").read_text())["positions"] == "keep"
    assert applied and set(applied) == {"keep"}
    assert "positions: keep" in capsys.readouterr().out


def test_unloadable_model_fails_loudly(tmp_path, tasks_dir, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "missing"), "--compressor", "random", "--budget", "4", *SMALL,
                   "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "cannot load model" in capsys.readouterr().err


def test_unknown_task_fails_loudly(tmp_path, tasks_dir, capsys):
    rc = cli.main(["eval", "--compressor", "random", "--budget", "4", "--tasks", "no_such_task", *SMALL,
                   "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "no_such_task" in capsys.readouterr().err


def test_unknown_compressor_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["eval", "--compressor", "nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_empty_answers_fail_the_run(tmp_path, tasks_dir, capsys, monkeypatch):
    original = VtcModel._generate_batch

    def silent(self, requests):
        results = original(self, requests)
        for result in results:
            result.text = ""
        return results

    monkeypatch.setattr(VtcModel, "_generate_batch", silent)
    rc = cli.main(["eval", "--compressor", "random", "--budget", "4", "--tasks", "vtc_shapes_image", *SMALL,
                   "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "empty answers" in capsys.readouterr().err


def test_sweep_warms_up_on_one_document_per_task_before_the_baseline(tmp_path, monkeypatch):
    """The process's first requests pay one-time costs (20.9 MB of resident growth on the first request vs ~5 MB
    after, on the embedded model): without a warm-up they land on the baseline alone and every compressor looks
    lighter. The warm-up answers one document per task, writes nothing and is not among the reported runs; a task
    whose aggregation refuses one document (MME) does not stop it."""
    calls = []

    def fake_run_one(model, processor, compressor, budget, tasks, task_manager, limit, device, batch_size,
                     results_dir, model_name, positions=None, aggregations=None):
        calls.append((compressor, budget, limit, results_dir))
        if limit == 1:  # like MME's aggregation on one document (it scores pairs): the warm-up ignores it
            raise AssertionError("MME only supports pairwise evaluation")
        return _fake_result([budget or 1.0])["runs"][0] | {"compressor": compressor, "budget": budget}

    from vtc.eval.lmms.tasks import write_tasks

    folder = write_tasks(tmp_path / "tasks", images=1, videos=1, questions=1)
    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    result = sweep.sweep(None, ["random"], [0.5, 16], list(sweep.DEFAULT_TASKS), [folder], 7, "cpu", 1,
                         tmp_path / "out")
    out = (tmp_path / "out").resolve()
    assert calls == [("none", None, 1, None), ("none", None, 7, out), ("random", 0.5, 7, out), ("random", 16, 7, out)]
    assert [(r["compressor"], r["budget"]) for r in result["runs"]] == [("none", None), ("random", 0.5), ("random", 16)]


def test_sweep_checks_every_compressor_before_the_baseline(tiny_dirs, tmp_path, monkeypatch):
    """A compressor the model refuses (a video method on LLaVA-NeXT's AnyRes views) used to fail after the runs
    before it (minutes); now it fails before anything runs -- or, when every encoder-side compressor was asked for
    (``vtc eval`` without ``--compressor``), it is left out with the reason."""
    from vtc.eval.lmms.tasks import write_tasks

    calls = []

    def fake_run_one(model, processor, compressor, budget, *args, **kwargs):
        calls.append(compressor)
        return _fake_result([budget or 1.0])["runs"][0] | {"compressor": compressor, "budget": budget}

    folder = write_tasks(tmp_path / "tasks", images=1, videos=1, questions=1)
    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    args = (str(tiny_dirs["llava_next"]), ["random", "dycoke"], [4], ["vtc_shapes_image"], [folder], 1, "cpu", 1,
            tmp_path / "out")
    with pytest.raises(sweep.EvalFailure, match=r"refuses dycoke @ 4: .*nothing was run; drop --compressor dycoke"):
        sweep.sweep(*args)
    assert calls == []
    result = sweep.sweep(*args, skip_unsupported=True)
    assert calls == ["none", "none", "random"]  # warm-up, baseline, random
    assert result["compressors"] == ["random"] and list(result["skipped_compressors"]) == ["dycoke"]
    assert result["skipped_compressors"]["dycoke"].startswith("dycoke @ 4: ")


def test_check_names_every_run_with_empty_answers():
    result = {"runs": [{"compressor": "none", "budget": None, "empty_answers": {}, "samples": {"t": 4, "u": 120}},
                       {"compressor": "hiprune", "budget": 8, "empty_answers": {"t": [3, 5]},
                        "samples": {"t": 4, "u": 120}}]}
    with pytest.raises(sweep.EvalFailure, match=r"hiprune @ 8 on t: 2 of 4 docs \[3, 5\]"):  # half: broken
        sweep.check(result)
    # one empty answer of 120 (random @ 25 % on the embedded model, doc 87: the model stopped at once): a warning,
    # the document scored wrong, the run kept
    result["runs"][1]["empty_answers"] = {"u": [87]}
    assert sweep.check(result) == ["empty answers (scored wrong): hiprune @ 8 on u: 1 of 120 docs [87]"]
    result["runs"][1]["empty_answers"] = {"u": list(range(59))}
    assert len(sweep.check(result)) == 1  # 59 of 120: still a warning
    result["runs"][1]["empty_answers"] = {"u": list(range(60))}
    with pytest.raises(sweep.EvalFailure, match="60 of 120 docs"):
        sweep.check(result)


def _fake_result(budgets, compressors=("visionzip", "prumerge_plus"), n=10):
    """A small ``vtc eval`` result without running anything: 2 tasks, the baseline then compressors x budgets."""
    tasks = ["vtc_shapes_image", "vtc_shapes_video"]
    full = {"vtc_shapes_image": 196, "vtc_shapes_video": 1568}

    def run(compressor, budget, accuracy):
        keep = 1.0 if budget is None else budget
        return {"compressor": compressor, "budget": budget, "accuracy": {t: accuracy for t in tasks},
                "samples": {t: n for t in tasks}, "empty_answers": {}, "visual_tokens_in": 882,
                "visual_tokens_out": 882 * keep,
                "visual_tokens_by_task": {t: {"in": full[t], "out": round(full[t] * keep)} for t in tasks},
                "prefill_flops": 2e9 * keep, "first_token_seconds": 0.1 * keep, "peak_memory_bytes": 2**30 * keep,
                "peak_memory_source": "cuda", "relative": {}}

    runs = [run("none", None, 0.7)] + [run(c, b, 0.5 + 0.1 * i) for c in compressors
                                       for i, b in enumerate(budgets)]
    sweep.add_relative(runs)
    return {"model": "fake", "tasks": tasks, "budgets": list(budgets), "compressors": list(compressors),
            "positions": "reindex", "runs": runs}


def test_wilson_interval_by_hand():
    # 7/10, z = 1.96: z^2/n = 0.38415, centre = (0.7 + 0.19207) / 1.38415 = 0.64449,
    # half = 1.96 / 1.38415 * sqrt(0.7 * 0.3 / 10 + 3.8415 / 400) = 1.41602 * 0.17494 = 0.24772 -> [0.397, 0.892]
    lo, hi = sweep.wilson(0.7, 10)
    assert (lo, hi) == (pytest.approx(0.397, abs=5e-4), pytest.approx(0.892, abs=5e-4))
    # 0/10: centre = 0.19207 / 1.38415 = 0.13877 = half -> [0, 0.278]; 10/10 mirrors it
    assert sweep.wilson(0.0, 10) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.2775, abs=5e-4))
    assert sweep.wilson(1.0, 10) == (pytest.approx(0.7225, abs=5e-4), pytest.approx(1.0, abs=1e-12))


def test_wilson_interval_holds_the_observed_accuracy_exactly():
    """At 0 and 1 the formula's end lands on the accuracy only up to rounding (e.g. 1e-17 above 0): the interval
    must still hold it, or matplotlib refuses the negative error bar (found on a stand-in MMMU at accuracy 0)."""
    for n in range(1, 400):
        for p in (0.0, 1.0, 1 / n, 1 - 1 / n):
            lo, hi = sweep.wilson(p, n)
            assert 0.0 <= lo <= p <= hi <= 1.0, (p, n, lo, hi)


def test_plot_draws_tasks_at_accuracy_zero_and_one(tmp_path):
    result = _fake_result([0.5], n=8)
    for run in result["runs"]:
        run["accuracy"] = {"vtc_shapes_image": 0.0, "vtc_shapes_video": 1.0}
    for n in (3, 7, 8, 20, 49, 100, 300):
        for run in result["runs"]:
            run["samples"] = {t: n for t in result["tasks"]}
        assert sweep.plot(result, tmp_path / f"edges{n}.png")


def test_table_reports_visual_tokens_per_task_within_120_columns():
    text = sweep.table(_fake_result([0.5, 0.125], compressors=("prumerge_plus", "visionzip")))
    grid = text.split("\n\n")[0].splitlines()  # the accuracy / tokens table
    assert "image tok" in grid[0] and "video tok" in grid[0] and "visual tokens" not in grid[0]
    assert "196->196" in grid[2] and "1568->1568" in grid[2]
    assert "196->98" in grid[3] and "1568->784" in grid[3]
    assert "882" not in text  # the mean over all tasks' requests is not printed
    assert "per task" in text and "prefill FLOPs" in text
    tables = text.split("\n\npositions:")[0]
    assert max(len(line) for line in tables.splitlines()) <= 120


def test_table_with_the_ten_benchmarks_splits_into_grids_within_120_columns():
    """The llava15-table preset prints ten benchmarks: one grid would be ~230 columns wide and wrap in a terminal;
    it is split by tasks, each grid keeping the compressor and budget columns, every task exactly once."""
    from vtc.eval.lmms.table import PRESETS, column_title

    result = _fake_result([192, 128, 64], compressors=("prumerge_plus", "visionzip"))
    tasks = list(PRESETS["llava15-table"]["tasks"])
    assert len(tasks) == 10
    result["tasks"] = tasks
    for run in result["runs"]:
        value = run["accuracy"]["vtc_shapes_image"]
        run["accuracy"] = {t: value * (1500.0 if t == "mme" else 1.0) for t in tasks}
        run["visual_tokens_by_task"] = {t: {"in": 576, "out": run["budget"] or 576} for t in tasks}
    sweep.add_relative(result["runs"])
    text = sweep.table(result)
    assert max(len(line) for line in text.split("\n\npositions:")[0].splitlines()) <= 120
    grids = [g for g in text.split("\n\n") if g.startswith("compressor     budget")][:-1]  # the last: costs
    assert len(grids) >= 3
    headers = [g.splitlines()[0] for g in grids]
    titles = [column_title(t)[0] for t in tasks]
    for title in titles:  # each benchmark's score column in exactly one grid, with its tokens beside it
        assert sum(f"  {title}  " in h + "  " and f"{title} tok" in h for h in headers) == 1, title
    for grid in grids:
        assert [line.split()[0] for line in grid.splitlines()[2:]] == \
            ["none", *["prumerge_plus"] * 3, *["visionzip"] * 3]


def test_plot_lines_join_only_a_compressors_own_budgets(tmp_path):
    one, two = _fake_result([0.5]), _fake_result([0.5, 0.125])
    assert sweep.segments(one, "vtc_shapes_image") == {"visionzip": [], "prumerge_plus": []}
    lines = sweep.segments(two, "vtc_shapes_video")
    assert set(lines) == {"visionzip", "prumerge_plus"}  # no segment to the baseline
    assert lines["visionzip"] == [((196, 0.6), (784, 0.5))]
    for name, result in (("one", one), ("two", two)):
        path = tmp_path / f"{name}.png"
        sweep.plot(result, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
