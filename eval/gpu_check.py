"""One-shot GPU check: vtc's benchmarks in bf16 and the equality tests that matter on CUDA, in about 8 minutes,
written as one JSON and one markdown table.

    python3 eval/gpu_check.py [--device cuda] [--out gpu_check] [--wheels .gpuwheels] [--small] [--budget-s 480]
    make gpu-check          # the same, with the machine's python3
    make gpu-wheels         # here, with network: the wheels the GPU machine lacks, into .gpuwheels/

Why a standalone script: the GPU machines lent to this project have torch but an older transformers (vtc needs
>= 5.20) and no network. It runs with the system ``python3`` before vtc is importable: it first installs, from
wheels that travel with the checkout (``--wheels``, filled by ``make gpu-wheels``), whatever is missing or too
old, then vtc itself from this checkout (``pip install --no-deps --no-build-isolation .``), and runs every step in
a fresh subprocess from a scratch folder (so the installed package is the one imported, not the source tree).

Steps, in order, each with its own time limit (what is left of ``--budget-s`` is shared out; a step that runs out
is recorded as timed out and the next one runs):

  equality     pytest tests/test_device_equality.py --device DEVICE: keep-all == unwrapped, compressed == the
               hand-built prompt, batch of two == single runs (LLaVA-1.5 and Qwen2.5-VL tiny models; fastervlm,
               hiprune, visionzip)
  capture      python -m vtc.eval.bench.capture (CLIP-L/14-336, one image)
  anyres       python -m vtc.eval.bench.capture_highres --workload anyres (5 views x 577 tokens)
  clip672      ... --workload clip672 (2,305 tokens)
  qwen-image   ... --workload qwen-image (Qwen2.5-VL-7B tower at 1344 px: 9,216 patches)
  qwen-video   ... --workload qwen-video (the same tower, 64 frames of 224 px: 8,192 patches)
  video        python -m vtc.eval.bench.video (depth 32, 64 frames: capture + selection memory vs the tower)
  prefill      python -m vtc.eval.bench.prefill (LLaVA-1.5-7B shape, 32 LLM layers)

All in ``--dtype`` (default bfloat16) with SDPA; flash-attention is reported when installed (the benchmarks keep
SDPA, the attention vtc is designed to leave untouched). ``--small`` shrinks every size (depth 2, 112 px, 4 frames,
2 LLM layers) so the script itself can be tested on a CPU: ``python3 eval/gpu_check.py --device cpu --small``.
Outputs in ``--out``: ``gpu_check.json`` (every step: command, exit code, seconds, the end of its output, and the
benchmark's own JSON report) and ``gpu_check.md`` (the headline ratios).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: what vtc needs that a GPU machine may lack or have too old (the distribution name, minimum version)
REQUIRED = {"transformers": "5.20", "pytest": "8"}
#: what ``make gpu-wheels`` downloads (versions pinned from the local venv): transformers and what its hub client
#: needs beyond an older install, and pytest for the equality step
WHEELS = ("transformers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "pytest", "pluggy", "iniconfig",
          "pygments")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _wheel_name_version(path: pathlib.Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name, version


def wheels_to_install(files, installed) -> list[pathlib.Path]:
    """The wheels whose distribution ``installed(name)`` reports missing (None) or older than the wheel."""
    todo = []
    for path in files:
        name, version = _wheel_name_version(pathlib.Path(path))
        have = installed(name)
        if have is None or _version_tuple(have) < _version_tuple(version):
            todo.append(pathlib.Path(path))
    return todo


def ensure_environment(wheels: pathlib.Path, python: str, log) -> dict:
    """Install from ``wheels`` every wheel whose distribution is missing or older than the wheel (never a
    downgrade), then vtc from this checkout; returns what was found and done. Fails with one message naming the fix
    when something ``REQUIRED`` is still missing or too old."""
    names = ("torch", *REQUIRED, "flash-attn", "vtc")
    found = {name: _installed(name) for name in names}
    actions = []
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    # one at a time: a wheel this python cannot take is reported, the others still go in
    for path in wheels_to_install(files, _installed):
        done = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(path)],
                              capture_output=True, text=True)
        actions.append(f"{'installed' if done.returncode == 0 else 'could not install'} {path.name}")
        log(actions[-1])
    still = [name for name, minimum in REQUIRED.items()
             if _installed(name) is None or _version_tuple(_installed(name)) < _version_tuple(minimum)]
    if still:
        raise SystemExit(f"error: {', '.join(still)} missing or too old ({found}) and not in {wheels.name}/: run "
                         "`make gpu-wheels` on a machine with network, and carry the folder with the checkout")
    log("installing vtc from this checkout (pip install --no-deps --no-build-isolation .)")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(ROOT)],
                   check=True, cwd=ROOT)
    actions.append("installed vtc from the checkout")
    return {"before": found, "after": {name: _installed(name) for name in names}, "actions": actions}


def plan(device: str, dtype: str, small: bool, out: pathlib.Path) -> list[tuple[str, list[str], float]]:
    """``(name, argv after python, share of the time budget)`` per step."""
    d = ["--device", device, "--dtype", dtype]
    if small:
        qwen = ["--depth", "2"]
        image, frames, video_depth, llm = ["--size", "112"], ["--frames", "4"], ["--depth", "2", "--frames", "4",
                                                                               "--size", "56"], ["--llm-layers", "2"]
        rounds = ["--repeats", "1", "--warmup", "0"]
    else:
        qwen, image, frames, video_depth, llm = [], ["--size", "1344"], ["--frames", "64"], ["--depth", "32"], \
            ["--llm-layers", "32"]
        rounds = ["--repeats", "7", "--warmup", "2"]
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
             str(ROOT / "tests" / "test_device_equality.py"), "--device", device]
    high = ["-m", "vtc.eval.bench.capture_highres", *d, *rounds]
    steps = [
        ("equality", tests, 0.10),
        ("capture", ["-m", "vtc.eval.bench.capture", *d, *rounds[:2], "--json", str(out / "capture.json")], 0.08),
        ("anyres", [*high, "--workload", "anyres", "--json", str(out / "anyres.json")], 0.10),
        ("clip672", [*high, "--workload", "clip672", "--json", str(out / "clip672.json")], 0.10),
        ("qwen-image", [*high, "--workload", "qwen-image", *qwen, *image, "--json", str(out / "qwen_image.json")],
         0.16),
        ("qwen-video", [*high, "--workload", "qwen-video", *qwen, *frames, "--json", str(out / "qwen_video.json")],
         0.14),
        ("video", ["-m", "vtc.eval.bench.video", *d, *video_depth, "--repeats", rounds[1], "--json",
                   str(out / "video.json")], 0.14),
        ("prefill", ["-m", "vtc.eval.bench.prefill", *d, *llm, "--rounds", rounds[1], "--json",
                     str(out / "prefill.json")], 0.18),
    ]
    return steps


def run_steps(steps, python: str, budget_s: float, scratch: pathlib.Path, log) -> list[dict]:
    results, start = [], time.monotonic()
    for index, (name, argv, share) in enumerate(steps):
        left = budget_s - (time.monotonic() - start)
        later = sum(s for _, _, s in steps[index:])
        limit = max(20.0, left * share / later) if left > 0 else 0.0
        if left <= 0:
            results.append({"step": name, "status": "skipped (time budget spent)", "argv": argv})
            continue
        log(f"[{name}] limit {limit:.0f} s: python {' '.join(argv)}")
        began = time.monotonic()
        try:
            proc = subprocess.run([python, *argv], cwd=scratch, capture_output=True, text=True, timeout=limit)
            status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            status, rc = "timed out", None
            output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        seconds = time.monotonic() - began
        tail = "\n".join(line for line in output.splitlines() if "USDT" not in line)[-4000:]
        log(f"[{name}] {status} in {seconds:.0f} s\n{tail[-1500:]}\n")
        shown = [a.replace(str(scratch), "<scratch>").replace(str(ROOT), ".") for a in argv]  # no machine paths
        results.append({"step": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "argv": shown,
                        "output_tail": tail.replace(str(scratch), "<scratch>").replace(str(ROOT), ".")})
    return results


def _load(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary_table(out: pathlib.Path, results: list[dict]) -> str:
    """The headline figures of the benchmark JSONs as markdown."""
    lines = ["| step | status | s | figures |", "|---|---|---|---|"]
    files = {"capture": "capture.json", "anyres": "anyres.json", "clip672": "clip672.json",
             "qwen-image": "qwen_image.json", "qwen-video": "qwen_video.json", "video": "video.json",
             "prefill": "prefill.json"}
    for result in results:
        name, figures = result["step"], ""
        report = _load(out / files[name]) if name in files else None
        if report and name == "prefill":
            figures = "; ".join(f"vtc@{k}: {v['measured_speedup']:.2f}x faster, ideal {v['ideal_speedup']:.2f}x, "
                                f"{v['ratio']:.2f} of ideal" for k, v in report.get("speedups", {}).items())
        elif report and name == "video":
            figures = "; ".join(f"{k} extra peak {v['extra_percent']:.2f} %, {v['ratio_to_plain']:.3f}x time"
                                for k, v in report.get("variants", {}).items()
                                if k != "plain" and v.get("extra_percent") is not None and "ratio_to_plain" in v)
        elif report and "variants" in report:
            base = report["variants"]["plain"]["median_ms"]
            parts = [f"plain {base:.1f} ms"]
            for variant, v in report["variants"].items():
                if variant == "plain":
                    continue
                text = f"{variant} {v['ratio_to_plain']:.3f}x"
                if v.get("peak_ratio_to_plain"):
                    text += f" (peak mem {v['peak_ratio_to_plain']:.2f}x)"
                parts.append(text)
            figures = "; ".join(parts)
        lines.append(f"| {name} | {result['status']} | {result.get('seconds', '-')} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eval/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", default="gpu_check", help="output folder (default ./gpu_check)")
    parser.add_argument("--wheels", default=str(ROOT / ".gpuwheels"), help="wheels to install what is missing")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for all steps (default 480 s)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to test the script on a CPU")
    parser.add_argument("--steps", help="comma-separated subset of the steps (default: all)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="use the environment as it is (vtc already installed)")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    messages: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        messages.append(text)

    began = time.monotonic()
    environment = ensure_environment(pathlib.Path(args.wheels), python, log) if args.install else {"actions": []}
    probe = subprocess.run(
        [python, "-c", "import torch, transformers, vtc; print(torch.__version__, transformers.__version__, "
                       "torch.cuda.is_available() and torch.cuda.get_device_name(0))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir())
    if probe.returncode != 0:
        raise SystemExit(f"error: vtc does not import after the install:\n{probe.stderr[-2000:]}")
    log(f"torch, transformers, GPU: {probe.stdout.strip()}")
    if args.device.startswith("cuda") and probe.stdout.strip().endswith("False"):
        raise SystemExit("error: --device cuda but this torch sees no CUDA device")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="vtc_gpu_check_"))  # the benchmarks' JSONs, folded in below
    steps = plan(args.device, args.dtype, args.small, scratch)
    if args.steps:
        wanted = {s.strip() for s in args.steps.split(",")}
        unknown = wanted - {name for name, _, _ in steps}
        if unknown:
            raise SystemExit(f"error: unknown steps {sorted(unknown)}; known: {', '.join(n for n, _, _ in steps)}")
        steps = [step for step in steps if step[0] in wanted]
    budget = args.budget_s - (time.monotonic() - began)
    results = run_steps(steps, python, budget, scratch, log)
    table = summary_table(scratch, results)
    flash = (environment.get("after") or {}).get("flash-attn")
    header = (f"# vtc GPU check\n\n{probe.stdout.strip()} -- dtype {args.dtype}, SDPA"
              f"{'' if not flash else f'; flash-attn {flash} installed (benchmarks keep SDPA)'}"
              f"{'; flash-attn not installed' if not flash else ''}; total {time.monotonic() - began:.0f} s\n\n")
    (out / "gpu_check.md").write_text(header + table)
    report = {"device": args.device, "dtype": args.dtype, "small": args.small, "environment": environment,
              "versions": probe.stdout.strip(), "steps": results,
              "figures": {r["step"]: _load(scratch / f"{r['step'].replace('-', '_')}.json") for r in results},
              "total_s": round(time.monotonic() - began, 1)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(header + table)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
