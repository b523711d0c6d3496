"""Peak memory and time of vtc's signal capture + video selection on a Qwen2.5-VL-7B-shaped video tower.

Why: on a 64-frame video the Qwen2.5-VL ViT sees ~8k patches, so any N x N attention map kept across layers (what
``output_attentions=True`` would do) costs gigabytes. vtc captures received attention inside a pre-hook on the
declared blocks only, span by span (``cu_seqlens``), in query chunks, and keeps one ``[S]`` vector per layer. This
script checks, in one run, that capture + selection stay cheap next to the tower's own forward. Target: extra peak
memory <= 5 % of the tower's activations, and no N x N map kept for more than one layer at a time.

What: a ``Qwen2_5_VLForConditionalGeneration`` built from its config with random weights (seeded): the vision
tower of Qwen2.5-VL-7B (the real ``Qwen2_5_VisionTransformerPretrainedModel``: depth 32, width 1280, 16 heads, MLP
3420 (SiLU, gated), patch 14, temporal patch 2, spatial merge 2, window 112 px, full-attention blocks 7/15/23/31,
out_hidden_size 3584) next to a 1-layer, 64-wide LLM that is never run (it only makes the model class -- and so
vtc's adapter -- the real one). Input: one synthetic video (a textured background, a square moving across, a scene
cut halfway, pixel noise) of ``--frames`` frames of ``--size`` x ``--size`` px, through transformers'
``Qwen2VLVideoProcessor`` with Qwen2.5-VL's settings, i.e. ``pixel_values_videos [patches, 3*2*14*14]`` and
``video_grid_thw [[frames/2, size/14, size/14]]``. Defaults: 64 frames = 32 temporal steps (the tower fuses
``temporal_patch_size = 2`` frames) of 224 x 224 px = 16 x 16 patches, i.e. 8,192 patches and 2,048 video tokens
(8 x 8 per step). ``--depth`` shrinks the tower for CPU: full-attention blocks stay every 8th block counted back from
the last (depth-1, depth-9, ...), so the feature layer is always a full-attention block as in the 7B.

Variants, all under ``torch.inference_mode()``, in the same run:

  plain        the tower alone: ``model.model.get_video_features(pixel_values_videos, video_grid_thw)``, what the
               model itself runs for a video
  progressive  what vtc's cut runs for the video: the adapter's ``encode_videos`` (the same call inside
               ``QwenBlockCapture``, capturing what ``progressive`` declares: received attention at the feature
               layer; then per-merge-unit means, window order restored, split per temporal step), ``VideoTokens``
               as the cut builds them, ``run_video_compressor`` at ``--budget`` (default 25 % of the video's
               tokens), ``flat()`` and the gather / merge of the kept tokens
  quota        the same with ``quota`` (scorer ``similarity`` on a random [16, 3584] query by default; ``within``
               resize): no signals, so this is the tower + selection only
  hiprune      the same with ``hiprune`` frame by frame (received attention at blocks 15 and 31 at depth 32)
  fastervlm    the same with ``fastervlm`` frame by frame (received attention at the feature layer)

Time: after the warm-up rounds each round times every variant once (in a rotating order); median, min and max over
rounds, plus the median of the selection part alone (after the tower). On CPU it also reports the share of CPU the
process got while timing (other work on the machine skews CPU timings). Memory: after timing, one pass of every
variant under ``torch.profiler`` with ``profile_memory=True``: allocations and frees come back as a timeline, whose
running sum from the start of the call gives the peak above what was allocated before it (weights and inputs
excluded, the output included) -- in one process, unlike ru_maxrss. On CUDA the peak is
``torch.cuda.max_memory_allocated()`` minus the memory allocated before the call (the profiler timeline is still
used to say where the memory goes). The CPU figures count tensors (c10's allocator); scratch memory that BLAS /
oneDNN take for themselves is not seen, for either variant.

Reported: the tower's activation peak (a: plain), the peak with capture + selection (b), extra = b - a and
extra / a against the 5 % target, the phase holding b's peak (tower, capture or selection); per captured block the
transient memory of vtc's hook, its largest single allocation (with the op that made it), the largest allocation
inside the scoring kernel (a padded copy of q or k: the fused kernel forms no map), and what the hook left
allocated after it returned -- next to one N x N map of the largest span (heads x span^2 x 4 B) and one of the
whole video (heads x patches^2 x 4 B). The profiler ranges
that delimit the hook and the kernel are added by this script for the memory pass only (a forward pre-hook before and
one after vtc's, and a record_function around ``received_attention``); they observe, they change nothing. No
assertions -- it prints figures (and ``--json`` writes them).

    python -m vtc.eval.bench.video [--device cpu] [--dtype float32] [--depth 32] [--frames 64] [--size 224]
        [--budget 0.25] [--variants plain,progressive,quota,hiprune,fastervlm] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from vtc.budget import parse_budget, resolve_budget
from vtc.eval.bench.common import (
    CpuShare, describe_device, environment, finish, rotating_rounds, run_summary, sync, time_once, write_report,
)

TARGET_EXTRA_PERCENT = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("plain", "progressive", "quota", "hiprune", "fastervlm")
QUERY_TOKENS = 16
FPS = 2.0  # frames per second of the synthetic video (second_per_grid_ts = temporal_patch_size / FPS)

#: Qwen2.5-VL-7B-Instruct's vision_config (depth and full-attention blocks follow ``--depth``)
VISION_7B = dict(
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    hidden_act="silu",
    in_channels=3,
    tokens_per_second=2,
)
DEPTH_7B = 32


def full_attention_blocks(depth: int) -> tuple[int, ...]:
    """Every 8th block counted back from the last one: (7, 15, 23, 31) at depth 32, as in Qwen2.5-VL."""
    return tuple(sorted(range(depth - 1, -1, -8)))


def build_model(depth: int, device: str, dtype: torch.dtype, seed: int):
    """``Qwen2_5_VLForConditionalGeneration`` with the 7B's vision tower (``depth`` blocks) and a tiny, unused LLM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]})
    vision = dict(VISION_7B, depth=depth, fullatt_block_indexes=list(full_attention_blocks(depth)))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                              vision_start_token_id=252, vision_end_token_id=253)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype)


