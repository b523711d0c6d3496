"""Shared pieces of the benchmarks: the CLIP ViT-L/14-336-shaped reference tower and a synchronised timer."""

from __future__ import annotations

import time

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
