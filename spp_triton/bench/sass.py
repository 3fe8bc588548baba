"""Static SASS report of the pyramid-pool kernels, compiled for sm_90 / sm_80 without a GPU.

For every kernel variant of :data:`VARIANTS` (built only through
``spp_triton.kernels.pyramid_pool.forward_launch`` / ``backward_launch``), the kernel is compiled
with Triton's ``ASTSource`` for a ``GPUTarget`` (no driver needed), its cubin disassembled with the
``cuobjdump`` shipped in Triton's package, and the report gives:

* registers, spills, shared memory and static occupancy;
* the loops of the SASS control flow (backward branches), the *hot loops* (innermost loops with
  global loads or, in backward kernels, atomics), and per hot loop its instruction mix and
  *instructions per element* (loaded, or atomically added); per variant the number of hot loops
  and the median and maximum of that figure over them (kernels that unroll one loop per pyramid
  cell have many alike loops, plus rare-path ones); ``MEMBAR``, ``SHFL`` and ``BAR`` inside loops.

The exact rules are :data:`RULES`, printed in every report.

The same figures for torchvision's ``roi_pool`` forward and backward (``float``) are read from its
installed ``_C*.so``, and :func:`count_specializations` counts the forward kernels Triton would
compile for one level set over six map sizes (distinct ``_pack_args`` keys).

Compilation runs in subprocesses without ``TRITON_INTERPRET`` (the test suite sets it on CPU
machines, and then ``@triton.jit`` functions are interpreted, not compiled). Triton's own on-disk
cache makes a rerun fast.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spp_triton.runinfo import git_commit

# ----------------------------------------------------------------------------------------------
# the variant matrix
# ----------------------------------------------------------------------------------------------

LEVEL_SETS: dict[str, tuple[tuple[int, int], ...]] = {
    "1-2-4": ((1, 1), (2, 2), (4, 4)),
    "1-2-3-6": ((1, 1), (2, 2), (3, 3), (6, 6)),
    "7x7": ((7, 7),),
}

# Feature maps: (H, W) per map and spatial scale, for an 800x1333 image padded to 800x1344 (as
# detectron2 pads; the same shapes as tools/benchmark_kernels.py). "1map": the stride-16 map of
# a C4 head; "fpn4": P2-P5, each RoI reading the map its feature_index picks.
MAP_SETS: dict[str, tuple[tuple[tuple[int, int], float], ...]] = {
    "1map": (((50, 84), 1 / 16),),
    "fpn4": (((200, 336), 1 / 4), ((100, 168), 1 / 8), ((50, 84), 1 / 16), ((25, 42), 1 / 32)),
}
BATCH, CHANNELS, ROIS = 2, 256, 512

DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}  # name: (torch dtype, bytes)
LAYOUTS = ("nchw", "nhwc")  # nhwc = torch.channels_last


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel variant: a row of the report."""

    direction: str  # "fwd" | "bwd"
    mode: str  # "max" | "avg"
    levels: str  # key of LEVEL_SETS
    maps: str  # key of MAP_SETS
    dtype: str  # key of DTYPES
    layout: str  # one of LAYOUTS
    argmax: bool = True  # forward max only: store argmax

    @property
    def name(self) -> str:
        """E.g. ``fwd-max-1-2-4-1map-fp32-nchw`` (``fwd-max-noarg-...`` without argmax)."""
        mode = self.mode if self.argmax or self.direction != "fwd" else f"{self.mode}-noarg"
        return f"{self.direction}-{mode}-{self.levels}-{self.maps}-{self.dtype}-{self.layout}"

    @property
    def main(self) -> bool:
        """The main rows (float32, NCHW): the ones also compiled for the secondary arch."""
        return self.dtype == "fp32" and self.layout == "nchw"


def _matrix() -> tuple[Variant, ...]:
    rows = []
    for direction, mode, levels, maps, dtype, layout in itertools.product(
        ("fwd", "bwd"), ("max", "avg"), LEVEL_SETS, MAP_SETS, DTYPES, LAYOUTS
    ):
        rows.append(Variant(direction, mode, levels, maps, dtype, layout))
        if direction == "fwd" and mode == "max":
            rows.append(Variant(direction, mode, levels, maps, dtype, layout, argmax=False))
    return tuple(rows)


VARIANTS: tuple[Variant, ...] = _matrix()
VARIANTS_BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}


