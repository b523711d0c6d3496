"""Shared pieces of the benchmarks: the CLIP ViT-L/14-336-shaped reference tower and a synchronised timer."""

from __future__ import annotations

import json
import platform
import time
from typing import Callable

import torch

#: CLIP ViT-L/14-336 as used by LLaVA-1.5: 24 layers, 16 heads, width 1024, 577 tokens (CLS + 24x24).
NUM_LAYERS = 24
NUM_HEADS = 16


def build_clip_l_tower(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight ``CLIPVisionModel`` of CLIP-L/14-336 shape, eval mode, SDPA attention."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, device: str) -> float:
    """Milliseconds of one call of ``fn``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed * 1e3


def report_cpu_share(share: float) -> None:
    """Print how much of the CPUs the timed code got; other processes make CPU timings meaningless."""
    print(f"CPU share while timing: {share:.0%} of {torch.get_num_threads()} threads x wall time")
    if share < 0.85:
        print("warning: other processes shared the CPUs while timing; the figures are unreliable -- rerun idle")


def finish(device: str, share: float, wall_start: float) -> float:
    """End of a benchmark's printout: the CPU share (CPU runs) and the total wall time; returns the wall seconds."""
    if device == "cpu":
        report_cpu_share(share)
    wall = time.perf_counter() - wall_start
    print(f"total wall time {wall:.1f} s")
    return wall


def environment(device_name: str) -> dict:
    """The ``--json`` fields every benchmark opens with: what ran it."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device_name}


def run_summary(device: str, share: float, wall: float) -> dict:
    """The ``--json`` fields every benchmark closes with: how much CPU it got (CPU runs) and how long it took."""
    return {"cpu_share": share if device == "cpu" else None, "wall_s": wall}


class CpuShare:
    """``with CpuShare() as cpu: ...`` then ``cpu.share``: CPU time this process got over what its threads could
    have had in that wall time. Well below 1 means other processes took the CPUs and the timings are skewed."""

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = (time.perf_counter() - self._wall) * torch.get_num_threads()
        self.share = (time.process_time() - self._cpu) / wall if wall > 0 else 1.0
        return False


def rotating_rounds(runs: dict[str, Callable], rounds: int, device: str, times: dict | None = None,
                    limits: dict[str, int] | None = None, log: bool = False) -> dict[str, list[float]]:
    """Time every variant once per round, each round starting one variant later, so no variant always runs first
    (caches, clocks). Appends milliseconds to ``times`` (a new dict by default) and returns it; ``limits`` caps the
    samples of slow variants; ``log`` prints each round."""
    names = list(runs)
    times = {name: [] for name in names} if times is None else times
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if limits is None or len(times[name]) < limits[name]:
                times[name].append(time_once(runs[name], device))
        if log:
            done = ", ".join(f"{name} {times[name][-1]:.0f}" for name in names if times[name])
            print(f"  round {round_index + 1}/{rounds} (ms): {done}", flush=True)
    return times


def write_report(path, report: dict) -> None:
    """``--json``: write the report and say where."""
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")


def describe_device(device: str) -> str:
    """``device`` with what it is: the GPU's name, or the CPU's processor (the header line and ``--json``)."""
    if str(device).startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"
