"""Benchmark spp_triton's pooling against torchvision, detectron2 and PyTorch's adaptive pooling.

Cases (every implementation of a case gets the same inputs; outputs are checked before timing):

* ``spp``: whole-map SPP of ``[spp_batch, C, H/16, W/16]`` (the stride-16 map of the image):
  ``spp_triton.spp_pool`` vs ``F.adaptive_max_pool2d`` per level + cat, eager and under
  ``torch.compile``.
* ``roi_spp``: RoI SPP on the stride-16 map: ``spp_triton.roi_spp_pool`` vs
  ``torchvision.ops.roi_pool`` per level + cat (equal), and ``torchvision.ops.roi_align`` 7x7
  (the RoIAlign head's op: a different result, only timed).
* ``roi_pool``: RoI pooling 7x7: ``spp_triton.roi_pool`` vs ``torchvision.ops.roi_pool`` (equal)
  and ``roi_align`` 7x7 (timed).
* ``fpn_pool``: all FPN levels P2-P5 (strides 4, 8, 16, 32), 7x7, boxes assigned to levels by
  detectron2's rule: ``spp_triton.modeling.TritonROIPooler`` (one launch) vs detectron2
  ``ROIPooler(ROIPool)`` (equal) and ``ROIPooler(ROIAlignV2)`` (timed).
* ``fpn_spp``: the same with a spatial pyramid: ``SPPROIPooler`` vs ``ROIPooler(ROIPool)`` once
  per pyramid level + cat (equal) and ``ROIPooler(ROIAlignV2)`` 7x7 (timed).

All pooling is ``max`` (SPP-net, Fast R-CNN). The sweep runs over RoI count, channels, dtype and
pass (``fwd``, ``fwd+bwd``). Timing: CUDA, ``triton.testing.do_bench`` (median; it warms up and
flushes L2 before each call) on several input copies cycled so that no two consecutive calls read
the same memory; CPU, ``torch.utils.benchmark`` ``blocked_autorange`` median, also on cycled
copies.

Bytes floor (the least memory traffic any implementation needs; see benchmarks/NOTES.md):

* forward = output bytes + boxes (and level index) bytes + the bytes of the feature-map elements
  covered by at least one RoI window (all channels; whole-map SPP: the whole input). A RoI's window
  is its quantised rectangle clipped to its map, i.e. the union of its bins;
* fwd+bwd = forward + output-gradient bytes (read) + the full input-gradient bytes (written:
  the gradient map is dense, zeros included).

GB/s = floor / time; "% copy BW" = GB/s over the device's copy bandwidth, measured in the same run
as ``2 * bytes / time`` of a large ``dst.copy_(src)``. GB/s is reported for spp_triton and for
the alternatives that compute the same result (same floor); for the others ("timed only") only
time and the ratio. "speedup" = time of an implementation / time of spp_triton.

Usage::

    spp-triton-bench --quick                        # seconds, CI smoke test
    spp-triton-bench                                 # full GPU sweep
    spp-triton-bench --device cpu --rois 64,256 --channels 64,256 --dtypes fp32

Writes ``results.json``, ``results.md``, ``time_vs_rois_<pass>.png``, ``pct_copy_bandwidth.png``
(and with ``--profile`` ``profile/*.json`` chrome traces) to ``--output-dir`` (default
``output/benchmarks/<device>-<date>/``). Importable: :func:`run_sweep`, :func:`write_outputs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import spp_triton
from spp_triton import bins as _bins
from spp_triton.runinfo import git_commit

CASES = ("spp", "roi_spp", "roi_pool", "fpn_pool", "fpn_spp")
LEVELED_CASES = ("spp", "roi_spp", "fpn_spp")  # cases swept over --levels
ROI_CASES = ("roi_spp", "roi_pool", "fpn_pool", "fpn_spp")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FPN_STRIDES = (4, 8, 16, 32)
SINGLE_STRIDE = 16
POOL_SIZE = 7
OURS = "spp_triton"

# Relative tolerance of the gradient check (max |diff| / max |ref|): summation order differs.
_GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ============================================================================= configuration
@dataclasses.dataclass
class SweepConfig:
    """What :func:`run_sweep` measures. ``None`` fields take the device's default."""

    device: str = "auto"  # "auto" | "cuda" | "cpu"
    quick: bool = False
    cases: Sequence[str] = CASES
    levels: Sequence[Sequence[int]] = ((1, 2, 4), (1, 2, 3, 6))
    rois: Sequence[int] | None = None
    channels: Sequence[int] | None = None
    dtypes: Sequence[str] | None = None
    passes: Sequence[str] = PASSES
    batch: int = 2  # images in the RoI cases
    spp_batch: int | None = None  # images in the whole-map SPP case
    image: tuple[int, int] | None = None  # (H, W) before padding to a multiple of 32
    compile: bool | None = None  # None: on, except --quick on CPU (compile time dominates)
    profile: bool = False
    output_dir: str | None = None  # where --profile traces go (write_outputs gets its own)
    min_run_time: float | None = None  # CPU: seconds per blocked_autorange
    threads: int | None = None  # CPU: torch threads (None: 1 with --quick, else torch's default)
    seed: int = 0
    progress: bool = True
    command: str | None = None  # recorded in the outputs

    def resolved(self) -> SweepConfig:
        """A copy with the device and the device-dependent defaults filled in."""
        c = dataclasses.replace(self)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available")
        gpu = c.device == "cuda"
        if c.compile is None:
            c.compile = gpu or not c.quick
        if c.threads is None and c.quick and not gpu:
            c.threads = 1  # shared CI cores: contended OpenMP barriers cost more than a core
        if c.quick:
            c.rois = c.rois or (16, 64)
            c.channels = c.channels or (16,)
            c.dtypes = c.dtypes or (("fp32", "fp16", "bf16") if gpu else ("fp32",))
            c.image = c.image or (128, 192)
            c.spp_batch = c.spp_batch or 2
            c.min_run_time = c.min_run_time or 0.02
        else:
            c.rois = c.rois or (64, 256, 1000, 4096)
            c.channels = c.channels or (64, 256, 1024)
            c.dtypes = c.dtypes or ("fp32", "fp16", "bf16")
            c.image = c.image or (800, 1333)
            c.spp_batch = c.spp_batch or 8
            c.min_run_time = c.min_run_time or 0.5
        for name in c.cases:
            if name not in CASES:
                raise ValueError(f"unknown case {name!r}; choose from {CASES}")
        for name in c.dtypes:
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; choose from {tuple(DTYPES)}")
        for name in c.passes:
            if name not in PASSES:
                raise ValueError(f"unknown pass {name!r}; choose from {PASSES}")
        c.levels = tuple(tuple(int(v) for v in lv) for lv in c.levels)
        return c


