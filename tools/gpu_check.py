"""One-shot GPU check (``make gpu-check``): tests, sanitizers and benchmark targets on one GPU.

Each step runs in its own subprocess with its own timeout, so that the whole check stays within
8 minutes on one H200 and a failing or hanging step does not stop the others:

1. ``pytest``: the ``gpu``-marked tests, with this Python (the test modules that contain a gpu
   mark; detectron2 and fvcore are not needed);
2. ``slice``: a small kernel slice through the public API, forward and backward: max/avg,
   RoI/adaptive partition, level sets {1,2,4} and {1,2,3,6}, fp32/bf16, NCHW/channels_last, one
   and two feature maps (8 cases of a two-level orthogonal array: every pair of factor values
   occurs), plus hostile boxes (batch index out of range, NaN and huge coordinates, no boxes);
   results are compared with the CPU path;
3. ``memcheck`` and 4. ``racecheck``: the same slice under ``compute-sanitizer`` (skipped with a
   note when the tool is absent or refuses the device); its "ERROR SUMMARY: N errors" line
   decides;
5. ``bench``: the benchmark's target rows at 1000 RoIs, 256 channels, fp32 and bf16: RoI SPP
   {1,2,4} and {1,2,3,6} against torchvision ``roi_pool`` per level + cat (fwd >= 3x,
   fwd+bwd >= 2x), and FPN P2-P5 7x7 RoI pooling in one launch against a torchvision-only replica
   of detectron2's ``ROIPooler(ROIPool)`` per-level loop (fwd >= 2x; detectron2 is not on the GPU
   image, so the replica stands in for it, checked equal to it in tests/test_gpu_check.py).

It writes at most 8 files into one folder (``--output-dir``; default ``$OUT/gpu_<device>_<date>/``
when ``$OUT`` is set, else ``output/gpu_<device>_<date>/``): summary.md, summary.json,
pytest.txt, slice.txt, memcheck.txt, racecheck.txt, bench.txt, bench.json, and prints the
summary table last. Exit status 1 if any check failed. Without a CUDA device, or with
``--dry-run``, every step is skipped with the reason, the summary is still written, and the exit
status is 0.

Usage::

    python3 tools/gpu_check.py                 # the whole check (make gpu-check)
    python3 tools/gpu_check.py --dry-run       # what would run; writes the summary only
    python3 tools/gpu_check.py --slice         # the kernel slice alone (what the sanitizers run)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

STEPS = ("pytest", "slice", "memcheck", "racecheck", "bench")
STEP_TITLES = {
    "pytest": "pytest -m gpu",
    "slice": "kernel slice (no sanitizer)",
    "memcheck": "compute-sanitizer memcheck",
    "racecheck": "compute-sanitizer racecheck",
    "bench": "benchmark target rows",
}
# Seconds per step; they add up to BUDGET_S, which leaves 20 s of the 8 minutes for start-up and
# for killing a step that overran (each step's deadline also shrinks to what the budget has left).
# The first steps pay for compiling: a nested max variant takes 5-15 s on our 2-core CPU (Triton
# 3.6 and 3.8), and the slice compiles about 16; the sanitizer steps re-run the slice with
# Triton's on-disk cache warm.
STEP_TIMEOUTS = {"pytest": 90, "slice": 130, "memcheck": 75, "racecheck": 55, "bench": 110}
BUDGET_S = 460
MIN_STEP_S = 10  # a step with less time left than this is not started
LOGS = {s: f"{s}.txt" for s in STEPS}
FILES = ("summary.md", "summary.json", *LOGS.values(), "bench.json")  # all we ever write: 8

SANITIZER_GLOBS = (
    "/usr/local/cuda/bin/compute-sanitizer",
    "/usr/local/cuda-*/bin/compute-sanitizer",
    "/usr/local/cuda*/compute-sanitizer/compute-sanitizer",
    "/opt/nvidia/compute-sanitizer*/compute-sanitizer",
    "/opt/nvidia/*/compute-sanitizer/compute-sanitizer",
)
SANITIZER_OPTIONS = ("--report-api-errors", "no")  # CUDA API probes by libraries are not bugs

BENCH_DTYPES = ("fp32", "bf16")
BENCH_ROIS, BENCH_CHANNELS = 1000, 256
FPN_POOL = 7
OURS = "spp_triton"
TV_CAT = "torchvision roi_pool/level+cat"
FPN_OURS_NOTE = "multilevel_roi_spp_pool: level assignment + one launch (as TritonROIPooler)"
FPN_REPLICA = "ROIPooler(ROIPool) replica: torchvision roi_pool per FPN level"
FPN_REPLICA_NOTE = (
    "detectron2 is absent on the GPU image: the same loop as detectron2's ROIPooler "
    "(level assignment, nonzero per level, roi_pool, index_put_), autocast for half dtypes"
)
SHORT_NAMES = {TV_CAT: "torchvision roi_pool+cat", FPN_REPLICA: "ROIPooler replica"}
# (case label, pass, baseline implementation, needed speedup)
TARGETS = (
    ("roi_spp{1,2,4}", "fwd", TV_CAT, 3.0),
    ("roi_spp{1,2,4}", "fwd+bwd", TV_CAT, 2.0),
    ("roi_spp{1,2,3,6}", "fwd", TV_CAT, 3.0),
    ("roi_spp{1,2,3,6}", "fwd+bwd", TV_CAT, 2.0),
    ("fpn_pool", "fwd", FPN_REPLICA, 2.0),
)


# ============================================================================= records
@dataclasses.dataclass
class Check:
    name: str
    status: str  # "PASS" | "FAIL" | "SKIP"
    figure: str = ""
    note: str = ""
    seconds: float | None = None

    def cell(self) -> str:
        if self.figure and self.note:
            return f"{self.figure} ({self.note})"
        return self.figure or self.note


@dataclasses.dataclass
class Context:
    out_dir: Path
    python: str
    deadline: float
    timeouts: dict
    sanitizer: str | None

    def timeout(self, step: str) -> float:
        return min(self.timeouts[step], self.deadline - time.monotonic() - 1)


# ============================================================================= environment
def _date() -> str:
    return _dt.date.today().isoformat()


def device_slug(name: str | None) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; no device -> ``"nocuda"``."""
    if not name:
        return "nocuda"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def results_dir(explicit: str | None, slug: str) -> Path:
    if explicit:
        return Path(explicit)
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "output"
    return base / f"gpu_{slug}_{_date()}"