def select_variants(
    patterns: Sequence[str] | None = None, main_only: bool = False
) -> list[Variant]:
    """The variants whose name matches any of the glob ``patterns`` (all when none)."""
    return [
        v
        for v in VARIANTS
        if (not patterns or any(fnmatch.fnmatchcase(v.name, p) for p in patterns))
        and (v.main or not main_only)
    ]


# ----------------------------------------------------------------------------------------------
# compiling (in a subprocess without TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------


def _maps(variant: Variant) -> list:
    import torch

    dtype = getattr(torch, DTYPES[variant.dtype][0])
    fmt = torch.channels_last if variant.layout == "nhwc" else torch.contiguous_format
    return [
        torch.empty(BATCH, CHANNELS, h, w, dtype=dtype, memory_format=fmt)
        for (h, w), _ in MAP_SETS[variant.maps]
    ]


def _launch(variant: Variant) -> Any:
    """The variant's ``Launch`` for CPU tensors (shapes matter, values do not)."""
    import torch

    from spp_triton.kernels import pyramid_pool as pp

    maps = _maps(variant)
    scales = [s for _, s in MAP_SETS[variant.maps]]
    boxes = torch.zeros(ROIS, 5, dtype=torch.float32)
    index = torch.arange(ROIS, dtype=torch.int64) % len(maps)
    levels = list(LEVEL_SETS[variant.levels])
    argmax = variant.argmax or variant.direction == "bwd"
    fwd = pp.forward_launch(
        maps, boxes, index, scales, levels, variant.mode, "roi", with_argmax=argmax
    )
    if variant.direction == "fwd":
        return fwd
    out, arg = fwd.outputs
    return pp.backward_launch(out, maps, boxes, index, scales, levels, variant.mode, "roi", arg)


def _pack(kernel: Any, args: tuple, kwargs: dict, backend: Any) -> tuple:
    """Triton's specialization of a call: ``(options, signature, constexprs, attrs)``."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, spec, options)


def _compile_one(variant: Variant, arch: int, out_dir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    start = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    launch = _launch(variant)
    options, sig, constexprs, attrs = _pack(launch.kernel, launch.args, launch.kwargs, backend)
    compiled = triton.compile(
        ASTSource(launch.kernel, sig, constexprs, attrs), target=target, options=options.__dict__
    )
    cubin = out_dir / f"{variant.name}.sm{arch}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    meta = compiled.metadata
    return dict(
        case=variant.name,
        arch=arch,
        kernel=meta.name,
        num_warps=meta.num_warps,
        shared_bytes=meta.shared,
        cubin=str(cubin),
        compile_s=round(time.perf_counter() - start, 2),
    )


# Map sizes (H, W) of the variant count: feature maps of differently sized images.
SPEC_SIZES: tuple[tuple[int, int], ...] = (
    (25, 34),
    (32, 32),
    (38, 50),
    (50, 68),
    (64, 64),
    (13, 17),
)


def count_specializations(
    levels: str = "1-2-4", sizes: Sequence[tuple[int, int]] = SPEC_SIZES, layout: str = "nchw"
) -> dict:
    """How many forward (max, float32, one map) kernels Triton compiles for ``sizes``.

    Binds each call as Triton's launcher does and counts distinct ``(signature, constexprs,
    attrs)`` keys; also names the parameters whose specialization differs. Needs a process
    without ``TRITON_INTERPRET``; no GPU.
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from spp_triton.kernels import pyramid_pool as pp

    backend = make_backend(GPUTarget("cuda", 90, 32))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    keys, kernel = [], None
    for h, w in sizes:
        x = torch.empty(BATCH, CHANNELS, h, w, memory_format=fmt)
        boxes = torch.zeros(ROIS, 5)
        index = torch.zeros(ROIS, dtype=torch.int64)
        launch = pp.forward_launch(
            [x], boxes, index, [1 / 16], list(LEVEL_SETS[levels]), "max", "roi"
        )
        kernel = launch.kernel
        _, sig, constexprs, attrs = _pack(launch.kernel, launch.args, launch.kwargs, backend)
        keys.append((dict(sig), dict(constexprs), {p: repr(a) for p, a in attrs.items()}))
    names = [p.name for p in kernel.params]

    def label(path: Any) -> str:
        if isinstance(path, str):
            return path
        return names[path[0]] + "".join(f"[{i}]" for i in path[1:])

    varying = set()
    for part in range(3):
        for path in set().union(*(k[part] for k in keys)):
            if len({repr(k[part].get(path)) for k in keys}) > 1:
                varying.add(label(path))
    distinct = {repr(sorted((repr(p), repr(v)) for d in k for p, v in d.items())) for k in keys}
    return dict(
        direction="fwd",
        mode="max",
        dtype="fp32",
        levels=levels,
        layout=layout,
        sizes=[list(s) for s in sizes],
        distinct=len(distinct),
        varying_params=sorted(varying),
    )