def _padded(image: tuple[int, int]) -> tuple[int, int]:
    """detectron2 pads a batch to a multiple of 32 (SIZE_DIVISIBILITY of FPN models)."""
    return tuple(int(math.ceil(v / 32) * 32) for v in image)


def _levels_name(levels) -> str:
    return "{" + ",".join(str(n) for n in levels) + "}"


# ============================================================================= inputs
def make_boxes(num: int, batch: int, image: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """RPN-proposal-like boxes ``[num, 5]`` (batch, x1, y1, x2, y2), fp32, in image pixels.

    sqrt(area) log-uniform between 16 px (4 px on tiny images) and the image's short side,
    aspect ratio log-normal (sigma 0.5), centres uniform, clipped to the image; so all FPN levels
    receive boxes under detectron2's rule (canonical 224 px -> P4)."""
    h, w = image
    lo, hi = math.log(min(16.0, h / 8)), math.log(min(h, w))
    side = torch.exp(lo + torch.rand(num, generator=gen) * (hi - lo))
    aspect = torch.exp(torch.randn(num, generator=gen) * 0.5)
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(num, generator=gen) * w, torch.rand(num, generator=gen) * h
    x1, x2 = (cx - bw / 2).clamp(0, w), (cx + bw / 2).clamp(0, w)
    y1, y2 = (cy - bh / 2).clamp(0, h), (cy + bh / 2).clamp(0, h)
    # images in order, as detectron2's convert_boxes_to_pooler_format produces them
    img = torch.sort(torch.randint(0, batch, (num,), generator=gen)).values.float()
    return torch.stack([img, x1, y1, x2, y2], dim=1)


def _box_lists(rois: torch.Tensor, batch: int, dtype: torch.dtype):
    from detectron2.structures import Boxes

    return [Boxes(rois[rois[:, 0] == i, 1:].to(dtype)) for i in range(batch)]


def _fpn_level_index(rois: torch.Tensor, batch: int) -> torch.Tensor:
    from detectron2.modeling.poolers import assign_boxes_to_levels

    return assign_boxes_to_levels(_box_lists(rois, batch, torch.float32), 2, 5, 224, 4)


def _covered_pixels(rois, scale, height, width, batch) -> int:
    """Pixels (one channel) of an ``[batch, height, width]`` map inside at least one RoI window."""
    if rois.shape[0] == 0:
        return 0
    x0, y0, rw, rh = _bins.quantize_rois(rois[:, 1:5].float().cpu(), scale, torch.float32)
    c0, c1 = x0.clamp(0, width), (x0 + rw).clamp(0, width)
    r0, r1 = y0.clamp(0, height), (y0 + rh).clamp(0, height)
    keep = (c1 > c0) & (r1 > r0)
    b = rois[:, 0].long().cpu()[keep]
    c0, c1, r0, r1 = c0[keep], c1[keep], r0[keep], r1[keep]
    diff = torch.zeros(batch, height + 1, width + 1, dtype=torch.int32)
    ones = torch.ones_like(b, dtype=torch.int32)
    for rr, cc, sign in ((r0, c0, 1), (r0, c1, -1), (r1, c0, -1), (r1, c1, 1)):
        diff.index_put_((b, rr, cc), ones * sign, accumulate=True)
    cover = diff.cumsum(1).cumsum(2)[:, :height, :width]
    return int((cover > 0).sum())


# ============================================================================= cases
@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable[[dict], torch.Tensor]
    check: str  # "ours" | "equal" | "timed"
    note: str = ""


@dataclasses.dataclass
class Point:
    """One sweep point: a case at one size, dtype and pass."""

    case: str
    levels: tuple[int, ...] | None
    rois: int | None
    channels: int
    dtype: str
    pass_: str

    @property
    def label(self) -> str:
        lv = _levels_name(self.levels) if self.levels else ""
        return f"{self.case}{lv}"


class _CompileState:
    """torch.compile is tried once per run; a failure disables it with a note."""

    def __init__(self, enabled: bool, quick: bool = False):
        self.enabled = enabled
        self.note = (
            ""
            if enabled
            else (
                "torch.compile baseline skipped (--quick on CPU: compiling dominates; "
                "pass --compile)"
                if quick
                else "torch.compile baseline skipped (--no-compile)"
            )
        )

    def fail(self, err: BaseException):
        self.enabled = False
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.note = f"torch.compile failed on this machine, skipped: {type(err).__name__}: {first}"


def _adaptive_cat(levels):
    def fn(x):
        return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], 1)

    return fn


