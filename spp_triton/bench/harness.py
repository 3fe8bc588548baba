"""The benchmark's harness: timing (CUDA ``do_bench`` / CPU ``blocked_autorange`` on cycled
input copies), copy bandwidth, output/gradient checks, and the sweep itself."""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import os
import platform
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from spp_triton.bench.cases import (
    _GRAD_TOL,
    DTYPES,
    LEVELED_CASES,
    OURS,
    POOL_SIZE,
    ROI_CASES,
    Impl,
    Point,
    SweepConfig,
    _as_fp32,
    _CompileState,
    _padded,
    build_case,
    bytes_floor,
    make_boxes,
    make_inputs,
)


# ============================================================================= timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, min_run_time: float) -> float:
    """Median seconds of one call of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    import torch.utils.benchmark as tb

    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str, cfg: SweepConfig) -> dict:
    """Device copy bandwidth: ``2 * bytes / time`` of ``dst.copy_(src)`` on a large buffer."""
    nbytes = (512 << 20) if device == "cuda" else (64 << 20)
    if cfg.quick and device == "cuda":
        nbytes = 256 << 20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, max(cfg.min_run_time, 0.2))
    return {"copy_bytes": nbytes, "copy_seconds": t, "copy_gbps": 2 * nbytes / t / 1e9}


def _rotation_bytes(device: str) -> int:
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        return 4 * l2
    return 64 << 20  # > L3 of common server CPUs' slice


def _n_copies(input_bytes: int, device: str) -> int:
    return max(1, min(8, math.ceil(_rotation_bytes(device) / max(input_bytes, 1))))


# ============================================================================= checking
def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _grads(out, feats, grad_out):
    return torch.autograd.grad(out, feats, grad_out, allow_unused=True)


def check_impl(impl: Impl, ours_out, ours_grads, d: dict, grad_out, dtype, backward: bool) -> str:
    """Compare an "equal" implementation with spp_triton on the same inputs.

    Forward: bit-exact (max pooling selects). For half dtypes, where torchvision computes bin
    sizes in half precision, a mismatch falls back to the implementation run on the float32
    inputs (spp_triton computes bins in float32 for every input dtype). Backward: gradients
    agree to ``_GRAD_TOL`` (summation order differs)."""
    out = impl.fn(d)
    how = "equal"
    ref_inputs = d
    if not torch.equal(out.detach(), ours_out.detach()):
        if dtype == torch.float32:
            raise AssertionError(
                f"{impl.name}: output differs from spp_triton "
                f"(max rel err {_max_rel_err(out, ours_out):.3g})"
            )
        ref_inputs = _as_fp32(d)
        out = impl.fn(ref_inputs)
        if not torch.equal(out.detach().to(dtype), ours_out.detach()):
            raise AssertionError(
                f"{impl.name}: output differs from spp_triton, also against its float32 result"
            )
        how = "equal to its fp32 result (half-precision bins differ)"
    if backward:
        g = grad_out if out.dtype == grad_out.dtype else grad_out.float()
        ref = _grads(out, ref_inputs["feats"], g)
        tol = _GRAD_TOL[dtype]
        errs = [
            _max_rel_err(a, b)
            for a, b in zip(ours_grads, ref, strict=True)
            if a is not None and b is not None
        ]
        worst = max(errs, default=0.0)
        if worst > tol:
            raise AssertionError(
                f"{impl.name}: input gradients differ from spp_triton "
                f"(max rel err {worst:.3g} > {tol:g})"
            )
        how += f"; grads rel err {worst:.1e}"
    return how


# ============================================================================= sweep
def sweep_points(cfg: SweepConfig) -> list[Point]:
    pts = []
    for case in cfg.cases:
        level_sets = cfg.levels if case in LEVELED_CASES else (None,)
        rois = cfg.rois if case in ROI_CASES else (None,)
        for lv, k, c, dt, ps in itertools.product(
            level_sets, rois, cfg.channels, cfg.dtypes, cfg.passes
        ):
            pts.append(Point(case, lv, k, c, dt, ps))
    return pts


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def _run_point(
    point: Point, cfg: SweepConfig, compile_state: _CompileState, bw: dict, profile_dir: Path | None
) -> list[dict]:
    device = cfg.device
    dtype = DTYPES[point.dtype]
    backward = point.pass_ == "fwd+bwd"
    gen = torch.Generator().manual_seed(cfg.seed)  # boxes (host)
    dgen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # tensors (device)
    shapes, impls = build_case(point, cfg, compile_state)
    rois_cpu = (
        make_boxes(point.rois, cfg.batch, _padded(cfg.image), gen)
        if point.rois is not None
        else None
    )
    es = torch.empty((), dtype=dtype).element_size()
    input_bytes = sum(math.prod(s) for s in shapes) * es
    copies = [
        make_inputs(point, shapes, rois_cpu, cfg, dtype, device, dgen, backward)
        for _ in range(_n_copies(input_bytes, device))
    ]
    base = {
        "case": point.case,
        "label": point.label,
        "levels": list(point.levels)
        if point.levels
        else ([POOL_SIZE] if "pool" in point.case else None),
        "rois": point.rois,
        "channels": point.channels,
        "dtype": point.dtype,
        "pass": point.pass_,
        "feature_shapes": [list(s) for s in shapes],
        "input_copies": len(copies),
        "device": device,
        **bw,
    }
    rows = []
    ours_impl = impls[0]
    try:
        ours_out = ours_impl.fn(copies[0])
        _sync(device)
    except Exception as err:  # noqa: BLE001 - reported, the sweep goes on
        return [
            {
                **base,
                "impl": ours_impl.name,
                "is_ours": True,
                "check": "error",
                "note": f"{type(err).__name__}: {err}"[:300],
                "time_ms": None,
            }
        ]
    floor = bytes_floor(point, shapes, rois_cpu, ours_out.numel(), dtype, cfg)
    grad_outs = {}
    ours_grads = None
    if backward:
        for i in range(len(copies)):
            grad_outs[(OURS, i)] = torch.randn(ours_out.shape, generator=dgen, device=device).to(
                dtype
            )
        ours_grads = _grads(ours_out, copies[0]["feats"], grad_outs[(OURS, 0)])

    for impl in impls:
        row = {
            **base,
            **floor,
            "impl": impl.name,
            "is_ours": impl.check == "ours",
            "note": impl.note,
            "time_ms": None,
        }
        try:
            if impl.check == "ours":
                row["check"] = "reference"
            elif impl.check == "equal":
                row["check"] = check_impl(
                    impl, ours_out, ours_grads, copies[0], grad_outs.get((OURS, 0)), dtype, backward
                )
            else:
                out = impl.fn(copies[0])
                row["check"] = "timed only (not comparable)"
                if backward:
                    for i in range(len(copies)):
                        grad_outs[(impl.name, i)] = torch.randn(
                            out.shape, generator=dgen, device=device
                        ).to(out.dtype)
            _sync(device)
        except AssertionError as err:
            row["check"] = f"MISMATCH: {err}"
            rows.append(row)
            continue
        except Exception as err:  # noqa: BLE001 - e.g. a dtype the library does not support
            if "compile" in impl.name:
                compile_state.fail(err)
                row["note"] = compile_state.note
                row["check"] = "skipped"
            else:
                row["check"] = "error"
                row["note"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            rows.append(row)
            continue

        key = OURS if impl.check != "timed" else impl.name
        cycle = itertools.cycle(range(len(copies)))

        if backward:

            def call(impl=impl, key=key, cycle=cycle):
                i = next(cycle)
                d = copies[i]
                return _grads(impl.fn(d), d["feats"], grad_outs[(key, i)])
        else:

            def call(impl=impl, cycle=cycle):
                return impl.fn(copies[next(cycle)])

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time_fn(call, device, cfg.min_run_time)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large point
            row["check"] += "; timing failed"
            row["note"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        row["time_ms"] = t * 1e3
        if impl.check in ("ours", "equal"):
            row["gbps"] = floor["bytes_floor"] / t / 1e9
            row["pct_copy_bw"] = 100.0 * row["gbps"] / bw["copy_gbps"]
        if profile_dir is not None and impl.check == "ours":
            _profile_once(
                call,
                device,
                profile_dir
                / f"{point.label}_{point.pass_}_{point.dtype}.json".replace("{", "")
                .replace("}", "")
                .replace(",", "-")
                .replace("+", "_"),
            )
        rows.append(row)

    t_ours = rows[0]["time_ms"] if rows and rows[0]["is_ours"] else None
    for row in rows:
        if t_ours and row["time_ms"]:
            row["speedup"] = row["time_ms"] / t_ours  # > 1: spp_triton is faster
    return rows


def _profile_once(call, device: str, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    call()  # warm
    _sync(device)
    with profile(activities=acts, record_shapes=True) as prof:
        call()
        _sync(device)
    prof.export_chrome_trace(str(path))


def run_sweep(config: SweepConfig | dict | None = None) -> list[dict]:
    """Run the sweep; one dict per (sweep point, implementation). See the module docstring."""
    if config is None:
        config = SweepConfig()
    elif isinstance(config, dict):
        config = SweepConfig(**config)
    cfg = config.resolved()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _sweep(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _sweep(cfg: SweepConfig) -> list[dict]:
    points = sweep_points(cfg)
    compile_state = _CompileState(cfg.compile, cfg.quick)
    bw = copy_bandwidth(cfg.device, cfg)
    bw["device_name"] = device_name(cfg.device)
    bw["threads"] = torch.get_num_threads()
    profile_dir = None
    if cfg.profile:
        profile_dir = Path(cfg.output_dir or default_output_dir(cfg.device)) / "profile"
    profiled = set()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    results = []
    bar = tqdm(points, desc="benchmark", unit="pt", disable=not cfg.progress, dynamic_ncols=True)
    for point in bar:
        if cfg.progress:
            bar.set_postfix_str(
                f"{point.label} K={point.rois} C={point.channels} {point.dtype} {point.pass_}"
            )
        key = (point.label, point.pass_)
        pdir = profile_dir if (profile_dir is not None and key not in profiled) else None
        profiled.add(key)
        results.extend(_run_point(point, cfg, compile_state, bw, pdir))
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    for row in results:
        row["compile_note"] = compile_state.note
    return results


def default_output_dir(device: str) -> Path:
    """``output/benchmarks/<device>-<date>/`` under the working directory (results worth keeping
    are committed under ``benchmarks/results/`` by hand, with ``--output-dir``)."""
    name = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower())
    return Path("output") / "benchmarks" / f"{name.strip('-')}-{_dt.date.today().isoformat()}"