def compile_worker(request_path: str) -> None:
    """Subprocess entry point: compile the request's variants, append one JSON line per result."""
    request = json.loads(Path(request_path).read_text())
    out_dir = Path(request["out_dir"])
    with open(request["results"], "a") as results:
        for name in request["cases"]:
            for arch in request["archs_by_case"][name]:
                try:
                    record = _compile_one(VARIANTS_BY_NAME[name], arch, out_dir)
                except Exception as exc:  # a failed variant is a row of the report, not a crash
                    record = dict(case=name, arch=arch, error=f"{type(exc).__name__}: {exc}"[:2000])
                results.write(json.dumps(record) + "\n")
                results.flush()
        for spec in request.get("specializations", []):
            try:
                record = count_specializations(**spec)
            except Exception as exc:
                record = dict(spec, error=f"{type(exc).__name__}: {exc}"[:2000])
            results.write(json.dumps(dict(specialization=record)) + "\n")


def _compile_all(
    plan: dict[str, list[int]], specializations: list[dict], work_dir: Path, jobs: int
) -> list[dict]:
    """Compile ``plan`` (case -> archs) in ``jobs`` subprocesses; their JSON records."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    cases = list(plan)
    jobs = max(1, min(jobs, len(cases) or 1))
    procs = []
    for j in range(jobs):
        request = dict(
            cases=cases[j::jobs],
            archs_by_case=plan,
            out_dir=str(work_dir),
            results=str(work_dir / f"results{j}.jsonl"),
            specializations=specializations if j == 0 else [],
        )
        path = work_dir / f"request{j}.json"
        path.write_text(json.dumps(request))
        code = "import sys; from spp_triton.bench.sass import compile_worker as w; w(sys.argv[1])"
        with open(work_dir / f"worker{j}.log", "w") as log:  # a file: no pipe to fill up
            cmd = [sys.executable, "-c", code, str(path)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    for j, proc in enumerate(procs):
        if proc.wait() != 0:
            log = (work_dir / f"worker{j}.log").read_text()
            raise RuntimeError(f"SASS compile worker failed:\n{log[-3000:]}")
    records = []
    for j in range(jobs):
        path = work_dir / f"results{j}.jsonl"
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


# ----------------------------------------------------------------------------------------------
# SASS: parsing, loops, mix
# ----------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``) shipped in Triton's package."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("triton is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    raise RuntimeError(f"{name} not found under triton/backends/nvidia/bin")


@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction: address, guard predicate (``""`` if none), opcode, operands."""

    addr: int
    pred: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers: ``LDG`` for ``LDG.E.128.CONSTANT``."""
        return self.opcode.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class Loop:
    """A loop: the instructions from its header (``start``) to its last back edge (``end``)."""

    start: int
    end: int
    body: tuple[Instr, ...]


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^(@!?U?P[0-9T]+)\s+")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` output -> instructions per function (in address order)."""
    functions: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        m = _INSTR.match(line)
        if m is None or current is None:
            continue
        rest = m.group(2).strip()
        pred = ""
        p = _PRED.match(rest)
        if p:
            pred, rest = p.group(1), rest[p.end() :]
        opcode, _, operands = rest.partition(" ")
        current.append(Instr(int(m.group(1), 16), pred, opcode, operands.strip()))
    return functions


def find_loops(instrs: Sequence[Instr]) -> list[Loop]:
    """Loops from backward branches (``BRA`` to an address at or before the branch).

    An unconditional branch to itself (the trap after ``EXIT``) is not a loop. Back edges to one
    header make one loop ending at the last of them. Sorted by start address.
    """
    ends: dict[int, int] = {}
    for ins in instrs:
        if ins.base != "BRA":
            continue
        targets = _HEX.findall(ins.operands)
        if not targets:
            continue
        target = int(targets[-1], 16)
        if target > ins.addr or (target == ins.addr and not ins.pred):
            continue
        ends[target] = max(ends.get(target, ins.addr), ins.addr)
    return [
        Loop(start, end, tuple(i for i in instrs if start <= i.addr <= end))
        for start, end in sorted(ends.items())
    ]


