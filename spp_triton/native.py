"""The CPU path's compiled kernels (``csrc/roi_max.c``): built on first use, loaded with ctypes.

Max pooling over the RoI partition is the CPU path's hot loop. torchvision's ``roi_pool`` skips
NaN, so on top of it exact NaN propagation needs a second read of every RoI window; the forward
kernel checks NaN while it pools, and derives nested levels from finer ones. The backward kernel
scatters every level's gradient in one serial pass (deterministic).

The source is plain C99 without Python or torch headers: the system C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) builds it in about 1.5 s, once, the way Triton builds its own
launcher, into ``user_cache_dir()/native`` (or ``$SPP_TRITON_NATIVE_DIR``), keyed by the source,
compiler, flags and machine. Nothing is written next to the package.

Without a compiler, or with ``SPP_TRITON_NATIVE=0``, :func:`roi_max_kernel` and
:func:`roi_max_backward_kernel` return ``None`` and the CPU path uses torchvision (plus its NaN
guard): the same pooled values and argmax, slower; gradients equal up to float rounding where
several levels add into one pixel (one warning says why when there is no compiler or a build
fails).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from spp_triton.model_zoo import user_cache_dir

__all__ = ["roi_max_kernel", "roi_max_backward_kernel", "level_specs", "Level"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "roi_max.c"
# No -ffast-math (or -Ofast): the kernel relies on IEEE comparisons with NaN.
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared"]
_TYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64
# each function's argument types (see csrc/roi_max.c)
_SIGNATURES = {
    # x, n_img, channels, height, width, batch, n_rois, levels, n_levels, out, argmax (NULL:
    # values only), row_width, out_rows (NULL: RoI r to row r)
    "spp_roi_max": [_P, _I, _I, _I, _I, _P, _I, None, _I, _P, _P, _I, _P],
    # grad_out, argmax, row_width, rows (NULL: RoI r reads row r), batch, n_rois, levels,
    # n_levels, grad, n_img, channels, height, width
    "spp_roi_max_backward": [_P, _P, _I, _P, _P, _I, None, _I, _P, _I, _I, _I, _I],
}


class Level(ctypes.Structure):
    """``spp_level`` in ``csrc/roi_max.c``: one level's bin edges for all RoIs."""

    _fields_ = [
        ("bins_h", ctypes.c_int64),
        ("bins_w", ctypes.c_int64),
        ("row_lo", ctypes.c_void_p),
        ("row_hi", ctypes.c_void_p),
        ("col_lo", ctypes.c_void_p),
        ("col_hi", ctypes.c_void_p),
        ("offset", ctypes.c_int64),
        ("source", ctypes.c_int64),
    ]


def level_specs(levels, offsets, edges=None, sources=None):
    """The ``spp_level`` array for ``levels`` ((bh, bw) pairs, in the order the kernel takes them)
    whose output blocks start at ``offsets``. The forward also needs each level's bin ``edges``
    (four contiguous int64 tensors, which the caller keeps alive during the call) and ``sources``
    (the position of the level to derive it from, or -1); the backward needs neither."""
    specs = (Level * len(levels))()
    for i, (spec, (bh, bw)) in enumerate(zip(specs, levels, strict=True)):
        spec.bins_h, spec.bins_w, spec.offset = bh, bw, offsets[i]
        spec.source = -1 if sources is None else sources[i]
        if edges is not None:
            spec.row_lo, spec.row_hi, spec.col_lo, spec.col_hi = (t.data_ptr() for t in edges[i])
    return specs


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and flags, built if not cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [source, compiler.encode(), " ".join(_FLAGS).encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]
    folder = Path(os.environ.get("SPP_TRITON_NATIVE_DIR") or user_cache_dir() / "native")
    target = folder / f"roi_max-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes building at once never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, str(SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SPP_TRITON_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "spp_triton: no C compiler found ($CC, cc, gcc, clang); the CPU path pools with "
            "torchvision plus a NaN guard (same results, slower). Set SPP_TRITON_NATIVE=0 to "
            "silence this.",
            stacklevel=3,
        )
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(
            f"spp_triton: building {SOURCE.name} with {compiler} failed ({detail}); the CPU path "
            "pools with torchvision plus a NaN guard (same results, slower). Set "
            "SPP_TRITON_NATIVE=0 to silence this.",
            stacklevel=3,
        )
        return None
    for name, signature in _SIGNATURES.items():
        for type_name in _TYPE_NAMES.values():
            fn = getattr(lib, f"{name}_{type_name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(Level) if t is None else t for t in signature]
    return lib


def _function(name: str, dtype: torch.dtype):
    if dtype not in _TYPE_NAMES:
        return None
    lib = _library()
    return None if lib is None else getattr(lib, f"{name}_{_TYPE_NAMES[dtype]}")


def roi_max_kernel(dtype: torch.dtype):
    """The compiled forward for contiguous CPU maps of ``dtype`` (float32 or float64), or ``None``
    when there is none (other dtypes, no compiler, ``SPP_TRITON_NATIVE=0``)."""
    return _function("spp_roi_max", dtype)


def roi_max_backward_kernel(dtype: torch.dtype):
    """The compiled max backward (from an argmax, either partition) for gradients of ``dtype``,
    or ``None`` (as :func:`roi_max_kernel`)."""
    return _function("spp_roi_max_backward", dtype)
