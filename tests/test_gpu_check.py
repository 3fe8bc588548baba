"""tools/gpu_check.py on a machine without a GPU: the skip path and its files, the verdicts drawn
from pytest / compute-sanitizer / benchmark output, the kernel slice's plumbing, the FPN baseline
against detectron2, and spp_triton without detectron2 and fvcore (as on the GPU image)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check", TOOL)


def _run_tool(args, env_extra=None, timeout=300):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ----------------------------------------------------------------------------- no CUDA device
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "no-cuda"])
def test_without_cuda_every_step_is_skipped_and_the_summary_written(tmp_path, dry_run):
    proc = _run_tool(["--dry-run"] if dry_run else [], {"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout

    (folder,) = tmp_path.iterdir()  # $OUT/gpu_<device>_<date>/
    assert re.fullmatch(r"gpu_nocuda_\d{4}-\d{2}-\d{2}", folder.name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["summary.json", "summary.md"]
    assert len(gc.FILES) <= 8 and set(files) <= set(gc.FILES)

    data = json.loads((folder / "summary.json").read_text())
    assert [c["status"] for c in data["checks"]] == ["SKIP"] * len(gc.STEPS)
    assert all("no CUDA device" in c["note"] for c in data["checks"])
    assert data["failed"] == 0 and set(data["commands"]) == set(gc.STEPS)

    # the table is printed last, and it is the summary's table
    checks = [gc.Check(**c) for c in data["checks"]]
    assert proc.stdout.rstrip().endswith(gc.table(checks))
    assert gc.table(checks) in (folder / "summary.md").read_text()


def test_rerun_into_the_same_folder_replaces_its_files(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "pytest.txt").write_text("from an earlier run")
    (folder / "notes.txt").write_text("not ours: kept")
    assert gc.main(["--dry-run", "--output-dir", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "summary.json", "summary.md"]
    assert "dry run" in capsys.readouterr().out


def test_results_dir_names():
    assert gc.device_slug("NVIDIA H200") == "h200"
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gc.device_slug(None) == "nocuda"
    assert gc.results_dir("x/y", "h200") == Path("x/y")


def test_make_target_uses_plain_python_without_setup():
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(
        ["make", "-n", "gpu-check", "PYTHON=some-python3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "some-python3 tools/gpu_check.py" in out
    assert "pip" not in out and ".venv" not in out


# ----------------------------------------------------------------------------- verdicts
def test_pytest_verdicts():
    line = "3 passed, 1 skipped, 187 deselected, 2 warnings in 9.12s"
    assert gc.parse_pytest_counts(f"x\n{line}\n# exit status 0\n") == {
        "passed": 3,
        "skipped": 1,
        "deselected": 187,
        "warnings": 2,
    }
    assert gc.judge_pytest(0, 9.1, line).status == "PASS"
    assert gc.judge_pytest(1, 9.1, "2 passed, 1 failed in 3.0s").status == "FAIL"
    assert gc.judge_pytest(0, 9.1, "3 skipped in 1.0s").status == "FAIL"
    assert gc.judge_pytest(None, 100, "").note == "timed out"
    assert gc.judge_pytest(5, 1, "no tests ran in 0.1s").status == "FAIL"


def test_sanitizer_verdicts():
    ok = "========= COMPUTE-SANITIZER\nslice: 9 of 9 cases ok\n========= ERROR SUMMARY: 0 errors\n"
    assert gc.judge_sanitizer("memcheck", 0, 30, ok).status == "PASS"
    bad = ok.replace("0 errors", "12 errors")
    check = gc.judge_sanitizer("memcheck", 0, 30, bad)
    assert check.status == "FAIL" and check.figure == "12 errors"
    assert gc.judge_sanitizer("memcheck", 1, 30, ok).status == "FAIL"  # the slice itself failed
    assert gc.judge_sanitizer("memcheck", None, 100, "").status == "FAIL"
    refused = "========= Error: Device not supported\n"
    check = gc.judge_sanitizer("memcheck", 1, 3, refused)
    assert check.status == "SKIP" and "Device not supported" in check.note
    assert gc.judge_sanitizer("memcheck", 1, 3, "Traceback ...\n").status == "FAIL"
    race = ok.replace(
        "========= ERROR",
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n========= ERROR",
    )
    check = gc.judge_sanitizer("racecheck", 0, 30, race)
    assert check.status == "PASS" and "0 errors, 0 warnings" in check.figure


def _row(label, impl, pass_, dtype, ms, check="equal"):
    return {
        "label": label,
        "impl": impl,
        "pass": pass_,
        "dtype": dtype,
        "rois": gc.BENCH_ROIS,
        "channels": gc.BENCH_CHANNELS,
        "time_ms": ms,
        "is_ours": impl == gc.OURS,
        "check": "reference" if impl == gc.OURS else check,
    }


def test_bench_verdicts():
    rows = []
    for dtype in gc.BENCH_DTYPES:
        for label, pass_, baseline, need in gc.TARGETS:
            rows.append(_row(label, gc.OURS, pass_, dtype, 1.0))
            rows.append(
                _row(label, baseline, pass_, dtype, need * (1.5 if dtype == "fp32" else 0.5))
            )
    rows.append(
        _row("roi_spp{1,2,4}", "torchvision roi_align 7x7", "fwd", "fp32", 1.0, "timed only")
    )
    checks = gc.bench_checks(rows)
    assert checks[0].status == "PASS" and checks[0].figure == f"{len(gc.TARGETS) * 2} rows checked"
    by_dtype = {d: [c.status for c in checks[1:] if f" {d} " in c.name] for d in gc.BENCH_DTYPES}
    assert by_dtype == {"fp32": ["PASS"] * len(gc.TARGETS), "bf16": ["FAIL"] * len(gc.TARGETS)}

    rows[1]["check"] = "MISMATCH: differs"
    del rows[-2]  # a missing row is a failed target, not a pass
    checks = gc.bench_checks(rows)
    assert checks[0].status == "FAIL" and "MISMATCH" in checks[0].note
    assert checks[-1].status == "FAIL" and "not measured" in checks[-1].note


def test_a_step_that_hangs_is_killed_at_its_timeout(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    rc, seconds, text = gc.run_logged(cmd, tmp_path / "log.txt", timeout=2)
    assert rc is None and seconds < 30
    assert "started" in text and "timed out, killed" in text


# ----------------------------------------------------------------------------- the kernel slice
def test_slice_cases_cover_every_pair_of_factor_values():
    cases = gc.slice_cases()
    columns = [
        [c.mode for c in cases],
        [c.partition for c in cases],
        [c.levels for c in cases],
        [c.dtype for c in cases],
        [c.channels_last for c in cases],
        [c.maps for c in cases],
    ]
    for a, b in itertools.combinations(columns, 2):
        assert len(set(zip(a, b, strict=True))) == 4


@pytest.mark.parametrize("index", range(8))
def test_slice_case_runs_on_the_cpu_path(index):
    """The slice's plumbing (inputs, forward, backward, comparison) with CPU tensors."""
    gc.run_slice_case(gc.slice_cases()[index], "cpu", "torch", index)