_AMP_NOTE = (
    "fp16/bf16: run under torch.autocast (detectron2's Boxes are always fp32 and torchvision's "
    "roi_pool needs rois of the input's dtype; its autocast pools in fp32)"
)


def _amp(d: dict, fn):
    """Run ``fn`` under ``torch.autocast`` when the features are half precision."""
    dtype = d["feats"][0].dtype
    if dtype == torch.float32:
        return fn()
    with torch.autocast(device_type=d["feats"][0].device.type, dtype=dtype):
        return fn()


def build_case(point: Point, cfg: SweepConfig, compile_state: _CompileState):
    """(feature shapes, impls, extras) for a sweep point. ``extras`` hold the box geometry."""
    levels = point.levels
    c = point.channels
    ph, pw = _padded(cfg.image)
    impls: list[Impl] = []
    if point.case == "spp":
        shapes = [(cfg.spp_batch, c, ph // SINGLE_STRIDE, pw // SINGLE_STRIDE)]
        ref = _adaptive_cat(levels)
        impls.append(Impl(OURS, lambda d: spp_triton.spp_pool(d["feats"][0], levels), "ours"))
        impls.append(Impl("adaptive_max_pool2d/level+cat", lambda d: ref(d["feats"][0]), "equal"))
        if compile_state.enabled:
            torch._dynamo.reset()
            compiled = torch.compile(ref, dynamic=False)
            impls.append(
                Impl(
                    "adaptive_max_pool2d/level+cat (torch.compile)",
                    lambda d: compiled(d["feats"][0]),
                    "equal",
                )
            )
        return shapes, impls
    if point.case in ("roi_spp", "roi_pool"):
        shapes = [(cfg.batch, c, ph // SINGLE_STRIDE, pw // SINGLE_STRIDE)]
        s = 1.0 / SINGLE_STRIDE
        if point.case == "roi_spp":
            impls.append(
                Impl(
                    OURS,
                    lambda d: spp_triton.roi_spp_pool(d["feats"][0], d["rois"], levels, s),
                    "ours",
                )
            )
            impls.append(
                Impl(
                    "torchvision roi_pool/level+cat",
                    lambda d: torch.cat(
                        [
                            torchvision.ops.roi_pool(d["feats"][0], d["rois_t"], n, s).flatten(1)
                            for n in levels
                        ],
                        1,
                    ),
                    "equal",
                )
            )
        else:
            impls.append(
                Impl(
                    OURS,
                    lambda d: spp_triton.roi_pool(d["feats"][0], d["rois"], POOL_SIZE, s),
                    "ours",
                )
            )
            impls.append(
                Impl(
                    "torchvision roi_pool",
                    lambda d: torchvision.ops.roi_pool(d["feats"][0], d["rois_t"], POOL_SIZE, s),
                    "equal",
                )
            )
        impls.append(
            Impl(
                "torchvision roi_align 7x7",
                lambda d: torchvision.ops.roi_align(
                    d["feats"][0], d["rois_t"], POOL_SIZE, s, 0, True
                ),
                "timed",
                "RoIAlign head's op (ROIAlignV2: aligned, adaptive sampling); other numbers",
            )
        )
        return shapes, impls
    # FPN cases
    from detectron2.modeling.poolers import ROIPooler

    from spp_triton.modeling import SPPROIPooler, TritonROIPooler

    shapes = [(cfg.batch, c, ph // st, pw // st) for st in FPN_STRIDES]
    scales = tuple(1.0 / st for st in FPN_STRIDES)
    align = ROIPooler(POOL_SIZE, scales, 0, "ROIAlignV2")
    if point.case == "fpn_pool":
        ours = TritonROIPooler(POOL_SIZE, scales, mode="max")
        d2 = ROIPooler(POOL_SIZE, scales, 0, "ROIPool")
        impls.append(
            Impl(
                OURS,
                lambda d: ours(d["feats"], d["box_lists"]),
                "ours",
                "TritonROIPooler: one launch for all levels",
            )
        )
        impls.append(
            Impl(
                "detectron2 ROIPooler(ROIPool)",
                lambda d: _amp(d, lambda: d2(d["feats"], d["box_lists"])),
                "equal",
                _AMP_NOTE,
            )
        )
    else:
        ours = SPPROIPooler(levels, scales, mode="max")
        d2s = [ROIPooler(n, scales, 0, "ROIPool") for n in levels]
        impls.append(
            Impl(
                OURS,
                lambda d: ours(d["feats"], d["box_lists"]),
                "ours",
                "SPPROIPooler: one launch for all levels",
            )
        )
        impls.append(
            Impl(
                "detectron2 ROIPooler(ROIPool)/level+cat",
                lambda d: _amp(
                    d, lambda: torch.cat([p(d["feats"], d["box_lists"]).flatten(1) for p in d2s], 1)
                ),
                "equal",
                _AMP_NOTE,
            )
        )
    impls.append(
        Impl(
            "detectron2 ROIPooler(ROIAlignV2) 7x7",
            lambda d: align(d["feats"], d["box_lists"]),
            "timed",
            "RoIAlign head's pooler; other numbers",
        )
    )
    return shapes, impls


def make_inputs(point: Point, shapes, rois_cpu, cfg, dtype, device, gen, grad: bool) -> dict:
    # generated on the device (a 1024-channel P2 map is ~0.5 GB: slow to make on the host)
    feats = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    if grad:
        for f in feats:
            f.requires_grad_(True)
    d = {"feats": feats}
    if rois_cpu is not None:
        rois = rois_cpu.to(device)
        d["rois"] = rois
        d["rois_t"] = rois.to(dtype)  # torchvision wants boxes in the input's dtype
        if point.case.startswith("fpn"):
            d["box_lists"] = _box_lists(rois, cfg.batch, torch.float32)
    return d


def _as_fp32(d: dict) -> dict:
    """The same inputs in float32 (reference for half dtypes), fresh leaves."""
    out = dict(d)
    out["feats"] = [f.detach().float().requires_grad_(f.requires_grad) for f in d["feats"]]
    if "rois" in d:
        out["rois_t"] = d["rois"].float()
    return out


def bytes_floor(point: Point, shapes, rois_cpu, out_numel: int, dtype, cfg) -> dict:
    """Forward/backward bytes floors (see the module docstring) and the simple full-map one."""
    es = torch.empty((), dtype=dtype).element_size()
    c = point.channels
    out_bytes = out_numel * es
    map_bytes = sum(math.prod(s) for s in shapes) * es
    if rois_cpu is None:  # whole-map SPP: every element is read
        read = map_bytes
        meta = shapes[0][0] * 3 * 8  # regions
    elif point.case.startswith("fpn"):
        lvl = _fpn_level_index(rois_cpu, cfg.batch)
        read = 0
        for i, (s, st) in enumerate(zip(shapes, FPN_STRIDES, strict=True)):
            sel = rois_cpu[lvl == i]
            read += _covered_pixels(sel, 1.0 / st, s[2], s[3], s[0]) * c * es
        meta = rois_cpu.shape[0] * (5 * 4 + 8)  # boxes + level index
    else:
        s = shapes[0]
        read = _covered_pixels(rois_cpu, 1.0 / SINGLE_STRIDE, s[2], s[3], s[0]) * c * es
        meta = rois_cpu.shape[0] * 5 * 4
    fwd = read + meta + out_bytes
    floor = fwd if point.pass_ == "fwd" else fwd + out_bytes + map_bytes
    full = map_bytes + meta + out_bytes
    if point.pass_ != "fwd":
        full += out_bytes + map_bytes
    return {
        "bytes_floor": int(floor),
        "bytes_full_map": int(full),
        "covered_fraction": read / map_bytes if map_bytes else 0.0,
    }


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


# ============================================================================= outputs
def default_output_dir(device: str) -> Path:
    """``output/benchmarks/<device>-<date>/`` under the working directory (results worth keeping
    are committed under ``benchmarks/results/`` by hand, with ``--output-dir``)."""
    name = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower())
    return Path("output") / "benchmarks" / f"{name.strip('-')}-{_dt.date.today().isoformat()}"


def collect_meta(results: list[dict], command: str | None = None) -> dict:
    first = results[0] if results else {}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    notes = sorted({r["compile_note"] for r in results if r.get("compile_note")})
    return {
        "device": first.get("device"),
        "device_name": first.get("device_name"),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(short=False),
        "command": command or " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch_threads": first.get("threads"),
        "spp_triton_cpu_backend": os.environ.get("SPP_TRITON_CPU_BACKEND"),
        "copy_gbps": first.get("copy_gbps"),
        "copy_bytes": first.get("copy_bytes"),
        "timing": (
            "triton.testing.do_bench median, input copies cycled"
            if first.get("device") == "cuda"
            else "torch.utils.benchmark blocked_autorange median, input copies cycled"
        ),
        "bytes_floor": BYTES_FLOOR_TEXT,
        "notes": notes,
    }


BYTES_FLOOR_TEXT = (
    "forward: output bytes + boxes/level-index bytes + bytes of the feature-map elements covered "
    "by at least one RoI window (its quantised rectangle clipped to its map; all channels; "
    "whole-map SPP: the whole input); fwd+bwd: forward + output-gradient bytes + full "
    "input-gradient bytes. GB/s = floor / time; % copy BW against 2*bytes/time of a large "
    "dst.copy_(src) measured in the same run."
)


def _fmt(v, spec=".3f", empty="—"):
    return empty if v is None else format(v, spec)


def evaluate_targets(results: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the GPU targets of benchmarks/NOTES.md, where the sweep
    has the point (1000 RoIs, 256 channels, fp32; whole-map SPP at 256 channels)."""

    def find(label, impl, pass_="fwd", rois=1000, channels=256, dtype="fp32"):
        for r in results:
            if (
                r["label"] == label
                and r["impl"] == impl
                and r["pass"] == pass_
                and r["rois"] == rois
                and r["channels"] == channels
                and r["dtype"] == dtype
                and r.get("time_ms")
            ):
                return r
        return None

    out = []

    def speed(name, label, impl, need, pass_="fwd", rois=1000):
        r = find(label, impl, pass_, rois)
        if r is None or not r.get("speedup"):
            out.append((name, "not in this sweep", "n/a"))
            return
        s = r["speedup"]
        out.append((name, f"{s:.2f}x", "PASS" if s >= need else "FAIL"))

    for lv in ("{1,2,4}", "{1,2,3,6}"):
        speed(
            f"roi_spp{lv} fwd >= 3x torchvision roi_pool/level+cat",
            f"roi_spp{lv}",
            "torchvision roi_pool/level+cat",
            3.0,
        )
        speed(
            f"roi_spp{lv} fwd+bwd >= 2x torchvision roi_pool/level+cat",
            f"roi_spp{lv}",
            "torchvision roi_pool/level+cat",
            2.0,
            "fwd+bwd",
        )
        r = find(f"roi_spp{lv}", OURS)
        out.append(
            (
                f"roi_spp{lv} fwd >= 60% of copy bandwidth (floor)",
                "not in this sweep" if r is None else f"{r['pct_copy_bw']:.0f}%",
                "n/a" if r is None else ("PASS" if r["pct_copy_bw"] >= 60 else "FAIL"),
            )
        )
    speed(
        "roi_spp{1,2,3,6} fwd faster than roi_align 7x7",
        "roi_spp{1,2,3,6}",
        "torchvision roi_align 7x7",
        1.0,
    )
    speed(
        "fpn_pool (7x7, one launch) fwd >= 2x detectron2 ROIPooler(ROIPool)",
        "fpn_pool",
        "detectron2 ROIPooler(ROIPool)",
        2.0,
    )
    for lv in ("{1,2,4}", "{1,2,3,6}"):
        speed(
            f"spp{lv} fwd >= 3x adaptive_max_pool2d/level+cat",
            f"spp{lv}",
            "adaptive_max_pool2d/level+cat",
            3.0,
            rois=None,
        )
        speed(
            f"spp{lv} fwd >= 1.5x its torch.compile version",
            f"spp{lv}",
            "adaptive_max_pool2d/level+cat (torch.compile)",
            1.5,
            rois=None,
        )
    # half precision at least as fast as fp32 (5% noise allowance), every spp_triton point
    worst = None
    for r in results:
        if not r["is_ours"] or r["dtype"] == "fp32" or not r.get("time_ms"):
            continue
        ref = find(r["label"], OURS, r["pass"], r["rois"], r["channels"], "fp32")
        if ref:
            ratio = r["time_ms"] / ref["time_ms"]
            if worst is None or ratio > worst[0]:
                worst = (
                    ratio,
                    f"{r['label']} K={r['rois']} C={r['channels']} {r['dtype']} {r['pass']}",
                )
    if worst is None:
        out.append(("bf16/fp16 at least as fast as fp32 (spp_triton)", "no half/fp32 pairs", "n/a"))
    else:
        out.append(
            (
                "bf16/fp16 at least as fast as fp32 (spp_triton, worst point)",
                f"{worst[0]:.2f}x fp32 time at {worst[1]}",
                "PASS" if worst[0] <= 1.05 else "FAIL",
            )
        )
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# spp_triton kernel benchmark",
        "",
        f"- device: **{meta['device_name']}** ({meta['device']})",
        f"- date: {meta['date']}; git commit: `{meta['git_commit']}`",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, torchvision {meta['torchvision']}, triton {meta['triton']}, "
        f"python {meta['python']}, torch threads {meta['torch_threads']}",
        f"- timing: {meta['timing']}",
        f"- copy bandwidth (same run): **{_fmt(meta['copy_gbps'], '.1f')} GB/s** "
        f"(`dst.copy_(src)`, {meta['copy_bytes'] >> 20 if meta['copy_bytes'] else '?'} MiB)",
        f"- bytes floor: {meta['bytes_floor']}",
        "- speedup = time of the implementation / time of spp_triton (> 1: spp_triton faster).",
    ]
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], r["pass"]), []).append(r)
    for (label, pass_), rows in groups.items():
        lines += [
            "",
            f"## {label} — {pass_}",
            "",
            "| RoIs | C | dtype | implementation | ms | GB/s (floor) | % copy BW | "
            "speedup | check |",
            "|---:|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            name = f"**{r['impl']}**" if r["is_ours"] else r["impl"]
            check = r["check"] + (
                f" ({r['note']})" if r.get("note") and r["check"] in ("error", "skipped") else ""
            )
            lines.append(
                f"| {_fmt(r['rois'], 'd')} | {r['channels']} | {r['dtype']} | {name} | "
                f"{_fmt(r.get('time_ms'))} | {_fmt(r.get('gbps'), '.1f')} | "
                f"{_fmt(r.get('pct_copy_bw'), '.1f')} | {_fmt(r.get('speedup'), '.2f')} | "
                f"{check} |"
            )
    if meta.get("device") == "cuda":
        lines += [
            "",
            "## Targets (set for a CUDA GPU; 1000 RoIs, 256 channels, fp32)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        for name, measured, verdict in evaluate_targets(results):
            lines.append(f"| {name} | {measured} | {verdict} |")
    else:
        lines += [
            "",
            "_Measured on CPU: spp_triton runs its vectorised torch path, not the Triton "
            "kernels. The GPU targets of benchmarks/NOTES.md are evaluated on CUDA runs only._",
        ]
    return "\n".join(lines) + "\n"


def _xticks(ax, values) -> None:
    ticks = sorted({v for v in values if v})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(v) for v in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def _plots(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timed = [r for r in results if r.get("time_ms")]
    if not timed:
        return written
    labels = list(dict.fromkeys(r["label"] for r in timed))
    for pass_ in dict.fromkeys(r["pass"] for r in timed):
        sel = [r for r in timed if r["pass"] == pass_]
        dtype = sel[0]["dtype"] if all(r["dtype"] == sel[0]["dtype"] for r in sel) else "fp32"
        sel = [r for r in sel if r["dtype"] == dtype] or sel
        labs = [lb for lb in labels if any(r["label"] == lb for r in sel)]
        cols = min(3, len(labs))
        rows_n = math.ceil(len(labs) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
        for ax, lab in zip(axes.flat, labs, strict=False):
            rs = [r for r in sel if r["label"] == lab]
            chan = max(r["channels"] for r in rs)
            rs = [r for r in rs if r["channels"] == chan]
            roi_axis = rs[0]["rois"] is not None
            for impl in dict.fromkeys(r["impl"] for r in rs):
                pts = sorted(
                    (r["rois"] if roi_axis else r["channels"], r["time_ms"])
                    for r in sel
                    if r["label"] == lab
                    and r["impl"] == impl
                    and (not roi_axis or r["channels"] == chan)
                )
                ax.plot(
                    *zip(*pts, strict=True), marker="o", lw=2.5 if impl == OURS else 1.2, label=impl
                )
            _xticks(
                ax, [r["rois"] if roi_axis else r["channels"] for r in sel if r["label"] == lab]
            )
            ax.set_yscale("log")
            ax.set_xlabel("RoIs" if roi_axis else "channels")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{lab} {pass_} {dtype}" + (f" C={chan}" if roi_axis else ""), fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(labs) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"time_vs_rois_{pass_.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ours = [r for r in timed if r["is_ours"] and r.get("pct_copy_bw") is not None]
    if ours:
        labs = list(dict.fromkeys(r["label"] for r in ours))
        cols = min(3, len(labs))
        rows_n = math.ceil(len(labs) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
        for ax, lab in zip(axes.flat, labs, strict=False):
            rs = [r for r in ours if r["label"] == lab]
            roi_axis = rs[0]["rois"] is not None
            series = dict.fromkeys(
                (r["pass"], r["dtype"], r["channels"] if roi_axis else None) for r in rs
            )
            for pass_, dtype, chan in series:
                pts = sorted(
                    (r["rois"] if roi_axis else r["channels"], r["pct_copy_bw"])
                    for r in rs
                    if r["pass"] == pass_
                    and r["dtype"] == dtype
                    and (not roi_axis or r["channels"] == chan)
                )
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    label=f"{pass_} {dtype}" + (f" C={chan}" if roi_axis else ""),
                )
            if max(r["pct_copy_bw"] for r in rs) > 30:
                ax.axhline(60, color="grey", ls="--", lw=1, label="60% target")
            ax.set_ylim(bottom=0)
            _xticks(ax, [r["rois"] if roi_axis else r["channels"] for r in rs])
            ax.set_xlabel("RoIs" if roi_axis else "channels")
            ax.set_ylabel("% of copy bandwidth (bytes floor)")
            ax.set_title(f"spp_triton {lab}", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(labs) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / "pct_copy_bandwidth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results: list[dict], out_dir, meta: dict | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the PNG plots to ``out_dir``; return paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or collect_meta(results)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    targets = (  # GPU targets: evaluated on CUDA runs only
        [{"target": t, "measured": m, "verdict": v} for t, m, v in evaluate_targets(results)]
        if meta.get("device") == "cuda"
        else []
    )
    paths["json"].write_text(
        json.dumps({"meta": meta, "targets": targets, "results": results}, indent=1, default=str)
        + "\n"
    )
    paths["markdown"].write_text(markdown(results, meta))
    for i, p in enumerate(_plots(results, out_dir)):
        paths[f"png{i}"] = p
    return paths


# ============================================================================= CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _image(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, Path | None]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--quick", action="store_true", help="tiny sweep for smoke tests (seconds on CPU)"
    )
    p.add_argument("--cases", type=_names, default=CASES, help=f"comma list of {CASES}")
    p.add_argument(
        "--levels",
        default="1,2,4;1,2,3,6",
        help="pyramid level sets, ';'-separated (default '1,2,4;1,2,3,6')",
    )
    p.add_argument("--rois", type=_ints, help="RoI counts (default 64,256,1000,4096)")
    p.add_argument("--channels", type=_ints, help="channel counts (default 64,256,1024)")
    p.add_argument("--dtypes", type=_names, help="fp32,fp16,bf16 (default all; CPU quick: fp32)")
    p.add_argument("--passes", type=_names, default=PASSES, help="fwd,fwd+bwd")
    p.add_argument("--batch", type=int, default=2, help="images in the RoI cases")
    p.add_argument("--spp-batch", type=int, help="images in whole-map SPP (default 8)")
    p.add_argument("--image", type=_image, help="image HxW before padding (default 800x1333)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time the torch.compile baseline (default: on, except --quick on CPU)",
    )
    comp.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler chrome trace of one spp_triton iteration per case",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        help="folder for results.json/.md and plots (default output/benchmarks/<device>-<date>/)",
    )
    p.add_argument("--min-run-time", type=float, help="CPU: seconds per measurement")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU: torch intra-op threads (default: 1 with --quick, else torch's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    levels = tuple(_ints(s) for s in a.levels.split(";") if s.strip())
    cmd = " ".join(
        shlex.quote(v) for v in ["spp-triton-bench"] + list(sys.argv[1:] if argv is None else argv)
    )
    cfg = SweepConfig(
        device=a.device,
        quick=a.quick,
        cases=a.cases,
        levels=levels,
        rois=a.rois,
        channels=a.channels,
        dtypes=a.dtypes,
        passes=a.passes,
        batch=a.batch,
        spp_batch=a.spp_batch,
        image=a.image,
        compile=a.compile,
        profile=a.profile,
        output_dir=str(a.output_dir) if a.output_dir else None,
        min_run_time=a.min_run_time,
        threads=a.threads,
        seed=a.seed,
        progress=not a.no_progress,
        command=cmd,
    )
    return cfg, a.output_dir


def main(argv: Sequence[str] | None = None) -> int:
    # CPU rows time the torch CPU path, also when TRITON_INTERPRET=1 is set in the shell.
    os.environ.setdefault("SPP_TRITON_CPU_BACKEND", "torch")
    cfg, out_dir = parse_args(argv)
    resolved = cfg.resolved()
    out_dir = out_dir or default_output_dir(resolved.device)
    cfg.output_dir = str(out_dir)
    t0 = time.time()
    results = run_sweep(cfg)
    meta = collect_meta(results, cfg.command)
    meta["wall_seconds"] = round(time.time() - t0, 1)
    paths = write_outputs(results, out_dir, meta)
    print((out_dir / "results.md").read_text())
    print("wrote:", ", ".join(str(p) for p in paths.values()))
    bad = [r for r in results if r["check"].startswith("MISMATCH")]
    for r in bad:
        print(
            f"MISMATCH: {r['label']} K={r['rois']} C={r['channels']} {r['dtype']} {r['pass']}: "
            f"{r['check']}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
