"""The papers' results table: one row per (compressor, budget), one column per benchmark in the benchmark's own
metric, and the average relative to all tokens -- the "avg %" column of every token-compression paper.

    from vtc.eval.lmms.table import headline, standard_table, to_markdown, to_csv

``headline(task, metrics)`` picks the number a paper prints for a task from lmms-eval's results (MME: perception
score; POPE: F1; GQA / ScienceQA / TextVQA / VQAv2: accuracy; MMBench: its score; ChartQA: relaxed accuracy;
DocVQA: ANLS; Video-MME / MVBench: accuracy, ...); ``standard_table(result)`` builds the rows from a ``vtc eval``
result; the relative average of a row is the mean over benchmarks of ``100 * value / value with all tokens``.
Presets (``PRESETS``) are the benchmark lists and budgets of the papers' tables.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import statistics
from dataclasses import dataclass

#: lmms-eval task -> (metric key in its results, column title, scale to print: 100 turns a fraction into %)
HEADLINES: dict[str, tuple[str, str, float]] = {
    "mme": ("mme_perception_score", "MME", 1.0),
    "pope": ("pope_f1_score", "POPE F1", 100.0),
    "pope_adv": ("pope_f1_score", "POPE-adv F1", 100.0),
    "pope_pop": ("pope_f1_score", "POPE-pop F1", 100.0),
    "pope_random": ("pope_f1_score", "POPE-rand F1", 100.0),
    "pope_full": ("pope_f1_score", "POPE F1", 100.0),
    "gqa": ("exact_match", "GQA", 100.0),
    "scienceqa_img": ("exact_match", "SQA-IMG", 100.0),
    "textvqa_val": ("exact_match", "TextVQA", 100.0),
    "vqav2_val": ("exact_match", "VQAv2", 100.0),
    "vqav2_val_lite": ("exact_match", "VQAv2", 100.0),
    "mmbench_en_dev_static": ("gpt_eval_score", "MMB", 1.0),
    "mmmu_val": ("mmmu_acc", "MMMU", 100.0),
    "seedbench": ("seed_image", "SEED-I", 100.0),
    "chartqa": ("relaxed_overall", "ChartQA", 100.0),
    "docvqa_val": ("anls", "DocVQA", 100.0),
    "videomme": ("videomme_perception_score", "Video-MME", 1.0),
    "mvbench": ("mvbench_accuracy", "MVBench", 1.0),
    "egoschema_subset": ("score", "EgoSchema", 100.0),
    "mlvu_dev": ("mlvu_percetion_score", "MLVU", 1.0),
    "longvideobench_val_v": ("lvb_acc", "LongVideoBench", 100.0),
    "vtc_shapes_image": ("exact_match", "shapes", 100.0),
    "vtc_shapes_video": ("exact_match", "shapes video", 100.0),
    "vtc_shapes_image_mc": ("acc", "shapes MC", 100.0),
}
#: fallback metrics, in order, for a task not in HEADLINES
FALLBACK_METRICS = ("exact_match", "acc", "anls", "relaxed_overall")

#: paper protocols: the benchmarks and budgets of the standard tables (real task names; ``--standin`` runs the ones
#: with stand-in data here and names the others)
PRESETS: dict[str, dict] = {
    "llava15-table": {
        "what": "LLaVA-1.5 tables (FastV, SparseVLM, VisionZip, DivPrune, ...): 10 image benchmarks at 192 / 128 / 64 "
                "of 576 tokens",
        "tasks": ("gqa", "mmbench_en_dev_static", "mme", "pope_full", "scienceqa_img", "vqav2_val", "textvqa_val",
                  "mmmu_val", "seedbench", "chartqa"),
        "budgets": (192, 128, 64),
    },
    "qwen25vl-table": {
        "what": "Qwen2.5-VL tables (dynamic resolution): ratio budgets 33 / 22 / 11 %, incl. the high-resolution "
                "document and chart sets",
        "tasks": ("gqa", "mmbench_en_dev_static", "mme", "pope_full", "scienceqa_img", "textvqa_val", "chartqa",
                  "docvqa_val", "mmmu_val", "seedbench"),
        "budgets": (0.33, 0.22, 0.11),
    },
    "video-table": {
        "what": "video tables (FastVID, VidCom2, DyCoke, ...): ratio budgets 25 / 15 / 10 % of the video tokens",
        "tasks": ("videomme", "mvbench", "egoschema_subset", "mlvu_dev", "longvideobench_val_v"),
        "budgets": (0.25, 0.15, 0.10),
    },
}


def task_key(task: str) -> str:
    """The lmms-eval task a result column stands for (``vtc_standin_mme`` -> ``mme``)."""
    return task.removeprefix("vtc_standin_")


def known_headline(task: str) -> tuple[str, str, float] | None:
    """``HEADLINES`` entry of a task; an MVBench subtask (``mvbench_moving_direction``) reports MVBench's metric."""
    key = task_key(task)
    if key in HEADLINES:
        return HEADLINES[key]
    if key.startswith("mvbench_"):
        metric, _, scale = HEADLINES["mvbench"]
        return metric, "MVBench " + key.removeprefix("mvbench_").replace("_", " "), scale
    return None


