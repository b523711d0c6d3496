"""Smoke test of the video benchmark script (eval/bench/video.py) on a tiny video: it runs and writes sane JSON.

No timing assertions and no thresholds on ratios: the figures depend on the machine.
"""

from __future__ import annotations

import json
import math

from vtc.eval.bench import video as bench_video


def test_bench_video_smoke(tmp_path, capsys):
    out = tmp_path / "bench_video.json"
    rc = bench_video.main(["--depth", "2", "--frames", "4", "--size", "56", "--repeats", "1", "--warmup", "0",
                           "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target: extra peak" in printed and "N x N" in printed
    report = json.loads(out.read_text())

    assert report["tower"]["depth"] == 2 and report["tower"]["fullatt_block_indexes"] == [1]
    assert report["video"]["grid_thw"] == [2, 4, 4]  # 4 frames = 2 temporal steps of 4 x 4 patches
    assert report["video"]["patches"] == 32 and report["video"]["tokens"] == 8
    assert report["video"]["kept_tokens"] == 2  # 25 % of 8
    assert report["tower_peak_bytes"] > 0
    assert report["nxn_map_bytes"]["largest_span"] == 16
    assert report["nxn_map_bytes"]["span_map"] == 16 * 16 * 16 * 4

    variants = report["variants"]
    assert list(variants) == list(bench_video.VARIANTS)
    for name, v in variants.items():
        assert v["median_ms"] > 0 and v["min_ms"] > 0 and len(v["times_ms"]) == 1
        assert v["peak_bytes"] > 0 and math.isfinite(v["extra_percent"])
        assert v["extra_bytes"] == v["peak_bytes"] - report["tower_peak_bytes"]
        assert v["peak_phase"] in ("tower", "capture", "selection")
        if name == "plain":
            assert v["selection_median_ms"] is None and v["capture"] == {} and v["extra_bytes"] == 0
        else:
            assert v["selection_median_ms"] > 0 and len(v["selection_ms"]) == 1

    # what each compressor declared was captured at that block, and each hook kept only a per-token vector
    assert variants["progressive"]["signals"] == ["received_attention@1"]
    assert variants["quota"]["signals"] == [] and variants["quota"]["capture"] == {}
    for name in ("progressive", "hiprune", "fastervlm"):
        capture = variants[name]["capture"]
        assert list(capture) == ["1"]
        layer = capture["1"]
        assert layer["span"] == 16  # a full-attention block attends within each temporal step: 4 x 4 patches
        assert layer["transient_bytes"] > 0 and layer["largest_bytes"] > 0
        # the fused kernel forms no map: its largest allocation is a padded fp32 copy of q or k (16 heads x 32
        # patches x (80 + 8) features), linear in the patches -- here bigger than a 16-patch span's map only
        # because the head dim (80) exceeds the span
        assert 0 < layer["scores_largest_bytes"] <= 16 * 32 * 88 * 4
        assert 0 <= layer["retained_bytes"] <= 32 * 4  # the [S] fp32 received attention of the call