def synthetic_video(frames: int, size: int, seed: int) -> torch.Tensor:
    """``[frames, size, size, 3]`` uint8: a smooth random background (a new one from the middle frame on: a scene
    cut), a red square moving left to right, and a little pixel noise, so that frames are similar but not equal."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 6, 6, generator=gen) * 200 + 20
    backgrounds = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    side = max(4, size // 6)
    video = torch.empty(frames, 3, size, size)
    for t in range(frames):
        frame = backgrounds[0 if t < frames // 2 else 1].clone()
        x = round((size - side) * t / max(1, frames - 1))
        y = size // 3
        frame[:, y:y + side, x:x + side] = torch.tensor([230.0, 40.0, 40.0])[:, None, None]
        video[t] = frame + torch.randint(-6, 7, frame.shape, generator=gen)
    return video.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def video_inputs(frames: int, size: int, seed: int) -> dict:
    """What Qwen2.5-VL's processor returns for the video (``Qwen2VLVideoProcessor``, patch 14, merge 2, temporal 2;
    pixel bounds wide enough that a ``size`` multiple of 28 is kept as it is)."""
    from transformers import Qwen2VLVideoProcessor

    patch, merge, temporal = VISION_7B["patch_size"], VISION_7B["spatial_merge_size"], VISION_7B["temporal_patch_size"]
    processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                                      size={"shortest_edge": (patch * merge) ** 2, "longest_edge": size * size * 4},
                                      cap_pixels_per_frame=False)
    out = processor(videos=[synthetic_video(frames, size, seed).numpy()], return_tensors="pt")
    grid = out["video_grid_thw"]
    expected = [[frames // temporal, size // patch, size // patch]]
    if grid.tolist() != expected:
        raise RuntimeError(f"the video processor produced grid {grid.tolist()}, expected {expected}")
    return {
        "pixel_values_videos": out["pixel_values_videos"],
        "video_grid_thw": grid,
        "second_per_grid_ts": torch.tensor([temporal / FPS]),
    }


# ------------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    name: str
    run: object  # () -> output
    description: str
    signals: tuple = ()
    selection_ms: list[float] = field(default_factory=list)  # the selection part of each call


def make_variants(model, inputs: dict, budget, names, quota_scorer: str, seed: int, device: str) -> dict:
    import vtc
    from vtc.compressor import VisualTokens
    from vtc.integrations.transformers.adapter import adapter_for
    from vtc.video import VideoTokens, run_video_compressor

    adapter = adapter_for(model)
    tower = adapter.tower_info(inputs)
    out_dim = model.config.vision_config.out_hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(QUERY_TOKENS, out_dim, generator=gen).to(device=device, dtype=model.dtype)
    pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]

    def plain():
        return model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid, return_dict=True)

    def compressed(compressor, signals, record: list):
        q = query if compressor.uses_query else None  # the cut embeds the prompt only for query-aware methods

        def run():
            videos = adapter.encode_videos(inputs, signals)
            sync(device)
            start = time.perf_counter()
            with torch.profiler.record_function("vtc.selection"):
                kept = []
                stamps_per_video = videos.timestamps or [None] * len(videos.frames)
                for frames, grids, sigs, stamps in zip(videos.frames, videos.grids, videos.signals,
                                                       stamps_per_video):
                    tokens = [VisualTokens(features=f, grid=g, signals=s, query=q)
                              for f, g, s in zip(frames, grids, sigs)]
                    video = VideoTokens(frames=tokens, timestamps=stamps, query=q)
                    flat = run_video_compressor(compressor, video, budget).flat(video)
                    kept.append(flat.features if flat.is_merged else torch.cat(frames)[flat.indices])
            sync(device)
            record.append((time.perf_counter() - start) * 1e3)
            return kept

        return run

    options = {
        "progressive": {},
        "quota": {"scorer": quota_scorer},
        "hiprune": {},
        "fastervlm": {},
    }
    variants = {"plain": Variant("plain", plain, "model.model.get_video_features, no hooks")}
    for name in names:
        if name == "plain":
            continue
        compressor = vtc.create_compressor(name, **options[name])
        signals = tuple(dict.fromkeys(compressor.signals(tower)))
        record: list[float] = []
        how = "video budget" if getattr(compressor, "handles_video", False) else "frame by frame"
        opts = ", ".join(f"{k}={v}" for k, v in options[name].items())
        what = f"encode_videos + {','.join(map(str, signals)) or 'no signals'} + {name}"
        what += f"({opts})" if opts else ""
        variants[name] = Variant(name, compressed(compressor, signals, record), f"{what}, {how}", signals, record)
    return variants


# ------------------------------------------------------------------------------------------------------ memory
class CaptureRanges:
    """Profiler ranges for the memory pass: ``vtc.capture@L`` around vtc's capture hook on ``blocks[L].attn`` and
    ``vtc.scores`` around the received-attention kernel it calls. The range opens in a pre-hook put before vtc's and
    closes in one put after it once the tower starts (vtc registers its hooks when ``encode_videos`` enters the
    capture, just before it calls the tower). Observation only; also records the longest ``cu_seqlens`` span."""

    def __init__(self, visual, layers):
        self.visual, self.layers = visual, sorted(set(layers))
        self.handles, self.armed, self.open = [], [], {}
        self.spans: dict[int, int] = {}

    def __enter__(self):
        from vtc.integrations.transformers import capture as capture_module

        self._module, self._kernel = capture_module, capture_module.received_attention
        kernel = self._kernel

        def scored(*args, **kwargs):
            with torch.profiler.record_function("vtc.scores"):
                return kernel(*args, **kwargs)

        capture_module.received_attention = scored
        for layer in self.layers:
            attn = self.visual.blocks[layer].attn
            self.handles.append(attn.register_forward_pre_hook(self._opener(layer), prepend=True, with_kwargs=True))
        self.handles.append(self.visual.register_forward_pre_hook(self._arm))
        self.handles.append(self.visual.register_forward_hook(self._disarm))
        return self

    def __exit__(self, *exc):
        self._module.received_attention = self._kernel
        for handle in self.handles + self.armed:
            handle.remove()
        self.handles, self.armed = [], []
        self._close_all()
        return False

    def _opener(self, layer):
        def hook(module, args, kwargs):
            bounds = kwargs["cu_seqlens"].tolist()
            self.spans[layer] = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            scope = torch.profiler.record_function(f"vtc.capture@{layer}")
            scope.__enter__()
            self.open[layer] = scope

        return hook

    def _closer(self, layer):
        def hook(module, args):
            scope = self.open.pop(layer, None)
            if scope is not None:
                scope.__exit__(None, None, None)

        return hook

    def _arm(self, module, args):
        for layer in self.layers:
            self.armed.append(self.visual.blocks[layer].attn.register_forward_pre_hook(self._closer(layer)))

    def _disarm(self, module, args, output):
        for handle in self.armed:
            handle.remove()
        self.armed = []
        self._close_all()

    def _close_all(self):
        for scope in self.open.values():
            scope.__exit__(None, None, None)
        self.open.clear()


def _allocations(prof, device_type: str) -> list:
    """Allocation events (sizes signed: frees are negative) of ``device_type`` in time order, each with the names of
    its enclosing ranges and the op that made it."""
    from torch._C._profiler import _EventType

    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as error:  # pragma: no cover - torch without the event tree
        raise RuntimeError(f"this torch ({torch.__version__}) exposes no profiler event tree: {error}") from None
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag != _EventType.Allocation:
            continue
        fields = node.extra_fields
        if fields.device.type != device_type:
            continue
        scopes, op, parent = [], None, node.parent
        while parent is not None:
            if parent.name.startswith("vtc."):
                scopes.append(parent.name)
            elif op is None:
                op = parent.name
            parent = parent.parent
        events.append((node.start_time_ns, int(fields.alloc_size), tuple(scopes), op or "?"))
    events.sort(key=lambda e: e[0])
    return events


def _phase(scopes: tuple) -> str:
    if any(s.startswith("vtc.capture@") for s in scopes):
        return "capture"
    return "selection" if "vtc.selection" in scopes else "tower"


def analyse(events: list, spans: dict) -> dict:
    """Peak of the running sum, the phase holding it, the peak per phase, and per captured layer what its hook
    allocated."""
    total, peak, peak_phase = 0, 0, "tower"
    phase_peaks = {"tower": 0, "capture": 0, "selection": 0}
    layers: dict[int, dict] = {}
    for _, size, scopes, op in events:
        total += size
        phase = _phase(scopes)
        phase_peaks[phase] = max(phase_peaks[phase], total)
        if total > peak:
            peak, peak_phase = total, phase
        for scope in scopes:
            if not scope.startswith("vtc.capture@"):
                continue
            layer = int(scope.split("@")[1])
            info = layers.setdefault(layer, {"entry": total - size, "top": total - size, "retained_bytes": 0,
                                             "largest_bytes": 0, "largest_op": None, "scores_largest_bytes": 0})
            info["top"] = max(info["top"], total)
            info["retained_bytes"] += size
            if size > info["largest_bytes"]:
                info["largest_bytes"], info["largest_op"] = size, op
            if "vtc.scores" in scopes:
                info["scores_largest_bytes"] = max(info["scores_largest_bytes"], size)
    capture = {}
    for layer, info in sorted(layers.items()):
        capture[layer] = {
            "span": spans.get(layer),
            "transient_bytes": info["top"] - info["entry"],
            "largest_bytes": info["largest_bytes"],
            "largest_op": info["largest_op"],
            "scores_largest_bytes": info["scores_largest_bytes"],
            "retained_bytes": info["retained_bytes"],
        }
    return {"profile_peak_bytes": peak, "peak_phase": peak_phase, "phase_peaks_bytes": phase_peaks,
            "capture": capture}


def measure_memory(variant: Variant, model, device: str) -> dict:
    """One profiled call of ``variant``: its peak memory above what was allocated before it, and where it goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    layers = [s.layer for s in variant.signals]
    ranges = CaptureRanges(model.model.visual, layers) if layers else contextlib.nullcontext()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with ranges, profile(activities=activities, profile_memory=True) as prof:
        out = variant.run()
        sync(device)
        del out
    result = analyse(_allocations(prof, "cuda" if cuda else "cpu"), getattr(ranges, "spans", {}))
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        result["method"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_bytes"] = result["profile_peak_bytes"]
        result["method"] = "torch.profiler allocation timeline"
    if variant.selection_ms:
        variant.selection_ms.pop()  # the profiled call is not a timing sample
    return result


# ------------------------------------------------------------------------------------------------------ report
def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if n is not None else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.video", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--depth", type=int, default=DEPTH_7B, help="vision blocks (default 32, the 7B's)")
    parser.add_argument("--frames", type=int, default=64,
                        help="video frames, even (default 64 = 32 temporal steps of 2 fused frames)")
    parser.add_argument("--size", type=int, default=224, help="frame side in px, a multiple of 28 (default 224)")
    parser.add_argument("--budget", default="0.25", help="video budget: tokens (int) or fraction (default 0.25)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (plain is always run)")
    parser.add_argument("--quota-scorer", default="similarity", choices=("similarity", "uniform"))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each times every variant once")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.depth < 1:
        parser.error("--repeats and --depth must be >= 1, --warmup >= 0")
    temporal, unit = VISION_7B["temporal_patch_size"], VISION_7B["patch_size"] * VISION_7B["spatial_merge_size"]
    if args.frames < temporal or args.frames % temporal:
        parser.error(f"--frames must be a positive multiple of {temporal} (the temporal patch size)")
    if args.size < unit or args.size % unit:
        parser.error(f"--size must be a positive multiple of {unit} (patch 14 x spatial merge 2)")
    names = ["plain"] + [n for n in dict.fromkeys(s.strip() for s in args.variants.split(",")) if n and n != "plain"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        budget = parse_budget(args.budget)
    except (TypeError, ValueError) as error:
        parser.error(str(error))

    wall_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model = build_model(args.depth, args.device, dtype, args.seed)
    inputs = {k: v.to(args.device) for k, v in video_inputs(args.frames, args.size, args.seed).items()}
    variants = make_variants(model, inputs, budget, names, args.quota_scorer, args.seed, args.device)

    vision = model.config.vision_config
    t, h, w = inputs["video_grid_thw"][0].tolist()
    patches = t * h * w
    tokens = patches // vision.spatial_merge_size**2
    kept = resolve_budget(budget, tokens)
    device_name = describe_device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, dtype {args.dtype}")
    print(f"Qwen2.5-VL-7B vision tower (random weights, seed {args.seed}): depth {vision.depth}, width "
          f"{vision.hidden_size}, {vision.num_heads} heads, MLP {vision.intermediate_size}, "
          f"out {vision.out_hidden_size}, "
          f"full attention at {list(vision.fullatt_block_indexes)}, window {vision.window_size} px, "
          f"attn_implementation={vision._attn_implementation}")
    print(f"video: {args.frames} frames of {args.size}x{args.size} px -> grid_thw [{t}, {h}, {w}] = {patches} patches, "
          f"{tokens} tokens ({tokens // t} per step); budget {args.budget} -> {kept} tokens; "
          f"warm-up {args.warmup}, {args.repeats} rounds")

    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        with CpuShare() as cpu:
            for _ in range(args.warmup):
                for name in names:
                    time_once(variants[name].run, args.device)
            for name in names:
                variants[name].selection_ms.clear()
            rotating_rounds({name: variants[name].run for name in names}, args.repeats, args.device, times, log=True)
        share = cpu.share
        memory = {name: measure_memory(variants[name], model, args.device) for name in names}

    medians = {name: statistics.median(values) for name, values in times.items()}
    base, tower_peak = medians["plain"], memory["plain"]["peak_bytes"]
    print()
    print(f"{'variant':<12} {'median ms':>10} {'x plain':>8} {'min ms':>9} {'max ms':>9} {'select ms':>10}"
          f" {'peak MiB':>9} {'extra MiB':>10} {'extra %':>8} {'peak in':>9}  what")
    for name in names:
        v, m = variants[name], memory[name]
        select = f"{statistics.median(v.selection_ms):.1f}" if v.selection_ms else "-"
        extra = m["peak_bytes"] - tower_peak
        print(f"{name:<12} {medians[name]:>10.1f} {medians[name] / base:>8.3f} {min(times[name]):>9.1f} "
              f"{max(times[name]):>9.1f} {select:>10} {_mib(m['peak_bytes']):>9} "
              f"{'-' if name == 'plain' else _mib(extra):>10} "
              f"{'-' if name == 'plain' else f'{100 * extra / tower_peak:.2f}':>8} {m['peak_phase']:>9}  "
              f"{v.description}")

    heads = vision.num_heads
    span = max((c["span"] or 0 for m in memory.values() for c in m["capture"].values()), default=h * w)
    map_span = heads * span * span * 4
    map_video = heads * patches * patches * 4
    print()
    print(f"memory ({memory['plain']['method']}): tower activations peak (plain) {_mib(tower_peak)} MiB; "
          f"one N x N map: largest span {span} patches x {heads} heads = {_mib(map_span)} MiB, "
          f"whole video {patches} patches = {_mib(map_video)} MiB")
    rows = [(name, layer, c) for name in names for layer, c in memory[name]["capture"].items()]
    if rows:
        print(f"{'capture':<12} {'block':>5} {'span':>5} {'hook MiB':>9} {'largest MiB':>12} {'(op)':<14} "
              f"{'kernel MiB':>11} {'x map':>6} {'kept after KiB':>15}")
        for name, layer, c in rows:
            ratio = c["scores_largest_bytes"] / (heads * c["span"] ** 2 * 4) if c["span"] else float("nan")
            print(f"{name:<12} {layer:>5} {c['span']:>5} {_mib(c['transient_bytes']):>9} "
                  f"{_mib(c['largest_bytes']):>12} "
                  f"{str(c['largest_op']):<14} {_mib(c['scores_largest_bytes']):>11} {ratio:>6.2f} "
                  f"{c['retained_bytes'] / 1024:>15.1f}")
    print()
    print(f"target: extra peak (capture + selection) <= {TARGET_EXTRA_PERCENT:.0f} % of the tower's activations")
    for name in names[1:]:
        extra = memory[name]["peak_bytes"] - tower_peak
        percent = 100 * extra / tower_peak if tower_peak else float("nan")
        verdict = "within" if percent <= TARGET_EXTRA_PERCENT else "ABOVE"
        phases = ", ".join(f"{k} {_mib(v)}" for k, v in memory[name]["phase_peaks_bytes"].items())
        print(f"  {name:<12} {percent:6.2f} %  {verdict} target  (peak by phase, MiB: {phases})")
    kept_after = max((c["retained_bytes"] for _, _, c in rows), default=0)
    if rows:
        biggest = max(c["scores_largest_bytes"] for _, _, c in rows)
        verdict = "no N x N map outlives its layer" if kept_after < map_span else "a hook keeps >= one N x N map"
        print(f"N x N: largest allocation inside the scoring kernel {_mib(biggest)} MiB (one map of the largest span "
              f"{_mib(map_span)} MiB, of the whole video {_mib(map_video)} MiB); "
              f"most a hook left allocated {kept_after / 1024:.1f} KiB -> {verdict}")
    wall = finish(args.device, share, wall_start)

    if args.json:
        report = {
            **environment(device_name),
            "dtype": args.dtype,
            "seed": args.seed,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "tower": {
                "depth": vision.depth, "hidden_size": vision.hidden_size, "num_heads": heads,
                "intermediate_size": vision.intermediate_size, "out_hidden_size": vision.out_hidden_size,
                "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "spatial_merge_size": vision.spatial_merge_size, "window_size": vision.window_size,
                "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            },
            "video": {"frames": args.frames, "size": args.size, "grid_thw": [t, h, w], "patches": patches,
                      "tokens": tokens, "budget": budget, "kept_tokens": kept},
            "target_extra_percent": TARGET_EXTRA_PERCENT,
            "memory_method": memory["plain"]["method"],
            "tower_peak_bytes": tower_peak,
            "nxn_map_bytes": {"largest_span": span, "span_map": map_span, "video_map": map_video},
            "variants": {},
            **run_summary(args.device, share, wall),
        }
        for name in names:
            v, m = variants[name], memory[name]
            extra = m["peak_bytes"] - tower_peak
            report["variants"][name] = {
                "description": v.description,
                "signals": [str(s) for s in v.signals],
                "median_ms": medians[name],
                "ratio_to_plain": medians[name] / base,
                "min_ms": min(times[name]),
                "max_ms": max(times[name]),
                "times_ms": times[name],
                "selection_median_ms": statistics.median(v.selection_ms) if v.selection_ms else None,
                "selection_ms": list(v.selection_ms),
                "peak_bytes": m["peak_bytes"],
                "profile_peak_bytes": m["profile_peak_bytes"],
                "extra_bytes": extra,
                "extra_percent": 100 * extra / tower_peak if tower_peak else None,
                "peak_phase": m["peak_phase"],
                "phase_peaks_bytes": m["phase_peaks_bytes"],
                "capture": {str(layer): c for layer, c in m["capture"].items()},
            }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
