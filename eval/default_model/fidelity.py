"""Accuracy of the embedded default model at 100 % / 33 % / 11 % of its visual tokens, for every compressor, under
both position modes.

    python -m vtc.eval.default_model.fidelity [--images 300 --videos 60] [--out results.json]

The same held-out test questions are answered with all 196 tokens per image (frame) and with each registered
compressor keeping a third / a ninth of them. A video's 8 frames are one video (``images_as_video=True``): its
budget is that fraction of all its frames' tokens, which image compressors split evenly over the frames and the
video compressors (quota, progressive) allot by relevance / novelty.

Every compressed cell is run twice, with ``positions="reindex"`` (the kept tokens are numbered 0..k-1, what the
papers' reference code does on LLaVA-1.5) and ``positions="keep"`` (they keep their original position ids, what
FastV and the Qwen families do): on a model that locates things partly by position id the two differ.

Each cell carries its standard error, sqrt(p(1-p)/n). Two runs answer the *same* questions, so methods are compared
by the paired standard error of their per-question difference; the report lists which differences exceed twice
it. Also measures where the CLS attention of the tower's feature layer goes -- the share that lands on object
patches versus the share of patches that are objects -- since that is what CLS-attention pruning relies on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import time

import numpy as np
import torch

import vtc

from . import synthetic as syn
from .accuracy import evaluate, paired_difference
from .train import patch_targets

RATIOS = (0.33, 0.11)
POSITION_MODES = ("reindex", "keep")
MEDIA = ("image", "video")


def cls_attention_on_objects(model, processor, num_images: int = 100) -> dict:
    """Share of the feature layer's CLS attention on object patches, vs the share of patches that are objects."""
    from .accuracy import single_turn_prompt

    vtc.apply(model, "fastervlm", budget=22)
    on_object, area, precision = [], [], []
    try:
        for i in range(num_images):
            s = syn.make_image_sample("test", i)
            inputs = processor(images=[s.image], text=[single_turn_prompt(processor, "how many shapes are there ?")],
                               return_tensors="pt")
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            record = vtc.last_selection(model)[0]
            scores = record.scores.float()
            objects = torch.from_numpy(patch_targets(s)["color"] > 0)
            on_object.append(float(scores[objects].sum() / scores.sum()))
            area.append(float(objects.float().mean()))
            precision.append(float(objects[record.indices].float().mean()))
    finally:
        vtc.remove(model)
    return {"attention_on_objects": float(np.mean(on_object)), "object_area": float(np.mean(area)),
            "top22_object_precision": float(np.mean(precision)), "images": num_images}


def separated_pairs(correct: dict[str, list[int]], medium: str) -> list[dict]:
    """Pairs of runs (names -> per-question 0/1 on the same questions) whose accuracy difference on ``medium``
    exceeds twice its paired standard error, largest first."""
    out = []
    for a, b in itertools.combinations(sorted(correct), 2):
        xa, xb = correct[a][medium], correct[b][medium]
        if not xa:
            continue
        diff, se = paired_difference(xa, xb)
        if abs(diff) > 2 * se:
            better, worse = (a, b) if diff > 0 else (b, a)
            out.append({"better": better, "worse": worse, "points": round(100 * abs(diff), 1),
                        "stderr_points": round(100 * se, 2)})
    return sorted(out, key=lambda r: -r["points"])


def run_table(model, processor, names: list[str], ratios=RATIOS, modes=POSITION_MODES, on_batch=None,
              **eval_kwargs) -> dict:
    """Every (compressor, position mode, ratio) cell plus the all-tokens baseline, with the pairs each cell's
    comparisons separate (``separated``: per mode / ratio / medium, compressors compared with each other and with
    all tokens; ``positions_effect``: per compressor / ratio / medium, keep vs reindex)."""
    full = evaluate(model, processor, per_question=True, on_batch=on_batch, **eval_kwargs)
    correct: dict = {}
    rows: dict = {"none": {"1.0": {k: v for k, v in full.items() if k != "correct"}}}
    for name in names:
        rows[name] = {}
        for mode in modes:
            rows[name][mode] = {}
            for ratio in ratios:
                vtc.apply(model, name, budget=ratio, video_budget=ratio, images_as_video=True, positions=mode)
                try:
                    result = evaluate(model, processor, per_question=True, on_batch=on_batch, **eval_kwargs)
                finally:
                    vtc.remove(model)
                correct[(name, mode, ratio)] = result.pop("correct")
                rows[name][mode][str(ratio)] = result
    separated: dict = {}
    for mode, ratio, medium in itertools.product(modes, ratios, MEDIA):
        runs = {name: correct[(name, mode, ratio)] for name in names}
        runs["all tokens"] = full["correct"]
        separated[f"{mode}/{ratio}/{medium}"] = separated_pairs(runs, medium)
    positions_effect: dict = {}
    if len(modes) == 2:
        for name, ratio, medium in itertools.product(names, ratios, MEDIA):
            a, b = correct[(name, modes[1], ratio)][medium], correct[(name, modes[0], ratio)][medium]
            if a:
                diff, se = paired_difference(a, b)
                positions_effect[f"{name}/{ratio}/{medium}"] = {
                    f"{modes[1]}_minus_{modes[0]}_points": round(100 * diff, 1), "stderr_points": round(100 * se, 2)}
    return {"results": rows, "separated": separated, "positions_effect": positions_effect}


