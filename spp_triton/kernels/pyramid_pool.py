"""Triton kernels: every pyramid level of a batch of regions in one launch.

What one program computes
    Forward, grid ``(K, cdiv(C, BLOCK_C))``: program ``(k, cb)`` pools region ``k`` for channels
    ``[cb * BLOCK_C, cb * BLOCK_C + BLOCK_C)`` at *all* pyramid levels. It resolves the region
    (batch index, which feature map, bin edges of every level; ``spp_triton.kernels.bins``), then
    sweeps the region's window -- the union of all its bins, clipped to the map -- once, row by
    row, ``BLOCK_W`` columns at a time. Each ``[BLOCK_C, BLOCK_W]`` tile is reduced per *column
    bin* (the ``sum(bw)`` column ranges of all levels, padded to ``NCOL``, a power of two) to
    ``[BLOCK_C, NCOL]`` and combined over the row's tiles. The accumulator is indexed by *slots*
    ``(r, j)``, ``[BLOCK_C, NR, NCOL]`` (``NR`` = max ``bh`` padded): slot ``(r, j)`` is bin
    ``(ph = r, pw = j - WOFF[l])`` of the level ``l`` owning column bin ``j`` (slots with
    ``r >= bh`` are unused). At the end of a row, the row's column-bin results are broadcast over
    ``r`` into the slots whose row range contains the row -- no gather. So each window element
    is loaded once whatever the level set (nested or not, overlapping or not). Max keeps
    (value, flat index, is-NaN) per slot; avg keeps a float32 (float64) sum.

    Per tile and column bin, max needs two reductions over ``[BLOCK_C, NCOL, BLOCK_W]``: the
    NaN-free maximum, then the minimum of a key that is the column of a NaN, or the column plus
    ``2**30`` of an element equal to that maximum (so the first NaN wins, else the first maximum).
    Combining tiles (left to right) and rows (top to bottom) uses strict ``>``, so the earliest
    maximum in row-major order is kept.

    (``tl.gather`` from ``[BLOCK_C, NCOL]`` to flat bins would save the unused slots, but Triton
    3.8's gather lowering asserts on sm_90 for some block shapes -- e.g. ``BLOCK_C`` = 2 or 4.)

    Feature maps (FPN levels): each map's pointer, size, strides and spatial scale are tuple
    arguments with one entry per map; a program selects its region's map with scalar selects, so
    any number of maps is one launch. The level set, mode, partition and number of maps are
    ``tl.constexpr`` (levels as tuples ``LH``, ``LW`` and their prefix sums); per-bin tables are
    built in registers from them. Spatial scales travel as the bit pattern of the float64 value
    (an int64 argument) and are rounded to the bin dtype in the kernel, as torch would.

    Backward, same grid. Max, over flat bins (``NBINS`` = ``sum(bh * bw)`` padded to a power of
    two): each program loads its ``[BLOCK_C, NBINS]`` block of ``grad_out`` and ``argmax`` and
    ``tl.atomic_add``\\ s each gradient onto its argmax. Avg, in the forward's slot layout: the
    program sweeps the window like the forward; per row it sums the shares ``g / count`` of the
    slots containing the row per column bin, then per tile element over the column bins containing
    it, and atomically adds that (one atomic per window element and channel). Gradients
    accumulate in float32 (float64 for float64 maps) buffers, cast to the map dtype afterwards.
    Atomics make this path non-deterministic in the last bits for float32 sums; a deterministic
    path exists elsewhere.

Memory read and written
    Reads: the region row (``regions[k]``, ``feature_index[k]``), the window elements of the one
    map the region reads (through its strides; any layout), and, for max, the one selected element
    per output again (so that the stored value is that element bit for bit, ``-0.0`` included).
    Writes: ``out[k, :]`` / ``argmax[k, :]`` for the program's channels, layout level-major in the
    given order, then channel, row, column (``bins.level_offsets``). Backward reads ``grad_out``
    (and ``argmax``) at the same places and writes only gradient buffer elements inside the
    region's clipped window (avg) or at ``argmax`` (max).

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
    before any load; addresses are computed in int64. Backward ignores argmax values outside the
    plane. Assumed, not checked: a plane has fewer than ``2**30`` columns and ``2**31`` elements
    (argmax is int32).
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from spp_triton.kernels.bins import adaptive_bin_edges, quantize_roi, roi_bin_edges

MAX_FEATURE_MAPS = 5  # what the library supports (FPN P2-P6); the kernels take any number

_BIG = tl.constexpr(2**31 - 1)  # "no element" in an index accumulator
_NAN_OFF = tl.constexpr(2**30)  # key offset: NaN hits sort before (smaller than) max hits

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
def _flat_bin_tables(LH: tl.constexpr, LW: tl.constexpr, POFF: tl.constexpr, NBINS: tl.constexpr):
    """Per flat bin ``i`` (of ``NBINS``; ``POFF[l] <= i < POFF[l] + bh * bw`` for its level ``l``):
    ``POFF[l]``, ``bh * bw`` of its level, and whether ``i`` is a bin at all (int32 / bool)."""
    i = tl.arange(0, NBINS)
    loff = tl.zeros([NBINS], tl.int32)
    lsize = tl.zeros([NBINS], tl.int32)
    bin_ok = i < 0
    for lv in tl.static_range(len(LH)):
        m = (i >= POFF[lv]) & (i < POFF[lv] + LH[lv] * LW[lv])
        loff = tl.where(m, POFF[lv], loff)
        lsize = tl.where(m, LH[lv] * LW[lv], lsize)
        bin_ok = bin_ok | m
    return loff, lsize, bin_ok


@triton.jit
def _region_header(
    k,
    reg_ptr,
    reg_s0,
    reg_s1,
    fidx_ptr,
    fidx_s0,
    N,
    XH,
    XW,
    XSCALE,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
):
    """Resolve region ``k``: ``(ok, fi, b, H, W, row0, rows, col0, cols)``.

    ``ok``: the batch and feature indices are valid (else the region is all-empty); ``fi``: the map
    it reads; ``b``: int64 batch index (0 when not ``ok``); ``H, W``: that map's size. RoI: the
    quantised RoI start and extent per axis (``bins.quantize_rois``). Adaptive: ``(0, h, 0, w)``
    with ``h, w`` clamped to ``[0, H]``, ``[0, W]``.
    """
    fi = tl.load(fidx_ptr + k * fidx_s0).to(tl.int64)
    ok = (fi >= 0) & (fi < NUM_F)
    H = _pick(fi, XH, NUM_F)
    W = _pick(fi, XW, NUM_F)
    row_ptr = reg_ptr + k * reg_s0
    if ROI:
        bf = tl.load(row_ptr).to(BIN_DTYPE)
        # trunc(bf) in [0, N) as torchvision's int cast reads it; false for NaN.
        ok = ok & (bf > -1.0) & (bf < N)
        b = tl.where(ok, bf, 0.0).to(tl.int64)
        scale_bits = _pick(fi, XSCALE, NUM_F).to(tl.int64)
        scale = scale_bits.to(tl.float64, bitcast=True).to(BIN_DTYPE)
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
def _edges(start, extent, p, n, size, ok, ROI: tl.constexpr, BIN_DTYPE: tl.constexpr):
    """Clipped ``[lo, hi)`` of bins ``p`` of ``n``; ``lo = hi = 0`` where ``ok`` is false."""
    if ROI:
        lo, hi = roi_bin_edges(start, extent, p, n, size, BIN_DTYPE)
    else:
        lo, hi = adaptive_bin_edges(extent, p, n)
    lo = tl.where(ok, lo, 0)
    hi = tl.where(ok, hi, 0)
    return lo, hi


@triton.jit
def _span(lo, hi):
    """Smallest ``[a, b)`` containing every non-empty ``[lo, hi)``; ``a >= b`` when all empty."""
    nonempty = lo < hi
    a = tl.min(tl.where(nonempty, lo, _BIG), axis=0)
    b = tl.max(tl.where(nonempty, hi, 0), axis=0)
    return a, b


@triton.jit
def _div(num, den, ACC_DTYPE: tl.constexpr):
    """Correctly rounded ``num / den`` in ``ACC_DTYPE`` (float32 ``/`` is approximate on GPUs)."""
    d = den.to(ACC_DTYPE)
    if ACC_DTYPE == tl.float64:
        q = num / d
    else:
        q = tl.math.div_rn(num, d)
    return q


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _column_tables(
    LH: tl.constexpr, LW: tl.constexpr, POFF: tl.constexpr, WOFF: tl.constexpr, NCOL: tl.constexpr
):
    """Per column bin ``j`` (of ``NCOL``; ``WOFF[l] <= j < WOFF[l] + bw`` for its level ``l``):
    ``bw``, ``pw`` (its column within the level), ``bh`` and ``POFF[l]`` of its level, ``ok``."""
    j = tl.arange(0, NCOL)
    bw = tl.full([NCOL], 1, tl.int32)
    pw = tl.zeros([NCOL], tl.int32)
    bh = tl.full([NCOL], 1, tl.int32)  # 1 (not 0) for padding: no division by zero
    poff = tl.zeros([NCOL], tl.int32)
    ok = j < 0
    for lv in tl.static_range(len(LH)):
        m = (j >= WOFF[lv]) & (j < WOFF[lv] + LW[lv])
        bw = tl.where(m, LW[lv], bw)
        pw = tl.where(m, j - WOFF[lv], pw)
        bh = tl.where(m, LH[lv], bh)
        poff = tl.where(m, POFF[lv], poff)
        ok = ok | m
    return bw, pw, bh, poff, ok


@triton.jit
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
    XH,
    XW,
    XSN,
    XSC,
    XSH,
    XSW,
    XSCALE,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    WOFF: tl.constexpr,
    NR: tl.constexpr,
    NCOL: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    IS_MAX: tl.constexpr,
    WITH_ARGMAX: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)

    # Bin slot (r, j): row bin r of the level owning column bin j, i.e. bin (ph=r, pw) of that
    # level. Slots with r >= bh of the level (or j past the last level) are unused.
    bw, pw, bh, poff, col_ok = _column_tables(LH, LW, POFF, WOFF, NCOL)  # [NCOL]
    r2 = tl.arange(0, NR)[:, None] + tl.zeros([NR, NCOL], tl.int32)  # [NR, NCOL]
    bh2 = bh[None, :] + tl.zeros([NR, NCOL], tl.int32)
    slot_ok = (r2 < bh2) & col_ok[None, :]

    ok, fi, b, H, W, row0, rows, col0, cols = _region_header(
        k, reg_ptr, reg_s0, reg_s1, fidx_ptr, fidx_s0, N, XH, XW, XSCALE, NUM_F, ROI, BIN_DTYPE
    )
    rlo, rhi = _edges(row0, rows, r2, bh2, H, ok & slot_ok, ROI, BIN_DTYPE)  # [NR, NCOL]
    clo, chi = _edges(col0, cols, pw, bw, W, ok & col_ok, ROI, BIN_DTYPE)  # [NCOL]
    h_lo, h_hi = _span(tl.reshape(rlo, [NR * NCOL]), tl.reshape(rhi, [NR * NCOL]))
    w_lo, w_hi = _span(clo, chi)

    x_ptr = _pick(fi, X, NUM_F)
    s_h = _pick(fi, XSH, NUM_F).to(tl.int64)
    s_w = _pick(fi, XSW, NUM_F).to(tl.int64)
    plane = x_ptr + b * _pick(fi, XSN, NUM_F) + c64 * _pick(fi, XSC, NUM_F)  # [BLOCK_C]

    wr = tl.arange(0, BLOCK_W)
    if IS_MAX:
        acc_v = tl.full([BLOCK_C, NR, NCOL], float("-inf"), ACC_DTYPE)
        acc_i = tl.full([BLOCK_C, NR, NCOL], -1, tl.int32)
        acc_n = acc_i > 0  # all false: acc holds a NaN
    else:
        acc_s = tl.zeros([BLOCK_C, NR, NCOL], ACC_DTYPE)

    for h in range(h_lo, h_hi):
        row_on = ((rlo <= h) & (h < rhi))[None, :, :]  # slots whose rows contain h
        row_ptr = plane + h * s_h  # s_h is int64
        # Per column bin, over this row: max -- NaN-free maximum and key (column of the first
        # NaN, else column + _NAN_OFF of the first maximum, else _BIG); avg -- sum.
        if IS_MAX:
            row_v = tl.full([BLOCK_C, NCOL], float("-inf"), ACC_DTYPE)
            row_k = tl.full([BLOCK_C, NCOL], _BIG, tl.int32)
        else:
            row_s = tl.zeros([BLOCK_C, NCOL], ACC_DTYPE)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            w = w0 + wr
            x = tl.load(
                row_ptr[:, None] + (w.to(tl.int64) * s_w)[None, :],
                mask=cmask[:, None] & (w < w_hi)[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            inb = ((clo[:, None] <= w[None, :]) & (w[None, :] < chi[:, None]))[None, :, :]
            x3 = x[:, None, :]  # [BLOCK_C, 1, BLOCK_W] against [1, NCOL, BLOCK_W]
            if IS_MAX:
                w3 = w[None, None, :]
                isnan = x3 != x3
                mx = tl.max(tl.where(inb & (x3 == x3), x3, float("-inf")), axis=2)
                key = tl.where(
                    inb & isnan,
                    w3,
                    tl.where(inb & (x3 == mx[:, :, None]), w3 + _NAN_OFF, _BIG),
                )
                first = tl.min(key, axis=2)  # [BLOCK_C, NCOL]
                # Tiles come left to right: strict '>' keeps the earlier maximum.
                t_nan = first < _NAN_OFF
                r_nan = row_k < _NAN_OFF
                take = (first < _BIG) & (
                    (row_k == _BIG) | (t_nan & ~r_nan) | (~t_nan & ~r_nan & (mx > row_v))
                )
                row_v = tl.where(take, mx, row_v)
                row_k = tl.where(take, first, row_k)
            else:
                row_s += tl.sum(tl.where(inb, x3, 0.0), axis=2)  # [BLOCK_C, NCOL]
        # Fold the row into the slots whose rows contain h: a broadcast over r, no gather.
        if IS_MAX:
            cand_v = row_v[:, None, :]
            cand_k = row_k[:, None, :]
            cand_n = cand_k < _NAN_OFF
            cand_w = tl.where(cand_n, cand_k, cand_k - _NAN_OFF)
            # Rows come top to bottom: strict '>' keeps the earlier maximum.
            better = (
                row_on
                & (cand_k < _BIG)
                & ((acc_i < 0) | (cand_n & ~acc_n) | (~cand_n & ~acc_n & (cand_v > acc_v)))
            )
            acc_v = tl.where(better, cand_v, acc_v)
            acc_n = tl.where(better, cand_n, acc_n)
            acc_i = tl.where(better, h * W + cand_w, acc_i)
        else:
            acc_s += tl.where(row_on, row_s[:, None, :], 0.0)

    # out[k, C * POFF[l] + c * bh * bw + r * bw + pw]
    dst = (
        k * out_row
        + (poff.to(tl.int64) * C)[None, None, :]
        + c64[:, None, None] * (bh * bw)[None, None, :]
        + (r2 * bw[None, :] + pw[None, :])[None, :, :]
    )
    smask = cmask[:, None, None] & slot_ok[None, :, :]
    if IS_MAX:
        found = acc_i >= 0
        wdiv = tl.maximum(W, 1)
        sel_h = (acc_i // wdiv).to(tl.int64)
        sel_w = (acc_i % wdiv).to(tl.int64)
        # Re-read the selected element: the output is that element bit for bit.
        val = tl.load(
            plane[:, None, None] + sel_h * s_h + sel_w * s_w,
            mask=found & cmask[:, None, None],
            other=0.0,
        )
        tl.store(out_ptr + dst, val.to(out_ptr.dtype.element_ty), mask=smask)
        if WITH_ARGMAX:
            tl.store(argmax_ptr + dst, acc_i, mask=smask)
    else:
        count = (rhi - rlo) * (chi - clo)[None, :]  # [NR, NCOL]; 0 for empty bins
        mean = _div(acc_s, tl.maximum(count, 1)[None, :, :], ACC_DTYPE)
        mean = tl.where((count > 0)[None, :, :], mean, 0.0)
        tl.store(out_ptr + dst, mean.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
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
    GSN,
    GSC,
    GSH,
    GSW,
    XH,
    XW,
    XSCALE,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    WOFF: tl.constexpr,
    NBINS: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)

    loff, lsize, bin_ok = _flat_bin_tables(LH, LW, POFF, NBINS)
    ok, fi, b, H, W, row0, rows, col0, cols = _region_header(
        k, reg_ptr, reg_s0, reg_s1, fidx_ptr, fidx_s0, N, XH, XW, XSCALE, NUM_F, ROI, BIN_DTYPE
    )
    i = tl.arange(0, NBINS)
    pos = (loff.to(tl.int64) * C)[None, :] + c64[:, None] * lsize[None, :] + (i - loff)[None, :]
    m = cmask[:, None] & bin_ok[None, :] & ok
    a = tl.load(argmax_ptr + k * a_s0 + pos * a_s1, mask=m, other=-1)
    g = tl.load(grad_ptr + k * g_s0 + pos * g_s1, mask=m, other=0.0).to(ACC_DTYPE)
    hit = m & (a >= 0) & (a < H * W)
    wdiv = tl.maximum(W, 1)
    sel_h = (a // wdiv).to(tl.int64)
    sel_w = (a % wdiv).to(tl.int64)
    plane = _pick(fi, G, NUM_F) + b * _pick(fi, GSN, NUM_F) + c64 * _pick(fi, GSC, NUM_F)
    dst = plane[:, None] + sel_h * _pick(fi, GSH, NUM_F) + sel_w * _pick(fi, GSW, NUM_F)
    tl.atomic_add(dst, g, mask=hit)


@triton.jit
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
    GSN,
    GSC,
    GSH,
    GSW,
    XH,
    XW,
    XSCALE,
    LH: tl.constexpr,
    LW: tl.constexpr,
    POFF: tl.constexpr,
    WOFF: tl.constexpr,
    NR: tl.constexpr,
    NCOL: tl.constexpr,
    NUM_F: tl.constexpr,
    ROI: tl.constexpr,
    BIN_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)

    # Same (row slot, column bin) layout as the forward.
    bw, pw, bh, poff, col_ok = _column_tables(LH, LW, POFF, WOFF, NCOL)  # [NCOL]
    r2 = tl.arange(0, NR)[:, None] + tl.zeros([NR, NCOL], tl.int32)  # [NR, NCOL]
    bh2 = bh[None, :] + tl.zeros([NR, NCOL], tl.int32)
    slot_ok = (r2 < bh2) & col_ok[None, :]
    ok, fi, b, H, W, row0, rows, col0, cols = _region_header(
        k, reg_ptr, reg_s0, reg_s1, fidx_ptr, fidx_s0, N, XH, XW, XSCALE, NUM_F, ROI, BIN_DTYPE
    )
    rlo, rhi = _edges(row0, rows, r2, bh2, H, ok & slot_ok, ROI, BIN_DTYPE)  # [NR, NCOL]
    clo, chi = _edges(col0, cols, pw, bw, W, ok & col_ok, ROI, BIN_DTYPE)  # [NCOL]
    h_lo, h_hi = _span(tl.reshape(rlo, [NR * NCOL]), tl.reshape(rhi, [NR * NCOL]))
    w_lo, w_hi = _span(clo, chi)

    pos = (
        (poff.to(tl.int64) * C)[None, None, :]
        + c64[:, None, None] * (bh * bw)[None, None, :]
        + (r2 * bw[None, :] + pw[None, :])[None, :, :]
    )
    count = (rhi - rlo) * (chi - clo)[None, :]  # [NR, NCOL]; 0 for empty and unused slots
    m = cmask[:, None, None] & (count > 0)[None, :, :]
    g = tl.load(grad_ptr + k * g_s0 + pos * g_s1, mask=m, other=0.0).to(ACC_DTYPE)
    share = tl.where(m, _div(g, tl.maximum(count, 1)[None, :, :], ACC_DTYPE), 0.0)

    plane = _pick(fi, G, NUM_F) + b * _pick(fi, GSN, NUM_F) + c64 * _pick(fi, GSC, NUM_F)
    s_h = _pick(fi, GSH, NUM_F).to(tl.int64)
    s_w = _pick(fi, GSW, NUM_F).to(tl.int64)
    wr = tl.arange(0, BLOCK_W)
    for h in range(h_lo, h_hi):
        # Per column bin: the summed share of the slots whose rows contain h.
        row_on = ((rlo <= h) & (h < rhi))[None, :, :]
        col_share = tl.sum(tl.where(row_on, share, 0.0), axis=1)  # [BLOCK_C, NCOL]
        row_ptr = plane + h * s_h  # s_h is int64
        for w0 in range(w_lo, w_hi, BLOCK_W):
            w = w0 + wr
            inb = ((clo[:, None] <= w[None, :]) & (w[None, :] < chi[:, None]))[None, :, :]
            contrib = tl.sum(tl.where(inb, col_share[:, :, None], 0.0), axis=1)  # [BC, BW]
            tl.atomic_add(
                row_ptr[:, None] + (w.to(tl.int64) * s_w)[None, :],
                contrib,
                mask=cmask[:, None] & (w < w_hi)[None, :],
            )


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _float_bits(x: float) -> int:
    """The IEEE float64 bit pattern of ``x`` as a signed int (passed exactly as an i64 arg)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _level_meta(levels) -> dict:
    lh = tuple(int(bh) for bh, _ in levels)
    lw = tuple(int(bw) for _, bw in levels)
    poff, woff, p, q = [], [], 0, 0
    for bh, bw in zip(lh, lw, strict=True):
        poff.append(p)
        woff.append(q)
        p += bh * bw
        q += bw
    return dict(
        LH=lh,
        LW=lw,
        POFF=tuple(poff),
        WOFF=tuple(woff),
        NBINS=triton.next_power_of_2(p),
        NCOL=triton.next_power_of_2(q),
        NR=triton.next_power_of_2(max(lh)),
    )