def headline(task: str, metrics: dict) -> tuple[str, float] | None:
    """``(metric, value)``: the number a paper prints for ``task`` from its lmms-eval ``metrics`` (keys as lmms-eval
    writes them, ``"exact_match,none"`` or already bare), unscaled; ``None`` when no known metric is there."""
    bare = {key.split(",")[0]: value for key, value in metrics.items() if isinstance(value, (int, float))
            and not isinstance(value, bool) and "stderr" not in key}
    known = known_headline(task)
    for name in ([known[0]] if known else []) + list(FALLBACK_METRICS):
        if name in bare and math.isfinite(float(bare[name])):
            return name, float(bare[name])
    return None


def column_title(task: str) -> tuple[str, float]:
    """``(title, scale)`` of a task's column."""
    known = known_headline(task)
    return (known[1], known[2]) if known else (task_key(task), 1.0)


def bootstrap_se(values: list, aggregate, iterations: int = 200, seed: int = 0) -> float | None:
    """Standard error of ``aggregate(values)`` by resampling the per-document ``values`` with replacement
    (``iterations`` times, seeded); ``None`` when the aggregation cannot take a resample (e.g. MME pairs the two
    questions of each image and refuses a list that breaks a pair) or there are fewer than 2 documents."""
    if aggregate is None or len(values) < 2:
        return None
    rng = random.Random(seed)
    stats = []
    # some tasks' aggregations print their breakdown (MMMU prints a dict per call): not once per resample
    with contextlib.redirect_stdout(io.StringIO()):
        for _ in range(iterations):
            try:
                stats.append(float(aggregate([values[rng.randrange(len(values))] for _ in values])))
            except Exception:  # noqa: BLE001 - any task's aggregation: a resample it refuses means "no SE"
                return None
    return statistics.stdev(stats)


@dataclass
class Cell:
    """One benchmark of one row: the value as printed (scaled), its standard error (scaled, or None), documents."""

    value: float | None
    se: float | None
    n: int


def standard_table(result: dict) -> dict:
    """Rows of the papers' table from a ``vtc eval`` result (its ``runs``, the baseline first).

    Each run's ``headline`` entry (``{task: {"metric", "value", "se", "n"}}``) gives a cell, scaled for print
    (fractions as %); ``relative`` of a row is the mean over the benchmarks with a value in both the row and the
    baseline of ``100 * value / baseline value`` (the baseline row is 100 by definition; a benchmark whose baseline
    is 0 is left out of the mean)."""
    tasks = result["tasks"]
    base = result["runs"][0]
    columns = [{"task": t, "title": column_title(t)[0],
                "metric": (base.get("headline", {}).get(t) or {}).get("metric")} for t in tasks]
    rows = []
    for run in result["runs"]:
        cells, ratios = {}, []
        for task in tasks:
            _, scale = column_title(task)
            entry = (run.get("headline") or {}).get(task) or {}
            value, se = entry.get("value"), entry.get("se")
            cells[task] = Cell(None if value is None else value * scale, None if se is None else se * scale,
                               int(entry.get("n") or 0))
            reference = ((base.get("headline") or {}).get(task) or {}).get("value")
            if value is not None and reference:
                ratios.append(100.0 * value / reference)
        rows.append({"compressor": run["compressor"], "budget": run["budget"], "cells": cells,
                     "relative": statistics.fmean(ratios) if ratios else None, "benchmarks": len(ratios)})
    return {"columns": columns, "rows": rows}


def _budget(budget) -> str:
    if budget is None:
        return "all"
    if isinstance(budget, float):
        return f"{budget:.0%}" if budget * 100 == round(budget * 100) else f"{budget:.1%}"
    return str(budget)


def _cell(cell: Cell, with_se: bool = True) -> str:
    if cell.value is None:
        return "-"
    text = f"{cell.value:.1f}"
    if with_se:
        text += f" ± {cell.se:.1f}" if cell.se is not None else " ± n/a"
    return text


def to_markdown(table: dict) -> str:
    """The table as markdown: value ± standard error per cell, documents per benchmark in the header, and the
    average relative to all tokens last."""
    columns = table["columns"]
    ns = {c["task"]: sorted({row["cells"][c["task"]].n for row in table["rows"]}) for c in columns}
    head = ["method", "budget"] + [f"{c['title']} (n={'/'.join(map(str, ns[c['task']]))})" for c in columns]
    head.append("avg % of all tokens")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        name = "all tokens" if row["compressor"] == "none" else row["compressor"]
        cells = [_cell(row["cells"][c["task"]]) for c in columns]
        relative = "-" if row["relative"] is None else f"{row['relative']:.1f} %"
        lines.append("| " + " | ".join([name, _budget(row["budget"]), *cells, relative]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    """The table as CSV: per benchmark three columns (value, se, n), then the relative average."""
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["compressor", "budget"]
    for c in table["columns"]:
        header += [f"{c['task']}:{c['metric']}", f"{c['task']}:se", f"{c['task']}:n"]
    writer.writerow(header + ["relative_avg_percent", "benchmarks_in_avg"])
    for row in table["rows"]:
        line = [row["compressor"], "" if row["budget"] is None else row["budget"]]
        for c in table["columns"]:
            cell = row["cells"][c["task"]]
            line += ["" if cell.value is None else f"{cell.value:.6g}", "" if cell.se is None else f"{cell.se:.6g}",
                     cell.n]
        line += ["" if row["relative"] is None else f"{row['relative']:.4f}", row["benchmarks"]]
        writer.writerow(line)
    return out.getvalue()
