"""spp_triton.bench.kernels (spp-triton-bench, tools/benchmark_kernels.py): the --quick sweep end
to end on CPU (in process and as a CLI), the bytes floor's covered-pixel count, and the target
evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark_kernels.py"


@pytest.fixture(scope="module")
def bk():
    from spp_triton.bench import kernels

    return kernels


pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_sweep_in_process_writes_sane_outputs(bk, tmp_path):
    cfg = bk.SweepConfig(
        device="cpu", quick=True, levels=((1, 2, 4),), rois=(16, 32), progress=False
    )
    results = bk.run_sweep(cfg)
    labels = {r["label"] for r in results}
    assert labels == {"spp{1,2,4}", "roi_spp{1,2,4}", "roi_pool", "fpn_pool", "fpn_spp{1,2,4}"}
    assert {r["pass"] for r in results} == {"fwd", "fwd+bwd"}
    for r in results:
        assert not r["check"].startswith(("MISMATCH", "error")), r
        assert r["check"] == "skipped" or r["time_ms"] > 0, r
        assert r["device"] == "cpu" and r["copy_gbps"] > 0
        assert 0 < r["bytes_floor"] <= r["bytes_full_map"]
    ours = [r for r in results if r["is_ours"]]
    assert ours and all(r["speedup"] == 1.0 and r["gbps"] > 0 for r in ours)
    assert all(0 < r["pct_copy_bw"] < 1000 for r in ours)
    equal = [r for r in results if r["check"].startswith("equal")]
    assert {r["impl"] for r in equal} >= {
        "torchvision roi_pool/level+cat",
        "torchvision roi_pool",
        "detectron2 ROIPooler(ROIPool)",
        "detectron2 ROIPooler(ROIPool)/level+cat",
        "adaptive_max_pool2d/level+cat",
    }
    assert all(r["speedup"] > 0 for r in equal)
    timed_only = [r for r in results if r["check"].startswith("timed only")]
    assert timed_only and all("gbps" not in r for r in timed_only)
    # the compile baseline is skipped in --quick on CPU, with a note
    assert "pass --compile" in results[0]["compile_note"]

    paths = bk.write_outputs(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    meta = data["meta"]
    for key in ("device_name", "date", "git_commit", "command", "torch", "triton", "bytes_floor"):
        assert meta[key], key
    assert len(data["results"]) == len(results)
    # the GPU targets apply to CUDA runs only: no table of "n/a" rows on CPU
    assert data["targets"] == []
    md = paths["markdown"].read_text()
    assert "## Targets" not in md and "n/a |" not in md.split("_Measured on CPU")[-1]
    assert "evaluated on CUDA runs only" in md
    assert "## roi_spp{1,2,4} — fwd" in md and "| **spp_triton** |" in md
    assert meta["git_commit"] in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["pct_copy_bandwidth.png", "time_vs_rois_fwd.png", "time_vs_rois_fwd_bwd.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_quick_cli_with_profile(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(TOOL),
        "--quick",
        "--device",
        "cpu",
        "--cases",
        "roi_spp,fpn_pool",
        "--levels",
        "1,2,3,6",
        "--rois",
        "16",
        "--passes",
        "fwd",
        "--profile",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert "--quick" in data["meta"]["command"] and "--profile" in data["meta"]["command"]
    assert {r["label"] for r in data["results"]} == {"roi_spp{1,2,3,6}", "fpn_pool"}
    traces = sorted(p.name for p in (out / "profile").glob("*.json"))
    assert traces == ["fpn_pool_fwd_fp32.json", "roi_spp1-2-3-6_fwd_fp32.json"]
    trace = json.loads((out / "profile" / traces[0]).read_text())
    assert trace["traceEvents"]
    assert (out / "results.md").read_text().startswith("# spp_triton kernel benchmark")


def test_covered_pixels_matches_brute_force(bk):
    from spp_triton import bins

    g = torch.Generator().manual_seed(0)
    boxes = bk.make_boxes(40, 2, (160, 224), g)
    boxes[0, 1:] = torch.tensor([-50.0, -50.0, 400.0, 400.0])  # beyond the map: clipped
    scale, h, w = 1 / 16, 10, 14
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    x0, y0, rw, rh = bins.quantize_rois(boxes[:, 1:], scale, torch.float32)
    for i in range(boxes.shape[0]):
        b = int(boxes[i, 0])
        r0, r1 = max(int(y0[i]), 0), min(int(y0[i] + rh[i]), h)
        c0, c1 = max(int(x0[i]), 0), min(int(x0[i] + rw[i]), w)
        if r1 > r0 and c1 > c0:
            mask[b, r0:r1, c0:c1] = True
    assert bk._covered_pixels(boxes, scale, h, w, 2) == int(mask.sum())


def test_evaluate_targets(bk):
    def row(label, impl, t, pass_="fwd", dtype="fp32", rois=1000, pct=None):
        r = dict(label=label, impl=impl, pass_=pass_, rois=rois, channels=256, dtype=dtype)
        r["pass"] = r.pop("pass_")
        r.update(time_ms=t, is_ours=impl == bk.OURS, speedup=None, pct_copy_bw=pct)
        return r

    rows = [
        row("roi_spp{1,2,4}", bk.OURS, 1.0, pct=70.0),
        row("roi_spp{1,2,4}", "torchvision roi_pool/level+cat", 4.0),
        row("roi_spp{1,2,4}", bk.OURS, 0.9, dtype="bf16"),
        row("roi_spp{1,2,4}", bk.OURS, 2.0, pass_="fwd+bwd"),
        row("roi_spp{1,2,4}", "torchvision roi_pool/level+cat", 3.0, pass_="fwd+bwd"),
    ]
    for r in rows:
        r["speedup"] = r["time_ms"] / (2.0 if r["pass"] == "fwd+bwd" else 1.0)
    verdicts = {name: (m, v) for name, m, v in bk.evaluate_targets(rows)}
    assert verdicts["roi_spp{1,2,4} fwd >= 3x torchvision roi_pool/level+cat"] == ("4.00x", "PASS")
    assert verdicts["roi_spp{1,2,4} fwd+bwd >= 2x torchvision roi_pool/level+cat"][1] == "FAIL"
    assert verdicts["roi_spp{1,2,4} fwd >= 60% of copy bandwidth (floor)"] == ("70%", "PASS")
    assert verdicts["roi_spp{1,2,3,6} fwd faster than roi_align 7x7"][1] == "n/a"
    half = [v for k, v in verdicts.items() if k.startswith("bf16/fp16")][0]
    assert half[1] == "PASS" and half[0].startswith("0.90x")