# Register budgets (elements per program, num_warps=4), halved for float64: the accumulators
# ([BLOCK_C, NR, NCOL] forward, [BLOCK_C, NBINS] backward) and the tile reductions
# ([BLOCK_C, lanes, BLOCK_W]). Chosen so that ptxas reports no, or few, spills on sm_90 for the
# usual level sets.
_ACC_BUDGET = 2048
_TILE_BUDGET = 4096


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _block_c(channels: int, regions: int, slots: int, wide: bool) -> int:
    """Channels per program: at most 32 and what the accumulator budget allows, fewer (down to
    4) when there are too few programs to fill a GPU (e.g. whole-image SPP of a small batch)."""
    budget = (_ACC_BUDGET // 2 if wide else _ACC_BUDGET) // slots
    block = min(32, triton.next_power_of_2(max(channels, 1)), _pow2_floor(budget))
    while block > 4 and regions * triton.cdiv(channels, block) < 512:
        block //= 2
    return block


def _block_w(block_c: int, width: int, lanes: int, wide: bool) -> int:
    """Columns per tile: keep the ``[BLOCK_C, lanes, BLOCK_W]`` reduction within budget."""
    budget = (_TILE_BUDGET // 2 if wide else _TILE_BUDGET) // (block_c * lanes)
    return min(triton.next_power_of_2(max(width, 1)), _pow2_floor(budget))


def _map_args(maps: list[torch.Tensor], spatial_scales, partition: str) -> dict:
    scales = spatial_scales if partition == "roi" else [0.0] * len(maps)
    return dict(
        XH=tuple(int(f.shape[2]) for f in maps),
        XW=tuple(int(f.shape[3]) for f in maps),
        XSCALE=tuple(_float_bits(s) for s in scales),
    )


def _strides(maps: list[torch.Tensor], prefix: str) -> dict:
    return {
        prefix: tuple(maps),
        prefix + "SN": tuple(int(f.stride(0)) for f in maps),
        prefix + "SC": tuple(int(f.stride(1)) for f in maps),
        prefix + "SH": tuple(int(f.stride(2)) for f in maps),
        prefix + "SW": tuple(int(f.stride(3)) for f in maps),
    }


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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


def forward_launch(
    features, regions, feature_index, spatial_scales, levels, mode, partition, with_argmax=True
) -> Launch:
    """The forward launch for these inputs (see ``pyramid_pool_forward``)."""
    f0 = features[0]
    n, c = int(f0.shape[0]), int(f0.shape[1])
    k = int(regions.shape[0])
    meta = _level_meta(levels)
    p = sum(bh * bw for bh, bw in levels)
    is_max = mode == "max"
    with_argmax = with_argmax and is_max
    out = torch.empty((k, c * p), dtype=f0.dtype, device=f0.device)
    argmax = torch.empty((k, c * p) if with_argmax else (0,), dtype=torch.int32, device=f0.device)
    acc = _acc_dtype(f0.dtype)
    wide = acc == torch.float64
    block_c = _block_c(c, k, meta["NR"] * meta["NCOL"], wide)
    max_w = max(int(f.shape[3]) for f in features)
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
    )
    kwargs = dict(
        **_strides(features, "X"),
        **_map_args(features, spatial_scales, partition),
        **{name: meta[name] for name in ("LH", "LW", "POFF", "WOFF", "NR", "NCOL")},
        NUM_F=len(features),
        ROI=partition == "roi",
        IS_MAX=is_max,
        WITH_ARGMAX=with_argmax,
        BIN_DTYPE=_TL_DTYPE[acc],
        ACC_DTYPE=_TL_DTYPE[acc],
        BLOCK_C=block_c,
        BLOCK_W=_block_w(block_c, max_w, meta["NCOL"], wide),
    )
    grid = (k, triton.cdiv(c, block_c))
    return Launch(_pyramid_pool_fwd_kernel, grid, args, kwargs, (out, argmax))


def pyramid_pool_forward(
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor,
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


def backward_launch(
    grad_out, features, regions, feature_index, spatial_scales, levels, mode, partition, argmax
) -> Launch:
    """The backward launch (see ``pyramid_pool_backward``); ``outputs`` are the float32/64
    gradient buffers, one per map."""
    f0 = features[0]
    n, c = int(f0.shape[0]), int(f0.shape[1])
    k = int(regions.shape[0])
    acc = _acc_dtype(f0.dtype)
    bufs = [_grad_buffer(f, acc) for f in features]
    meta = _level_meta(levels)
    wide = acc == torch.float64
    is_max = mode == "max"
    block_c = _block_c(c, k, meta["NBINS"] if is_max else meta["NR"] * meta["NCOL"], wide)
    bins_meta = ("NBINS",) if is_max else ("NR", "NCOL")
    kwargs = dict(
        **_strides(bufs, "G"),
        **_map_args(features, spatial_scales, partition),
        **{name: meta[name] for name in ("LH", "LW", "POFF", "WOFF") + bins_meta},
        NUM_F=len(features),
        ROI=partition == "roi",
        BIN_DTYPE=_TL_DTYPE[acc],
        ACC_DTYPE=_TL_DTYPE[acc],
        BLOCK_C=block_c,
    )
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
    grid = (k, triton.cdiv(c, block_c))
    if is_max:
        kernel = _pyramid_pool_bwd_max_kernel
        args = grad_args + (argmax, int(argmax.stride(0)), int(argmax.stride(1))) + region_args
    else:
        kernel = _pyramid_pool_bwd_avg_kernel
        args = grad_args + region_args
        max_w = max(int(f.shape[3]) for f in features)
        kwargs["BLOCK_W"] = _block_w(block_c, max_w, meta["NCOL"], wide)
    return Launch(kernel, grid, args, kwargs, tuple(bufs))


def pyramid_pool_backward(
    grad_out: torch.Tensor,
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor,
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
