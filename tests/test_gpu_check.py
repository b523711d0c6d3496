"""``make gpu-check`` (eval/gpu_check.py) tested here at tiny sizes on the CPU, as the issue asks: it runs its steps in
fresh processes, folds every benchmark's JSON into one report and writes the markdown table; and it installs only
wheels that are missing or newer than what is installed."""

from __future__ import annotations

import json
import pathlib
import runpy
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "eval" / "gpu_check.py"


def test_installs_only_missing_or_older_distributions():
    check = runpy.run_path(str(SCRIPT))
    files = ["transformers-5.23.0-py3-none-any.whl", "pytest-9.2.0-py3-none-any.whl",
             "huggingface_hub-2.4.0-py3-none-any.whl", "truststore-0.10.5-py3-none-any.whl"]
    installed = {"transformers": "5.17.0", "pytest": "9.3.1", "huggingface_hub": "2.4.0"}.get
    todo = [p.name for p in check["wheels_to_install"](files, installed)]
    # older transformers: upgraded; newer pytest: never downgraded; same hub: kept; missing truststore: added
    assert todo == ["transformers-5.23.0-py3-none-any.whl", "truststore-0.10.5-py3-none-any.whl"]


def test_small_run_on_cpu_writes_one_report(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "float32", "--small", "--no-install",
         "--steps", "qwen-image,video", "--out", str(out), "--budget-s", "600"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["qwen-image", "video"]
    assert all(s["status"] == "ok" for s in report["steps"])
    image = report["figures"]["qwen-image"]
    assert image["workload"] == "qwen-image" and image["patches"] == 64  # 112 px: 8 x 8 patches
    assert set(image["variants"]) == {"plain", "fastervlm", "hiprune", "eager"}
    assert all(v["peak_bytes"] > 0 for v in image["variants"].values())
    assert report["figures"]["video"]["tower"]["depth"] == 2
    table = (out / "gpu_check.md").read_text()
    assert "| qwen-image | ok |" in table and "hiprune" in table and "extra peak" in table


def test_unknown_step_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--no-install", "--steps", "warp",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown steps ['warp']" in proc.stderr


def test_capture_highres_refuses_bad_sizes_before_building_a_model():
    from vtc.eval.bench import capture_highres

    for argv, message in ((["--workload", "qwen-image", "--size", "100"], "multiple of 28"),
                          (["--workload", "qwen-video", "--frames", "5"], "must be even")):
        proc = subprocess.run([sys.executable, "-m", "vtc.eval.bench.capture_highres", *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr
    assert capture_highres.WORKLOADS == ("clip336", "anyres", "clip672", "qwen-image", "qwen-video")
