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
