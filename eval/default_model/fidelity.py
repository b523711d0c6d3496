"""Accuracy of the embedded default model at 100 % / 33 % / 11 % of its visual tokens, for every compressor.

    python -m vtc.eval.default_model.fidelity [--images 200 --videos 60] [--out results.json]

The first real fidelity numbers of the project: the same held-out test questions answered with all 196 tokens per
image (frame) and with each registered compressor keeping a third / a ninth of them. A video's 8 frames are one
video (``images_as_video=True``): its budget is that fraction of all its frames' tokens, which image compressors
split evenly over the frames and the video compressors (quota, progressive) allot by relevance / novelty. Also
measures where the CLS
attention of the tower's feature layer goes -- the share of it that lands on object patches versus the share of
patches that are objects -- since that is what CLS-attention pruning relies on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch

import vtc

from . import synthetic as syn
from .accuracy import evaluate
from .train import patch_targets

RATIOS = (0.33, 0.11)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.default_model.fidelity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="folder written by vtc.eval.default_model.train (default: the embedded model)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--questions", type=int, default=4, help="questions per image / video")
    parser.add_argument("--compressor", action="append", help="repeatable; default: every registered one")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from tqdm import tqdm

    model, processor = vtc.load_default(args.model)
    names = args.compressor or vtc.list_compressors()
    per_run = args.images * args.questions + args.videos * args.questions
    bar = tqdm(total=per_run * (1 + len(names) * len(RATIOS)), desc="fidelity", unit="q", mininterval=5)
    kwargs = dict(split="test", num_images=args.images, num_videos=args.videos,
                  questions_per_sample=args.questions, on_batch=bar.update)
    start = time.perf_counter()
    full = evaluate(model, processor, **kwargs)
    rows = {"none": {"1.0": full}}
    for name in names:
        rows[name] = {}
        for ratio in RATIOS:
            vtc.apply(model, name, budget=ratio, video_budget=ratio, images_as_video=True)
            try:
                rows[name][str(ratio)] = evaluate(model, processor, **kwargs)
            finally:
                vtc.remove(model)
    bar.close()
    attention = cls_attention_on_objects(model, processor)
    result = {"model": args.model or "embedded default", "ratios": RATIOS, "tokens_per_image": 196,
              "results": rows, "cls_attention": attention, "seconds": round(time.perf_counter() - start)}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"\nCLS attention (feature layer) on object patches: {attention['attention_on_objects']:.1%} "
          f"(objects cover {attention['object_area']:.1%} of patches); fastervlm's 22 kept tokens are object "
          f"patches {attention['top22_object_precision']:.1%} of the time")
    return 0


def markdown_table(result: dict) -> str:
    full = result["results"]["none"]["1.0"]
    head = ("| compressor | image 100 % | image 33 % | image 11 % | video 100 % | video 33 % | video 11 % |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for name, runs in result["results"].items():
        if name == "none":
            continue
        cells = [f"{full['image_accuracy']:.1%}"] + [f"{runs[str(r)]['image_accuracy']:.1%}" for r in result["ratios"]]
        cells += [f"{full['video_accuracy']:.1%}"] + [f"{runs[str(r)]['video_accuracy']:.1%}"
                                                      for r in result["ratios"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
