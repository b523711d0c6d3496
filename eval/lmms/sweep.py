"""``vtc eval``: sweep compressors x budgets x tasks through lmms-eval on one loaded model.

    vtc eval                                   # the embedded model, every compressor, budgets 0.33 and 0.11,
                                               # the offline vtc_shapes tasks
    vtc eval --model DIR --compressor hiprune --compressor visionzip --budget 64 --budget 128 \\
             --tasks vtc_shapes_image --limit 50 --out results/

The model is loaded once and answers one untimed document per task (a warm-up, so the first measured run does not
pay the process's one-time costs); each run wraps it (``vtc.apply``), evaluates every task in-process with
lmms-eval (``simple_evaluate``), and unwraps it. The uncompressed baseline runs first. Writes ``OUT/vtc_eval.json``
(schema: ``RESULT_KEYS`` / ``RUN_KEYS``), ``OUT/vtc_eval.png`` (accuracy with 95 % Wilson intervals against the visual
tokens the LLM received, lines only between a compressor's budgets, the baseline a point and a dashed line) and
lmms-eval's own result files and per-sample logs under ``OUT/<model>__<compressor>_<budget>/`` (as
``python -m lmms_eval --output_path OUT --log_samples`` lays them out), ``OUT/vtc_table.md`` / ``.csv`` (the papers'
layout, ``vtc.eval.lmms.table``), and prints two tables: accuracy and mean visual tokens
in -> out per task; analytic prefill FLOPs, measured time to first token and peak memory, each relative to the
baseline.

It fails (exit 1, a message saying what and how to fix it) when the model cannot be loaded, a task is unknown or
produced no samples, or a run answered at least half of a task's documents with nothing (fewer are listed as
warnings) -- lmms-eval itself would exit 0 in all these cases.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import vtc

#: top-level keys of vtc_eval.json
RESULT_KEYS = ("vtc_version", "model", "device", "tasks", "task_names", "limit", "budgets", "compressors",
               "skipped_compressors", "positions", "flops_formula", "seconds", "runs")
#: keys of each entry of ``runs`` (the baseline first: compressor "none", budget null)
RUN_KEYS = ("compressor", "budget", "accuracy", "headline", "metrics", "samples", "empty_answers", "visual_tokens_in",
            "visual_tokens_out", "visual_tokens_by_task", "prefill_flops", "prefill_flops_parts", "first_token_seconds", "peak_memory_bytes",
            "peak_memory_source", "relative")
DEFAULT_TASKS = ("vtc_shapes_image", "vtc_shapes_video", "vtc_shapes_image_mc")
DEFAULT_BUDGETS = (0.33, 0.11)


class EvalFailure(RuntimeError):
    """A sweep that must not count as a result (message: what failed and the fix)."""


def _primary(task: str, metrics: dict) -> tuple[str, float]:
    """The task's headline metric (``table.headline``: what papers print), unscaled."""
    from .table import headline

    found = headline(task, metrics)
    if found is None:
        raise EvalFailure(f"task {task!r}: no known metric among {sorted(metrics)} (vtc.eval.lmms.table.HEADLINES "
                          "lists the metric each benchmark reports, else the first of FALLBACK_METRICS)")
    return found


def run_name(model_name: str, compressor: str, budget) -> str:
    """The folder name of one run in lmms-eval's layout: the model, the compressor and the budget, so runs at
    several budgets never share a folder (``llava-hf__llava-1.5-7b-hf__hiprune_64``)."""
    import re

    from lmms_eval.utils import sanitize_model_name

    base = re.sub(r"[^A-Za-z0-9._-]+", "-", sanitize_model_name(model_name or "vtc-default")).strip("-")
    return f"{base}__none" if compressor == "none" else f"{base}__{compressor}_{budget}"