def _capture(cmd: list[str], timeout: float = 20) -> str | None:
    """First lines of a quick command's output, or None if it cannot run or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    text = (proc.stdout or proc.stderr).strip()
    return "\n".join(text.splitlines()[:6]) or None


def git_commit() -> str:
    """The checkout's commit; "unknown" where the copy has no git history (maybe the device's)."""
    sha = _capture(["git", "rev-parse", "--short", "HEAD"])
    if sha is None:
        return "unknown (no git repository here)"
    dirty = _capture(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha + ("+dirty" if dirty else "")


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in SANITIZER_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.X_OK):
                return path
    return None


def _versions(info: dict) -> None:
    for mod in ("torch", "triton", "torchvision"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - recorded, the check goes on
            info[mod] = f"not importable: {type(err).__name__}: {err}"


def probe_environment(sanitizer: str | None) -> tuple[dict, str | None]:
    """(environment facts, the CUDA device name or None with the reason in ``info``)."""
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "compute_sanitizer": sanitizer or "not found",
    }
    _versions(info)
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        info["no_device_reason"] = f"torch is not importable ({type(err).__name__}: {err})"
        return info, None
    if not torch.cuda.is_available():
        info["no_device_reason"] = "no CUDA device (torch.cuda.is_available() is False)"
        return info, None
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    info.update(device=name, capability=f"{major}.{minor}", torch_cuda=torch.version.cuda)
    info["nvidia_smi"] = _capture(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    if sanitizer:
        info["compute_sanitizer_version"] = _capture([sanitizer, "--version"], 30)
    return info, name


# ============================================================================= subprocesses
def _child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("TRITON_INTERPRET", None)  # the GPU check runs compiled kernels only
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None):
    """Run ``cmd`` in the repository root, stdout and stderr into ``log``; at ``timeout`` kill
    its process group. Returns (exit status, or None on timeout; seconds; the log's text)."""
    t0 = time.monotonic()
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n# timeout {timeout:.0f} s\n\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_child_env(env),
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        seconds = time.monotonic() - t0
        end = "timed out, killed" if rc is None else f"exit status {rc}"
        fh.write(f"\n# {end} after {seconds:.1f} s\n")
    return rc, seconds, log.read_text(errors="replace")


# ============================================================================= step: pytest
def gpu_test_modules(tests_dir: Path = REPO / "tests") -> list[str]:
    """Test modules with a ``gpu`` mark (``pytest.mark.gpu`` or ``marks=pytest.mark.gpu``)."""
    return [
        str(p.relative_to(REPO))
        for p in sorted(tests_dir.glob("test_*.py"))
        if "mark.gpu" in p.read_text(errors="replace")
    ]


def pytest_command(python: str) -> list[str]:
    base = [python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs"]
    return base + gpu_test_modules()


_PYTEST_COUNT = re.compile(
    r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
)


def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's final line (``3 passed, 1 skipped, 187 deselected in 9.1s``)."""
    for line in reversed(text.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and _PYTEST_COUNT.search(line):
            counts = {}
            for n, word in _PYTEST_COUNT.findall(line):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(n)
            return counts
    return {}


def judge_pytest(rc: int | None, seconds: float, text: str) -> Check:
    c = parse_pytest_counts(text)
    figure = ", ".join(
        f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped") if c.get(k)
    )
    figure = f"{figure or 'no counts'} in {seconds:.0f} s"
    check = Check(STEP_TITLES["pytest"], "FAIL", figure, seconds=round(seconds, 1))
    if rc is None:
        check.note = "timed out"
    elif rc == 5 or not c:
        check.note = f"no test ran (pytest exit status {rc})"
    elif rc != 0 or c.get("failed") or c.get("errors"):
        check.note = f"pytest exit status {rc}"
    elif not c.get("passed"):
        check.note = "every gpu test was skipped"
    else:
        check.status = "PASS"
    return check


def step_pytest(ctx: Context) -> list[Check]:
    if not gpu_test_modules():
        return [Check(STEP_TITLES["pytest"], "FAIL", note="no test module has a gpu mark")]
    cmd = pytest_command(ctx.python)
    rc, seconds, text = run_logged(cmd, ctx.out_dir / LOGS["pytest"], ctx.timeout("pytest"))
    return [judge_pytest(rc, seconds, text)]


# ============================================================================= step: slice
def slice_command(python: str) -> list[str]:
    return [python, str(THIS.relative_to(REPO)), "--slice"]


def step_slice(ctx: Context) -> list[Check]:
    rc, seconds, text = run_logged(
        slice_command(ctx.python), ctx.out_dir / LOGS["slice"], ctx.timeout("slice")
    )
    m = re.search(r"^slice: (\d+) of (\d+) cases ok", text, re.M)
    figure = f"{m.group(1)}/{m.group(2)} cases ok" if m else "no result line"
    check = Check(STEP_TITLES["slice"], "FAIL", figure, seconds=round(seconds, 1))
    if rc is None:
        check.note = "timed out"
    elif rc != 0 or not m or m.group(1) != m.group(2):
        check.note = f"exit status {rc}; see {LOGS['slice']}"
    else:
        check.status = "PASS"
    return [check]


# ============================================================================= step: sanitizers
def sanitizer_command(sanitizer: str, tool: str, python: str) -> list[str]:
    return [sanitizer, "--tool", tool, *SANITIZER_OPTIONS, *slice_command(python)]


def _sanitizer_refusal(text: str) -> str | None:
    """The sanitizer's own line saying it cannot run here (e.g. on gVisor), if any."""
    for line in text.splitlines():
        if line.startswith("=====") and re.search(r"not supported|unsupported", line, re.I):
            return line.strip("= ").strip()
    return None


def judge_sanitizer(tool: str, rc: int | None, seconds: float, text: str) -> Check:
    check = Check(f"compute-sanitizer {tool}", "FAIL", seconds=round(seconds, 1))
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \(([^)]*)\)", text)
    if found:
        check.figure = f"{found[-1]} errors" + (f"; hazards: {hazards[-1][1]}" if hazards else "")
    if rc is None:
        check.note = "timed out"
    elif not found:
        refusal = _sanitizer_refusal(text)
        check.status = "SKIP" if refusal else "FAIL"
        check.note = f"sanitizer refused: {refusal}" if refusal else "no ERROR SUMMARY line"
    elif int(found[-1]):
        check.note = f"see {LOGS[tool]}"
    elif rc != 0:
        check.note = f"the slice failed under the sanitizer (exit status {rc})"
    else:
        check.status = "PASS"
    return check


def step_sanitizer(ctx: Context, tool: str) -> list[Check]:
    if ctx.sanitizer is None:
        note = "compute-sanitizer not found (PATH, /usr/local/cuda*, /opt/nvidia)"
        return [Check(f"compute-sanitizer {tool}", "SKIP", note=note)]
    # Without the caching allocator every tensor is its own allocation: overruns are visible.
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else None
    cmd = sanitizer_command(ctx.sanitizer, tool, ctx.python)
    rc, seconds, text = run_logged(cmd, ctx.out_dir / LOGS[tool], ctx.timeout(tool), env)
    return [judge_sanitizer(tool, rc, seconds, text)]


# ============================================================================= step: bench
def bench_command(python: str, out_json: Path) -> list[str]:
    return [python, str(THIS.relative_to(REPO)), "--bench", str(out_json)]


def _find_row(rows, label, impl, pass_, dtype):
    want = (label, impl, pass_, dtype, BENCH_ROIS, BENCH_CHANNELS)
    for r in rows:
        if tuple(r.get(k) for k in ("label", "impl", "pass", "dtype", "rois", "channels")) == want:
            return r
    return None


def target_check(rows, label, pass_, baseline, need, dtype) -> Check:
    name = f"{label} {pass_} {dtype} >= {need:g}x {SHORT_NAMES[baseline]}"
    ours = _find_row(rows, label, OURS, pass_, dtype)
    base = _find_row(rows, label, baseline, pass_, dtype)
    if not ours or not base or not ours.get("time_ms") or not base.get("time_ms"):
        row = base or ours or {}
        return Check(name, "FAIL", note=f"not measured: {row.get('check') or 'no row'}"[:160])
    speedup = base["time_ms"] / ours["time_ms"]
    figure = f"{speedup:.2f}x ({ours['time_ms']:.3f} vs {base['time_ms']:.3f} ms)"
    return Check(name, "PASS" if speedup >= need else "FAIL", figure)


def agreement_check(rows) -> Check:
    """Every "equal" alternative matched spp_triton before it was timed."""
    compared = [r for r in rows if not r.get("is_ours") and "timed" not in str(r.get("check"))]
    bad = [r for r in rows if str(r.get("check", "")).startswith(("MISMATCH", "error"))]
    name = "bench: outputs agree before timing"
    if bad:
        first = bad[0]
        return Check(name, "FAIL", f"{len(bad)} bad rows", f"{first['label']}: {first['check']}")
    return Check(name, "PASS", f"{len(compared)} rows checked")


def bench_checks(rows: list[dict]) -> list[Check]:
    if not rows:
        return [Check(STEP_TITLES["bench"], "FAIL", note="no rows measured")]
    checks = [agreement_check(rows)]
    for dtype in BENCH_DTYPES:
        for label, pass_, baseline, need in TARGETS:
            checks.append(target_check(rows, label, pass_, baseline, need, dtype))
    return checks


def step_bench(ctx: Context) -> list[Check]:
    out_json = ctx.out_dir / "bench.json"
    cmd = bench_command(ctx.python, out_json)
    rc, seconds, _ = run_logged(cmd, ctx.out_dir / LOGS["bench"], ctx.timeout("bench"))
    rows = json.loads(out_json.read_text())["results"] if out_json.exists() else []
    checks = bench_checks(rows)
    if rc != 0:
        why = "timed out" if rc is None else f"exit status {rc}"
        checks.insert(0, Check("bench: run", "FAIL", f"{seconds:.0f} s", f"{why}; see bench.txt"))
    return checks


# ============================================================================= orchestration
STEP_FUNCS = {
    "pytest": step_pytest,
    "slice": step_slice,
    "memcheck": lambda ctx: step_sanitizer(ctx, "memcheck"),
    "racecheck": lambda ctx: step_sanitizer(ctx, "racecheck"),
    "bench": step_bench,
}


def planned_commands(ctx: Context) -> dict[str, str]:
    san = ctx.sanitizer or "compute-sanitizer"
    cmds = {
        "pytest": pytest_command(ctx.python),
        "slice": slice_command(ctx.python),
        "memcheck": sanitizer_command(san, "memcheck", ctx.python),
        "racecheck": sanitizer_command(san, "racecheck", ctx.python),
        "bench": bench_command(ctx.python, ctx.out_dir / "bench.json"),
    }
    return {k: shlex.join(v) for k, v in cmds.items()}


def run_step(ctx: Context, step: str) -> list[Check]:
    left = ctx.timeout(step)
    if left < MIN_STEP_S:
        return [Check(STEP_TITLES[step], "FAIL", note=f"not run: time budget used ({left:.0f} s)")]
    print(f"[gpu-check] {step}: running (timeout {left:.0f} s)", flush=True)
    try:
        checks = STEP_FUNCS[step](ctx)
    except Exception as err:  # noqa: BLE001 - one broken step must not stop the others
        checks = [Check(STEP_TITLES[step], "FAIL", note=f"{type(err).__name__}: {err}"[:200])]
    for c in checks:
        print(f"[gpu-check] {step}: {c.status} {c.name}: {c.cell()}", flush=True)
    return checks


def table(checks: list[Check]) -> str:
    lines = ["| check | result | figure |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.status} | {c.cell().replace('|', '/')} |")
    return "\n".join(lines)


def summary_markdown(info: dict, checks: list[Check], commands: dict, times: str) -> str:
    lines = ["# spp_triton GPU check", ""]
    lines += [f"- {k}: {str(v).replace(chr(10), '; ')}" for k, v in info.items()]
    lines += [f"- {times}", "", table(checks), ""]
    lines += ["Commands (each with its own timeout, from the repository root):", ""]
    lines += [f"- {k}: `{v}`" for k, v in commands.items()]
    lines += [
        "",
        f"FPN baseline: {FPN_REPLICA} ({FPN_REPLICA_NOTE}).",
        f"Sanitizer options: `{' '.join(SANITIZER_OPTIONS)}`; memcheck with "
        "PYTORCH_NO_CUDA_MEMORY_CACHING=1.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, info, checks, commands, wall: float, ctx: Context) -> None:
    data = {
        "env": info,
        "checks": [dataclasses.asdict(c) for c in checks],
        "failed": sum(c.status == "FAIL" for c in checks),
        "commands": commands,
        "wall_seconds": round(wall, 1),
        "step_timeouts": ctx.timeouts,
    }
    written = {p.name for p in out_dir.iterdir() if p.is_file()}
    data["files"] = sorted(written | {"summary.md", "summary.json"})
    (out_dir / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    times = f"wall time: {wall:.0f} s; step timeouts (s): {ctx.timeouts}"
    (out_dir / "summary.md").write_text(summary_markdown(info, checks, commands, times))


def check_main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    sanitizer = find_sanitizer()
    info, device = probe_environment(sanitizer)
    reasons = (["dry run (--dry-run)"] if args.dry_run else []) + (
        [info["no_device_reason"]] if device is None else []
    )
    out_dir = results_dir(args.output_dir, device_slug(device))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a rerun into the same folder replaces, never accumulates
        (out_dir / name).unlink(missing_ok=True)
    timeouts = {**STEP_TIMEOUTS, **args.timeout}
    ctx = Context(out_dir, sys.executable, t0 + args.budget, timeouts, sanitizer)
    if reasons:
        print(f"[gpu-check] {'; '.join(reasons)}: every step skipped", flush=True)
        checks = [Check(STEP_TITLES[s], "SKIP", note="; ".join(reasons)) for s in STEPS]
    else:
        print(f"[gpu-check] {device}; results in {out_dir}", flush=True)
        checks = [c for step in STEPS for c in run_step(ctx, step)]
    write_summary(out_dir, info, checks, planned_commands(ctx), time.monotonic() - t0, ctx)
    failed = sum(c.status == "FAIL" for c in checks)
    print(f"\n[gpu-check] wrote {out_dir} ({len(list(out_dir.iterdir()))} files)")
    print(f"[gpu-check] {failed} of {len(checks)} checks failed\n")
    print(table(checks), flush=True)
    return 1 if failed else 0


# ============================================================================= the kernel slice
SLICE_LEVELS = ((1, 2, 4), (1, 2, 3, 6))
SLICE_SHAPE = (2, 24, 13, 17)  # 24 channels: not a power of two (masked channel blocks)
SLICE_SECOND_MAP = (7, 9)
SLICE_SCALES = (0.25, 0.125)
SLICE_IMAGE_SIZES = ((13, 17), (9, 11))  # a padded batch for the adaptive partition


@dataclasses.dataclass
class SliceCase:
    mode: str
    partition: str  # "roi" | "adaptive"
    levels: tuple[int, ...]
    dtype: str  # "fp32" | "bf16"
    channels_last: bool
    maps: int  # roi partition only: 1 (roi_spp_pool) or 2 (multilevel_roi_spp_pool)

    def __str__(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        maps = f" maps={self.maps}" if self.partition == "roi" else ""
        lv = ",".join(map(str, self.levels))
        return f"{self.mode} {self.partition} {{{lv}}} {self.dtype} {layout}{maps}"


def slice_cases() -> list[SliceCase]:
    """8 runs of a two-level orthogonal array over 6 factors (columns b0, b1, b2, b0^b1, b0^b2,
    b1^b2 of the 3-bit row index): each pair of factors shows all 4 value pairs."""
    cases = []
    for row in range(8):
        b0, b1, b2 = row & 1, (row >> 1) & 1, (row >> 2) & 1
        cases.append(
            SliceCase(
                mode=("max", "avg")[b0],
                partition=("roi", "adaptive")[b1],
                levels=SLICE_LEVELS[b2],
                dtype=("fp32", "bf16")[b0 ^ b1],
                channels_last=bool(b0 ^ b2),
                maps=1 + (b1 ^ b2),
            )
        )
    return cases


def slice_boxes(gen, count: int, batch: int, height: float, width: float):
    """Random boxes ``[count + 4, 5]`` in image pixels plus four edge cases: outside the map,
    inverted, degenerate, larger than the image."""
    import torch

    x1 = torch.rand(count, generator=gen) * (width + 16) - 8
    y1 = torch.rand(count, generator=gen) * (height + 16) - 8
    x2 = x1 + torch.rand(count, generator=gen) * width / 2
    y2 = y1 + torch.rand(count, generator=gen) * height / 2
    b = torch.randint(0, batch, (count,), generator=gen).float()
    edge = torch.tensor(
        [
            [0, -20, -20, -5, -5],
            [1, 40, 30, 20, 10],
            [0, 10, 10, 10, 10],
            [1, -100, -100, 10 * width, 10 * height],
        ]
    )
    return torch.cat([torch.stack([b, x1, y1, x2, y2], 1), edge])


def _slice_inputs(case: SliceCase, gen) -> dict:
    import torch

    n, c, h, w = SLICE_SHAPE
    feats = [torch.randn(SLICE_SHAPE, generator=gen)]
    if case.partition == "roi" and case.maps == 2:
        feats.append(torch.randn((n, c, *SLICE_SECOND_MAP), generator=gen))
    d = {"feats": feats}
    if case.partition == "roi":
        d["rois"] = slice_boxes(gen, 16, n, h / SLICE_SCALES[0], w / SLICE_SCALES[0])
        d["index"] = torch.randint(0, len(feats), (d["rois"].shape[0],), generator=gen)
    return d


def _slice_forward(case: SliceCase, feats, d: dict, device):
    import spp_triton

    if case.partition == "adaptive":
        return spp_triton.spp_pool(feats[0], case.levels, case.mode, list(SLICE_IMAGE_SIZES))
    rois = d["rois"].to(device)
    if case.maps == 1:
        return spp_triton.roi_spp_pool(feats[0], rois, case.levels, SLICE_SCALES[0], case.mode)
    index = d["index"].to(device)
    scales = list(SLICE_SCALES[: len(feats)])
    return spp_triton.multilevel_roi_spp_pool(feats, rois, index, scales, case.levels, case.mode)


def _forward_backward(case: SliceCase, d: dict, device, dtype, grad_out=None):
    """(output, input gradients, the output gradient used) of one case on ``device``."""
    import torch

    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    feats = [
        f.detach().to(device=device, dtype=dtype, memory_format=fmt, copy=True).requires_grad_()
        for f in d["feats"]
    ]
    out = _slice_forward(case, feats, d, device)
    if grad_out is None:  # drawn once, rounded to the case's dtype: both sides use its values
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grad_out = grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, feats, grad_out.to(device))
    return out, grads, grad_out


def _with_cpu_backend(name: str, fn):
    old = os.environ.get("SPP_TRITON_CPU_BACKEND")
    os.environ["SPP_TRITON_CPU_BACKEND"] = name
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("SPP_TRITON_CPU_BACKEND", None)
        else:
            os.environ["SPP_TRITON_CPU_BACKEND"] = old


def _tolerances(case: SliceCase, what: str) -> dict:
    if what == "out" and case.mode == "max":
        return {"rtol": 0.0, "atol": 0.0}  # max selects: exact, in every dtype
    if case.dtype == "bf16":
        return {"rtol": 2e-2, "atol": 3e-2}
    return {"rtol": 1e-5, "atol": 1e-5}


def run_slice_case(case: SliceCase, device: str, backend: str, seed: int) -> None:
    """One case on ``device`` (CPU: through ``backend``) against the torch CPU path on float32
    copies of the same (dtype-rounded) values; raises AssertionError on a difference."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    d = _slice_inputs(case, torch.Generator().manual_seed(seed))
    d["feats"] = [f.to(dtype) for f in d["feats"]]  # both sides see the same values
    out, grads, g = _with_cpu_backend(backend, lambda: _forward_backward(case, d, device, dtype))
    ref, ref_grads, _ = _with_cpu_backend(
        "torch", lambda: _forward_backward(case, d, "cpu", torch.float32, g)
    )
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    torch.testing.assert_close(out.float().cpu(), ref, **_tolerances(case, "out"))
    for gx, gr in zip(grads, ref_grads, strict=True):
        assert gx.dtype == dtype
        torch.testing.assert_close(gx.float().cpu(), gr, **_tolerances(case, "grad"))


def run_hostile_case(device: str) -> None:
    """CUDA skips the value checks of boxes; the kernels must stay in bounds: a RoI with a batch
    index outside [0, N) or NaN pools nothing, NaN coordinates count as 0, huge ones are
    clamped; and an empty box set works, forward and backward."""
    import torch

    import spp_triton

    nan, big = float("nan"), 1e30
    x = torch.randn(SLICE_SHAPE, generator=torch.Generator().manual_seed(5)).to(device)
    x.requires_grad_(True)
    rois = torch.tensor(
        [
            [2, 0, 0, 30, 30],
            [-1, 0, 0, 30, 30],
            [nan, 0, 0, 30, 30],
            [0, nan, nan, 30, 30],
            [1, -big, -big, big, big],
            [1, 4, 4, 40, 40],
        ],
        device=device,
    )
    for mode in ("max", "avg"):
        out = spp_triton.roi_spp_pool(x, rois, (1, 2, 4), SLICE_SCALES[0], mode)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(gx).all(), mode
        assert not out[:3].any(), f"{mode}: RoIs with a bad batch index must pool nothing"
        empty = spp_triton.roi_spp_pool(x, rois[:0], (1, 2, 4), SLICE_SCALES[0], mode)
        assert empty.shape == (0, SLICE_SHAPE[1] * 21), empty.shape
        if empty.requires_grad:
            (ge,) = torch.autograd.grad(empty.sum(), x, allow_unused=True)
            assert ge is None or not ge.any(), f"{mode}: gradient from no RoIs"


def slice_runs(device: str, backend: str) -> list[tuple[str, object]]:
    """(name, callable) for each case of the slice; the hostile case only on CUDA."""
    runs = [
        (str(c), lambda c=c, i=i: run_slice_case(c, device, backend, i))
        for i, c in enumerate(slice_cases())
    ]
    if device == "cuda":
        runs.append(("hostile boxes (CUDA: no value checks)", lambda: run_hostile_case(device)))
    return runs


def _run_one(index: int, name: str, run, device: str) -> bool:
    import torch

    t0 = time.monotonic()
    try:
        run()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - reported; the other cases still run
        where = traceback.format_exc(limit=-2).strip().splitlines()
        print(f"case {index}: {name}: FAILED {type(err).__name__}: {err}", flush=True)
        print("    " + "\n    ".join(where[:-1]), flush=True)
        return False
    print(f"case {index}: {name}: ok ({time.monotonic() - t0:.1f} s)", flush=True)
    return True


def slice_main(device: str, only: tuple[int, ...] | None = None) -> int:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("slice: no CUDA device")
        return 2
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    backend = "triton" if device == "cuda" or interpreted else "torch"
    print(f"slice on {device} (CPU tensors through: {backend}); torch {torch.__version__}")
    runs = [(i, *r) for i, r in enumerate(slice_runs(device, backend)) if not only or i in only]
    ok = sum(_run_one(i, name, run, device) for i, name, run in runs)
    print(f"slice: {ok} of {len(runs)} cases ok")
    return 0 if runs and ok == len(runs) else 1


# ============================================================================= benchmark rows
def load_benchmark_tool():
    """The kernel benchmark module (:mod:`spp_triton.bench.kernels`) of this checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # spp_triton is not installed on the GPU image
    return importlib.import_module("spp_triton.bench.kernels")


def pooler_format(box_lists):
    """``[K, 5]`` (image index, x1, y1, x2, y2) from one ``[L_i, 4]`` tensor per image."""
    import torch

    index = [
        torch.full((len(b), 1), float(i), dtype=b.dtype, device=b.device)
        for i, b in enumerate(box_lists)
    ]
    return torch.cat([torch.cat(index), torch.cat(list(box_lists))], 1)


def fpn_level_index(
    box_lists,
    num_maps: int,
    min_level: int = 2,
    canonical_size: float = 224,
    canonical_level: int = 4,
):
    """FPN paper's Eqn. 1, as detectron2 applies it: level = floor(4 + log2(sqrt(area) / 224)),
    clamped to the maps present; returned as an index into the maps (0 = finest)."""
    import torch

    boxes = torch.cat(list(box_lists))
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    level = level.clamp(min_level, min_level + num_maps - 1)
    return level.to(torch.int64) - min_level


def fpn_pool_one_launch(feats, box_lists, scales, size: int = FPN_POOL):
    """spp_triton: level assignment + one kernel launch for every map (TritonROIPooler's way)."""
    import spp_triton

    rois = pooler_format(box_lists)
    index = fpn_level_index(box_lists, len(feats))
    out = spp_triton.multilevel_roi_spp_pool(feats, rois, index, scales, [(size, size)], "max")
    return out.view(rois.shape[0], feats[0].shape[1], size, size)


def fpn_pool_replica(feats, box_lists, scales, size: int = FPN_POOL):
    """detectron2 ``ROIPooler(ROIPool)``'s loop with torchvision alone: one ``nonzero``,
    ``roi_pool`` and ``index_put_`` per map, into a zero-filled output."""
    import torch
    import torchvision

    rois = pooler_format(box_lists)
    index = fpn_level_index(box_lists, len(feats))
    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], size, size))
    for level, (f, scale) in enumerate(zip(feats, scales, strict=True)):
        rows = torch.nonzero(index == level, as_tuple=True)[0]
        out.index_put_((rows,), torchvision.ops.roi_pool(f, rois[rows], size, scale))
    return out


@dataclasses.dataclass
class FpnSize:
    """One FPN point; the defaults are the benchmark's target row (P2-P5 of an 800x1333 image)."""

    device: str = "cuda"
    rois: int = BENCH_ROIS
    channels: int = BENCH_CHANNELS
    image: tuple[int, int] = (800, 1333)
    batch: int = 2
    min_run_time: float = 0.5  # CPU timing only


def _fpn_inputs(bm, dtype, size: FpnSize) -> list[dict]:
    """Input copies (enough to cycle past the cache) sharing one set of RPN-like boxes."""
    import torch

    ph, pw = bm._padded(size.image)
    shapes = [(size.batch, size.channels, ph // st, pw // st) for st in bm.FPN_STRIDES]
    gen = torch.Generator().manual_seed(0)
    dgen = torch.Generator(device=size.device).manual_seed(1)
    rois = bm.make_boxes(size.rois, size.batch, (ph, pw), gen).to(size.device)
    box_lists = [rois[rois[:, 0] == i, 1:] for i in range(size.batch)]
    nbytes = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=dtype).element_size()
    return [
        {
            "feats": [torch.randn(s, generator=dgen, device=size.device).to(dtype) for s in shapes],
            "box_lists": box_lists,
        }
        for _ in range(bm._n_copies(nbytes, size.device))
    ]


def _fpn_impls(bm, scales) -> list:
    def ours(d):
        return fpn_pool_one_launch(d["feats"], d["box_lists"], scales)

    def replica(d):
        return bm._amp(d, lambda: fpn_pool_replica(d["feats"], d["box_lists"], scales))

    return [
        bm.Impl(OURS, ours, "ours", FPN_OURS_NOTE),
        bm.Impl(FPN_REPLICA, replica, "equal", FPN_REPLICA_NOTE),
    ]


def _fpn_row(bm, impl, copies, ours_out, dtype, size: FpnSize) -> dict:
    """Check ``impl`` against spp_triton's output (unless it is ours), then time it."""
    import itertools

    row = {"impl": impl.name, "is_ours": impl.check == "ours", "note": impl.note}
    row.update(time_ms=None, check="reference")
    try:
        if impl.check == "equal":
            row["check"] = bm.check_impl(impl, ours_out, None, copies[0], None, dtype, False)
        cycle = itertools.cycle(copies)
        seconds = bm.time_fn(lambda: impl.fn(next(cycle)), size.device, size.min_run_time)
        row["time_ms"] = 1e3 * seconds
    except AssertionError as err:
        row["check"] = f"MISMATCH: {err}"
    except Exception as err:  # noqa: BLE001 - reported as a row, like the benchmark tool
        row["check"] = f"error: {type(err).__name__}: {str(err)[:200]}"
    return row


def fpn_rows(bm, dtype_name: str, size: FpnSize | None = None) -> list[dict]:
    """fwd rows of FPN 7x7 RoI pooling: spp_triton in one launch, then the ROIPooler replica."""
    size = size or FpnSize()
    dtype = bm.DTYPES[dtype_name]
    scales = [1.0 / st for st in bm.FPN_STRIDES]
    copies = _fpn_inputs(bm, dtype, size)
    impls = _fpn_impls(bm, scales)
    ours_out = impls[0].fn(copies[0])
    base = {"case": "fpn_pool", "label": "fpn_pool", "rois": size.rois, "pass": "fwd"}
    base.update(channels=size.channels, dtype=dtype_name, input_copies=len(copies))
    rows = [{**base, **_fpn_row(bm, impl, copies, ours_out, dtype, size)} for impl in impls]
    if rows[0]["time_ms"] and rows[1]["time_ms"]:
        rows[1]["speedup"] = rows[1]["time_ms"] / rows[0]["time_ms"]
    return rows


def fpn_markdown(rows: list[dict]) -> str:
    lines = [
        "## fpn_pool 7x7 (P2-P5), fwd",
        "",
        "| dtype | implementation | ms | speedup | check |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        ms = f"{r['time_ms']:.3f}" if r.get("time_ms") else "—"
        sp = f"{r['speedup']:.2f}" if r.get("speedup") else "—"
        lines.append(f"| {r['dtype']} | {r['impl']} | {ms} | {sp} | {r['check']} |")
    return "\n".join(lines) + "\n"


def _write_bench(path: Path, meta: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str) + "\n")


def bench_main(out_json: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench: no CUDA device")
        return 2
    bm = load_benchmark_tool()
    cfg = bm.SweepConfig(
        device="cuda",
        cases=("roi_spp",),
        rois=(BENCH_ROIS,),
        channels=(BENCH_CHANNELS,),
        dtypes=BENCH_DTYPES,
        compile=False,
        progress=False,
        command=shlex.join(bench_command("python3", out_json)),
    )
    rows = bm.run_sweep(cfg)
    meta = bm.collect_meta(rows, cfg.command)
    meta["fpn_baseline"] = f"{FPN_REPLICA}: {FPN_REPLICA_NOTE}"
    _write_bench(out_json, meta, rows)  # written now too: the FPN rows may run out of time
    print(bm.markdown(rows, meta), flush=True)
    fpn = []
    for dtype_name in BENCH_DTYPES:
        fpn += fpn_rows(bm, dtype_name)
        _write_bench(out_json, meta, rows + fpn)
        torch.cuda.empty_cache()
    print(fpn_markdown(fpn), flush=True)
    bad = [r for r in rows + fpn if str(r.get("check", "")).startswith("MISMATCH")]
    return 1 if bad else 0


# ============================================================================= CLI
def _timeout_arg(text: str) -> tuple[str, float]:
    step, _, seconds = text.partition("=")
    if step not in STEP_TIMEOUTS or not seconds:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS with STEP in {STEPS}")
    return step, float(seconds)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", help="results folder (default $OUT or output/, see above)")
    p.add_argument("--dry-run", action="store_true", help="run nothing; write the summary")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    p.add_argument(
        "--timeout",
        type=_timeout_arg,
        action="append",
        default=[],
        metavar="STEP=S",
        help=f"one step's timeout (defaults {STEP_TIMEOUTS})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slice", action="store_true", help="run the kernel slice only")
    mode.add_argument("--bench", metavar="JSON", help="run the benchmark rows only")
    p.add_argument(
        "--slice-cases",
        type=lambda t: tuple(int(v) for v in t.split(",") if v.strip()),
        help="--slice: only these case numbers (comma list)",
    )
    p.add_argument(
        "--slice-device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="--slice on the CPU (Triton's interpreter if TRITON_INTERPRET=1)",
    )
    args = p.parse_args(argv)
    args.timeout = dict(args.timeout)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.slice or args.bench:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))  # spp_triton is not installed on the GPU image
        return (
            slice_main(args.slice_device, args.slice_cases)
            if args.slice
            else bench_main(Path(args.bench))
        )
    return check_main(args)


if __name__ == "__main__":
    sys.exit(main())
