"""Cost of every registered compressor's token selection, next to a CLIP ViT-L/14-336 tower forward.

Why: compression must be cheap compared with the vision tower it follows, or the time it saves in the LLM is
spent before. Target: selection <= 2 % of one tower forward at N = 576 (LLaVA-1.5's 24 x 24 grid). N = 12,544
(a 112 x 112 grid, high-resolution / many-view inputs) shows how each method scales; its ratio is still taken
against the same single 336 x 336 tower forward, so read it as a scaling figure, not as a target.

What: in one run,

  tower     one forward of a randomly initialised CLIP-L/14-336 (24 layers, 577 tokens, fp32, SDPA) on one
            336 x 336 image with ``output_hidden_states=True``;
  selection ``vtc.run_compressor(compressor, tokens, budget)`` for every compressor in ``vtc.list_compressors("encoder")``
            at each size, on random fp32 features ``[N, 4096]`` (fixed seed) with random signals for exactly
            what the compressor declares on a CLIP-L ``TowerInfo`` (attention: softmax of a random ``[N]``
            vector; keys: random ``[N, 64]``; query-aware compressors: 32 random text embeddings). Selection only:
            capturing the signals is
            ``vtc.eval.bench.capture``'s job.

Everything runs under ``torch.inference_mode()``. After one warm-up round, each round times the tower and every
(compressor, N) once, in a rotating order; medians over rounds are reported. A (compressor, N) whose warm-up call
takes longer than ``--slow-seconds`` (DivPrune at N = 12,544: its first pick is O(N^2 D) by design) is timed only
``--slow-repeats`` times, and the table says so. On CPU the share of CPU the process got is reported: other work
on the machine skews the figures. No assertions -- it prints figures (and ``--json`` writes them).

With ``--video 64x196`` every compressor also selects on one video (64 frames of 196 tokens, LLaVA-OneVision's
pooled frames; random features and per-frame signals) at ``--video-budget`` (default 25 %) through
``run_video_compressor``: video compressors budget the whole video, image compressors go frame by frame. Its share
is taken against 64 of the tower forwards above (one per frame: a proxy, stated as such).

    python -m vtc.eval.bench.selection [--budget 64] [--sizes 576,12544] [--video 64x196] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import zlib

import torch

from vtc.eval.bench.common import (
    NUM_LAYERS, CpuShare, build_clip_l_tower, describe_device, environment, finish, rotating_rounds, run_summary,
    time_once, write_report,
)

TARGET_PERCENT = 2.0
TARGET_N = 576
FEATURE_LAYER = 22  # LLaVA reads hidden_states[-2]: the output of layer 22
FEATURE_DIM, KEY_DIM = 4096, 64


def build_tower(device: str, seed: int):
    return build_clip_l_tower(device, torch.float32, seed)


def parse_size(text: str) -> tuple[int, int]:
    """``"576"`` -> (24, 24) (a perfect square), ``"24x32"`` -> (24, 32)."""
    raw = text.strip().lower()
    if "x" in raw:
        rows, cols = (int(part) for part in raw.split("x", 1))
    else:
        n = int(raw)
        rows = cols = math.isqrt(n)
        if rows * rows != n:
            raise ValueError(f"size {n} is not a perfect square; write it as ROWSxCOLS")
    if rows < 1 or cols < 1:
        raise ValueError(f"size {text!r} must have at least one row and column")
    return rows, cols


#: text tokens of the query handed to query-aware compressors (CDPruner): a short instruction
QUERY_TOKENS = 32


def make_tokens(compressor, tower_info, grid: tuple[int, int], features: torch.Tensor, seed: int, device: str):
    """VisualTokens with random signals for exactly what ``compressor`` declares (same signal -> same tensor)."""
    import vtc
    from vtc.signals import SignalKind

    n = grid[0] * grid[1]
    signals = {}
    for signal in compressor.signals(tower_info):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{n}/{signal}".encode()))
        if signal.kind == SignalKind.KEYS:
            value = torch.randn(n, KEY_DIM, generator=generator)
        else:  # CLS / received attention: a distribution over the N tokens
            value = torch.softmax(torch.randn(n, generator=generator), dim=0)
        signals[signal] = value.to(device)
    query = None
    if compressor.uses_query:  # a prompt of QUERY_TOKENS random text embeddings in the features' space
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{n}/query".encode()))
        query = torch.randn(QUERY_TOKENS, features.shape[-1], generator=generator).to(device)
    return vtc.VisualTokens(features=features, grid=grid, signals=signals, query=query)


def main(argv=None) -> int:
    import vtc
    from vtc.signals import TowerInfo

    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", default="64", help="tokens kept per image (int) or a ratio (0.25, 25%%)")
    parser.add_argument("--sizes", default="576,12544", help="comma-separated N (perfect squares) or ROWSxCOLS")
    parser.add_argument("--compressors", help="comma-separated subset of the registered compressors (default all)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; each times the tower and every cell")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (at least 1 is always run)")
    parser.add_argument("--slow-seconds", type=float, default=2.0,
                        help="a (compressor, N) whose warm-up call takes longer is timed only --slow-repeats times")
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--video", metavar="FRAMESxN", default=None,
                        help="also time every compressor on one video of FRAMES frames of N tokens each (e.g. "
                             "64x196, LLaVA-OneVision's pooled frames) through run_video_compressor")
    parser.add_argument("--video-budget", default="0.25", help="the video's budget (int tokens or a ratio)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.slow_repeats < 1 or args.warmup < 0:
        parser.error("--repeats and --slow-repeats must be >= 1, --warmup >= 0")
    try:
        budget = vtc.parse_budget(args.budget)
        video_budget = vtc.parse_budget(args.video_budget)
        grids = [parse_size(part) for part in args.sizes.split(",") if part.strip()]
        video = None
        if args.video:
            frames_text, _, size_text = args.video.lower().partition("x")
            video = (int(frames_text), parse_size(size_text))
            if video[0] < 1:
                raise ValueError(f"--video needs at least one frame, got {args.video!r}")
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    names = vtc.list_compressors("encoder")
    if args.compressors:
        wanted = [name.strip() for name in args.compressors.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown compressor(s) {unknown}; registered: {', '.join(names)}")
        names = [name for name in names if name in wanted]

    wall_start = time.perf_counter()
    device = args.device
    tower = build_tower(device, args.seed)
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(args.seed)).to(device)
    tower_info = TowerInfo(name="clip", num_layers=NUM_LAYERS, feature_layer=FEATURE_LAYER, has_cls=True)

    # one "cell" per (compressor, N); features are shared by all compressors of one size
    cells: dict[str, tuple] = {}
    for rows, cols in grids:
        n = rows * cols
        generator = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{n}/features".encode()))
        features = torch.randn(n, FEATURE_DIM, generator=generator).to(device)
        for name in names:
            compressor = vtc.create_compressor(name)
            tokens = make_tokens(compressor, tower_info, (rows, cols), features, args.seed, device)
            cells[f"{name}@{n}"] = (name, n, (rows, cols), compressor, tokens)

    video_cells: dict[str, tuple] = {}
    if video is not None:  # one video, shared by all compressors: frames of random features, signals per frame
        from vtc.video import VideoTokens

        num_frames, (rows, cols) = video
        n = rows * cols
        generator = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/video/{n}".encode()))
        frames = torch.randn(num_frames, n, FEATURE_DIM, generator=generator).to(device)
        for name in names:
            compressor = vtc.create_compressor(name)
            tokens = [make_tokens(compressor, tower_info, (rows, cols), frames[t], args.seed + t, device)
                      for t in range(num_frames)]
            clip = VideoTokens(frames=tokens, query=tokens[0].query)
            video_cells[f"{name}@video"] = (name, num_frames * n, compressor, clip)

    def tower_forward():
        return tower(pixel_values=pixel_values, output_hidden_states=True)

    def selection(key):
        _, _, _, compressor, tokens = cells[key]
        return lambda: vtc.run_compressor(compressor, tokens, budget)

    def video_selection(key):
        from vtc.video import run_video_compressor

        _, _, compressor, clip = video_cells[key]
        return lambda: run_video_compressor(compressor, clip, video_budget)

    jobs = {"tower": tower_forward, **{key: selection(key) for key in cells},
            **{key: video_selection(key) for key in video_cells}}
    kept = {key: vtc.resolve_budget(budget, n) for key, (_, n, _, _, _) in cells.items()}
    kept.update({key: vtc.resolve_budget(video_budget, n) for key, (_, n, _, _) in video_cells.items()})

    device_name = describe_device(device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, fp32")
    print(
        f"tower: CLIP ViT-L/14-336 (random weights, seed {args.seed}), 1 image, output_hidden_states=True, "
        f"attn_implementation={tower.config._attn_implementation}"
    )
    print(
        f"selection: {len(names)} compressors x N in {[r * c for r, c in grids]}, D={FEATURE_DIM}, "
        f"budget {budget!r}; warm-up {max(1, args.warmup)}, {args.repeats} rounds"
    )

    times: dict[str, list[float]] = {key: [] for key in jobs}
    warm: dict[str, float] = {}
    repeats: dict[str, int] = {}
    with torch.inference_mode():
        with CpuShare() as cpu:
            for _ in range(max(1, args.warmup)):
                for key, fn in jobs.items():
                    warm[key] = time_once(fn, device)  # the last warm-up call decides whether a cell is slow
            for key in jobs:
                slow = key != "tower" and warm[key] > args.slow_seconds * 1e3
                repeats[key] = min(args.repeats, args.slow_repeats) if slow else args.repeats
            rotating_rounds(jobs, args.repeats, device, times, limits=repeats)
        share = cpu.share

    medians = {key: statistics.median(values) for key, values in times.items()}
    base = medians["tower"]
    print()
    print(f"tower forward: median {base:.1f} ms (min {min(times['tower']):.1f}, max {max(times['tower']):.1f}, "
          f"{repeats['tower']} rounds); target: selection <= {TARGET_PERCENT:g} % of it "
          f"= {base * TARGET_PERCENT / 100:.1f} ms at N = {TARGET_N}")
    print()
    print(f"{'compressor':<14} {'N':>6} {'k':>5} {'runs':>4} {'median ms':>10} {'min ms':>9} {'% tower':>8}  target")
    above = []
    slow_cells = []
    for key, (name, n, _, _, _) in cells.items():
        percent = 100.0 * medians[key] / base
        flag = ""
        if n == TARGET_N:
            flag = "ok" if percent <= TARGET_PERCENT else "ABOVE"
            if percent > TARGET_PERCENT:
                above.append(name)
        if repeats[key] < args.repeats:
            flag = (flag + " " if flag else "") + f"(slow: {repeats[key]} run)"
            slow_cells.append(key)
        print(f"{name:<14} {n:>6} {kept[key]:>5} {repeats[key]:>4} {medians[key]:>10.2f} {min(times[key]):>9.2f} "
              f"{percent:>7.2f}%  {flag}")
    print()
    if any(n == TARGET_N for (_, n, _, _, _) in cells.values()):
        if above:
            print(f"ABOVE target ({TARGET_PERCENT:g} % of the tower at N = {TARGET_N}): {', '.join(above)}")
        else:
            print(f"all compressors within target ({TARGET_PERCENT:g} % of the tower at N = {TARGET_N})")
    if slow_cells:
        print(
            f"slow (warm-up call > {args.slow_seconds:g} s, timed {args.slow_repeats}x instead of {args.repeats}x): "
            + ", ".join(f"{key} (warm-up {warm[key] / 1e3:.1f} s)" for key in slow_cells)
        )
    print("note: % tower at N != 576 compares with the same 577-token tower forward (a scaling figure)")
    if video_cells:
        num_frames = video[0]
        print()
        print(f"video: {num_frames} frames x {video[1][0] * video[1][1]} tokens, D={FEATURE_DIM}, budget "
              f"{video_budget!r}; '% towers' = of {num_frames} tower forwards (one per frame, the CLIP-L forward "
              "above as the per-frame proxy)")
        print(f"{'compressor':<14} {'tokens':>7} {'kept':>6} {'runs':>4} {'median ms':>10} {'min ms':>9} "
              f"{'% towers':>9}")
        for key, (name, n, _, _) in video_cells.items():
            percent = 100.0 * medians[key] / (base * num_frames)
            print(f"{name:<14} {n:>7} {kept[key]:>6} {repeats[key]:>4} {medians[key]:>10.2f} "
                  f"{min(times[key]):>9.2f} {percent:>8.3f}%")
    wall = finish(device, share, wall_start)

    if args.json:
        report = {
            **environment(device_name),
            "budget": budget,
            "feature_dim": FEATURE_DIM,
            "warmup": max(1, args.warmup),
            "repeats": args.repeats,
            "slow_seconds": args.slow_seconds,
            "slow_repeats": args.slow_repeats,
            "seed": args.seed,
            "target_percent": TARGET_PERCENT,
            "target_n": TARGET_N,
            "tower": {
                "median_ms": base,
                "min_ms": min(times["tower"]),
                "times_ms": times["tower"],
                "warmup_ms": warm["tower"],
            },
            "selection": [
                {
                    "compressor": name,
                    "n": n,
                    "grid": list(grid),
                    "k": kept[key],
                    "median_ms": medians[key],
                    "min_ms": min(times[key]),
                    "percent_of_tower": 100.0 * medians[key] / base,
                    "within_target": (100.0 * medians[key] / base <= TARGET_PERCENT) if n == TARGET_N else None,
                    "runs": repeats[key],
                    "slow": key in slow_cells,
                    "times_ms": times[key],
                    "warmup_ms": warm[key],
                }
                for key, (name, n, grid, _, _) in cells.items()
            ],
            "video": None if not video_cells else {
                "frames": video[0],
                "grid": list(video[1]),
                "budget": video_budget,
                "per_frame_proxy": "the CLIP-L tower forward above, once per frame",
                "selection": [
                    {"compressor": name, "tokens": n, "kept": kept[key], "median_ms": medians[key],
                     "min_ms": min(times[key]), "percent_of_towers": 100.0 * medians[key] / (base * video[0]),
                     "runs": repeats[key], "times_ms": times[key], "warmup_ms": warm[key]}
                    for key, (name, n, _, _) in video_cells.items()
                ],
            },
            **run_summary(device, share, wall),
        }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
