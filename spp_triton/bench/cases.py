"""The benchmark's cases: sweep configuration, inputs, the implementations compared per case, and
the bytes floor. See :mod:`spp_triton.bench.kernels` for the whole tool."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision

import spp_triton
from spp_triton import bins as _bins

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
