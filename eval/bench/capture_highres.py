"""Cost of vtc's signal capture at the sizes users run: AnyRes views, a 672 px CLIP tower, Qwen2.5-VL at 1344 px and
on a 64-frame video -- time and peak memory, next to the anchors' route (eager attention).

Why: ``python -m vtc.eval.bench.capture`` measures one 577-token CLIP-L image, where an N x N statistic is cheap.
The anchors' penalty (and any of vtc's) grows with N^2: this script measures where it is largest, in one run per
workload. Targets: vtc's capture <= 1.03x the plain SDPA tower; the anchors' route is reported for comparison.

Workloads (``--workload``):

  clip336     CLIP ViT-L/14-336 (LLaVA-1.5), one image: 577 tokens
  anyres      the same tower on LLaVA-NeXT's AnyRes input: 5 views (4 tiles + the overview) x 577 = 2,885 tokens,
              one pass per view (a batch of 5), as LLaVA-NeXT runs it
  clip672     a CLIP-L/14 tower at 672 px: 2,305 tokens in one sequence
  qwen-image  Qwen2.5-VL-7B's vision tower (depth ``--depth``, default 32: windowed blocks of 112 px, full-attention
              blocks 7/15/23/31) on one ``--size`` x ``--size`` image (default 1344: 96 x 96 = 9,216 patches)
  qwen-video  the same tower on a ``--frames``-frame video of 224 x 224 px (default 64: 8,192 patches; full blocks
              attend within each temporal step)

Variants, all under ``torch.inference_mode()``, interleaved in rotating order after warm-up, median over rounds:

  plain          the tower with SDPA, no hooks (CLIP: ``output_hidden_states=True`` as LLaVA reads it; Qwen:
                 ``get_image_features`` / ``get_video_features``)
  cls_attention  CLIP: vtc's capture for ``cls_attention`` (CLS rows of layers 16..22)
  fastervlm      CLIP: CLS row of layer 22; Qwen: received attention at the feature layer (no CLS there)
  hiprune        received attention at hiprune's two layers (CLIP 8 and 22; Qwen the object / deep blocks it declares)
  eager          the anchors' route: the same weights with eager attention (CLIP: ``output_attentions=True``, every
                 layer's map returned; Qwen: eager attention in every block, the maps formed span by span -- the
                 Qwen tower returns none, so this is a lower bound of a route that also keeps them)

Qwen variants run vtc's real adapter path (``encode`` / ``encode_videos`` with the declared signals, i.e.
``QwenBlockCapture``), ``plain`` the model's own feature call. Memory: the peak above what was allocated before the
call (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the running sum of the profiler's allocation timeline), one
extra call per variant after timing. No assertions -- it prints figures (and ``--json`` writes them). Where a size
does not fit the machine's time, run a smaller ``--size`` / ``--frames`` / ``--depth`` and say so.

    python -m vtc.eval.bench.capture_highres --workload anyres [--device cuda --dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch

from vtc.eval.bench.common import (
    CpuShare, describe_device, environment, finish, rotating_rounds, run_summary, sync, time_once, write_report,
)

TARGET_RATIO = 1.03
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORKLOADS = ("clip336", "anyres", "clip672", "qwen-image", "qwen-video")
CLIP_VARIANTS = ("plain", "cls_attention", "fastervlm", "hiprune", "eager")
QWEN_VARIANTS = ("plain", "fastervlm", "hiprune", "eager")


# ------------------------------------------------------------------------------------------------------ CLIP
def _clip_tower(image_size: int, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=image_size, patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def clip_workload(workload: str, device: str, dtype, seed: int):
    """``(variants, descriptions, facts)`` for a CLIP-L/14 workload."""
    import vtc
    from vtc.integrations.transformers.capture import ProjectionCapture
    from vtc.signals import Signal, SignalKind, TowerInfo

    image_size, batch = {"clip336": (336, 1), "anyres": (336, 5), "clip672": (672, 1)}[workload]
    sdpa = _clip_tower(image_size, seed)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    sdpa, eager = sdpa.to(device=device, dtype=dtype), eager.to(device=device, dtype=dtype)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    pixels = pixels.to(device=device, dtype=dtype)
    layers = getattr(sdpa, "vision_model", sdpa).encoder.layers
    tower = TowerInfo(name="clip", num_layers=24, feature_layer=22, has_cls=True)
    signals = {
        "cls_attention": tuple(vtc.create_compressor("cls_attention").signals(tower)),
        "fastervlm": tuple(vtc.create_compressor("fastervlm").signals(tower)),
        "hiprune": (Signal(SignalKind.RECEIVED_ATTENTION, 8), Signal(SignalKind.RECEIVED_ATTENTION, 22)),
    }

    def captured(name):
        def run():
            with ProjectionCapture(layers, signals[name], num_heads=16, cls_index=0):
                return sdpa(pixel_values=pixels, output_hidden_states=True)
        return run

    variants = {
        "plain": lambda: sdpa(pixel_values=pixels, output_hidden_states=True),
        **{name: captured(name) for name in signals},
        "eager": lambda: eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True),
    }
    descriptions = {"plain": "SDPA, no hooks", "eager": "eager, output_attentions=True (all 24 maps returned)",
                    **{name: "SDPA + " + ",".join(map(str, s)) for name, s in signals.items()}}
    tokens = (image_size // 14) ** 2 + 1
    facts = {"tower": "CLIP ViT-L/14 (24 layers, width 1024, 16 heads)", "image_size": image_size, "views": batch,
             "tokens_per_pass": tokens, "tokens_total": tokens * batch}
    return variants, descriptions, facts


# ------------------------------------------------------------------------------------------------------ Qwen
def qwen_workload(workload: str, device: str, dtype, seed: int, depth: int, size: int, frames: int):
    """``(variants, descriptions, facts)`` for the Qwen2.5-VL-7B vision tower on one image or one video."""
    import vtc
    from vtc.eval.bench.video import build_model, video_inputs
    from vtc.integrations.transformers.adapter import adapter_for

    model = build_model(depth, device, dtype, seed)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    if workload == "qwen-image":
        inputs = image_inputs(size, seed)
        pixels, grid = inputs["pixel_values"].to(device=device, dtype=dtype), inputs["image_grid_thw"].to(device)
        inputs = {"pixel_values": pixels, "image_grid_thw": grid}

        def features(m):
            return m.model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
    else:
        inputs = video_inputs(frames, 224, seed)
        pixels = inputs["pixel_values_videos"].to(device=device, dtype=dtype)
        grid = inputs["video_grid_thw"].to(device)
        inputs = {**inputs, "pixel_values_videos": pixels, "video_grid_thw": grid}

        def features(m):
            return m.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid, return_dict=True)
    adapter = adapter_for(model)
    tower = adapter.tower_info(inputs)
    signals = {
        "fastervlm": tuple(dict.fromkeys(vtc.create_compressor("fastervlm").signals(tower))),
        "hiprune": tuple(dict.fromkeys(vtc.create_compressor("hiprune").signals(tower))),
    }
    encode = adapter.encode if workload == "qwen-image" else adapter.encode_videos

    def captured(name):
        return lambda: encode(inputs, signals[name])

    variants = {"plain": lambda: features(model), **{n: captured(n) for n in signals}, "eager": lambda: features(eager)}
    descriptions = {"plain": "SDPA, the model's own feature call", "eager": "eager attention in every block",
                    **{n: f"vtc adapter encode + {','.join(map(str, s))}" for n, s in signals.items()}}
    patches = int(grid.prod(dim=-1).sum())
    facts = {"tower": f"Qwen2.5-VL-7B vision tower, depth {depth} (full-attention blocks "
                      f"{list(model.config.vision_config.fullatt_block_indexes)})",
             "grid_thw": grid.tolist(), "patches": patches, "tokens_after_merge": patches // 4}
    if workload == "qwen-image":
        facts["image_size"] = size
    else:
        facts["frames"] = frames
    return variants, descriptions, facts


def image_inputs(size: int, seed: int) -> dict:
    """Qwen2.5-VL's image processor on one ``size`` x ``size`` picture (pixel bounds wide enough to keep it)."""
    import numpy as np
    from transformers import Qwen2VLImageProcessor

    if size % 28:
        raise SystemExit(f"error: --size must be a multiple of 28 (patch 14 x merge 2), got {size}")
    gen = np.random.default_rng(seed)
    picture = (gen.random((size, size, 3)) * 255).astype("uint8")
    processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 28 * 28, "longest_edge": size * size * 2})
    out = processor(images=[picture], return_tensors="pt")
    expected = [[1, size // 14, size // 14]]
    if out["image_grid_thw"].tolist() != expected:
        raise RuntimeError(f"the image processor produced grid {out['image_grid_thw'].tolist()}, expected {expected}")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


# ------------------------------------------------------------------------------------------------------ memory
def peak_bytes(fn, device: str) -> tuple[int, str]:
    """Peak memory of one call above what was allocated before it, and how it was measured."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    from vtc.eval.bench.video import _allocations

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    total = peak = 0
    for _, size, _, _ in _allocations(prof, "cpu"):
        total += size
        peak = max(peak, total)
    return peak, "torch.profiler allocation timeline"


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.capture_highres",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="anyres", choices=WORKLOADS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--depth", type=int, default=32, help="Qwen workloads: vision blocks (default 32, the 7B's)")
    parser.add_argument("--size", type=int, default=1344, help="qwen-image: picture side in px (default 1344)")
    parser.add_argument("--frames", type=int, default=64, help="qwen-video: frames of 224 px (default 64)")
    parser.add_argument("--variants", help="comma-separated subset of the workload's variants (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each times every variant once")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.depth < 1 or args.frames < 2:
        parser.error("--repeats and --depth must be >= 1, --warmup >= 0, --frames >= 2")
    if args.workload == "qwen-image" and (args.size < 28 or args.size % 28):
        parser.error(f"--size must be a positive multiple of 28 (patch 14 x merge 2), got {args.size}")
    if args.workload == "qwen-video" and args.frames % 2:
        parser.error(f"--frames must be even (Qwen fuses 2 frames per temporal step), got {args.frames}")

    wall_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    if args.workload.startswith("qwen"):
        variants, descriptions, facts = qwen_workload(args.workload, args.device, dtype, args.seed, args.depth,
                                                      args.size, args.frames)
    else:
        variants, descriptions, facts = clip_workload(args.workload, args.device, dtype, args.seed)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - set(variants))
        if unknown or "plain" not in wanted:
            parser.error(f"--variants: unknown {unknown} (known: {', '.join(variants)}); 'plain' is required")
        variants = {name: variants[name] for name in variants if name in wanted}
    names = list(variants)
    device_name = describe_device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, dtype {args.dtype}")
    print(f"workload {args.workload}: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    print(f"warm-up {args.warmup}, {args.repeats} rounds, variants interleaved", flush=True)

    times: dict[str, list[float]] = {name: [] for name in names}
    memory: dict[str, dict] = {}
    with torch.inference_mode():
        with CpuShare() as cpu:
            for _ in range(args.warmup):
                for name in names:
                    time_once(variants[name], args.device)
            rotating_rounds(variants, args.repeats, args.device, times, log=True)
        share = cpu.share
        if args.memory:
            for name in names:
                peak, method = peak_bytes(variants[name], args.device)
                memory[name] = {"peak_bytes": peak, "method": method}
        sync(args.device)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["plain"]
    base_peak = memory.get("plain", {}).get("peak_bytes")
    print()
    print(f"{'variant':<14} {'median ms':>10} {'x plain':>8} {'min ms':>9} {'peak MiB':>9} {'x plain':>8}  what")
    for name in names:
        peak = memory.get(name, {}).get("peak_bytes")
        peak_text = f"{peak / 2**20:>9.1f}" if peak is not None else f"{'-':>9}"
        peak_ratio = f"{peak / base_peak:>8.3f}" if peak is not None and base_peak else f"{'-':>8}"
        print(f"{name:<14} {medians[name]:>10.1f} {medians[name] / base:>8.3f} {min(times[name]):>9.1f} "
              f"{peak_text} {peak_ratio}  {descriptions[name]}")
    print()
    print(f"target: vtc capture <= {TARGET_RATIO:.2f}x plain SDPA (time); the anchors' route (eager) for comparison")
    for name in names:
        if name in ("plain", "eager"):
            continue
        ratio = medians[name] / base
        print(f"  {name:<14} {ratio:.3f}x  {'within' if ratio <= TARGET_RATIO else 'ABOVE'} target")
    if "eager" in medians:
        print(f"  {'eager':<14} {medians['eager'] / base:.3f}x  (the anchors' route)")
    wall = finish(args.device, share, wall_start)

    if args.json:
        report = {
            **environment(device_name),
            "workload": args.workload, **facts, "dtype": args.dtype, "warmup": args.warmup,
            "repeats": args.repeats, "seed": args.seed, "target_ratio": TARGET_RATIO,
            "variants": {
                name: {"description": descriptions[name], "median_ms": medians[name],
                       "ratio_to_plain": medians[name] / base, "min_ms": min(times[name]), "times_ms": times[name],
                       **({"peak_bytes": memory[name]["peak_bytes"],
                           "peak_ratio_to_plain": memory[name]["peak_bytes"] / base_peak if base_peak else None,
                           "memory_method": memory[name]["method"]} if name in memory else {})}
                for name in names
            },
            **run_summary(args.device, share, wall),
        }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