def innermost_loops(loops: Sequence[Loop]) -> list[Loop]:
    """The loops that contain no other loop."""
    return [
        a
        for a in loops
        if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)
    ]


_ATOMICS = ("RED", "REDG", "ATOM", "ATOMG")


def load_bits(ins: Instr) -> int:
    """Bits one ``LDG`` loads per thread, from its width modifier (32 when there is none)."""
    mods = ins.opcode.split(".")[1:]
    for mod, bits in (("U8", 8), ("S8", 8), ("U16", 16), ("S16", 16)):
        if mod in mods:
            return bits
    widths = [int(m) for m in mods if m in ("64", "128", "256")]
    return widths[0] if widths else 32


def _load_key(ins: Instr) -> str:
    bits = load_bits(ins)
    mods = ins.opcode.split(".")[1:]
    small = [m for m in mods if m in ("U8", "S8", "U16", "S16")]
    return f"LDG.{small[0] if small else bits}"


def atomic_lanes(ins: Instr) -> int:
    """Elements one ``RED``/``ATOM`` updates per thread (``F16x2`` -> 2; scalar -> 1)."""
    for mod in ins.opcode.split(".")[1:]:
        m = re.search(r"x(\d+)$", mod)
        if m:
            return int(m.group(1))
    return 1


def instruction_mix(instrs: Iterable[Instr]) -> dict[str, int]:
    """Counts of the instructions that matter for a memory-bound kernel.

    ``total``; global loads by width (``LDG.32``, ``LDG.64``, ``LDG.128``, ``LDG.U16``, ...);
    ``STG``; ``RED/ATOM`` (global atomics); ``SHFL``; ``BAR``; ``MEMBAR``; shared-memory ``LDS``/
    ``STS``; local-memory (spill) ``LDL``/``STL``. Zero counts are left out.
    """
    mix: Counter[str] = Counter()
    for ins in instrs:
        mix["total"] += 1
        base = ins.base
        if base == "LDG":
            mix[_load_key(ins)] += 1
        elif base in _ATOMICS:
            mix["RED/ATOM"] += 1
        elif base in ("STG", "SHFL", "BAR", "MEMBAR", "LDS", "STS", "LDL", "STL"):
            mix[base] += 1
    return dict(mix)


def _figures(instrs: Sequence[Instr], elem_bytes: int, backward: bool) -> dict:
    """Instruction count, elements loaded / atomically added, instructions per element."""
    n = len(instrs)
    ld_elems = sum(load_bits(i) for i in instrs if i.base == "LDG") / (8 * elem_bytes)
    atomics = sum(atomic_lanes(i) for i in instrs if i.base in _ATOMICS)
    elems = atomics if backward and atomics else ld_elems
    return dict(
        instructions=n,
        loaded_elements=ld_elems,
        atomic_elements=atomics,
        per_element=round(n / elems, 3) if elems else None,
        per_element_basis="atomic" if backward and atomics else "loaded",
    )


