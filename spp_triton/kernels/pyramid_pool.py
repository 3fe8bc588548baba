"""Triton kernels: every pyramid level of a batch of regions in one launch.

What one program computes
    Forward, grid ``(K, cdiv(C, BLOCK_C))``: program ``(k, cb)`` pools region ``k`` for channels
    ``[cb * BLOCK_C, cb * BLOCK_C + BLOCK_C)`` at *all* pyramid levels, **one lane per channel**.
    Every lane of a program works on the same region, so bin edges and loop bounds are uniform
    scalars: a lane walks each rectangle it pools serially (rows, then columns), with no masks, no
    shuffles and no barriers; the column loop is the hot loop (``tl.maximum`` with NaN propagation,
    i.e. ``FMNMX.NAN``, or an add, per element; LLVM unrolls it four times).

    Max pools a rectangle in two passes: the maximum of each row (NaN-propagating) and the first
    row whose maximum beats the best so far (strict ``>``; a NaN row beats every non-NaN row); then
    one re-scan of that row, right to left, for its first element equal to the maximum (or its
    first NaN). So the argmax is the first maximum in row-major order -- torchvision's rule --
    without an index select per element, and the value is that element bit for bit (``-0.0``).

    Levels that nest (every coarse bin is a union of finest bins: ``bh``, ``bw`` divide those of
    a finer level in the set, e.g. {1, 2, 4} or {1, 2, 3, 6}) are pooled from the finest level's
    *cells*: each cell is pooled once, stored as a finest-level output, and folded into its coarse
    bins, which a lane keeps in registers (``[NB, BLOCK_C]`` tensors whose bin axis is in-thread,
    so each fold is a handful of instructions on registers known at compile time). The fold
    compares (key, flat index): the key is the value's order-preserving integer image with
    ``-0.0 == +0.0`` and every NaN above ``+inf``, so the fold keeps the first maximum (or first
    NaN) in row-major order even though cells are visited cell by cell. Overlapping cells (floor /
    ceil edges share a pixel) are harmless for a maximum. torchvision's float partition does not
    always nest (e.g. 14 bins over an extent of 57 pixels), so the union edges are checked against
    each coarse bin's own edges per region; when any differs, those levels are pooled directly.
    Every other level (and every level of avg, where overlapping cells would count a pixel twice)
    is pooled directly, bin by bin, in a runtime loop.

    Feature maps (FPN levels): the maps' pointers are a tuple argument; their sizes and strides are
    rows of a small int64 tensor and their spatial scales a float64 tensor, so nothing about a map's
    size is compiled in (one variant serves every image size). A program selects its region's map
    with scalar selects, so any number of maps is one launch. The level set, mode, partition,
    number of maps and whether the maps' width stride is 1 are ``tl.constexpr``.

    Backward, max: grid ``(K, cdiv(C * P, BLOCK))``, one lane per output element (coalesced reads
    of ``grad_out`` and ``argmax``): it finds its channel from its position and adds its gradient
    onto its argmax with a relaxed atomic (no memory fence). Avg: grid as the forward, one lane per
    channel, bin by bin: ``g / count`` added with relaxed atomics onto every in-map pixel of the
    bin. Gradients accumulate in float32 (float64 for float64 maps) buffers, cast to the map dtype
    afterwards. Atomics make this path non-deterministic in the last bits for float32 sums; a
    deterministic path exists elsewhere.

Memory read and written
    Reads: the region row (``regions[k]``, ``feature_index[k]``), the map table row of its map, and
    the elements of the one map the region reads inside its bins (through its strides; any layout);
    each element once per *finest* bin containing it for nested max levels, once per bin otherwise;
    plus one row per pooled rectangle again for the argmax. Writes: ``out[k, :]`` / ``argmax[k, :]``
    for the program's channels, layout level-major in the given order, then channel, row, column
    (``bins.level_offsets``). Backward reads ``grad_out`` (and ``argmax``) at the same places and
    writes only gradient buffer elements inside the region's bins (avg) or at ``argmax`` (max).

Rules
    * Ties (max): the first maximal element in row-major order (h, then w) within the bin wins --
      torchvision's rule. ``argmax`` is the flat index ``h * W + w`` in the (batch, channel) plane
      of the map the region reads.
    * NaN (max): propagates. A bin containing a NaN outputs NaN and its argmax is the bin's first
      NaN in row-major order. (torchvision's ``roi_pool`` skips NaN; this does not.)
    * ``-inf``: an ordinary value; a bin of ``-inf`` gives ``-inf`` with argmax at its first
      element. (torchvision's ``roi_pool`` gives ``-FLT_MAX`` and argmax -1 there.)
    * Empty bin (clipped to nothing): output 0, argmax -1, no gradient. Avg divides the sum by the
      number of in-map pixels of the bin.

Memory safety
    No region value can make a program read or write outside the tensors: a region whose batch
    index is not in ``[0, N)`` (or is NaN), or whose ``feature_index`` is not in ``[0, F)``, is
    all-empty (zeros, argmax -1, no gradient); NaN coordinates count as 0, infinite or huge ones
    are clamped to ``COORD_LIMIT``, adaptive sizes to the map; every bin is clipped to its map
    before any load; lanes past the last channel read the last channel (their stores are masked);
    addresses are computed in int64. Backward ignores argmax values outside the plane. Assumed, not
    checked: a plane has fewer than ``2**31`` elements (argmax is int32).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from spp_triton import bins as _bins
from spp_triton.kernels.bins import adaptive_bin_edges, quantize_roi, roi_bin_edges

MAX_FEATURE_MAPS = 5  # what the library supports (FPN P2-P6); the kernels take any number

_BIG = tl.constexpr(2**31 - 1)  # "no element" in a fold's index
_META = tl.constexpr(6)  # map table row: H, W, stride N, stride C, stride H, stride W

# Level roles (constexpr per level, chosen on the host): pooled directly bin by bin; the finest
# level of a nested group (pooled cell by cell); a coarse level folded from its group's cells.
DIRECT, FINE, COARSE = 0, 1, 2
_FINE = tl.constexpr(FINE)
_COARSE = tl.constexpr(COARSE)
_DIRECT = tl.constexpr(DIRECT)

# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick(fi, values, NUM_F: tl.constexpr):
    """``values[fi]`` for a scalar runtime ``fi`` (``values[0]`` when ``fi`` is out of range)."""
    v = values[0]
    for f in tl.static_range(1, NUM_F):
        v = tl.where(fi == f, values[f], v)
    return v


@triton.jit
def _region_header(
    k,
    reg_ptr,
    reg_s0,
    reg_s1,
    fidx_ptr,
    fidx_s0,
    N,
    meta_ptr,
    scale_ptr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Resolve region ``k``: ``(ok, fi, b, H, W, row0, rows, col0, cols)``.

    ``ok``: the batch and feature indices are valid (else the region is all-empty); ``fi``: the map
    it reads (0 when not ``ok``); ``b``: int64 batch index (0 when not ``ok``); ``H, W``: that
    map's size (int32). RoI: the quantised RoI start and extent per axis
    (``bins.quantize_rois``). Adaptive: ``(0, h, 0, w)`` with ``h, w`` clamped to the map.
    """
    fi = tl.load(fidx_ptr + k * fidx_s0).to(tl.int64)
    ok = (fi >= 0) & (fi < NUM_F)
    fi = tl.where(ok, fi, 0)
    H = tl.load(meta_ptr + fi * _META).to(tl.int32)
    W = tl.load(meta_ptr + fi * _META + 1).to(tl.int32)
    row_ptr = reg_ptr + k * reg_s0
    if ROI:
        bf = tl.load(row_ptr).to(BIN_DTYPE)
        # trunc(bf) in [0, N) as torchvision's int cast reads it; false for NaN.
        ok = ok & (bf > -1.0) & (bf < N)
        b = tl.where(ok, bf, 0.0).to(tl.int64)
        scale = tl.load(scale_ptr + fi).to(BIN_DTYPE)
        x1 = tl.load(row_ptr + reg_s1)
        y1 = tl.load(row_ptr + 2 * reg_s1)
        x2 = tl.load(row_ptr + 3 * reg_s1)
        y2 = tl.load(row_ptr + 4 * reg_s1)
        col0, row0, cols, rows = quantize_roi(x1, y1, x2, y2, scale, BIN_DTYPE)
    else:
        bi = tl.load(row_ptr).to(tl.int64)
        ok = ok & (bi >= 0) & (bi < N)
        b = tl.where(ok, bi, 0)
        hh = tl.load(row_ptr + reg_s1).to(tl.int64)
        ww = tl.load(row_ptr + 2 * reg_s1).to(tl.int64)
        rows = tl.minimum(tl.maximum(hh, 0), H).to(tl.int32)
        cols = tl.minimum(tl.maximum(ww, 0), W).to(tl.int32)
        row0 = 0
        col0 = 0
    return ok, fi, b, H, W, row0, rows, col0, cols