#: the LLM-side cells: (compressor, its options, budget) -- FastV / DART keep 33 % / 11 % of the 196 tokens after
#: their drop (K = 2, the papers'), PyramidDrop the same after its last drop, SparseVLM its table's 192 / 64 rows
LLM_CELLS = (("fastv", {}, 65), ("fastv", {}, 22), ("dart", {}, 65), ("dart", {}, 22),
             ("pdrop", {"budget_mode": "kept"}, 65), ("pdrop", {"budget_mode": "kept"}, 22),
             ("sparsevlm", {}, 192), ("sparsevlm", {}, 64))
#: encoder-side baselines run at each LLM-side cell's average visual tokens per layer (the FLOPs-equivalent budget),
#: with positions="keep" as the LLM-side cut keeps them (on this model keep beats reindex: docs/default_model)
LLM_BASELINES = ("random", "pool")


def llm_table(model, processor, cells=LLM_CELLS, baselines=LLM_BASELINES, on_batch=None, **eval_kwargs) -> dict:
    """Accuracy of each LLM-side cell next to the encoder-side baselines at the same average visual tokens per LLM
    layer (the cell's schedule on this model's 196 tokens and LLM depth), with paired standard errors."""
    from vtc.integrations.transformers.adapter import adapter_for

    full = evaluate(model, processor, per_question=True, on_batch=on_batch, **eval_kwargs)
    adapter = adapter_for(model)
    tokens, layers = adapter.fixed_image_tokens(), len(adapter.language_model().layers)
    rows = []
    for name, options, budget in cells:
        compressor = vtc.create_compressor(name, **options)
        stages = compressor.schedule(tokens, layers, budget, adapter.llm_first_layer())
        average = vtc.inllm.average_tokens(stages, tokens, layers)
        vtc.apply(model, compressor, budget=budget)
        try:
            result = evaluate(model, processor, per_question=True, on_batch=on_batch, **eval_kwargs)
        finally:
            vtc.remove(model)
        row = {"compressor": name, "options": options, "budget": budget, "average_tokens": average,
               "schedule": [[s.layer, s.keep] for s in stages], "result": result, "baselines": {}}
        for base in baselines:
            vtc.apply(model, base, budget=max(1, round(average)), positions="keep")  # as the LLM-side cut
            try:
                other = evaluate(model, processor, per_question=True, on_batch=on_batch, **eval_kwargs)
            finally:
                vtc.remove(model)
            diff, se = paired_difference(result["correct"]["image"], other["correct"]["image"])
            row["baselines"][base] = {"image_accuracy": other["image_accuracy"], "image_stderr": other["image_stderr"],
                                      "llm_minus_baseline_points": round(100 * diff, 1),
                                      "stderr_points": round(100 * se, 2)}
        diff, se = paired_difference(result["correct"]["image"], full["correct"]["image"])
        row["minus_all_tokens_points"], row["minus_all_tokens_stderr"] = round(100 * diff, 1), round(100 * se, 2)
        result.pop("correct")
        rows.append(row)
    full.pop("correct")
    return {"all_tokens": full, "tokens_per_image": tokens, "llm_layers": layers, "rows": rows}