def analyse_function(instrs: Sequence[Instr], elem_bytes: int, backward: bool) -> dict:
    """Loop and hot-loop figures of one kernel (the rules: :data:`RULES`)."""
    loops = find_loops(instrs)
    inner = innermost_loops(loops)

    def is_hot(loop: Loop) -> bool:
        return any(i.base == "LDG" or (backward and i.base in _ATOMICS) for i in loop.body)

    hot = [
        dict(
            start=hex(loop.start),
            end=hex(loop.end),
            **_figures(loop.body, elem_bytes, backward),
            mix=instruction_mix(loop.body),
        )
        for loop in inner
        if is_hot(loop)
    ]
    in_loops = {i.addr: i for loop in loops for i in loop.body}.values()
    figures = [h for h in hot if h["per_element"] is not None]
    # The lower median: the figure of an actual loop, whose body and mix are reported with it.
    median_loop = (
        sorted(figures, key=lambda h: h["per_element"])[(len(figures) - 1) // 2]
        if figures
        else None
    )
    shapes = Counter(
        (h["instructions"], h["loaded_elements"], h["atomic_elements"]) for h in figures
    )
    # The main loop: the one moving the most elements per iteration (the loop the compiler
    # unrolled, where wide bins spend their time); among equals the most frequent body (one
    # copy per pooling site), then the shortest. Remainder and re-scan loops are listed apart.
    main_loop = (
        max(
            figures,
            key=lambda h: (
                max(h["loaded_elements"], h["atomic_elements"]),
                shapes[(h["instructions"], h["loaded_elements"], h["atomic_elements"])],
                -h["instructions"],
            ),
        )
        if figures
        else None
    )
    loop_shapes = [
        dict(
            instructions=n,
            elements=max(ld, at),
            per_element=round(n / max(ld, at), 3),
            count=count,
        )
        for (n, ld, at), count in sorted(shapes.items(), key=lambda kv: -kv[1])
    ]
    return dict(
        kernel_figures=_figures(instrs, elem_bytes, backward),
        mix=instruction_mix(instrs),
        main_loop=main_loop,
        per_element_main=main_loop["per_element"] if main_loop else None,
        loop_shapes=loop_shapes,
        loops=len(loops),
        innermost_loops=len(inner),
        hot_loops=hot,
        n_hot_loops=len(hot),
        per_element_median=median_loop["per_element"] if median_loop else None,
        per_element_max=max(h["per_element"] for h in figures) if figures else None,
        median_loop=median_loop,
        membar_in_loops=sum(1 for i in in_loops if i.base == "MEMBAR"),
        shfl_in_loops=sum(1 for i in in_loops if i.base == "SHFL"),
        bar_in_loops=sum(1 for i in in_loops if i.base == "BAR"),
    )


# ----------------------------------------------------------------------------------------------
# resources and occupancy
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits used for static occupancy."""

    regs: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reg_unit: int = 256  # registers are allocated per warp in units of this
    smem: int = 233472  # shared memory per SM, bytes
    smem_reserved: int = 1024  # per block, reserved by the system


ARCH_LIMITS: dict[int, ArchLimits] = {
    90: ArchLimits(),
    80: ArchLimits(smem=167936),
}


def static_occupancy(regs: int, num_warps: int, shared_bytes: int, arch: int) -> dict:
    """Active warps per SM and occupancy (/ max warps) from registers, block size, shared memory.

    Registers per warp = ``regs * 32`` rounded up to the allocation unit; blocks per SM = the
    least of the register, shared-memory, warp and block limits.
    """
    lim = ARCH_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // lim.reg_unit) * lim.reg_unit
    by = {
        "registers": (lim.regs // per_warp) // num_warps,
        "warps": lim.max_warps // num_warps,
        "blocks": lim.max_blocks,
        "shared": lim.smem // (shared_bytes + lim.smem_reserved),
    }
    blocks = min(by.values())
    warps = blocks * num_warps
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    return dict(warps=warps, occupancy=round(warps / lim.max_warps, 3), limiter=limiter)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(binary: str, arch: int | None = None) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage``: per function, registers and local memory bytes per thread.

    ``local`` = stack frame + other local memory, what the driver reports as the local size
    (Triton's ``n_spills`` is that / 4); ptxas puts spills in the stack frame.
    """
    cmd = [nvidia_tool("cuobjdump"), "-res-usage"]
    if arch is not None:
        cmd += ["-arch", f"sm_{arch}"]
    text = subprocess.run(cmd + [binary], capture_output=True, text=True, check=True).stdout
    usage: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        r = _RES.search(line)
        if r and name:
            usage[name] = dict(regs=int(r.group(1)), local=int(r.group(2)) + int(r.group(4)))
    return usage


def disassemble(binary: str, arch: int | None = None, function: str | None = None) -> str:
    """``cuobjdump -sass`` of a cubin (or of one function of one arch in a fat binary)."""
    cmd = [nvidia_tool("cuobjdump"), "-sass"]
    if arch is not None:
        cmd += ["-arch", f"sm_{arch}"]
    if function is not None:
        cmd += ["-fun", function]
    return subprocess.run(cmd + [binary], capture_output=True, text=True, check=True).stdout


def analyse_cubin(record: dict, sass_dir: Path | None = None) -> dict:
    """Complete a compile record with resources, occupancy and loop figures from its cubin."""
    variant = VARIANTS_BY_NAME[record["case"]]
    cubin, arch, kernel = record["cubin"], record["arch"], record["kernel"]
    text = disassemble(cubin)
    if sass_dir is not None:
        (sass_dir / f"{variant.name}.sm{arch}.sass").write_text(text)
    res = resource_usage(cubin)[kernel]
    instrs = parse_sass(text)[kernel]
    out = {k: v for k, v in record.items() if k != "cubin"}
    out.update(dataclasses.asdict(variant), name=variant.name, main=variant.main)
    out.update(regs=res["regs"], spills=res["local"] // 4, local_bytes=res["local"])
    out.update(static_occupancy(res["regs"], record["num_warps"], record["shared_bytes"], arch))
    out.update(analyse_function(instrs, DTYPES[variant.dtype][1], variant.direction == "bwd"))
    return out


# ----------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------

TORCHVISION_BLOCK = 512  # threads per block of torchvision's roi_pool launches (roi_pool_kernel.cu)
TORCHVISION_KERNELS = {
    "fwd": re.compile(r"(?<![A-Za-z_])roi_pool_forward_kernel_implIfE"),
    "bwd": re.compile(r"(?<![A-Za-z_])roi_pool_backward_kernel_implIfE"),
}


def torchvision_binary() -> str:
    """Path of torchvision's compiled extension (``_C*.so``)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchvision is not installed")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob("_C*.so"))
        if found:
            return str(found[0])
    raise RuntimeError("torchvision's _C*.so not found")


def analyse_torchvision(arch: int) -> list[dict]:
    """torchvision ``roi_pool`` forward and backward (float) for ``arch``, like our variants."""
    binary = torchvision_binary()
    try:
        usage = resource_usage(binary, arch)
    except subprocess.CalledProcessError:  # no code for this arch (or no CUDA code at all)
        usage = {}
    rows = []
    for direction, pattern in TORCHVISION_KERNELS.items():
        names = [n for n in usage if pattern.search(n)]
        if not names:
            error = f"no sm_{arch} roi_pool kernel in {binary}"
            rows.append(dict(direction=direction, arch=arch, error=error))
            continue
        name = names[0]
        instrs = parse_sass(disassemble(binary, arch, name)).get(name, [])
        res = usage[name]
        row = dict(
            name=f"torchvision roi_pool {direction} <float>",
            direction=direction,
            arch=arch,
            kernel=name,
            binary=binary,
            regs=res["regs"],
            spills=res["local"] // 4,
            num_warps=TORCHVISION_BLOCK // 32,
            shared_bytes=0,
        )
        row.update(static_occupancy(res["regs"], TORCHVISION_BLOCK // 32, 0, arch))
        row.update(analyse_function(instrs, 4, direction == "bwd"))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

RULES = (
    "Rules. **Occupancy**: active warps per SM / 64, from registers (65536 per SM, allocated per "
    "warp in units of 256), `num_warps` and shared memory (the limiter in brackets). **Loops**: "
    "a loop is a backward `BRA` (target at or before the branch); its body runs from the target "
    "to the last back edge to it, inclusive; innermost loops contain no other loop. **Hot "
    "loops**: innermost loops with a global load (`LDG`); for backward kernels, with an `LDG` "
    "or an atomic (`RED`/`ATOM`). **instr/elem** of a loop: forward, body instructions / map "
    "elements loaded per iteration (`LDG` bytes / dtype size, per thread); backward, body "
    "instructions / gradient elements atomically added (marked `(atomic)`), or / loaded "
    "elements if the loop has no atomic. A kernel without a hot loop shows the figure of its "
    "whole code instead (every instruction once, cold paths included). Per variant: the "
    "**median** over its hot loops (the lower median, an actual loop, whose 'body' and 'mix' are "
    "shown) and the **max**. **Main loop**: the hot loop that moves the most elements per "
    "iteration (the unrolled one, where wide bins spend their time), among equals the most "
    "frequent body, then the shortest; its instr/elem is the figure compared with torchvision's "
    "(whose only hot loop is its x16 unrolled one, chosen by the same rule). **Other hot "
    "loops** lists every distinct hot-loop body as instructions/elements (xcount): remainder "
    "loops of the unrolled ones and the argmax re-scan of one row per bin. MEMBAR / SHFL / BAR "
    "'in loops' count every "
    "loop, hot or not. **Spills**: local memory (stack frame + local) bytes per thread / 4, as "
    "Triton's `n_spills`; `LDL`/`STL` in a mix are its accesses.\n"
)


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mix_text(mix: dict[str, int] | None) -> str:
    if not mix:
        return "–"
    order = ["LDG.U8", "LDG.U16", "LDG.32", "LDG.64", "LDG.128", "STG", "RED/ATOM", "SHFL", "BAR"]
    order += ["MEMBAR", "LDS", "STS", "LDL", "STL"]
    keys = [k for k in order if mix.get(k)] + sorted(k for k in mix if k not in order + ["total"])
    return " ".join(f"{k}×{mix[k]}" for k in keys) or "none"


_HEADER = (
    "| variant | regs | spills | smem KB | warps/SM (occ.) | hot loops | main loop body "
    "| instr/elem main | median | max | main loop mix | other hot loops | MEMBAR in loops "
    "| SHFL / BAR in loops |\n"
    "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|---|\n"
)


def _shapes_text(r: dict) -> str:
    main = r.get("main_loop")
    rest = [
        s
        for s in r.get("loop_shapes", [])
        if not main
        or (s["instructions"], s["elements"])
        != (main["instructions"], max(main["loaded_elements"], main["atomic_elements"]))
    ]
    return (
        ", ".join(f"{s['instructions']}/{_fmt(s['elements'], 0)} (x{s['count']})" for s in rest)
        or "–"
    )


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r.get('name', r.get('case'))} | compile failed: {r['error'][:120]} |\n"
    loop = r.get("main_loop")
    if loop:
        atomic = loop["per_element_basis"] == "atomic"
        main = _fmt(r["per_element_main"]) + (" (atomic)" if atomic else "")
    else:  # straight-line kernel: the whole kernel's figure instead
        whole = r["kernel_figures"]
        atomic = " (atomic)" if whole["per_element_basis"] == "atomic" else ""
        main = f"no loop; kernel {_fmt(whole['per_element'])}{atomic}"
    return (
        f"| {r['name']} | {r['regs']} | {r['spills']} | {r['shared_bytes'] / 1024:.1f} "
        f"| {r['warps']} ({r['occupancy']:.2f}, {r['limiter']}) | {r['n_hot_loops']} "
        f"| {loop['instructions'] if loop else '–'} | {main} "
        f"| {_fmt(r['per_element_median'])} | {_fmt(r['per_element_max'])} "
        f"| {_mix_text(loop['mix'] if loop else None)} | {_shapes_text(r)} "
        f"| {r['membar_in_loops']} "
        f"| {'yes' if r['shfl_in_loops'] else 'no'} ({r['shfl_in_loops']}) / "
        f"{'yes' if r['bar_in_loops'] else 'no'} ({r['bar_in_loops']}) |\n"
    )


def _comparison(rows: list[dict], tv: list[dict], arch: int) -> str:
    tv_by = {t["direction"]: t for t in tv if t["arch"] == arch and "error" not in t}
    tv_fwd, tv_bwd = tv_by.get("fwd"), tv_by.get("bwd")
    ours = {r["name"]: r for r in rows if r["arch"] == arch and "error" not in r}
    text = f"\n### sm_{arch}: forward, max, float32, NCHW, with argmax\n\n"
    text += (
        "torchvision pools one level per launch, so it reads every window element once per level: "
        "its per-level figure × the number of levels is what one of our launches replaces. "
        "Target: ours ≤ ½ of that.\n\n"
        "| level set | torchvision per level × levels | ours (main loop, 1map) | ratio "
        "| ours (main loop, fpn4) | ratio |\n|---|---|---:|---:|---:|---:|\n"
    )
    tv_elem = tv_fwd["per_element_main"] if tv_fwd else None
    for levels, pairs in LEVEL_SETS.items():
        n = len(pairs)
        total = tv_elem * n if tv_elem else None
        cells = [f"{_fmt(tv_elem)} × {n} = {_fmt(total)}"]
        for maps in MAP_SETS:
            r = ours.get(f"fwd-max-{levels}-{maps}-fp32-nchw")
            mine = r["per_element_main"] if r else None
            ratio = mine / total if mine and total else None
            cells += [_fmt(mine), _fmt(ratio)]
        text += f"| {levels} | " + " | ".join(cells) + " |\n"
    text += "\nKernels side by side (torchvision: block of 512 threads; figures per element).\n\n"
    text += _HEADER
    for t in (tv_fwd, tv_bwd):
        if t:
            text += _row(t)
    for name in ("fwd-max-1-2-4-1map-fp32-nchw", "bwd-max-1-2-4-1map-fp32-nchw"):
        if name in ours:
            text += _row(ours[name])
    return text


def render_markdown(report: dict) -> str:
    """The report as Markdown: one table per arch, torchvision comparison, variant count."""
    meta = report["meta"]
    text = f"# Static SASS report ({meta['date']})\n\n"
    text += (
        "## How measured\n\n"
        f"Triton {meta['triton']} compiled each variant for the GPU target (no GPU used: "
        "`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`, launches built by "
        "`forward_launch`/`backward_launch`), then `cuobjdump -sass` / `-res-usage` "
        f"(CUDA {meta['cuobjdump']}, shipped in Triton's package). torchvision "
        f"{meta['torchvision']}: the same tools on its installed `_C*.so`. Inputs: batch "
        f"{BATCH}, {CHANNELS} channels, {ROIS} RoIs; `1map` = one {_sizes('1map')} map at 1/16; "
        f"`fpn4` = P2-P5 ({_sizes('fpn4')}), `feature_index` picking maps; `nhwc` = "
        f"channels_last. Kernels at commit {meta['git']}. "
        f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s).\n\n" + RULES
    )
    rows = report["variants"]
    for arch in meta["archs"]:
        mine = [r for r in rows if r["arch"] == arch]
        text += f"\n## sm_{arch}: {len(mine)} variants\n\n" + _HEADER
        text += "".join(_row(r) for r in mine)
    text += "\n## torchvision roi_pool vs ours\n"
    for arch in meta["archs"]:
        text += _comparison(rows, report["torchvision"], arch)
    if report["specializations"]:
        text += "\n## Compiled forward variants across map sizes\n\n"
        text += (
            "Distinct Triton specialization keys (`_pack_args`: signature, constexprs, "
            "attributes) of the forward kernel for one call per map size; each distinct key is "
            "one more compilation at run time.\n\n"
            "| kernel | layout | map sizes | distinct compiled variants | parameters that vary |\n"
            "|---|---|---|---:|---|\n"
        )
        for s in report["specializations"]:
            if "error" in s:
                text += f"| fwd max fp32 {s['levels']} | {s['layout']} | failed: {s['error']} |\n"
                continue
            sizes = ", ".join("×".join(map(str, hw)) for hw in s["sizes"])
            kernel = f"{s['direction']} {s['mode']} {s['dtype']} {s['levels']}"
            varying = ", ".join(s["varying_params"]) or "none"
            text += f"| {kernel} | {s['layout']} | {sizes} | {s['distinct']} | {varying} |\n"
    return text


def run_report(
    archs: Sequence[int] = (90, 80),
    patterns: Sequence[str] | None = None,
    full_archs: Sequence[int] = (90,),
    jobs: int | None = None,
    sass_dir: Path | None = None,
    specializations: bool = True,
    command: str = "",
) -> dict:
    """Compile, disassemble and analyse; the report as a JSON-able dict.

    Archs in ``full_archs`` get every selected variant, the others only the main rows (float32,
    NCHW). ``sass_dir``: also keep each variant's SASS there.
    """
    start = time.perf_counter()
    plan: dict[str, list[int]] = {}
    for arch in archs:
        for v in select_variants(patterns, main_only=arch not in full_archs):
            plan.setdefault(v.name, []).append(arch)
    specs = [dict(levels="1-2-4", layout=lay) for lay in LAYOUTS] if specializations else []
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spp_sass_") as tmp:
        records = _compile_all(plan, specs, Path(tmp), jobs or os.cpu_count() or 1)
        spec_rows = [r["specialization"] for r in records if "specialization" in r]
        failed = [dict(r, name=r["case"]) for r in records if "error" in r]
        built = [r for r in records if "cubin" in r]
        with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            rows = failed + list(pool.map(lambda r: analyse_cubin(r, sass_dir), built))
    order = {v.name: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (-r["arch"], order[r["case"]]))
    tv = [row for arch in archs for row in analyse_torchvision(arch)]
    meta = dict(
        date=datetime.date.today().isoformat(),
        triton=importlib.metadata.version("triton"),
        torchvision=importlib.metadata.version("torchvision"),
        cuobjdump=_tool_version("cuobjdump"),
        git=git_commit(),
        archs=list(archs),
        full_archs=list(full_archs),
        patterns=list(patterns or []),
        command=command,
        elapsed_s=round(time.perf_counter() - start, 1),
    )
    return dict(meta=meta, variants=rows, torchvision=tv, specializations=spec_rows)


def _sizes(maps: str) -> str:
    return ", ".join(f"{h}×{w}" for (h, w), _ in MAP_SETS[maps])


def _tool_version(name: str) -> str:
    out = subprocess.run([nvidia_tool(name), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``sass_report.json`` and ``sass_report.md`` into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "sass_report.json", out_dir / "sass_report.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(render_markdown(report))
    return js, md