@triton.jit
def _edges(start, extent, p, n: tl.constexpr, size, ok, ROI: tl.constexpr, BIN_DTYPE: tl.constexpr):
    """Clipped ``[lo, hi)`` of bin ``p`` (int32 scalar) of ``n`` on an axis; empty unless ``ok``."""
    pp = p + tl.zeros([], tl.int32)  # p: a static or a runtime index
    nn = tl.full([], n, tl.int32)
    if ROI:
        lo, hi = roi_bin_edges(start, extent, pp, nn, size, BIN_DTYPE)
    else:
        lo, hi = adaptive_bin_edges(extent, pp, nn)
    lo = tl.where(ok, lo, 0)
    hi = tl.where(ok, hi, 0)
    return lo, hi


@triton.jit
def _div(num, den, ACC_DTYPE: tl.constexpr):
    """Correctly rounded ``num / den`` in ``ACC_DTYPE`` (float32 ``/`` is approximate on GPUs)."""
    d = den.to(ACC_DTYPE)
    if ACC_DTYPE == tl.float64:
        q = num / d
    else:
        q = tl.math.div_rn(num, d)
    return q


@triton.jit
def _rect_max(
    plane,
    s_h,
    s_w,
    W,
    rlo,
    rhi,
    clo,
    chi,
    UNIT_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per lane, the maximum of ``[rlo, rhi) x [clo, chi)`` of its plane: ``(value, index)``.

    ``index`` is the flat ``h * W + w`` of the first maximum (or first NaN) in row-major order,
    ``-1`` for an empty rectangle; ``value`` is that element, bit for bit (in ``ACC_DTYPE``).
    """
    nonempty = (rlo < rhi) & (clo < chi)
    best = tl.full([BLOCK_C], float("-inf"), ACC_DTYPE)
    brow = tl.zeros([BLOCK_C], tl.int32) + tl.where(nonempty, rlo, -1)
    for h in range(rlo, rhi):
        row = plane + h * s_h
        m = tl.full([BLOCK_C], float("-inf"), ACC_DTYPE)
        for w in range(clo, chi):  # the hot loop: one load and one max per element
            if UNIT_W:
                x = tl.load(row + w)
            else:
                x = tl.load(row + w * s_w)
            m = tl.maximum(m, x.to(ACC_DTYPE), propagate_nan=tl.PropagateNan.ALL)
        # Strict '>' keeps the earlier row; the first NaN row wins over everything after it.
        take = (m > best) | ((m != m) & (best == best))
        best = tl.where(take, m, best)
        brow = tl.where(take, h, brow)
    # The first element of row `brow` equal to `best` (its first NaN when `best` is NaN; then no
    # element equals `best`, and a non-NaN best's row has no NaN), scanning right to left.
    last = chi - 1
    if UNIT_W:
        end = plane + tl.maximum(brow, 0).to(tl.int64) * s_h + last
    else:
        end = plane + tl.maximum(brow, 0).to(tl.int64) * s_h + last.to(tl.int64) * s_w
    ncol = tl.where(nonempty, chi - clo, 0)
    bcol = tl.full([BLOCK_C], -1, tl.int32)
    value = best
    for t in range(0, ncol):
        if UNIT_W:
            x = tl.load(end - t).to(ACC_DTYPE)
        else:
            x = tl.load(end - t * s_w).to(ACC_DTYPE)
        hit = (x == best) | (x != x)
        bcol = tl.where(hit, last - t, bcol)
        value = tl.where(hit, x, value)
    index = tl.where(bcol >= 0, brow * W + bcol, -1)
    return value, index


@triton.jit
def _rect_sum(
    plane,
    s_h,
    s_w,
    rlo,
    rhi,
    clo,
    chi,
    UNIT_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per lane, the sum of ``[rlo, rhi) x [clo, chi)`` of its plane in ``ACC_DTYPE``."""
    acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    for h in range(rlo, rhi):
        row = plane + h * s_h
        for w in range(clo, chi):  # the hot loop: one load and one add per element
            if UNIT_W:
                x = tl.load(row + w)
            else:
                x = tl.load(row + w * s_w)
            acc += x.to(ACC_DTYPE)
    return acc


@triton.jit
def _order_key(value, index, ACC_DTYPE: tl.constexpr):
    """An integer that orders like ``value`` (``-0.0 == +0.0``; every NaN above ``+inf``), and
    below every value's key where ``index < 0`` (an empty cell)."""
    if ACC_DTYPE == tl.float64:
        bits = (value + 0.0).to(tl.int64, bitcast=True)  # + 0.0 turns -0.0 into +0.0
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        key = tl.where(value != value, 0x7FFFFFFFFFFFFFFF, key)
        key = tl.where(index < 0, -0x7FFFFFFFFFFFFFFF - 1, key)
    else:
        bits = (value + 0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(value != value, 0x7FFFFFFF, key)
        key = tl.where(index < 0, -0x7FFFFFFF - 1, key)
    return key


@triton.jit
def _union_matches(
    start,
    extent,
    q,
    n: tl.constexpr,
    fine_n: tl.constexpr,
    size,
    ok,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Whether bin ``q`` of ``n`` spans exactly the bins of ``fine_n`` it contains."""
    r: tl.constexpr = fine_n // n
    lo, hi = _edges(start, extent, q, n, size, ok, ROI, BIN_DTYPE)
    flo, _ = _edges(start, extent, q * r, fine_n, size, ok, ROI, BIN_DTYPE)
    _, fhi = _edges(start, extent, q * r + r - 1, fine_n, size, ok, ROI, BIN_DTYPE)
    return (lo == flo) & (hi == fhi)


@triton.jit
def _nested(
    row0,
    rows,
    col0,
    cols,
    H,
    W,
    ok,
    LH: tl.constexpr,
    LW: tl.constexpr,
    ROLE: tl.constexpr,
    GROUP: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Whether every coarse bin's edges equal the union of its finest cells' (RoI partition:
    float edges may not nest; the adaptive partition always does)."""
    nested = ok | (ok == 0)  # a scalar True
    if ROI:
        for lv in tl.static_range(len(LH)):
            if ROLE[lv] == _COARSE:
                nested = nested & _axis_nests(
                    row0, rows, H, ok, LH[lv], LH[GROUP[lv]], ROI, BIN_DTYPE
                )
                nested = nested & _axis_nests(
                    col0, cols, W, ok, LW[lv], LW[GROUP[lv]], ROI, BIN_DTYPE
                )
    return nested


@triton.jit
def _axis_nests(
    start,
    extent,
    size,
    ok,
    N: tl.constexpr,
    FINE_N: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Whether every bin of ``N`` on this axis spans exactly the ``FINE_N`` bins it contains.

    (Level sizes reach the static loops as constexpr parameters: Triton 3.6 does not treat an
    element of a constexpr tuple as a constexpr.)"""
    nests = ok | (ok == 0)
    for q in tl.static_range(N):
        nests = nests & _union_matches(start, extent, q, N, FINE_N, size, ok, ROI, BIN_DTYPE)
    return nests


@triton.jit
def _fold(acc_k, acc_i, acc_v, j, key, index, value, BIN: tl.constexpr):
    """Fold one cell ``(key, index, value)`` (``[1, BLOCK_C]``) into accumulator row ``BIN``:
    a larger key wins, an equal key goes to the smaller (earlier in row-major order) index."""
    better = (j == BIN) & ((key > acc_k) | ((key == acc_k) & (index < acc_i)))
    acc_k = tl.where(better, key, acc_k)
    acc_i = tl.where(better, index, acc_i)
    acc_v = tl.where(better, value[None, :], acc_v)
    return acc_k, acc_i, acc_v


@triton.jit
def _pool_nested_group(
    out_ptr,
    argmax_ptr,
    out_base,
    C,
    n_rows,
    c64,
    cmask,
    plane,
    s_h,
    s_w,
    H,
    W,
    ok,
    row0,
    rows,
    col0,
    cols,
    G: tl.constexpr,
    FH: tl.constexpr,
    FW: tl.constexpr,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    ROLE: tl.constexpr,
    GROUP: tl.constexpr,
    ACC_ROW: tl.constexpr,
    ACC_ROWS: tl.constexpr,
    ROI: tl.constexpr,
    WITH_ARGMAX: tl.constexpr,
    UNIT_W: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Level ``G`` cell by cell (rows ``[0, n_rows)``, a runtime loop; columns unrolled), each
    cell stored and folded into the current row of bins of every coarse level of its group.

    The accumulators hold one row of bins per coarse level (rows ``ACC_ROW[l] + pw``, in-thread);
    a coarse row is stored and reset after the last cell row it covers.
    """
    out_ty = out_ptr.dtype.element_ty
    j = tl.arange(0, ACC_ROWS)[:, None]
    if ACC_DTYPE == tl.float64:
        empty_key = -(2**63)
        acc_k = tl.full([ACC_ROWS, BLOCK_C], empty_key, tl.int64)
    else:
        empty_key = -(2**31)
        acc_k = tl.full([ACC_ROWS, BLOCK_C], empty_key, tl.int32)
    acc_i = tl.full([ACC_ROWS, BLOCK_C], _BIG, tl.int32)
    acc_v = tl.zeros([ACC_ROWS, BLOCK_C], ACC_DTYPE)
    for p in range(0, n_rows):
        rlo, rhi = _edges(row0, rows, p, FH, H, ok, ROI, BIN_DTYPE)
        for q in tl.static_range(FW):
            clo, chi = _edges(col0, cols, q, FW, W, ok, ROI, BIN_DTYPE)
            v, i = _rect_max(plane, s_h, s_w, W, rlo, rhi, clo, chi, UNIT_W, ACC_DTYPE, BLOCK_C)
            dst = out_base + POFF[G] * C + c64 * (FH * FW) + (p * FW + q)
            tl.store(out_ptr + dst, tl.where(i >= 0, v, 0.0).to(out_ty), mask=cmask)
            if WITH_ARGMAX:
                tl.store(argmax_ptr + dst, i, mask=cmask)
            key = _order_key(v, i, ACC_DTYPE)[None, :]
            ii = tl.where(i >= 0, i, _BIG)[None, :]
            for lv in tl.static_range(len(LH)):
                if ROLE[lv] == _COARSE and GROUP[lv] == G:
                    acc_k, acc_i, acc_v = _fold(
                        acc_k, acc_i, acc_v, j, key, ii, v, ACC_ROW[lv] + q // (FW // LW[lv])
                    )
        for lv in tl.static_range(len(LH)):
            if ROLE[lv] == _COARSE and GROUP[lv] == G:
                done = (p % (FH // LH[lv])) == (FH // LH[lv]) - 1  # last cell row of a bin row
                _store_coarse_row(
                    out_ptr,
                    argmax_ptr,
                    out_base
                    + POFF[lv] * C
                    + c64 * (LH[lv] * LW[lv])
                    + (p // (FH // LH[lv])) * LW[lv],
                    cmask & done,
                    j,
                    acc_i,
                    acc_v,
                    ACC_ROW[lv],
                    LW[lv],
                    WITH_ARGMAX,
                    ACC_DTYPE,
                )
                mine = (j >= ACC_ROW[lv]) & (j < ACC_ROW[lv] + LW[lv])
                acc_k = tl.where(mine & done, empty_key, acc_k)
                acc_i = tl.where(mine & done, _BIG, acc_i)


@triton.jit
def _store_coarse_row(
    out_ptr,
    argmax_ptr,
    row_dst,
    mask,
    j,
    acc_i,
    acc_v,
    ROW0: tl.constexpr,
    BW: tl.constexpr,
    WITH_ARGMAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Store accumulator rows ``[ROW0, ROW0 + BW)`` (one row of a coarse level's bins) at
    ``row_dst + pw``; each row is read in-thread, its value bits exactly."""
    for pw in tl.static_range(BW):
        sel = j == ROW0 + pw
        idx = tl.sum(tl.where(sel, acc_i, 0), axis=0)
        if ACC_DTYPE == tl.float64:
            bits = tl.sum(tl.where(sel, acc_v.to(tl.int64, bitcast=True), 0), axis=0)
            val = bits.to(tl.float64, bitcast=True)
        else:
            bits = tl.sum(tl.where(sel, acc_v.to(tl.int32, bitcast=True), 0), axis=0)
            val = bits.to(tl.float32, bitcast=True)
        found = idx != _BIG
        value = tl.where(found, val, 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row_dst + pw, value, mask=mask)
        if WITH_ARGMAX:
            tl.store(argmax_ptr + row_dst + pw, tl.where(found, idx, -1), mask=mask)


@triton.jit
def _bin_edges_rt(
    row0,
    rows,
    col0,
    cols,
    t,
    H,
    W,
    ok,
    BH: tl.constexpr,
    BW: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Clipped edges ``(rlo, rhi, clo, chi)`` of bin ``t`` (runtime, row-major) of a level;
    empty unless ``ok``."""
    ph = t // BW
    pw = t % BW
    if ROI:
        rlo, rhi = roi_bin_edges(row0, rows, ph, tl.full([], BH, tl.int32), H, BIN_DTYPE)
        clo, chi = roi_bin_edges(col0, cols, pw, tl.full([], BW, tl.int32), W, BIN_DTYPE)
    else:
        rlo, rhi = adaptive_bin_edges(rows, ph, tl.full([], BH, tl.int32))
        clo, chi = adaptive_bin_edges(cols, pw, tl.full([], BW, tl.int32))
    rlo = tl.where(ok, rlo, 0)
    rhi = tl.where(ok, rhi, 0)
    return rlo, rhi, clo, chi


@triton.jit
def _pool_level(
    out_ptr,
    argmax_ptr,
    level_base,
    count,
    c64,
    cmask,
    plane,
    s_h,
    s_w,
    H,
    W,
    ok,
    row0,
    rows,
    col0,
    cols,
    BH: tl.constexpr,
    BW: tl.constexpr,
    ROI: tl.constexpr,
    IS_MAX: tl.constexpr,
    WITH_ARGMAX: tl.constexpr,
    UNIT_W: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Pool bins ``[0, count)`` of a ``BH x BW`` level directly, one rectangle each."""
    for t in range(0, count):
        rlo, rhi, clo, chi = _bin_edges_rt(
            row0, rows, col0, cols, t, H, W, ok, BH, BW, ROI, BIN_DTYPE
        )
        dst = level_base + c64 * (BH * BW) + t
        if IS_MAX:
            v, i = _rect_max(plane, s_h, s_w, W, rlo, rhi, clo, chi, UNIT_W, ACC_DTYPE, BLOCK_C)
            tl.store(
                out_ptr + dst, tl.where(i >= 0, v, 0.0).to(out_ptr.dtype.element_ty), mask=cmask
            )
            if WITH_ARGMAX:
                tl.store(argmax_ptr + dst, i, mask=cmask)
        else:
            s = _rect_sum(plane, s_h, s_w, rlo, rhi, clo, chi, UNIT_W, ACC_DTYPE, BLOCK_C)
            n = tl.maximum(rhi - rlo, 0) * tl.maximum(chi - clo, 0)
            mean = tl.where(n > 0, _div(s, tl.maximum(n, 1), ACC_DTYPE), 0.0)
            tl.store(out_ptr + dst, mean.to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _pyramid_pool_fwd_kernel(
    out_ptr,
    argmax_ptr,
    out_row,
    reg_ptr,
    reg_s0,
    reg_s1,
    fidx_ptr,
    fidx_s0,
    N,
    C,
    X,
    meta_ptr,
    scale_ptr,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    ROLE: tl.constexpr,
    GROUP: tl.constexpr,
    ACC_ROW: tl.constexpr,
    ACC_ROWS: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    IS_MAX: tl.constexpr,
    WITH_ARGMAX: tl.constexpr,
    UNIT_W: tl.constexpr,
    EVEN_C: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:  # no lane past the channels: no mask to keep alive
        cmask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cmask = c < C
    c64 = c.to(tl.int64)
    c_read = tl.minimum(c, C - 1).to(tl.int64)  # lanes past C read channel C - 1, store nothing

    ok, fi, b, H, W, row0, rows, col0, cols = _region_header(
        k, reg_ptr, reg_s0, reg_s1, fidx_ptr, fidx_s0, N, meta_ptr, scale_ptr, NUM_F, ROI, BIN_DTYPE
    )
    row_meta = meta_ptr + fi * _META
    s_h = tl.load(row_meta + 4)
    s_w = tl.load(row_meta + 5)
    plane = _pick(fi, X, NUM_F) + b * tl.load(row_meta + 2) + c_read * tl.load(row_meta + 3)
    out_base = k * out_row

    # Nested max levels: the finest level's cells, folded into the coarse bins of their group.
    fast = _nested(row0, rows, col0, cols, H, W, ok, LH, LW, ROLE, GROUP, ROI, BIN_DTYPE)
    if ACC_ROWS > 0:
        for g in tl.static_range(len(LH)):
            if ROLE[g] == _FINE:
                _pool_nested_group(
                    out_ptr,
                    argmax_ptr,
                    out_base,
                    C,
                    tl.where(fast, LH[g], 0),
                    c64,
                    cmask,
                    plane,
                    s_h,
                    s_w,
                    H,
                    W,
                    ok,
                    row0,
                    rows,
                    col0,
                    cols,
                    g,
                    LH[g],
                    LW[g],
                    LH,
                    LW,
                    POFF,
                    ROLE,
                    GROUP,
                    ACC_ROW,
                    ACC_ROWS,
                    ROI,
                    WITH_ARGMAX,
                    UNIT_W,
                    BIN_DTYPE,
                    ACC_DTYPE,
                    BLOCK_C,
                )

    # Every other level (and the nested ones where the float partition does not nest): bin by
    # bin, each bin its own rectangle.
    for lv in tl.static_range(len(LH)):
        if ROLE[lv] == _DIRECT:
            count = tl.full([], LH[lv] * LW[lv], tl.int32)
        else:
            count = tl.where(fast, 0, LH[lv] * LW[lv])
        _pool_level(
            out_ptr,
            argmax_ptr,
            out_base + POFF[lv] * C,
            count,
            c64,
            cmask,
            plane,
            s_h,
            s_w,
            H,
            W,
            ok,
            row0,
            rows,
            col0,
            cols,
            LH[lv],
            LW[lv],
            ROI,
            IS_MAX,
            WITH_ARGMAX,
            UNIT_W,
            BIN_DTYPE,
            ACC_DTYPE,
            BLOCK_C,
        )


@triton.jit(do_not_specialize=["N"])
def _pyramid_pool_bwd_max_kernel(
    grad_ptr,
    g_s0,
    g_s1,
    argmax_ptr,
    a_s0,
    a_s1,
    reg_ptr,
    reg_s0,
    reg_s1,
    fidx_ptr,
    fidx_s0,
    N,
    C,
    G,
    meta_ptr,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    DENSE: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # flat position in out[k]
    # Channel of each position: its level's block starts at C * POFF[l], bh * bw per channel.
    chan = tl.zeros([BLOCK], tl.int32)
    inside = pos < 0
    for lv in tl.static_range(len(LH)):
        rel = pos - C * POFF[lv]
        here = (rel >= 0) & (rel < C * (LH[lv] * LW[lv]))
        chan = tl.where(here, rel // (LH[lv] * LW[lv]), chan)
        inside = inside | here
    fi = tl.load(fidx_ptr + k * fidx_s0).to(tl.int64)
    ok = (fi >= 0) & (fi < NUM_F)
    fi = tl.where(ok, fi, 0)
    row_ptr = reg_ptr + k * reg_s0
    if ROI:
        bf = tl.load(row_ptr).to(BIN_DTYPE)
        ok = ok & (bf > -1.0) & (bf < N)
        b = tl.where(ok, bf, 0.0).to(tl.int64)
    else:
        bi = tl.load(row_ptr).to(tl.int64)
        ok = ok & (bi >= 0) & (bi < N)
        b = tl.where(ok, bi, 0)
    row_meta = meta_ptr + fi * _META
    H = tl.load(row_meta).to(tl.int32)
    W = tl.load(row_meta + 1).to(tl.int32)
    m = inside & ok
    a = tl.load(argmax_ptr + k * a_s0 + pos.to(tl.int64) * a_s1, mask=m, other=-1)
    g = tl.load(grad_ptr + k * g_s0 + pos.to(tl.int64) * g_s1, mask=m, other=0.0).to(ACC_DTYPE)
    hit = m & (a >= 0) & (a < H * W)
    plane = (
        _pick(fi, G, NUM_F) + b * tl.load(row_meta + 2) + chan.to(tl.int64) * tl.load(row_meta + 3)
    )
    if DENSE:  # the buffer's planes are dense rows: the argmax is the offset
        dst = plane + a.to(tl.int64)
    else:
        wdiv = tl.maximum(W, 1)
        dst = (
            plane
            + (a // wdiv).to(tl.int64) * tl.load(row_meta + 4)
            + (a % wdiv).to(tl.int64) * tl.load(row_meta + 5)
        )
    tl.atomic_add(dst, g, mask=hit, sem="relaxed")


@triton.jit(do_not_specialize=["N"])
def _pyramid_pool_bwd_avg_kernel(
    grad_ptr,
    g_s0,
    g_s1,
    reg_ptr,
    reg_s0,
    reg_s1,
    fidx_ptr,
    fidx_s0,
    N,
    C,
    G,
    meta_ptr,
    scale_ptr,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    UNIT_W: tl.constexpr,
    EVEN_C: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:  # no lane past the channels: no mask to keep alive
        cmask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cmask = c < C
    c64 = c.to(tl.int64)
    ok, fi, b, H, W, row0, rows, col0, cols = _region_header(
        k, reg_ptr, reg_s0, reg_s1, fidx_ptr, fidx_s0, N, meta_ptr, scale_ptr, NUM_F, ROI, BIN_DTYPE
    )
    row_meta = meta_ptr + fi * _META
    s_h = tl.load(row_meta + 4)
    s_w = tl.load(row_meta + 5)
    plane = _pick(fi, G, NUM_F) + b * tl.load(row_meta + 2) + c64 * tl.load(row_meta + 3)
    for lv in tl.static_range(len(LH)):
        _spread_level(
            grad_ptr + k * g_s0,
            g_s1,
            (POFF[lv] * C + c64 * (LH[lv] * LW[lv])),
            tl.where(ok, LH[lv] * LW[lv], 0),
            cmask,
            plane,
            s_h,
            s_w,
            H,
            W,
            ok,
            row0,
            rows,
            col0,
            cols,
            LH[lv],
            LW[lv],
            ROI,
            UNIT_W,
            BIN_DTYPE,
            ACC_DTYPE,
        )


@triton.jit
def _spread_level(
    grad_row,
    g_s1,
    level_pos,
    count,
    cmask,
    plane,
    s_h,
    s_w,
    H,
    W,
    ok,
    row0,
    rows,
    col0,
    cols,
    BH: tl.constexpr,
    BW: tl.constexpr,
    ROI: tl.constexpr,
    UNIT_W: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Avg backward of bins ``[0, count)`` of a level: ``g / n`` onto each of a bin's pixels."""
    for t in range(0, count):
        rlo, rhi, clo, chi = _bin_edges_rt(
            row0, rows, col0, cols, t, H, W, ok, BH, BW, ROI, BIN_DTYPE
        )
        n = tl.maximum(rhi - rlo, 0) * tl.maximum(chi - clo, 0)
        g = tl.load(grad_row + (level_pos + t) * g_s1, mask=cmask & (n > 0), other=0.0)
        share = _div(g.to(ACC_DTYPE), tl.maximum(n, 1), ACC_DTYPE)
        for h in range(rlo, rhi):
            row = plane + h * s_h
            for w in range(clo, chi):  # the hot loop: one relaxed atomic per element
                if UNIT_W:
                    tl.atomic_add(row + w, share, mask=cmask, sem="relaxed")
                else:
                    tl.atomic_add(row + w * s_w, share, mask=cmask, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


class Launch(NamedTuple):
    """One kernel launch, fully resolved: ``kernel[grid](*args, **kwargs)`` runs it.

    ``outputs`` are the tensors it writes (forward: ``(out, argmax)``; backward: the gradient
    buffers). The SASS report and the compile tests build the same launches without a GPU.
    """

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    outputs: tuple


def level_roles(levels, mode: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(ROLE, GROUP)`` per level: how the forward pools it (``DIRECT``, ``FINE``, ``COARSE``)
    and, for a coarse level, the index of the finest level it is folded from.

    Max only: levels are taken finest first (most bins); a level joins the first group whose
    finest level it divides on both axes, else it starts a group. A group of one level is direct.
    """
    n = len(levels)
    role, group = [DIRECT] * n, list(range(n))
    if mode != "max":
        return tuple(role), tuple(group)
    order = sorted(range(n), key=lambda i: (-levels[i][0] * levels[i][1], i))
    finest: list[int] = []
    for i in order:
        bh, bw = levels[i]
        for f in finest:
            fh, fw = levels[f]
            if fh % bh == 0 and fw % bw == 0 and (fh, fw) != (bh, bw):
                group[i] = f
                break
        else:
            finest.append(i)
    for i in range(n):
        if group[i] != i:
            role[i], role[group[i]] = COARSE, FINE
    return tuple(role), tuple(group)


def _level_meta(levels, mode: str) -> dict:
    lh = tuple(int(bh) for bh, _ in levels)
    lw = tuple(int(bw) for _, bw in levels)
    poff, p = [], 0
    for bh, bw in zip(lh, lw, strict=True):
        poff.append(p)
        p += bh * bw
    role, group = level_roles(list(zip(lh, lw, strict=True)), mode)
    # Accumulator rows of each coarse level (one row of its bins) in its group's accumulator.
    acc_row, used = [0] * len(lh), {}
    for i, r in enumerate(role):
        if r == COARSE:
            acc_row[i] = used.get(group[i], 0)
            used[group[i]] = acc_row[i] + lw[i]
    rows = max(used.values(), default=0)
    return dict(
        LH=lh,
        LW=lw,
        POFF=tuple(poff),
        ROLE=role,
        GROUP=group,
        ACC_ROW=tuple(acc_row),
        ACC_ROWS=triton.next_power_of_2(rows) if rows else 0,
    )


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _map_table(maps: list[torch.Tensor], spatial_scales, partition: str, device):
    """``(meta, scales)``: int64 ``[F, 6]`` (H, W and the four strides) and float64 ``[F]``.

    Cached per device and content (a training run sees few distinct shapes), so a call does not
    pay a host-to-device copy.
    """
    scales = spatial_scales if partition == "roi" else [0.0] * len(maps)
    rows = tuple((int(f.shape[2]), int(f.shape[3]), *(int(s) for s in f.stride())) for f in maps)
    key = (str(device), rows, tuple(float(s) for s in scales))
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) >= 256:
            _TABLES.clear()
        meta = torch.tensor(rows, dtype=torch.int64).to(device)
        scale = torch.tensor(key[2], dtype=torch.float64).to(device)
        hit = _TABLES[key] = (meta, scale)
    return hit


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return _bins.bin_dtype_for(dtype)


def _region_maps(feature_index: torch.Tensor | None, k: int, device) -> torch.Tensor:
    """``feature_index``, or for one map (``None``) a stride-0 zero vector of length ``k``: every
    region reads map 0 and no ``[K]`` tensor is built."""
    if feature_index is not None:
        return feature_index
    return torch.zeros(1, dtype=torch.int64, device=device).expand(k)


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _block_c(channels: int, regions: int) -> int:
    """Channels (lanes) per program: up to 128, fewer (down to 32) when there are too few
    programs to fill a GPU, and no more than the channels rounded up to a power of two."""
    block = min(128, triton.next_power_of_2(max(channels, 1)))
    while block > 32 and regions * triton.cdiv(channels, block) < 1024:
        block //= 2
    return block


_MAX_REGISTERS = 128


def _num_warps(block: int) -> int:
    return max(1, min(4, block // 32))


def forward_launch(
    features, regions, feature_index, spatial_scales, levels, mode, partition, with_argmax=True
) -> Launch:
    """The forward launch for these inputs (see ``pyramid_pool_forward``)."""
    f0 = features[0]
    n, c = int(f0.shape[0]), int(f0.shape[1])
    k = int(regions.shape[0])
    feature_index = _region_maps(feature_index, k, regions.device)
    meta = _level_meta(levels, mode)
    p = _bins.pyramid_width(levels)
    is_max = mode == "max"
    with_argmax = with_argmax and is_max
    out = torch.empty((k, c * p), dtype=f0.dtype, device=f0.device)
    argmax = torch.empty((k, c * p) if with_argmax else (0,), dtype=torch.int32, device=f0.device)
    acc = _acc_dtype(f0.dtype)
    table, scales = _map_table(features, spatial_scales, partition, f0.device)
    block_c = _block_c(c, k)
    args = (
        out,
        argmax if with_argmax else out,
        c * p,
        regions,
        int(regions.stride(0)),
        int(regions.stride(1)),
        feature_index,
        int(feature_index.stride(0)),
        n,
        c,
        tuple(features),
        table,
        scales,
    )
    kwargs = dict(
        **meta,
        NUM_F=len(features),
        ROI=partition == "roi",
        IS_MAX=is_max,
        WITH_ARGMAX=with_argmax,
        UNIT_W=all(int(f.stride(3)) == 1 for f in features),
        EVEN_C=c % block_c == 0,
        BIN_DTYPE=_TL_DTYPE[acc],
        ACC_DTYPE=_TL_DTYPE[acc],
        BLOCK_C=block_c,
        num_warps=_num_warps(block_c),
        # A register ceiling makes ptxas allocate freely below it; without one it keeps some of
        # these kernels at 80 registers and spills predicates to the stack.
        maxnreg=_MAX_REGISTERS,
    )
    grid = (k, triton.cdiv(c, block_c))
    return Launch(_pyramid_pool_fwd_kernel, grid, args, kwargs, (out, argmax))


def pyramid_pool_forward(
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    spatial_scales: list[float],
    levels: list[tuple[int, int]],
    mode: str,
    partition: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every region at every level in one launch; see the module docstring.

    Returns ``(out [K, C * P], argmax [K, C * P] int32)`` for max, ``(out, empty int32)`` for avg
    and for max with ``with_argmax=False`` (no gradient will be needed; argmax is not stored).
    No validation: the ops layer checks shapes, dtypes and devices.
    """
    launch = forward_launch(
        features, regions, feature_index, spatial_scales, levels, mode, partition, with_argmax
    )
    out, argmax = launch.outputs
    if out.numel() > 0:
        with _device_ctx(out.device):
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    return out, argmax


def _grad_buffer(f: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed gradient accumulator for map ``f``: channels_last if ``f`` is, else contiguous.

    (``f`` may be a zero-stride stand-in that only carries the shape.)
    """
    channels_last = (
        f.dim() == 4
        and not f.is_contiguous()
        and f.is_contiguous(memory_format=torch.channels_last)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(f.shape, dtype=dtype, device=f.device, memory_format=fmt).zero_()


_BWD_MAX_BLOCK = 512


def backward_launch(
    grad_out, features, regions, feature_index, spatial_scales, levels, mode, partition, argmax
) -> Launch:
    """The backward launch (see ``pyramid_pool_backward``); ``outputs`` are the float32/64
    gradient buffers, one per map."""
    f0 = features[0]
    n, c = int(f0.shape[0]), int(f0.shape[1])
    k = int(regions.shape[0])
    feature_index = _region_maps(feature_index, k, regions.device)
    acc = _acc_dtype(f0.dtype)
    bufs = [_grad_buffer(f, acc) for f in features]
    meta = _level_meta(levels, "avg")  # LH, LW, POFF
    table, scales = _map_table(bufs, spatial_scales, partition, f0.device)
    region_args = (
        regions,
        int(regions.stride(0)),
        int(regions.stride(1)),
        feature_index,
        int(feature_index.stride(0)),
        n,
        c,
    )
    grad_args = (grad_out, int(grad_out.stride(0)), int(grad_out.stride(1)))
    common = dict(
        LH=meta["LH"],
        LW=meta["LW"],
        POFF=meta["POFF"],
        NUM_F=len(features),
        ROI=partition == "roi",
        BIN_DTYPE=_TL_DTYPE[acc],
        ACC_DTYPE=_TL_DTYPE[acc],
    )
    if mode == "max":
        p = _bins.pyramid_width(levels)
        block = min(_BWD_MAX_BLOCK, triton.next_power_of_2(max(c * p, 1)))
        dense = all(b.is_contiguous() for b in bufs)
        kernel = _pyramid_pool_bwd_max_kernel
        args = grad_args + (argmax, int(argmax.stride(0)), int(argmax.stride(1)))
        args += region_args + (tuple(bufs), table)
        kwargs = dict(
            common, DENSE=dense, BLOCK=block, num_warps=_num_warps(block), maxnreg=_MAX_REGISTERS
        )
        grid = (k, triton.cdiv(c * p, block))
    else:
        block_c = _block_c(c, k)
        kernel = _pyramid_pool_bwd_avg_kernel
        args = grad_args + region_args + (tuple(bufs), table, scales)
        kwargs = dict(
            common,
            UNIT_W=all(int(b.stride(3)) == 1 for b in bufs),
            EVEN_C=c % block_c == 0,
            BLOCK_C=block_c,
            num_warps=_num_warps(block_c),
            maxnreg=_MAX_REGISTERS,
        )
        grid = (k, triton.cdiv(c, block_c))
    return Launch(kernel, grid, args, kwargs, tuple(bufs))


def pyramid_pool_backward(
    grad_out: torch.Tensor,
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    spatial_scales: list[float],
    levels: list[tuple[int, int]],
    mode: str,
    partition: str,
    argmax: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradient w.r.t. each feature map (its shape and dtype); float32 atomics (float64 for f64).

    Max routes each output gradient to its argmax (skipping -1); avg spreads ``g / count`` evenly
    over the bin's in-map pixels. Non-deterministic summation order (atomics).
    """
    launch = backward_launch(
        grad_out, features, regions, feature_index, spatial_scales, levels, mode, partition, argmax
    )
    bufs = launch.outputs
    if launch.grid[0] > 0 and launch.grid[1] > 0 and grad_out.numel() > 0:
        with _device_ctx(grad_out.device):
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    return [
        buf if buf.dtype == f.dtype else buf.to(f.dtype)
        for buf, f in zip(bufs, features, strict=True)
    ]
