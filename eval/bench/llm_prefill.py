"""Prefill speedup of an LLM-side compressor (FastV) on the LLaVA-1.5 shape, next to the ideal for its schedule, and
the cost of its signal capture.

Why: FastV keeps every token in layers < K and only ``k`` after; a zero-overhead implementation of that schedule
is the same LLM run by hand -- layers < K on the whole prompt, layers >= K on the kept rows. vtc's cut must come close
(target: measured speedup >= 0.9 x that ideal) while computing the attention signal from q/k projections, gathering
rotary tables, rebuilding masks and keeping a shorter cache in layers >= K. And capturing the signal alone (FastV at
``budget=1.0``: the row is computed, nothing is dropped) must cost little: target <= 1.03 x the plain prefill.

What: the model of ``vtc.eval.bench.prefill`` (``build_model``: CLIP ViT-L/14-336 tower, LLaVA projector, a Llama LLM
of LLaVA-1.5-7B's width with ``--llm-layers`` layers, SDPA) and its prompt (5 + 576 ``<image>`` + 35 tokens). A
*prefill* is one forward under ``torch.inference_mode()`` with ``use_cache=True`` and ``logits_to_keep=1``.

  full        the unwrapped model on the full prompt
  capture     ``vtc.apply(model, "fastv", budget=1.0, layer=K)``: the signal of layer K-1 computed, nothing dropped
  fastv@k     ``vtc.apply(model, "fastv", budget=k, layer=K)``
  ideal@k     ``get_image_features`` + the LLM by hand: embeddings spliced as LlavaModel does, layers < K on every
              token, layers >= K on the rows fastv@k kept (same cache, same rotary rows), final norm + head on the
              last token: the schedule with zero overhead

Checks (once, untimed): fastv@k's logits equal ideal@k's (the same kept rows), capture's equal full's. Figures:
median / min / max over ``--rounds`` rotating rounds after the warm-up; ratios from this run only. The capture
overhead is also timed directly (the signal computation alone, ``CaptureClock``), since on a shared CPU whole
prefills vary by more than the 3 % being measured. No assertions.

    python -m vtc.eval.bench.llm_prefill [--device cpu] [--llm-layers 4] [--layer 2] [--budgets 64] [--rounds 5]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict

import torch

from vtc.eval.bench.common import (
    CpuShare, describe_device, environment, finish, rotating_rounds, run_summary, time_once, write_report,
)
from vtc.eval.bench.prefill import DTYPES, Shape, build_model, build_prompt

TARGET_RATIO = 0.9
TARGET_CAPTURE = 1.03


class CaptureClock:
    """Wall time spent computing the LLM-side signals (``LLMCut._capture``: projections, rotary, attention rows)
    during the calls made inside ``with clock:`` -- the capture cost measured directly, free of the run-to-run
    noise of whole prefills. Bench-only instrumentation: the method is wrapped while the block runs."""

    def __init__(self):
        self.seconds: list[float] = []

    def __enter__(self):
        from vtc.integrations.transformers.llm_cut import LLMCut

        self.original = LLMCut._capture
        clock = self

        def timed(cut, *args, **kwargs):
            start = time.perf_counter()
            try:
                return clock.original(cut, *args, **kwargs)
            finally:
                clock.seconds.append(time.perf_counter() - start)

        LLMCut._capture = timed
        return self

    def __exit__(self, *exc):
        from vtc.integrations.transformers.llm_cut import LLMCut

        LLMCut._capture = self.original


def make_variants(model, prompt, budgets: list[int], layer: int) -> dict:
    import vtc

    ids, mask, pixels = prompt.input_ids, prompt.attention_mask, prompt.pixel_values
    lm, head, embed = model.model.language_model, model.lm_head, model.get_input_embeddings()
    kept_rows: dict[int, torch.Tensor] = {}

    def forward():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def wrapped(budget):
        def run():
            vtc.apply(model, "fastv", budget=budget, layer=layer)
            try:
                out = forward()
                records = vtc.last_llm_selection(model)
            finally:
                vtc.remove(model)
            if isinstance(budget, int):
                keep = torch.ones(ids.shape[1], dtype=torch.bool)
                keep[records[0].positions] = False
                keep[records[0].positions[records[0].kept]] = True
                kept_rows[budget] = keep.nonzero().squeeze(-1).to(ids.device)
            return out.logits

        return run

    def ideal(k):
        def run():
            from transformers import DynamicCache

            image = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
            hidden = embed(ids)
            hidden = hidden.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(hidden),
                                           image.to(hidden.dtype))
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
            cos, sin = lm.rotary_emb(hidden, positions)
            cache = DynamicCache(config=lm.config)
            rows = kept_rows[k]
            for j, decoder_layer in enumerate(lm.layers):
                if j == layer:
                    hidden, cos, sin = hidden[:, rows], cos[:, rows], sin[:, rows]
                hidden = decoder_layer(hidden, attention_mask=None, position_embeddings=(cos, sin),
                                       past_key_values=cache, use_cache=True)
            return head(lm.norm(hidden[:, -1:]))

        return run

    variants = {"full": lambda: forward().logits, "capture": wrapped(1.0)}
    for k in budgets:
        variants[f"fastv@{k}"] = wrapped(k)
        variants[f"ideal@{k}"] = ideal(k)
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.llm_prefill",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--budgets", default="64", help="comma-separated visual tokens kept after layer K (of 576)")
    parser.add_argument("--layer", type=int, default=2, help="K, FastV's drop layer (default 2)")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM layers (default 4; LLaVA-1.5-7B has 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    for flag, attr in (("--llm-width", "llm_width"), ("--llm-mlp", "llm_mlp"), ("--llm-heads", "llm_heads"),
                       ("--vocab", "vocab_size"), ("--vision-width", "vision_width"), ("--vision-mlp", "vision_mlp"),
                       ("--vision-layers", "vision_layers"), ("--vision-heads", "vision_heads"),
                       ("--image-size", "image_size"), ("--patch-size", "patch_size")):
        parser.add_argument(flag, dest=attr, type=int, default=getattr(Shape(), attr), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = Shape(**{name: getattr(args, name) for name in asdict(Shape())})
    try:
        budgets = list(dict.fromkeys(int(b) for b in args.budgets.split(",") if b.strip()))
    except ValueError:
        parser.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
    if not budgets or not all(0 < k < shape.image_tokens for k in budgets):
        parser.error(f"--budgets must be in 1..{shape.image_tokens - 1}")
    if not 1 <= args.layer < args.llm_layers:
        parser.error(f"--layer must be in 1..{args.llm_layers - 1} (the LLM has {args.llm_layers} layers)")
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --warmup >= 0")

    wall_start = time.perf_counter()
    model = build_model(shape, args.device, DTYPES[args.dtype], args.seed)
    prompt = build_prompt(shape, 5, 35, args.seed, args.device, DTYPES[args.dtype])
    device_name = describe_device(args.device)
    length = int(prompt.input_ids.shape[1])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, dtype {args.dtype}")
    print(f"LLaVA-1.5 shape, {shape.llm_layers} LLM layers (random weights, SDPA); prompt {length} tokens "
          f"({shape.image_tokens} visual); FastV K={args.layer}, budgets {budgets}; prefill = one forward, "
          f"use_cache=True, logits_to_keep=1; warm-up {max(1, args.warmup)}, {args.rounds} rounds", flush=True)

    with torch.inference_mode():
        variants = make_variants(model, prompt, budgets, args.layer)
        outputs = {name: run() for name, run in variants.items()}  # warm-up 1, and the checks
        diffs = {"capture_vs_full": float((outputs["capture"][:, -1] - outputs["full"][:, -1]).abs().max())}
        for k in budgets:
            diffs[f"fastv@{k}_vs_ideal@{k}"] = float(
                (outputs[f"fastv@{k}"][:, -1] - outputs[f"ideal@{k}"][:, -1]).abs().max())
        for _ in range(max(0, args.warmup - 1)):
            for run in variants.values():
                time_once(run, args.device)
        times = {name: [] for name in variants}
        with CpuShare() as cpu:
            rotating_rounds(variants, args.rounds, args.device, times, log=True)
        clock = CaptureClock()
        with clock:  # the signal computation timed directly, apart from the rounds
            for _ in range(args.rounds):
                variants["capture"]()

    medians = {name: statistics.median(v) for name, v in times.items()}
    base = medians["full"]
    print()
    print(f"{'variant':<10} {'median ms':>10} {'x full':>7} {'min ms':>9} {'max ms':>9}")
    for name in variants:
        print(f"{name:<10} {medians[name]:>10.1f} {medians[name] / base:>7.3f} {min(times[name]):>9.1f} "
              f"{max(times[name]):>9.1f}")
    capture = medians["capture"] / base
    capture_ms = 1000 * statistics.median(clock.seconds)
    direct = 1 + capture_ms / base
    print()
    print(f"capture overhead, whole prefills: {capture:.3f} x the plain prefill (median of {args.rounds} rounds; "
          "the rounds' spread above shows how much of it is noise)")
    print(f"capture overhead, timed directly: {capture_ms:.1f} ms of signal computation per prefill (median of "
          f"{len(clock.seconds)}) = {direct:.4f} x the plain prefill (target <= {TARGET_CAPTURE:.2f}: "
          f"{'within' if direct <= TARGET_CAPTURE else 'ABOVE'})")
    speedups = {}
    for k in budgets:
        measured, ideal = base / medians[f"fastv@{k}"], base / medians[f"ideal@{k}"]
        ratio = measured / ideal
        speedups[str(k)] = {"measured_speedup": measured, "ideal_speedup": ideal, "ratio": ratio,
                            "within_target": ratio >= TARGET_RATIO}
        print(f"fastv@{k}: {measured:.2f}x measured vs {ideal:.2f}x ideal for K={args.layer} -> ratio {ratio:.3f} "
              f"(target >= {TARGET_RATIO:.2f}: {'within' if ratio >= TARGET_RATIO else 'BELOW'}; "
              f"{'faster' if measured >= 1 else 'slower'} than full)")
    print("sanity: max |logit diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    wall = finish(args.device, cpu.share, wall_start)
    if args.json:
        write_report(args.json, {
            **environment(device_name), "dtype": args.dtype, "seed": args.seed, "rounds": args.rounds,
            "warmup": max(1, args.warmup), "layer": args.layer, "budgets": budgets, "shape": asdict(shape),
            "sequence_length": length, "medians_ms": medians, "times_ms": times, "capture_ratio": capture,
            "capture_signal_ms": [1000 * x for x in clock.seconds], "capture_ratio_direct": direct,
            "target_capture": TARGET_CAPTURE, "target_ratio": TARGET_RATIO, "speedups": speedups,
            "max_abs_logit_diff": diffs, **run_summary(args.device, cpu.share, wall),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
