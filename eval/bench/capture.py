"""Cost of vtc's attention-signal capture on a CLIP ViT-L/14-336 vision tower.

Why: vtc never switches the tower to eager attention to read attention maps; it hooks ``q_proj``/``k_proj`` of the
declared layers only (``ProjectionCapture``) and scores them without an N x N map. This script checks that the
claim "capture is (almost) free" holds: target is vtc capture <= 1.03x the plain SDPA forward, against the
``output_attentions=True`` eager tower that the naive approach needs.

What: one forward of a randomly initialised CLIP-L/14-336 tower (24 layers, 577 tokens per image) with
``output_hidden_states=True`` (LLaVA reads ``hidden_states[-2]``), under ``torch.inference_mode()``, for

  plain         SDPA tower, no hooks
  cls_attention SDPA + capture of CLS attention at layers 16..22 (the default ``cls_attention`` compressor)
  fastervlm     SDPA + capture of CLS attention at layer 22
  received      SDPA + capture of received attention at layers 8 and 22 (what HiPrune needs)
  eager+attn    eager tower (identical weights) with ``output_attentions=True``

Variants are interleaved: after the warm-up rounds each round times every variant once (in a rotating order), and
the median over rounds is reported (min too). On CPU it also reports the share of CPU the process got while timing:
other work on the machine skews CPU timings badly, so a low share is flagged. No assertions -- it prints figures
(and ``--json`` writes them).

    python -m vtc.eval.bench.capture [--device cpu] [--dtype float32] [--batch 1] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from vtc.eval.bench.common import (
    NUM_HEADS, NUM_LAYERS, CpuShare, build_clip_l_tower, describe_device, environment, finish, rotating_rounds,
    run_summary, time_once, write_report,
)

TARGET_RATIO = 1.03
FEATURE_LAYER = 22  # LLaVA reads hidden_states[-2]: the output of layer 22
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_towers(device: str, dtype: torch.dtype, seed: int):
    sdpa = build_clip_l_tower("cpu", torch.float32, seed)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa.to(device=device, dtype=dtype), eager.to(device=device, dtype=dtype)


def capture_signals():
    import vtc
    from vtc.signals import Signal, SignalKind, TowerInfo

    tower = TowerInfo(name="clip", num_layers=NUM_LAYERS, feature_layer=FEATURE_LAYER, has_cls=True)
    return {
        "cls_attention": tuple(vtc.create_compressor("cls_attention").signals(tower)),
        "fastervlm": tuple(vtc.create_compressor("fastervlm").signals(tower)),
        "received": (Signal(SignalKind.RECEIVED_ATTENTION, 8), Signal(SignalKind.RECEIVED_ATTENTION, 22)),
    }


def make_variants(sdpa, eager, pixel_values):
    from vtc.integrations.transformers.capture import ProjectionCapture

    layers = getattr(sdpa, "vision_model", sdpa).encoder.layers  # transformers 5 flattens CLIPVisionModel
    signals = capture_signals()
    last_results: dict[str, dict] = {}

    def plain():
        return sdpa(pixel_values=pixel_values, output_hidden_states=True)

    def captured(name):
        def run():
            with ProjectionCapture(layers, signals[name], num_heads=NUM_HEADS, cls_index=0) as capture:
                out = sdpa(pixel_values=pixel_values, output_hidden_states=True)
            last_results[name] = capture.results
            return out

        return run

    def eager_attn():
        return eager(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)

    variants = {
        "plain": plain,
        "cls_attention": captured("cls_attention"),
        "fastervlm": captured("fastervlm"),
        "received": captured("received"),
        "eager+attn": eager_attn,
    }
    descriptions = {
        "plain": "SDPA, no hooks",
        "cls_attention": "SDPA + " + ",".join(map(str, signals["cls_attention"])),
        "fastervlm": "SDPA + " + ",".join(map(str, signals["fastervlm"])),
        "received": "SDPA + " + ",".join(map(str, signals["received"])),
        "eager+attn": "eager, output_attentions=True",
    }
    return variants, descriptions, last_results


def sanity(sdpa, eager, pixel_values, last_results) -> str:
    """Captured CLS attention at the feature layer vs the eager map (one extra forward, not timed)."""
    from vtc.signals import Signal, SignalKind

    got = last_results.get("fastervlm", {}).get(Signal(SignalKind.CLS_ATTENTION, FEATURE_LAYER))
    if got is None:
        return "sanity: no capture result"
    out = eager(pixel_values=pixel_values, output_attentions=True)
    ref = out.attentions[FEATURE_LAYER][:, :, 0].float().mean(dim=1)
    diff = (got.float() - ref).abs().max().item()
    return f"sanity: |captured - eager| CLS attention @ layer {FEATURE_LAYER}: max {diff:.2e} (shape {tuple(got.shape)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds; each times every variant once")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--repeats and --batch must be >= 1, --warmup >= 0")

    wall_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    sdpa, eager = build_towers(args.device, dtype, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch, 3, 336, 336, generator=generator).to(device=args.device, dtype=dtype)
    variants, descriptions, last_results = make_variants(sdpa, eager, pixel_values)
    names = list(variants)

    device_name = describe_device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, dtype {args.dtype}")
    print(
        f"CLIP ViT-L/14-336 (random weights, seed {args.seed}), batch {args.batch}, "
        f"attn_implementation={sdpa.config._attn_implementation}; warm-up {args.warmup}, {args.repeats} rounds"
    )

    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        with CpuShare() as cpu:
            for _ in range(args.warmup):
                for name in names:
                    time_once(variants[name], args.device)
            rotating_rounds(variants, args.repeats, args.device, times)
        share = cpu.share
        check = sanity(sdpa, eager, pixel_values, last_results)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["plain"]
    print()
    low = min(times["plain"])
    print(f"{'variant':<14} {'median ms':>10} {'x plain':>8}  {'min ms':>9} {'x plain':>8} {'max ms':>9}  what")
    for name in names:
        values = times[name]
        print(
            f"{name:<14} {medians[name]:>10.1f} {medians[name] / base:>8.3f}  "
            f"{min(values):>9.1f} {min(values) / low:>8.3f} {max(values):>9.1f}  {descriptions[name]}"
        )
    print()
    print(f"target: vtc capture (cls_attention, fastervlm, received) <= {TARGET_RATIO:.2f}x plain SDPA")
    for name in ("cls_attention", "fastervlm", "received"):
        ratio = medians[name] / base
        print(f"  {name:<14} {ratio:.3f}x  {'within' if ratio <= TARGET_RATIO else 'ABOVE'} target")
    print(check)
    wall = finish(args.device, share, wall_start)

    if args.json:
        report = {
            **environment(device_name),
            "dtype": args.dtype,
            "batch": args.batch,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "target_ratio": TARGET_RATIO,
            "variants": {
                name: {
                    "description": descriptions[name],
                    "median_ms": medians[name],
                    "ratio_to_plain": medians[name] / base,
                    "min_ms": min(times[name]),
                    "min_ratio_to_plain": min(times[name]) / low,
                    "times_ms": times[name],
                }
                for name in names
            },
            "sanity": check,
            **run_summary(args.device, share, wall),
        }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
