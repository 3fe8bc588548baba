"""Triton transcription of spp_triton/bins.py.

Each helper here is the ``@triton.jit`` twin of the function of the same name in
``spp_triton/bins.py`` and must agree with it bit for bit
(``tests/test_kernels.py::test_bin_helpers_match_bins_py``; ``tests/test_bins.py`` checks
``bins.py`` itself against torchvision). Only the arithmetic is transcribed; the order of
operations, the dtypes in which they happen and the rounding of every step are the same:

* RoI corners: ``x * spatial_scale`` in the bin dtype, rounded half away from zero (exactly:
  ``t = trunc(x)``, ``x - t`` is exact, add ``sign(x)`` when ``|x - t| >= 0.5``), clamped to
  ``[-COORD_LIMIT, COORD_LIMIT]``. One addition for memory safety, where ``bins.py`` is undefined:
  a NaN scaled coordinate is taken as 0 (infinities are clamped like any large value).
* RoI bin edges: ``b = extent / n`` correctly rounded in the bin dtype (``tl.math.div_rn`` for
  float32, since Triton's float32 ``/`` is approximate on GPUs; float64 ``/`` is IEEE), then
  ``floor(p * b)`` and ``ceil((p + 1) * b)`` (products only, no fused add), offset by the RoI start
  and clipped to ``[0, size]``.
* Adaptive bin edges: integer ``floor(p * size / n)``, ``ceil((p + 1) * size / n)``.

All integer results are int32: quantised corners lie in ``[-2**22, 2**22]``, extents in
``[1, 2**23 + 1]``, and edges are clipped to the map.
"""

from __future__ import annotations

import triton
import triton.language as tl

from spp_triton import bins as _bins

COORD_LIMIT = tl.constexpr(_bins.COORD_LIMIT)


@triton.jit
def round_half_away_from_zero(x):
    """C's ``round`` on a float tensor; exact (``x - trunc(x)`` is exact in floating point)."""
    t = tl.where(x < 0, tl.ceil(x), tl.floor(x))  # trunc(x)
    one = tl.where(x < 0, -1.0, 1.0).to(x.dtype)  # sign(x); only used when |x - t| >= 0.5
    return tl.where(tl.abs(x - t) >= 0.5, t + one, t)


@triton.jit
def quantize_coord(x, scale, BIN_DTYPE: tl.constexpr):
    """One box coordinate (image space) -> its quantised int32 feature-map coordinate.

    ``x`` is converted to ``BIN_DTYPE`` and multiplied by ``scale`` (already ``BIN_DTYPE``), as
    ``bins.quantize_rois`` does. NaN (a NaN coordinate, or ``inf * 0``) becomes 0.
    """
    s = x.to(BIN_DTYPE) * scale
    s = tl.where(s == s, s, 0.0)
    r = round_half_away_from_zero(s)
    r = tl.minimum(tl.maximum(r, -COORD_LIMIT), COORD_LIMIT)
    return r.to(tl.int32)


@triton.jit
def quantize_roi(x1, y1, x2, y2, scale, BIN_DTYPE: tl.constexpr):
    """``bins.quantize_rois`` for one box: ``(x0, y0, width, height)`` as int32, extents >= 1."""
    qx1 = quantize_coord(x1, scale, BIN_DTYPE)
    qy1 = quantize_coord(y1, scale, BIN_DTYPE)
    qx2 = quantize_coord(x2, scale, BIN_DTYPE)
    qy2 = quantize_coord(y2, scale, BIN_DTYPE)
    width = tl.maximum(qx2 - qx1 + 1, 1)
    height = tl.maximum(qy2 - qy1 + 1, 1)
    return qx1, qy1, width, height


@triton.jit
def bin_size(extent, n, BIN_DTYPE: tl.constexpr):
    """``extent / n`` correctly rounded in ``BIN_DTYPE`` (``n`` may be a tensor of bin counts)."""
    e = extent.to(BIN_DTYPE)
    d = n.to(BIN_DTYPE)
    if BIN_DTYPE == tl.float64:
        b = e / d  # float64 division is IEEE round-to-nearest on every backend
    else:
        b = tl.math.div_rn(e, d)
    return b


@triton.jit
def roi_bin_edges(start, extent, p, n, size, BIN_DTYPE: tl.constexpr):
    """RoI-partition edges of bins ``p`` (of ``n``) along one axis -> ``(lo, hi)`` int32, clipped.

    ``start``/``extent``: the RoI's quantised start and extent (int32 scalars); ``p``/``n``: int32
    tensors of the same shape; ``size``: the map's length on this axis.
    """
    b = bin_size(extent, n, BIN_DTYPE)
    lo = tl.floor(p.to(BIN_DTYPE) * b).to(tl.int32) + start
    hi = tl.ceil((p + 1).to(BIN_DTYPE) * b).to(tl.int32) + start
    lo = tl.minimum(tl.maximum(lo, 0), size)
    hi = tl.minimum(tl.maximum(hi, 0), size)
    return lo, hi


@triton.jit
def adaptive_bin_edges(size, p, n):
    """Adaptive-partition edges of bins ``p`` (of ``n``) of a region of ``size >= 0`` pixels.

    Computed in int64 (``p * size`` cannot overflow), returned as int32.
    """
    s = size.to(tl.int64)
    p64 = p.to(tl.int64)
    n64 = n.to(tl.int64)
    lo = (p64 * s) // n64
    hi = ((p64 + 1) * s + n64 - 1) // n64
    return lo.to(tl.int32), hi.to(tl.int32)