def llm_markdown(table: dict) -> str:
    full = table["all_tokens"]
    lines = [f"all tokens: {full['image_accuracy']:.1%} (±{100 * full['image_stderr']:.1f}, n={full['image_questions']}); "
             f"{table['tokens_per_image']} tokens per image, {table['llm_layers']} LLM layers; ± = standard error, "
             "baseline differences are paired (same questions)", "",
             "| compressor | budget | schedule (layer: kept) | tokens / layer | accuracy | random at same tokens / layer "
             "| pool at same tokens / layer |", "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        result = row["result"]
        cells = []
        for base in ("random", "pool"):
            b = row["baselines"].get(base)
            cells.append("–" if b is None else f"{b['image_accuracy']:.1%} ({b['llm_minus_baseline_points']:+.1f} "
                                               f"± {b['stderr_points']:.1f})")
        schedule = ", ".join(f"{layer}: {keep}" for layer, keep in row["schedule"])
        lines.append(f"| {row['compressor']} | {row['budget']} | {schedule} | {row['average_tokens']:.1f} | "
                     f"{result['image_accuracy']:.1%} ±{100 * result['image_stderr']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.default_model.fidelity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="folder written by vtc.eval.default_model.train (default: the embedded model)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--questions", type=int, default=4, help="questions per image / video")
    parser.add_argument("--compressor", action="append", help="repeatable; default: every registered one")
    parser.add_argument("--positions", action="append", choices=POSITION_MODES,
                        help="repeatable; default: both reindex and keep")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--llm", action="store_true",
                        help="the LLM-side table instead: fastv / dart / pdrop / sparsevlm, each next to random and "
                             "pool at the same visual tokens per LLM layer (images only)")
    args = parser.parse_args(argv)
    if args.llm:
        from tqdm import tqdm

        model, processor = vtc.load_default(args.model)
        per_run = args.images * args.questions
        bar = tqdm(total=per_run * (1 + len(LLM_CELLS) * (1 + len(LLM_BASELINES))), desc="fidelity (LLM-side)",
                   unit="q", mininterval=5)
        start = time.perf_counter()
        table = llm_table(model, processor, on_batch=bar.update, split="test", num_images=args.images,
                          num_videos=0, questions_per_sample=args.questions)
        bar.close()
        table.update(model=args.model or "embedded default", seconds=round(time.perf_counter() - start),
                     threads=torch.get_num_threads())
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(table, indent=2))
        print(llm_markdown(table))
        return 0
    names = args.compressor or vtc.list_compressors("encoder")
    for name in names:
        vtc.get_compressor_class(name)  # fail before loading the model on an unknown name
    modes = tuple(args.positions or POSITION_MODES)

    from tqdm import tqdm

    model, processor = vtc.load_default(args.model)
    per_run = args.images * args.questions + args.videos * args.questions
    bar = tqdm(total=per_run * (1 + len(names) * len(RATIOS) * len(modes)), desc="fidelity", unit="q",
               mininterval=5)
    start = time.perf_counter()
    table = run_table(model, processor, names, RATIOS, modes, on_batch=bar.update, split="test",
                      num_images=args.images, num_videos=args.videos, questions_per_sample=args.questions)
    bar.close()
    attention = cls_attention_on_objects(model, processor)
    result = {"model": args.model or "embedded default", "ratios": RATIOS, "positions": modes,
              "tokens_per_image": 196, **table, "cls_attention": attention,
              "seconds": round(time.perf_counter() - start), "threads": torch.get_num_threads()}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print()
    print(separation_summary(result))
    print(f"\nCLS attention (feature layer) on object patches: {attention['attention_on_objects']:.1%} "
          f"(objects cover {attention['object_area']:.1%} of patches); fastervlm's 22 kept tokens are object "
          f"patches {attention['top22_object_precision']:.1%} of the time")
    return 0


def _pct(run: dict, medium: str) -> str:
    value = run[f"{medium}_accuracy"]
    return "–" if value is None else f"{value:.1%}"


def markdown_table(result: dict) -> str:
    """One row per compressor: image and video accuracy at each ratio under each position mode; the all-tokens
    baseline and the largest standard error of each column in the header."""
    full = result["results"]["none"]["1.0"]
    modes, ratios = result.get("positions", ("reindex",)), result["ratios"]
    runs = {n: r for n, r in result["results"].items() if n != "none"}
    columns = [(medium, mode, r) for medium in MEDIA for mode in modes for r in ratios]

    def worst_se(medium, mode, r):
        ses = [run[mode][str(r)][f"{medium}_stderr"] for run in runs.values()]
        ses = [s for s in ses if s is not None]
        return f" ±{100 * max(ses):.1f}" if ses else ""

    head = "| compressor | " + " | ".join(f"{m} {int(round(100 * r))} % {mode}{worst_se(m, mode, r)}"
                                           for m, mode, r in columns) + " |"
    lines = [f"all tokens: image {_pct(full, 'image')} (±{100 * (full['image_stderr'] or 0):.1f}, "
             f"n={full['image_questions']}), video {_pct(full, 'video')} (±{100 * (full['video_stderr'] or 0):.1f}, "
             f"n={full['video_questions']}); ± = the column's largest standard error, in points", "",
             head, "|---" * (len(columns) + 1) + "|"]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(_pct(run[mode][str(r)], m) for m, mode, r in columns) + " |")
    return "\n".join(lines)


def separation_summary(result: dict) -> str:
    """Per cell, which differences exceed twice their paired standard error (the rest are within the noise)."""
    lines = ["Differences beyond 2 paired standard errors (points):"]
    for cell, pairs in result["separated"].items():
        shown = ", ".join(f"{p['better']} > {p['worse']} by {p['points']}" for p in pairs) or "none"
        lines.append(f"- {cell}: {shown}")
    effects = result.get("positions_effect", {})
    if effects:
        lines.append("keep minus reindex, same compressor and ratio (points, ± paired standard error):")
        for key, e in effects.items():
            diff = next(v for k, v in e.items() if k.endswith("_points") and k != "stderr_points")
            mark = " *" if abs(diff) > 2 * e["stderr_points"] else ""
            lines.append(f"- {key}: {diff:+.1f} ± {e['stderr_points']:.1f}{mark}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