class Aggregations:
    """Each task's own aggregation functions (for bootstrap standard errors), built once per sweep from lmms-eval's
    task objects; ``None`` for a metric whose aggregation cannot be had."""

    def __init__(self, task_manager):
        self.task_manager, self._cache = task_manager, {}

    def get(self, task: str, metric: str):
        if task not in self._cache:
            try:
                from lmms_eval.evaluator_utils import get_task_list
                from lmms_eval.tasks import get_task_dict

                outputs = get_task_list(get_task_dict([task], self.task_manager))
                self._cache[task] = outputs[0].task.aggregation() if outputs else {}
            except Exception:  # noqa: BLE001 - no aggregation -> no bootstrap SE, the run itself is unaffected
                self._cache[task] = {}
        return self._cache[task].get(metric)


def _stderr(metrics: dict, metric: str) -> float | None:
    for key, value in metrics.items():
        if key.split(",")[0] == f"{metric}_stderr" and isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def headline_entry(task: str, results: dict, samples: dict, subtasks: list[str], aggregations) -> dict:
    """``{"metric", "value", "se", "n"}`` of one task (unscaled). A group (POPE's three splits, MVBench's 20
    subtasks) is the unweighted mean of its subtasks, as the papers average them; its SE combines theirs. The SE is
    lmms-eval's own where it computes one, else a bootstrap of the task's own aggregation over the per-document
    results (``table.bootstrap_se``), else None."""
    from .table import bootstrap_se

    if subtasks:
        parts = [headline_entry(t, results, samples, [], aggregations) for t in subtasks]
        values = [p["value"] for p in parts]
        ses = [p["se"] for p in parts]
        return {"metric": parts[0]["metric"], "value": statistics.fmean(values),
                "se": None if None in ses else math.sqrt(sum(se * se for se in ses)) / len(ses),
                "n": sum(p["n"] for p in parts), "subtasks": {t: p for t, p in zip(subtasks, parts)}}
    metrics = results.get(task) or {}
    metric, value = _primary(task, metrics)
    docs = samples.get(task) or []
    se = _stderr(metrics, metric)
    if se is None and aggregations is not None:
        values = [d[metric] for d in docs if metric in d]
        if len(values) == len(docs):
            se = bootstrap_se(values, aggregations.get(task, metric))
    return {"metric": metric, "value": value, "se": se, "n": len(docs)}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_one(model, processor, compressor: str, budget, tasks: list[str], task_manager, limit, device: str,
            batch_size: int, results_dir: pathlib.Path | None, model_name: str, positions: str | None = None,
            aggregations: "Aggregations | None" = None) -> dict:
    """Evaluate ``tasks`` once with ``compressor`` at ``budget`` (``"none"``: baseline) and ``positions`` (None: the
    family's default); returns one run entry. With ``results_dir``, lmms-eval's own files are written there as
    ``python -m lmms_eval --output_path results_dir --log_samples`` would: ``<run name>/<date>_results.json`` and
    ``<date>_samples_<task>.jsonl`` (each line with vtc's per-sample counts in ``token_counts``), the run name
    carrying the model, compressor and budget (``run_name``)."""
    from lmms_eval import evaluator
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    from .model import VtcModel

    kwargs = {} if compressor == "none" else {"budget": budget}
    if compressor != "none" and positions is not None:
        kwargs["positions"] = positions
    lm = VtcModel(model=model, processor=processor, pretrained=model_name, compressor=compressor, device=device,
                  batch_size=batch_size, progress=False, **kwargs)
    chatter = io.StringIO()  # lmms-eval's and datasets' per-task progress bars: shown only if the run fails
    tracker = EvaluationTracker(output_path=str(results_dir)) if results_dir is not None else None
    # tasks that write submission files (MMBench, TextVQA) put them in ./submissions when run in-process: the run's
    # own folder is the working directory while it runs (every path the sweep holds is absolute)
    name = run_name(model_name, compressor, budget)
    workdir = None if results_dir is None else results_dir / name
    try:
        with contextlib.redirect_stderr(chatter), _working_directory(workdir):
            # model_args only names the run for lmms-eval's tracker (the model object is already built)
            out = evaluator.simple_evaluate(model=lm, model_args=f"pretrained={name}",
                                            tasks=list(tasks), task_manager=task_manager, limit=limit,
                                            batch_size=batch_size, device=device, log_samples=True,
                                            verbosity="WARNING", evaluation_tracker=tracker)
    except Exception:
        sys.stderr.write(chatter.getvalue()[-4000:])
        raise
    finally:
        vtc.remove(model)
    if not out or "results" not in out:
        raise EvalFailure(f"lmms-eval returned no results for {compressor} @ {budget} (tasks {tasks})")
    stats = list(lm.sample_stats)
    all_samples = out.get("samples") or {}
    groups = out.get("group_subtasks") or {}
    accuracy, metrics, samples, empty, headlines = {}, {}, {}, {}, {}
    leaves_of = {}
    for task in tasks:
        subtasks = list(groups.get(task) or [])
        leaves = leaves_of[task] = subtasks or [task]
        task_samples = [s for leaf in leaves for s in (all_samples.get(leaf) or [])]
        if not task_samples or any(not out["results"].get(leaf) for leaf in leaves):
            raise EvalFailure(f"task {task!r} produced no samples with {compressor} @ {budget}; check the task name "
                              "and its data (vtc eval --list-tasks)")
        headlines[task] = headline_entry(task, out["results"], all_samples, subtasks, aggregations)
        accuracy[task] = headlines[task]["value"]
        task_metrics = out["results"][task] if not subtasks else out["results"][leaves[0]]
        metrics[task] = {k.split(",")[0]: v for k, v in task_metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
        samples[task] = len(task_samples)
        empty[task] = [s["doc_id"] for s in task_samples
                       # the model's own text (a task's filter may legitimately reduce an answer to "")
                       if any(isinstance(r, str) and not r.strip() for r in _flat(s.get("resps")))]
    if tracker is not None:  # lmms-eval's own result files, as its CLI writes them
        stamp = get_datetime_str()
        logged = out.pop("samples", None) or {}
        with contextlib.redirect_stderr(chatter):
            tracker.save_results_aggregated(results=out, samples=logged, datetime_str=stamp)
            for task_name in out.get("configs", {}):
                if task_name in logged:
                    tracker.save_results_samples(task_name=task_name, samples=logged[task_name])
    generate = [s for s in stats if s.request == "generate_until"]
    flops = [s.prefill_flops for s in stats if s.prefill_flops is not None]
    parts = {}
    if flops:
        for key in stats[0].prefill_flops_parts or {}:
            parts[key] = _mean([(s.prefill_flops_parts or {}).get(key) for s in stats])
    return {
        "compressor": compressor,
        "budget": None if compressor == "none" else budget,
        "accuracy": accuracy,
        "headline": headlines,
        "metrics": metrics,
        "samples": samples,
        "empty_answers": {t: ids for t, ids in empty.items() if ids},
        "visual_tokens_in": _mean([s.visual_tokens_in for s in stats]),
        "visual_tokens_out": _mean([s.visual_tokens_out for s in stats]),
        "visual_tokens_by_task": {t: {"in": _mean([s.visual_tokens_in for s in stats if s.task in leaves_of[t]]),
                                      "out": _mean([s.visual_tokens_out for s in stats if s.task in leaves_of[t]])}
                                  for t in tasks},
        "prefill_flops": _mean(flops),
        "prefill_flops_parts": parts,
        "first_token_seconds": _median([s.first_token_seconds for s in generate]),
        "peak_memory_bytes": max((s.peak_memory_bytes for s in stats if s.peak_memory_bytes is not None),
                                 default=None),
        "peak_memory_source": next((s.peak_memory_source for s in stats if s.peak_memory_source), None),
        "relative": {},
    }


def _flat(values):
    for value in values or []:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def add_relative(runs: list[dict]) -> None:
    """Each run's figures relative to the baseline (``runs[0]``): ratios, and accuracy as a difference."""
    base = runs[0]
    for run in runs:
        rel = {"accuracy_delta": {t: run["accuracy"][t] - base["accuracy"][t] for t in run["accuracy"]}}
        for key in ("visual_tokens_out", "prefill_flops", "first_token_seconds", "peak_memory_bytes"):
            a, b = run[key], base[key]
            rel[key] = None if a is None or not b else a / b
        run["relative"] = rel


def _quiet_lmms_eval() -> None:
    """lmms-eval logs through loguru at DEBUG by default (a line for every file of its task folders it cannot read
    as a task); ``vtc eval`` is a command of its own, so it shows lmms-eval's warnings and errors only."""
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover - lmms-eval depends on loguru
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@contextlib.contextmanager
def _working_directory(path: pathlib.Path | None):
    if path is None:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def task_environment(env: dict | None):
    """``env`` set for the duration of the sweep and restored after: only what lmms-eval's own task code reads
    (Video-MME's and MVBench's utils find their videos under ``$HF_HOME``; see ``standin.StandinSet.env``)."""
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sweep(model_ref: str | None, compressors: list[str], budgets: list, tasks: list[str], include_path,
          limit, device: str, batch_size: int, out_dir: pathlib.Path, progress=None, positions: str | None = None,
          env: dict | None = None, task_names: dict | None = None, skip_unsupported: bool = False) -> dict:
    """Run the baseline and every compressor x budget; returns the JSON-ready result (lmms-eval's own result files
    for each run go to ``out_dir/<run name>/``). ``positions``: the position mode of every compressed run (None: the
    model family's default, recorded); ``env``: what the tasks' own code needs (``task_environment``);
    ``task_names``: the benchmark each task stands for, recorded (stand-ins: ``vtc_standin_mme`` -> ``mme``).

    Every compressor x budget is applied to the loaded model once before anything runs (``check_compressors``): one
    the model refuses (a video method on LLaVA-NeXT's AnyRes views, a layer it does not have) fails the sweep at
    once -- or, with ``skip_unsupported`` (``vtc eval`` without ``--compressor``: every encoder-side compressor), is
    left out and recorded in ``skipped_compressors`` with the reason."""
    include_path = [pathlib.Path(p).resolve() for p in include_path]
    with task_environment(env):
        return _sweep(model_ref, compressors, budgets, tasks, include_path, limit, device, batch_size,
                      pathlib.Path(out_dir).resolve(), progress, positions, task_names, skip_unsupported)


def check_compressors(model, processor, model_name: str, compressors: list[str], budgets: list,
                      positions: str | None, device: str) -> dict[str, str]:
    """``{compressor: why}`` for each compressor the loaded model refuses at one of ``budgets`` -- wrapped and
    unwrapped exactly as a run does (``VtcModel``), so a refusal surfaces now instead of after the runs before
    it."""
    from .model import VtcModel

    refused = {}
    for compressor in compressors:
        for budget in budgets:
            kwargs = {"budget": budget} if positions is None else {"budget": budget, "positions": positions}
            try:
                VtcModel(model=model, processor=processor, pretrained=model_name, compressor=compressor,
                         device=device, progress=False, **kwargs)
            except (ValueError, TypeError) as exc:
                refused[compressor] = f"{compressor} @ {budget}: {exc}"
                break
            finally:
                vtc.remove(model)
    return refused


def _warm_up(model, processor, tasks, task_manager, device, batch_size, model_name, positions, aggregations) -> None:
    """Answer one document of each task with all tokens, untimed and unreported. Only the answering matters: a
    task whose aggregation cannot take one document (MME scores the two questions of an image as a pair) fails
    after it, which is ignored here -- a task that really fails does so again, with its message, in the baseline."""
    # in a throw-away working directory: tasks that write submission files (MMBench, TextVQA) write them there
    with tempfile.TemporaryDirectory(prefix="vtc-warm-up-") as scratch, _working_directory(pathlib.Path(scratch)), \
            contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_one(model, processor, "none", None, tasks, task_manager, 1, device, batch_size, None, model_name,
                    positions, aggregations)
        except Exception:  # noqa: BLE001 - see the docstring
            pass


def _sweep(model_ref, compressors, budgets, tasks, include_path, limit, device, batch_size, out_dir, progress,
           positions, task_names, skip_unsupported=False) -> dict:
    from lmms_eval.tasks import TaskManager

    from .model import VtcModel
    from ..measure import make_cpu_memory_measurable

    make_cpu_memory_measurable()
    _quiet_lmms_eval()
    start = time.perf_counter()
    task_manager = TaskManager(verbosity="WARNING", include_path=[str(p) for p in include_path])
    known = set(task_manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:  # before the model loads: a typo must not cost a checkpoint load
        raise EvalFailure(f"unknown task(s) {missing}; the offline tasks are {list(DEFAULT_TASKS)} (written by "
                          "vtc eval itself), others need --include-path DIR or an installed lmms-eval task")
    loader = VtcModel(pretrained=model_ref, compressor="none", device=device, progress=False)  # loads or fails
    model, processor, model_name = loader.model, loader.processor, loader.pretrained
    modes = vtc.position_modes(model)
    if positions is not None and positions not in modes:
        raise EvalFailure(f"--positions {positions} is not available for this model; choose one of {list(modes)}")
    positions = positions or modes[0]
    refused = check_compressors(model, processor, model_name, compressors, budgets, positions, device)
    if refused and not skip_unsupported:
        raise EvalFailure("this model refuses " + "; ".join(refused.values()) + " -- nothing was run; drop "
                          "--compressor " + " / ".join(refused))
    compressors = [c for c in compressors if c not in refused]
    if progress is not None and refused:
        progress.total = 1 + len(compressors) * len(budgets)
        progress.refresh()
    plan = [("none", None)] + [(c, b) for c in compressors for b in budgets]
    runs = []
    aggregations = Aggregations(task_manager)
    # one untimed document per task first: the process's first requests pay one-time costs (allocator pools,
    # kernel caches; 20.9 MB of resident growth vs ~5 MB after on the embedded model) that would otherwise land on
    # the baseline alone and make every compressor look lighter and faster than it is
    if progress:
        progress.set_postfix_str("warm-up: 1 document per task, not reported")
    _warm_up(model, processor, tasks, task_manager, device, batch_size, model_name, positions, aggregations)
    for compressor, budget in plan:
        if progress:
            progress.set_postfix_str(f"{compressor} @ {budget}" if budget is not None else "baseline")
        runs.append(run_one(model, processor, compressor, budget, tasks, task_manager, limit, device, batch_size,
                            out_dir, model_name, positions, aggregations))
        if progress:
            progress.update(1)
    add_relative(runs)
    from vtc.flops import FORMULA

    result = {
        "vtc_version": vtc.__version__,
        "model": model_name,
        "device": str(device),
        "tasks": list(tasks),
        "task_names": {t: (task_names or {}).get(t, t) for t in tasks},
        "limit": limit,
        "budgets": list(budgets),
        "compressors": list(compressors),
        "skipped_compressors": refused,
        "positions": positions,
        "flops_formula": FORMULA,
        "seconds": round(time.perf_counter() - start, 1),
        "runs": runs,
    }
    return result


#: share of a task's answers that, when empty in one run, fails the sweep (a pipeline that says nothing)
EMPTY_FAIL_SHARE = 0.5


def check(result: dict) -> list[str]:
    """Raise ``EvalFailure`` when a run answered at least ``EMPTY_FAIL_SHARE`` of a task's documents with nothing
    (a broken chat template, a model that stops at once: a green run with nothing in it is not a result); return
    one warning per run and task with fewer empty answers -- a compressed model may stop at once on a document
    (scored wrong, as lmms-eval does), which says something about the compressor, not about the setup."""
    bad, warnings_ = [], []
    for run in result["runs"]:
        for task, ids in run["empty_answers"].items():
            total = (run.get("samples") or {}).get(task) or len(ids)
            what = (f"{run['compressor']} @ {run['budget']} on {task}: {len(ids)} of {total} docs "
                    f"{ids[:10]}{' ...' if len(ids) > 10 else ''}")
            (bad if len(ids) >= EMPTY_FAIL_SHARE * total else warnings_).append(what)
    if bad:
        raise EvalFailure(f"empty answers: {'; '.join(bad)}. The model produced no text (check the chat template, "
                          "max_new_tokens and the answers in OUT/<model>__<compressor>_<budget>/*_samples_*.jsonl)")
    return [f"empty answers (scored wrong): {w}" for w in warnings_]


def _fmt_flops(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} G"


def _ratio(value) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _tokens(by_task: dict) -> str:
    if by_task is None or by_task.get("in") is None or by_task.get("out") is None:
        return "-"
    return f"{by_task['in']:.0f}->{by_task['out']:.0f}"


def _grid(head: list, rows: list) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


#: widest printed line of ``table`` (the score grid is split by tasks beyond it)
TABLE_WIDTH = 120


def _grids_within(fixed: int, head: list, rows: list, width: int = TABLE_WIDTH) -> list[str]:
    """``_grid`` of ``head`` / ``rows`` split column-wise into grids no wider than ``width``: each grid repeats the
    first ``fixed`` columns and takes the following columns in pairs (a task's score and tokens), as many pairs as
    fit (at least one)."""
    columns = list(zip(head, *rows))
    widths = [max(len(str(x)) for x in col) for col in columns]
    key = list(range(fixed))
    pairs = [list(range(i, min(i + 2, len(columns)))) for i in range(fixed, len(columns), 2)]
    groups, current = [], []
    for pair in pairs:
        if current and sum(widths[i] + 2 for i in key + current + pair) - 2 > width:
            groups.append(current)
            current = []
        current += pair
    groups.append(current)
    lines = []
    for group in groups:
        if lines:
            lines.append("")
        pick = key + group
        lines += _grid([head[i] for i in pick], [[row[i] for i in pick] for row in rows])
    return lines


def table(result: dict) -> str:
    """The printed summary, within ``TABLE_WIDTH`` columns: per task the accuracy and the mean visual tokens per
    request in -> out (per task: an image, a video and a multiple-choice question carry different counts, so one
    mean over all of them matches no workload), a task group per grid when they do not fit in one (the standard
    table's ten benchmarks); then the prefill FLOPs, time to first token and peak memory of each run, relative to
    the baseline."""
    from .table import column_title

    tasks = result["tasks"]
    head = ["compressor", "budget"]
    for t in tasks:
        short = t.replace("vtc_shapes_", "") if t.startswith("vtc_shapes_") else column_title(t)[0]
        head += [short, f"{short} tok"]
    cost_head = ["compressor", "budget", "prefill FLOPs", "first token", "peak mem"]
    rows, cost_rows = [], []
    for run in result["runs"]:
        rel = run["relative"]
        budget = "all" if run["budget"] is None else str(run["budget"])
        cells = []
        for t in tasks:
            delta = rel["accuracy_delta"][t]
            cells.append(f"{run['accuracy'][t]:.3f}" + ("" if run["budget"] is None else f" ({delta:+.3f})"))
            cells.append(_tokens((run.get("visual_tokens_by_task") or {}).get(t)))
        ttft = "-" if run["first_token_seconds"] is None else f"{run['first_token_seconds'] * 1e3:.1f} ms"
        mem = "-" if run["peak_memory_bytes"] is None else f"{run['peak_memory_bytes'] / 2**20:.1f} MB"
        rows.append([run["compressor"], budget, *cells])
        cost_rows.append([run["compressor"], budget, _fmt_flops(run["prefill_flops"]) + _ratio(rel["prefill_flops"]),
                          ttft + _ratio(rel["first_token_seconds"]), mem + _ratio(rel["peak_memory_bytes"])])
    lines = _grids_within(2, head, rows) + [""] + _grid(cost_head, cost_rows)
    source = next((r["peak_memory_source"] for r in result["runs"] if r["peak_memory_source"]), None)
    notes = [f"positions: {result['positions']} ({vtc.POSITION_MODES.get(result['positions'], '')}) in every "
             "compressed run (vtc eval --positions to change)",
             "score: each task's headline metric as lmms-eval reports it (offline tasks: exact match of the first "
             "word, argmin loss among the choices for _mc; benchmarks: vtc.eval.lmms.table.HEADLINES); in brackets "
             "the change from the baseline",
             ("<task> tok: visual tokens per request in -> out, averaged per task (an image, a video and a question "
              "carry different counts)"),
             "prefill FLOPs: analytic, per request over all tasks (formula in vtc_eval.json 'flops_formula'); first "
             "token: median time to first token of generate requests; peak mem: highest " +
             ("resident-memory growth per request (CPU)" if source == "cpu_rss" else "CUDA memory allocated "
              "above the start per request")]
    return "\n".join(lines + [""] + notes)


#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


def wilson(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion ``accuracy`` observed over ``n`` samples.

    Assumes ``accuracy`` is the mean of ``n`` independent 0/1 outcomes (exact match, argmin-loss choice: true for
    the offline tasks and most lmms-eval accuracy metrics; not for graded scores such as MME's sums or ANLS).
    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or 1. The interval always
    holds ``accuracy`` (clamped to [0, 1]), also where rounding would put an end a hair past it (at 0 and 1)."""
    if not n:
        return 0.0, 1.0
    p = min(max(float(accuracy), 0.0), 1.0)
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def points(result: dict, task: str) -> dict[str, list[tuple[float, float]]]:
    """Each compressor's measured (visual tokens received, accuracy) on ``task``, sorted by tokens; the baseline
    under ``"none"``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for run in result["runs"]:
        tokens = run["visual_tokens_by_task"][task]["out"]
        out.setdefault(run["compressor"], []).append((tokens, run["accuracy"][task]))
    return {name: sorted(p) for name, p in out.items()}


def segments(result: dict, task: str) -> dict[str, list[tuple[tuple[float, float], tuple[float, float]]]]:
    """The line segments of the plot: one between consecutive measured budgets of the same compressor, none to the
    baseline (nothing was measured in between) and none for a compressor with a single budget."""
    return {name: list(itertools.pairwise(p)) for name, p in points(result, task).items() if name != "none"}


def plot(result: dict, path: pathlib.Path) -> bool:
    """Accuracy against the visual tokens the LLM received, one panel per task: every measured point with its 95 %
    Wilson interval (``wilson``: accuracy taken as a mean of 0/1 outcomes over the task's ``samples``), lines only
    between a compressor's own measured budgets, the baseline as its own point with a dashed horizontal reference,
    and the y axis fixed at [0, 1] so that differences inside the intervals do not look significant. Compressors
    are drawn a sliver apart on x (1.2 % of the baseline's tokens each) so that equal budgets do not overlap.
    Only proportion metrics are drawn (``plotted_tasks``); returns whether a picture was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = plotted_tasks(result)
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    base = result["runs"][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        measured = points(result, task)
        lines = segments(result, task)
        counts = {r["compressor"]: r["samples"][task] for r in result["runs"]}  # n per point (same limit per run)
        full = base["visual_tokens_by_task"][task]["out"]
        names = ["none", *(c for c in result["compressors"] if c in measured)]
        for i, name in enumerate(names):
            # compressors at one budget share x: shift each by a sliver of the axis so no interval hides another
            dodge = 0.0 if name == "none" else (i - len(names) / 2) * 0.012 * full
            xs, ys = zip(*measured[name])
            xs = [x + dodge for x in xs]
            lo, hi = zip(*(wilson(y, counts[name]) for y in ys))
            err = [[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]]
            color = "black" if name == "none" else colors[(i - 1) % len(colors)]
            label = "all tokens (baseline)" if name == "none" else name
            ax.errorbar(xs, ys, yerr=err, fmt="s" if name == "none" else "o", color=color, capsize=3,
                        label=label)
            if name == "none":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1)
            for (x0, y0), (x1, y1) in lines.get(name, []):
                ax.plot([x0 + dodge, x1 + dodge], [y0, y1], color=color)
        ns = sorted(set(counts.values()))
        ax.set_title(f"{task} (n = {ns[0] if len(ns) == 1 else ns} per point)")
        ax.set_xlabel(f"visual tokens the LLM received per request (all: {full:.0f})")
        ax.set_ylabel("accuracy (95 % Wilson interval)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['model']}: accuracy vs visual tokens (lines join one compressor's budgets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plotted_tasks(result: dict) -> list[str]:
    """The tasks whose headline is a proportion (accuracy, F1 as a fraction, ...): the plot's Wilson intervals
    assume one; scores such as MME's sums are left to the table."""
    from .table import column_title

    return [t for t in result["tasks"] if column_title(t)[1] == 100.0
            and all(0.0 <= r["accuracy"][t] <= 1.0 for r in result["runs"])]