@pytest.mark.slow
def test_slice_through_the_triton_interpreter():
    """One case through the Triton kernels (interpreter) against the torch CPU path."""
    triton = pytest.importorskip("triton")
    if triton.__version__.startswith("3.6"):
        pytest.skip("Triton 3.6's interpreter needs conftest's shim, which a subprocess lacks")
    proc = _run_tool(
        ["--slice", "--slice-device", "cpu", "--slice-cases", "3"], {"TRITON_INTERPRET": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "through: triton" in proc.stdout and "slice: 1 of 1 cases ok" in proc.stdout


# ----------------------------------------------------------------------------- FPN baseline
def test_fpn_baseline_equals_detectron2_roipooler():
    """The torchvision-only replica is detectron2's ROIPooler(ROIPool), bit for bit, and the
    one-launch path is TritonROIPooler, with detectron2's level assignment."""
    pytest.importorskip("detectron2")
    from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
    from detectron2.structures import Boxes

    from spp_triton.modeling import TritonROIPooler

    bm = gc.load_benchmark_tool()
    size = gc.FpnSize(device="cpu", rois=300, channels=4, image=(512, 768))
    d = gc._fpn_inputs(bm, torch.float32, size)[0]
    scales = [1.0 / s for s in bm.FPN_STRIDES]
    boxes = [Boxes(b) for b in d["box_lists"]]
    index = gc.fpn_level_index(d["box_lists"], 4)
    assert torch.equal(index, assign_boxes_to_levels(boxes, 2, 5, 224, 4))
    assert len(index.unique()) == 4  # every map is used
    replica = gc.fpn_pool_replica(d["feats"], d["box_lists"], scales)
    assert torch.equal(replica, ROIPooler(7, scales, 0, "ROIPool")(d["feats"], boxes))
    ours = gc.fpn_pool_one_launch(d["feats"], d["box_lists"], scales)
    assert torch.equal(ours, TritonROIPooler(7, scales, mode="max")(d["feats"], boxes))
    assert torch.equal(ours, replica)


def test_fpn_rows_on_the_cpu():
    bm = gc.load_benchmark_tool()
    size = gc.FpnSize(device="cpu", rois=40, channels=4, image=(128, 192), min_run_time=0.02)
    rows = gc.fpn_rows(bm, "fp32", size)
    assert [r["impl"] for r in rows] == [gc.OURS, gc.FPN_REPLICA]
    assert rows[1]["check"] == "equal" and all(r["time_ms"] > 0 for r in rows)
    assert "| fp32 | spp_triton |" in gc.fpn_markdown(rows)


# ----------------------------------------------------------------------------- no detectron2/fvcore
_BLOCKER = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class _Absent(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("detectron2", "fvcore"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Absent())
""")


def _run_blocked(tmp_path, args, timeout=300):
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_gpu_run_works_without_detectron2_and_fvcore(tmp_path):
    """As on the GPU image: spp_triton, its profiling module, the benchmark tool and the gpu
    test modules import, and the gpu tests are collected."""
    proc = _run_blocked(tmp_path, ["-c", "import fvcore"])
    assert proc.returncode != 0 and "No module named 'fvcore'" in proc.stderr  # blocker works

    tools = str(REPO / "tools")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        import spp_triton, spp_triton.profiling
        from torch.utils import flop_counter
        spp_triton.profiling.register_flop_formulas()
        assert torch.ops.spp_triton.pyramid_pool in flop_counter.flop_registry
        import spp_triton.bench.kernels
        for name in ("gpu_check",):
            path = {tools!r} + "/" + name + ".py"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        assert "detectron2" not in sys.modules and "fvcore" not in sys.modules
        print("imports-ok")
    """)
    proc = _run_blocked(tmp_path, ["-c", script])
    assert proc.returncode == 0 and "imports-ok" in proc.stdout, proc.stderr[-3000:]

    modules = gc.gpu_test_modules()
    assert "tests/test_kernels.py" in modules
    collect = ["-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    proc = _run_blocked(tmp_path, collect + modules)
    assert proc.returncode == 0, proc.stdout[-3000:]
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
    assert m and int(m.group(1)) >= 1, proc.stdout[-2000:]


def test_every_step_runs_and_fails_cleanly_when_the_device_is_missing(
    tmp_path, monkeypatch, capsys
):
    """The orchestration end to end, with a "device" that is not there: each step runs in its
    subprocess, fails on its own without stopping the others, and the files and table follow
    the rules. The fake compute-sanitizer runs the slice and prints a clean summary line."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(
        '#!/bin/sh\nshift 4\n"$@"\nrc=$?\necho "========= ERROR SUMMARY: 0 errors"\nexit $rc\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(gc, "find_sanitizer", lambda: str(fake))
    monkeypatch.setattr(gc, "probe_environment", lambda sanitizer: ({"device": "Fake"}, "Fake"))
    folder = tmp_path / "out"
    assert gc.main(["--output-dir", str(folder), "--timeout", "pytest=200"]) == 1

    files = sorted(p.name for p in folder.iterdir())
    assert set(files) <= set(gc.FILES) and len(files) <= 8
    assert {"pytest.txt", "slice.txt", "memcheck.txt", "racecheck.txt", "bench.txt"} <= set(files)
    data = json.loads((folder / "summary.json").read_text())
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["pytest -m gpu"]["note"] == "every gpu test was skipped"
    assert by_name["kernel slice (no sanitizer)"]["status"] == "FAIL"
    assert "the slice failed under the sanitizer" in by_name["compute-sanitizer memcheck"]["note"]
    assert by_name["bench: run"]["status"] == "FAIL"
    assert data["failed"] == len(data["checks"])  # nothing passes without a device
    checks = [gc.Check(**c) for c in data["checks"]]
    assert capsys.readouterr().out.rstrip().endswith(gc.table(checks))
