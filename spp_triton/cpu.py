"""The CPU path: forward and backward of pyramid pooling without Triton (vectorised PyTorch, and
for max over the RoI partition on CPU a small compiled C kernel, ``spp_triton.native``).

It has the same interface as ``spp_triton.kernels.pyramid_pool`` (see there for the argument
conventions) and runs on any device (the compiled kernel only on CPU tensors). ``spp_triton.ops``
uses it for CPU tensors and for the deterministic backward (max: the compiled serial scatter on
CPU, else torchvision's serial ``_roi_pool_backward``, a 1-D ``scatter_add_`` on other devices; avg:
``index_put_(accumulate=True)``; PyTorch makes the last two deterministic under
``torch.use_deterministic_algorithms(True)``).

How it is fast without a loop per RoI:

* **max, RoI partition, compiled** (the default for float32/float64 where a C compiler exists):
  ``csrc/roi_max.c`` through ``spp_triton.native``. The host side quantises the RoIs and computes
  every level's bin edges once (``bins.roi_bin_edges``); the kernel pools the root levels,
  derives the nested ones inside (nesting checked per RoI), checks NaN while it reads, and writes
  each map's RoIs straight into their rows of the output. No guard and no exact path: those
  below serve the path without a compiler. Its backward (both partitions) is one serial scatter
  into a gradient map the OS zeroes lazily (``_zeros``).
* **max, RoI partition, without the compiled kernel**: one call of torchvision's C++ ``roi_pool``
  at each *root* level (a level that divides no other requested level); every other level is
  derived from a finer one whose bins nest in it (coarse bin = union of fine bins), so the RoI
  windows are read once per root level instead of once per level; with an argmax too, from levels
  of at most 16 bins (a coarse bin's argmax is the smallest among its fine bins holding the
  maximum). Nesting of torchvision's float partition is checked per RoI, and the rare RoIs where it
  fails (e.g. 1 bin from 7 over some extents) are pooled directly. Boxes are handed to torchvision
  already quantised (``spp_triton.bins``) with scale 1, so the partition is ours. The RoIs are
  quantised once per call and map. torchvision skips NaN and never returns less than -FLT_MAX; a
  guard (one reduction over the RoIs' windows, or over the whole map when the windows cover much of
  it) finds the RoIs that read a NaN, an infinity or a huge value, and only those are pooled again
  by a direct, exact gather (``_exact_max``).
* **max, adaptive partition**: ``F.adaptive_max_pool2d`` on each distinct valid image size (its
  argmax moved to a bin's first NaN where it picked another).
* **avg, both partitions**: a float64 summed-area table, four lookups per bin; the backward
  scatters ``+-g / count`` at the four corners of each bin and integrates (two cumsums).

Argmax convention (shared with the kernels): int32 flat index ``h * W + w`` of the selected element
in its (image, channel) plane, ``-1`` for an empty bin; ties go to the first maximal element in
row-major order; a bin with a NaN selects its first NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_pool)

from spp_triton import bins, native

Levels = bins.Levels


def _batch_index(regions: torch.Tensor) -> torch.Tensor:
    return regions[:, 0].to(torch.int64)


# ----------------------------------------------------------------------------- max, RoI partition
def _finest_first(levels: Levels) -> list[int]:
    """Level indices by decreasing bin count (stable): every level after the ones it may be
    derived from."""
    return sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1])


def _root_plan(levels: Levels, max_fine_bins: int | None = None) -> list[int | None]:
    """For each level, the index of a finer level it is derived from (``None``: pool it directly).

    A level derives from the coarsest finer level whose bin counts it divides on both axes (the
    fewest values to reduce), and that has at most ``max_fine_bins`` bins if given.
    """
    order = _finest_first(levels)
    plan: list[int | None] = [None] * len(levels)
    for pos, i in enumerate(order):
        bh, bw = levels[i]
        for j in reversed(order[:pos]):
            fh, fw = levels[j]
            if max_fine_bins is not None and fh * fw > max_fine_bins and levels[j] != (bh, bw):
                continue
            if fh % bh == 0 and fw % bw == 0:
                plan[i] = j
                break
    return plan


def _torchvision_max(x32: torch.Tensor, qrois: torch.Tensor, bh: int, bw: int):
    """torchvision's ``roi_pool`` of quantised RoIs: ``(values, int64 argmax)`` (narrowed to int32
    when copied into the output)."""
    return torch.ops.torchvision.roi_pool(x32, qrois, 1.0, bh, bw)


def _torchvision_max_values(x32: torch.Tensor, qrois: torch.Tensor, bh: int, bw: int):
    """The values alone (its int64 argmax is dropped at once, never converted)."""
    return torch.ops.torchvision.roi_pool(x32, qrois, 1.0, bh, bw)[0]


def _group_max(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v.amax(dim)`` for the small group dims of the derivation: a chain of elementwise
    maxima over the slices, much faster on CPU than a reduction over a dim of size 2 or 3."""
    parts = v.unbind(dim)
    out = parts[0]
    for p in parts[1:]:
        out = torch.maximum(out, p)
    return out if len(parts) > 1 else out.clone()


def _derive_max(fine_val: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Coarse ``(bh, bw)`` maxima of fine bins grouped ``rh x rw``, reduced separably: rows
    first (whole contiguous fine rows at a time), then columns of the ``rh`` times smaller rest."""
    k, c, fh, fw = fine_val.shape
    rh, rw = fh // bh, fw // bw
    return _group_max(_group_max(fine_val.view(k, c, bh, rh, fw), 3).view(k, c, bh, bw, rw), -1)


def _set_empty_bins(val: torch.Tensor, empty: torch.Tensor, fill: float) -> torch.Tensor:
    """``val [R, C, bh, bw]`` with the bins that ``empty [R, bh, bw]`` marks set to ``fill``."""
    return val.masked_fill(empty[:, None], fill)


class _Quantised(NamedTuple):
    """RoIs quantised once (``bins.quantize_rois``) for every level, the guard and the exact path:
    integer ``(x0, y0, width, height)`` and the same corners as exact floats for torchvision's
    ``roi_pool`` with scale 1 (whose own rounding of an integer is the identity)."""

    batch: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor
    qrois: torch.Tensor


def _quantise(regions, scale, bin_dtype, dtype) -> _Quantised:
    x0, y0, roi_w, roi_h = bins.quantize_rois(regions[:, 1:5], scale, bin_dtype)
    qrois = torch.stack([regions[:, 0], x0, y0, x0 + roi_w - 1, y0 + roi_h - 1], dim=1).to(dtype)
    return _Quantised(_batch_index(regions), x0, y0, roi_w, roi_h, qrois)


# Where torchvision's roi_pool departs from spp_triton's rule, and how those RoIs are found.
# torchvision starts each bin at -FLT_MAX and keeps a value only if it is greater, so
# * it skips NaN (spp_triton propagates it): invisible in its output, so a guard reads the RoIs'
#   windows (the union of their bins over all levels), summed over channels: a NaN makes the sum
#   NaN. +-inf and overflowing sums are flagged too, which only costs an exact re-pooling;
# * a bin whose every number is <= -FLT_MAX (a plane of -inf, float64 values below -FLT_MAX)
#   comes out as -FLT_MAX with argmax -1 (spp_triton: the true maximum at its first position):
#   visible in the output, whose values never go below -FLT_MAX.
# The RoIs found either way are pooled again by ``_exact_max``.
_FLT_MAX = torch.finfo(torch.float32).max
# rough CPU costs (ns) that pick between a whole-map reduction and one per RoI window
_NS_PER_MAP_ELEMENT = 0.15
_NS_PER_WINDOW_ELEMENT = 0.5
_NS_PER_WINDOW = 10_000.0


Geometry = dict  # (bh, bw) -> clipped (row_lo, row_hi, col_lo, col_hi), int64 [K, bh] / [K, bw]


def _geometry(q: _Quantised, levels: Levels, height: int, width: int, bin_dtype) -> Geometry:
    """Every level's bin edges for the quantised RoIs, computed once per call and map."""
    geometry: Geometry = {}
    for bh, bw in levels:
        if (bh, bw) not in geometry:
            geometry[(bh, bw)] = (
                *bins.roi_bin_edges(q.y0, q.height, bh, height, bin_dtype),
                *bins.roi_bin_edges(q.x0, q.width, bw, width, bin_dtype),
            )
    return geometry


def _empty_bins(geometry: Geometry, level) -> torch.Tensor:
    """``[K, bh, bw]``: the bins clipped away (only RoIs reaching past the map have any)."""
    rlo, rhi, clo, chi = geometry[level]
    return (rhi <= rlo)[:, :, None] | (chi <= clo)[:, None, :]


def _windows(geometry: Geometry):
    """Per RoI, the clipped rows ``[r0, r1)`` and columns ``[c0, c1)`` its bins read (bins are
    ordered, so from the first bin's start to the last bin's end), each int64 ``[K]``."""
    edges = list(geometry.values())
    r0 = torch.stack([rlo[:, 0] for rlo, _, _, _ in edges]).amin(0)
    r1 = torch.stack([rhi[:, -1] for _, rhi, _, _ in edges]).amax(0)
    c0 = torch.stack([clo[:, 0] for _, _, clo, _ in edges]).amin(0)
    c1 = torch.stack([chi[:, -1] for _, _, _, chi in edges]).amax(0)
    return r0, r1, c0, c1


def _nan_rois(x: torch.Tensor, q: _Quantised, geometry: Geometry) -> torch.Tensor | None:
    """Indices of the RoIs whose windows may hold a NaN (see above), or ``None``.

    Few RoIs with small windows: each window is summed on its own (most of a large FPN map is
    read by no RoI). Otherwise the whole map is summed once; only if that is not finite, a
    summed-area table of the pixels whose channel sums are not finite says which windows hold
    one."""
    n_img, c, height, width = x.shape
    r0, r1, c0, c1 = _windows(geometry)
    area = int(((r1 - r0).clamp(min=0) * (c1 - c0).clamp(min=0)).sum())
    k = r0.shape[0]
    window_cost = _NS_PER_WINDOW * k + _NS_PER_WINDOW_ELEMENT * c * area
    if window_cost < _NS_PER_MAP_ELEMENT * x.numel():
        sums = [
            x[i, :, a:b, cc:d].sum(0).sum()
            for i, a, b, cc, d in zip(*(t.tolist() for t in (q.batch, r0, r1, c0, c1)), strict=True)
            if a < b and cc < d
        ]
        if not sums:
            return None
        flagged = ~torch.stack(sums).isfinite()
        if not bool(flagged.any()):
            return None
        return ((r1 > r0) & (c1 > c0)).nonzero().squeeze(1)[flagged]
    if bool(x.sum().isfinite()):  # one pass; only when it fails, find where
        return None
    flagged = ~x.sum(1).isfinite()  # [N, H, W]
    table = F.pad(flagged.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    b = q.batch
    r0, c0 = r0.clamp(max=height), c0.clamp(max=width)
    r1, c1 = r1.clamp(min=r0), c1.clamp(min=c0)
    count = table[b, r1, c1] - table[b, r0, c1] - table[b, r1, c0] + table[b, r0, c0]
    hits = (count > 0).nonzero().squeeze(1)
    return hits if hits.numel() else None


def _floor_rois(results) -> torch.Tensor | None:
    """Indices of the RoIs with a bin at torchvision's floor, -FLT_MAX (see above), or ``None``."""
    lowest = torch.stack([v.amin() for v, _ in results]).amin()
    if bool(lowest > -_FLT_MAX):
        return None
    at_floor = torch.stack([v.flatten(1).amin(1) <= -_FLT_MAX for v, _ in results]).any(0)
    return at_floor.nonzero().squeeze(1)


# The exact path gathers at most about this many elements at a time.
_EXACT_CHUNK_ELEMENTS = 1 << 22


def _exact_max(x: torch.Tensor, q: _Quantised, levels: Levels, geometry: Geometry, which):
    """spp_triton's max rule read directly, for the few RoIs the guard flags: per level
    ``(values [k, C, bh, bw], int32 argmax)``. Each bin's elements are gathered (rows and columns
    padded to the largest bin of the chunk by repeating the bin's last one, which changes neither
    its maximum nor its first maximal position), reduced with ``amax`` (which propagates NaN), and
    the argmax is the smallest flat index among the NaNs, if any, else among the maximal elements.
    RoIs go in chunks of similar bin size, channels in chunks too when one RoI is large.
    Only the RoIs ``which`` (indices into ``q`` and ``geometry``) are pooled."""
    n_img, c, height, width = x.shape
    maps = x.reshape(n_img, c, height * width)
    k = which.numel()
    roi_batch = q.batch[which]
    out = []
    for bh, bw in levels:
        rlo, rhi, clo, chi = (t[which] for t in geometry[(bh, bw)])
        bin_h = (rhi - rlo).clamp(min=1).amax(1)
        bin_w = (chi - clo).clamp(min=1).amax(1)
        order = torch.argsort(bin_h * bin_w, descending=True)
        val = x.new_empty(k, c, bh, bw)
        arg = torch.empty(k, c, bh, bw, dtype=torch.int64, device=x.device)
        start = 0
        while start < k:
            # RoIs sorted by bin size, largest first: the chunk's first RoI bounds the rest
            per_channel = bh * bw * int(bin_h[order[start]]) * int(bin_w[order[start]])
            count = max(1, _EXACT_CHUNK_ELEMENTS // (c * per_channel))
            rois = order[start : start + count]
            pad_h, pad_w = int(bin_h[rois].max()), int(bin_w[rois].max())
            count = rois.numel()
            rows = rlo[rois, :, None] + torch.arange(pad_h, device=x.device)
            rows = torch.minimum(rows, rhi[rois, :, None] - 1).clamp(0, height - 1)
            cols = clo[rois, :, None] + torch.arange(pad_w, device=x.device)
            cols = torch.minimum(cols, chi[rois, :, None] - 1).clamp(0, width - 1)
            # [n, bh, bw, P] flat positions of each bin's (padded) elements, P = pad_h * pad_w
            pos = (rows[:, :, None, :, None] * width + cols[:, None, :, None, :]).flatten(-2)
            batch = roi_batch[rois].view(-1, 1, 1, 1)
            channels = max(1, _EXACT_CHUNK_ELEMENTS // (count * bh * bw * pad_h * pad_w))
            for c0 in range(0, c, channels):
                v = maps[batch, c0 : c0 + channels, pos]  # [n, bh, bw, P, channels]
                top = v.amax(3)
                has_nan = top.isnan()[:, :, :, None]
                hit = torch.where(has_nan, v.isnan(), v == top[:, :, :, None])
                first = torch.where(hit, pos[..., None], height * width).amin(3)
                val[rois, c0 : c0 + channels] = top.permute(0, 3, 1, 2)
                arg[rois, c0 : c0 + channels] = first.permute(0, 3, 1, 2)
            start += count
        empty = ((rhi <= rlo)[:, :, None] | (chi <= clo)[:, None, :])[:, None]
        out.append((val.masked_fill(empty, 0.0), arg.masked_fill(empty, -1).to(torch.int32)))
    return out


def _repair(results, exact, rows: torch.Tensor) -> list:
    """``results`` with the ``rows`` replaced by their exact values (and argmax)."""
    fixed = []
    for (val, arg), (ev, ea) in zip(results, exact, strict=True):
        val = val.clone()
        val[rows] = ev.to(val.dtype)
        if arg is not None:
            arg = arg.clone()
            arg[rows] = ea.to(arg.dtype)
        fixed.append((val, arg))
    return fixed


def _roi_max(
    x: torch.Tensor,
    regions: torch.Tensor,
    scale: float,
    levels: Levels,
    bin_dtype: torch.dtype,
    with_argmax: bool,
    into=None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Max over the RoI partition on one feature map (any float dtype; pooled in float32 or
    float64). Returns ``(values [K, C*P], argmax [K, C*P] or None)``, levels concatenated.

    ``into=(out, argmax, rows)`` (see ``_roi_max_native``): the compiled kernel may write the
    result into those rows directly and return ``None``; otherwise the result is returned."""
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    k, c = regions.shape[0], x.shape[1]
    q = _quantise(regions, scale, bin_dtype, x32.dtype)
    geometry = _geometry(q, levels, x.shape[2], x.shape[3], bin_dtype)
    small_plane = x.shape[2] * x.shape[3] < 2**31 - 1  # the kernel's positions are int32
    kernel = native.roi_max_kernel(x32.dtype) if x32.device.type == "cpu" and small_plane else None
    if kernel is not None:
        if into is not None and into[0].dtype == x32.dtype:
            return _roi_max_native(kernel, x32, q.batch, levels, geometry, with_argmax, into)
        out, argmax = _roi_max_native(kernel, x32, q.batch, levels, geometry, with_argmax)
        return out.to(x.dtype), argmax
    nan_rows = _nan_rois(x32, q, geometry)
    results = _roi_max_levels(x32, q, levels, geometry, with_argmax)
    found = [r for r in (nan_rows, _floor_rois(results)) if r is not None]
    if found:
        special = torch.cat(found).unique()
        results = _repair(results, _exact_max(x32, q, levels, geometry, special), special)
    if len(results) == 1:  # one level: torchvision's tensors are the output
        v, a = results[0]
        return v.reshape(k, -1).to(x.dtype), a.reshape(k, -1) if a is not None else None
    # One output, each level copied into its block (no concatenation of temporaries; the dtype
    # conversion to the input's happens in the same copy).
    width = c * bins.pyramid_width(levels)
    out = torch.empty(k, width, dtype=x.dtype, device=x.device)
    argmax = torch.empty(k, width, dtype=torch.int32, device=x.device) if with_argmax else None
    for (v, a), offset in zip(results, bins.level_offsets(levels, c), strict=True):
        block = slice(offset, offset + v[0].numel())
        out[:, block].view_as(v).copy_(v)
        if argmax is not None:
            argmax[:, block].view_as(a).copy_(a)
    return out, argmax


def _roi_max_native(kernel, x32, batch, levels: Levels, geometry: Geometry, with_argmax, into=None):
    """``_roi_max`` by the compiled kernel (``spp_triton.native``): NaN-aware, levels nested in a
    finer one derived from it in the kernel (each window read once per root level), written
    straight into the output; no guard, no exact path.

    ``into=(out, argmax, rows)``: write RoI ``i`` into row ``rows[i]`` of those (contiguous, of
    ``x32``'s dtype; ``argmax`` int32 or None) instead of new tensors, and return ``None``."""
    n_img, c, height, width = x32.shape
    if height * width >= 2**31 - 1:
        raise ValueError(f"a {height}x{width} map has too many elements for int32 positions")
    x32 = x32.contiguous()
    k = batch.shape[0]
    row_width = c * bins.pyramid_width(levels)
    if into is None:
        out = torch.empty(k, row_width, dtype=x32.dtype)
        argmax = torch.empty(k, row_width, dtype=torch.int32) if with_argmax else None
        rows = None
    else:
        out, argmax, rows = into
        rows = rows.contiguous()
    batch = batch.contiguous()
    # finest first (``_root_plan``'s order), each nested level naming the finer one to derive from
    plan, order = _root_plan(levels), _finest_first(levels)
    position = {i: p for p, i in enumerate(order)}
    offsets = bins.level_offsets(levels, c)
    edges = [[t.contiguous() for t in geometry[levels[i]]] for i in order]
    specs = native.level_specs(
        [levels[i] for i in order],
        [offsets[i] for i in order],
        edges,
        [-1 if plan[i] is None else position[plan[i]] for i in order],
    )
    status = kernel(
        x32.data_ptr(),
        n_img,
        c,
        height,
        width,
        batch.data_ptr(),
        k,
        specs,
        len(levels),
        out.data_ptr(),
        argmax.data_ptr() if argmax is not None else None,
        row_width,
        rows.data_ptr() if rows is not None else None,
    )
    if status != 0:  # the public functions check batch indices first
        raise ValueError(f"regions: a batch index lies outside [0, {n_img - 1}]")
    return (out, argmax) if into is None else None


def _roi_max_levels(
    x32: torch.Tensor,
    q: _Quantised,
    levels: Levels,
    geometry: Geometry,
    with_argmax: bool,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Max over the RoI partition on one float32/float64 map: per level ``(values [K, C, bh, bw],
    int32 argmax of the same shape or None)``.

    Coarse nested levels are derived from finer ones: without ``with_argmax`` here, with it (a
    gradient will be needed) in ``_roi_max_levels_with_argmax``.

    Empty bins: torchvision gives 0 for a bin clipped away, which must not win when bins are
    merged into a coarse bin whose other values are negative. Only RoIs reaching past the map
    have empty bins (geometry says which, without reading values); for those rows (few) the
    derivation is repeated on a copy whose empty bins hold -inf, and its result, with coarse
    bins that are empty set back to 0, replaces theirs. A genuine -inf in the input is kept.
    """
    k, qrois = q.x0.shape[0], q.qrois
    plan = _root_plan(levels)
    if with_argmax:
        plan = _root_plan(levels, _MAX_FINE_BINS_WITH_ARGMAX)
        if any(src is not None and levels[src] != levels[i] for i, src in enumerate(plan)):
            return _roi_max_levels_with_argmax(x32, q, levels, geometry, plan)
    derives = not with_argmax and any(
        src is not None and levels[src] != levels[i] for i, src in enumerate(plan)
    )
    if not derives:  # every level pooled directly: no geometry needed
        pooled: dict[tuple[int, int], tuple] = {}
        for bh, bw in levels:
            if (bh, bw) not in pooled:
                pooled[(bh, bw)] = (
                    _torchvision_max(x32, qrois, bh, bw)
                    if with_argmax
                    else (_torchvision_max_values(x32, qrois, bh, bw), None)
                )
        return [pooled[lv] for lv in levels]

    empties = {level: _empty_bins(geometry, level) for level in geometry}
    special = torch.zeros(k, dtype=torch.bool, device=x32.device)
    for empty in empties.values():
        special |= empty.flatten(1).any(1)
    special_rows = special.nonzero().squeeze(1)
    n_special = special_rows.numel()
    # position of each RoI among the special rows (-1: not special)
    special_pos = torch.full((k,), -1, dtype=torch.int64, device=x32.device)
    special_pos[special_rows] = torch.arange(n_special, device=x32.device)

    vals: list = [None] * len(levels)
    neg: list = [None] * len(levels)  # special rows, empty bins at -inf
    for i in sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1]):
        bh, bw = levels[i]
        src = plan[i]
        empty = empties[(bh, bw)]
        if src is None:
            vals[i] = _torchvision_max_values(x32, qrois, bh, bw)
            if n_special:
                neg[i] = _set_empty_bins(vals[i][special_rows], empty[special_rows], -math.inf)
            continue
        if levels[src] == (bh, bw):
            vals[i], neg[i] = vals[src], neg[src]
            continue
        vals[i] = _derive_max(vals[src], bh, bw)
        if n_special:
            neg[i] = _derive_max(neg[src], bh, bw)
        # torchvision's float partition nests for the usual level sets but not always (e.g. 14
        # bins over some extents): re-pool directly the RoIs where the union differs.
        bad = _nesting_fails(geometry, levels[src], (bh, bw))
        if bad.numel():
            direct = _torchvision_max_values(x32, qrois[bad], bh, bw)
            vals[i][bad] = direct
            pos = special_pos[bad]
            hit = pos >= 0
            if bool(hit.any()):
                neg[i][pos[hit]] = _set_empty_bins(direct[hit], empty[bad[hit]], -math.inf)

    if n_special:  # special rows: the -inf derivation, empty coarse bins back to 0
        done = set()
        for i, src in enumerate(plan):
            if src is not None and id(vals[i]) not in done:
                done.add(id(vals[i]))
                empty = empties[levels[i]]
                vals[i][special_rows] = _set_empty_bins(neg[i], empty[special_rows], 0.0)
    return [(v, None) for v in vals]


def _nesting_fails(geometry, fine, coarse) -> torch.Tensor:
    """RoIs whose ``coarse`` bins are not unions of their ``fine`` bins under torchvision's float
    partition (``geometry``: per level the clipped edges), as indices."""
    (fh, fw), (bh, bw) = fine, coarse
    f_rlo, f_rhi, f_clo, f_chi = geometry[fine]
    rlo, rhi, clo, chi = geometry[coarse]
    r_h, r_w = fh // bh, fw // bw
    nests = (
        (rlo == f_rlo[:, ::r_h]).all(1)
        & (rhi == f_rhi[:, r_h - 1 :: r_h]).all(1)
        & (clo == f_clo[:, ::r_w]).all(1)
        & (chi == f_chi[:, r_w - 1 :: r_w]).all(1)
    )
    return (~nests).nonzero().squeeze(1)


def _group_min(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v.amin(dim)`` as a chain of elementwise minima (see ``_group_max``)."""
    parts = v.unbind(dim)
    out = parts[0]
    for p in parts[1:]:
        out = torch.minimum(out, p)
    return out if len(parts) > 1 else out.clone()


# With an argmax, deriving costs several elementwise passes over the fine level's [K, C, fh, fw]
# tensor (about 10 ns per element on our 2-core VM, about what torchvision's roi_pool spends per
# bin and channel): derived only from levels of at most this many bins, e.g. {1,2,4}: 2 from 4,
# 1 from 2; {1,2,3,6}: 1 from 2, the rest pooled directly.
_MAX_FINE_BINS_WITH_ARGMAX = 16


def _derive_max_with_argmax(fine_val, fine_arg, bh: int, bw: int):
    """Coarse ``(bh, bw)`` maxima and argmax from fine bins grouped ``rh x rw``. ``fine_val``
    holds -inf in empty fine bins, so they cannot win; the coarse argmax is the smallest flat
    index among the fine bins holding the maximum, which is the coarse bin's first maximal element
    in row-major order."""
    k, c, fh, fw = fine_val.shape
    rh, rw = fh // bh, fw // bw
    top = _derive_max(fine_val, bh, bw)  # [k, c, bh, bw]
    hit = fine_val.view(k, c, bh, rh, bw, rw) == top[:, :, :, None, :, None]
    first = torch.where(hit, fine_arg.view(k, c, bh, rh, bw, rw), torch.iinfo(torch.int32).max)
    return top, _group_min(_group_min(first, 3), -1)


def _roi_max_levels_with_argmax(x32, q: _Quantised, levels: Levels, geometry: Geometry, plan):
    """``_roi_max_levels`` with argmax: root levels pooled by torchvision (values and argmax),
    the others derived (``_derive_max_with_argmax``); RoIs whose bins do not nest are pooled
    directly at that level."""
    results: list = [None] * len(levels)
    # per source level: its values with -inf in empty bins (they must not win a derived bin),
    # the same tensor when it has none
    sources: dict[int, torch.Tensor] = {}
    for i in sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1]):
        bh, bw = levels[i]
        src = plan[i]
        if src is None:
            results[i] = _torchvision_max(x32, q.qrois, bh, bw)
        elif levels[src] == (bh, bw):
            results[i] = results[src]
        else:
            if src not in sources:
                fine_empty = _empty_bins(geometry, levels[src])
                fine_val = results[src][0]
                sources[src] = (
                    fine_val.masked_fill(fine_empty[:, None], -math.inf)
                    if bool(fine_empty.any())
                    else fine_val
                )
            val, arg = _derive_max_with_argmax(sources[src], results[src][1], bh, bw)
            coarse_empty = _empty_bins(geometry, (bh, bw))
            if bool(coarse_empty.any()):  # every fine bin empty: 0 and -1, as torchvision
                val = val.masked_fill(coarse_empty[:, None], 0.0)
                arg = arg.masked_fill(coarse_empty[:, None], -1)
            bad = _nesting_fails(geometry, levels[src], (bh, bw))
            if bad.numel():
                direct_val, direct_arg = _torchvision_max(x32, q.qrois[bad], bh, bw)
                val[bad] = direct_val
                arg[bad] = direct_arg
            results[i] = (val, arg)
    return results


# ----------------------------------------------------------------------------- max, adaptive
def _adaptive_max(x: torch.Tensor, regions: torch.Tensor, levels: Levels, with_argmax: bool):
    """Max over the adaptive partition, per level ``(values [K, C*bh*bw], int32 argmax or
    None)``. ATen's ``adaptive_max_pool2d`` propagates NaN but its index is a bin's *last* NaN;
    where a bin holds NaN the argmax is moved to its first (only when the output has a NaN)."""
    results = _adaptive_max_single(x, regions, levels, with_argmax)
    if not with_argmax or not any(bool(v.isnan().any()) for v, _ in results):
        return results
    n_img, c, height, width = x.shape
    plane = height * width
    # float64 key: positive at NaNs, larger for earlier positions (exact for any plane)
    flat = torch.arange(plane, dtype=torch.float64, device=x.device).view(1, 1, height, width)
    key = torch.where(x.isnan(), plane - flat, torch.full_like(flat, -1.0))
    keys = _adaptive_max_single(key, regions, levels, False)
    return [
        (v, torch.where(kv > 0, (plane - kv).to(a.dtype), a))
        for (v, a), (kv, _) in zip(results, keys, strict=True)
    ]


def _adaptive_max_single(x: torch.Tensor, regions: torch.Tensor, levels: Levels, with_argmax: bool):
    """``F.adaptive_max_pool2d`` per level on each group of images sharing a valid size (one
    group, and no copy, for an unpadded batch)."""
    k = regions.shape[0]
    n_img, c, height, width = x.shape
    sizes = regions[:, 1:3]
    groups = torch.unique(sizes, dim=0).tolist()
    whole = (
        len(groups) == 1
        and groups[0] == [height, width]
        and k == n_img
        and torch.equal(_batch_index(regions), torch.arange(k, device=x.device))
    )
    if whole:
        pooled = [F.adaptive_max_pool2d(x, lv, return_indices=with_argmax) for lv in levels]
        if not with_argmax:
            return [(v.reshape(k, -1), None) for v in pooled]
        return [(v.reshape(k, -1), idx.to(torch.int32).reshape(k, -1)) for v, idx in pooled]
    outs = [
        (
            x.new_zeros(k, c, bh, bw),
            torch.full((k, c, bh, bw), -1, dtype=torch.int32, device=x.device),
        )
        for bh, bw in levels
    ]
    for h, w in groups:
        sel = (sizes == sizes.new_tensor([h, w])).all(1)
        crop = x[_batch_index(regions[sel])][:, :, :h, :w]
        for (bh, bw), (val, arg) in zip(levels, outs, strict=True):
            v, idx = F.adaptive_max_pool2d(crop, (bh, bw), return_indices=True)
            val[sel] = v
            arg[sel] = ((idx // w) * width + idx % w).to(torch.int32)
    return [(v.reshape(k, -1), a.reshape(k, -1) if with_argmax else None) for v, a in outs]


# ----------------------------------------------------------------------------- avg (both)
def _summed_area_table(x: torch.Tensor) -> torch.Tensor:
    sat = F.pad(x.to(torch.float64), (1, 0, 1, 0))
    return sat.cumsum(2).cumsum(3)


def _avg_single(x, regions, scales, levels, partition, bin_dtype):
    k = regions.shape[0]
    n_img, c, height, width = x.shape
    finite = torch.isfinite(x)
    all_finite = bool(finite.all())
    # A summed-area table would smear a NaN or inf over every later sum: tabulate the finite
    # values, and (only if there are any) count NaN, +inf and -inf per bin separately.
    sat = _summed_area_table(x if all_finite else torch.where(finite, x, torch.zeros_like(x)))
    specials = (
        None
        if all_finite
        else [_summed_area_table(m) for m in (x.isnan(), x == float("inf"), x == float("-inf"))]
    )
    b = _batch_index(regions)[:, None, None]
    outs = []
    edges = bins.region_bin_edges(regions, scales, height, width, levels, partition, bin_dtype)
    for r_lo, r_hi, c_lo, c_hi in edges:

        def box_sum(table, r_lo=r_lo, r_hi=r_hi, c_lo=c_lo, c_hi=c_hi):
            # advanced indices around a slice: each lookup is [K, bh, bw, C]
            def at(r, cc):
                return table[b, :, r[:, :, None], cc[:, None, :]]

            return at(r_hi, c_hi) - at(r_lo, c_hi) - at(r_hi, c_lo) + at(r_lo, c_lo)

        total = box_sum(sat)
        count = ((r_hi - r_lo)[:, :, None] * (c_hi - c_lo)[:, None, :]).clamp(min=0)
        mean = torch.where(
            count[..., None] > 0, total / count.clamp(min=1)[..., None], torch.zeros_like(total)
        )
        if specials is not None:
            nan, pos, neg = (box_sum(t) > 0.5 for t in specials)
            mean = torch.where(pos, float("inf"), mean)
            mean = torch.where(neg, float("-inf"), mean)
            mean = torch.where(nan | (pos & neg), float("nan"), mean)
        outs.append(mean.permute(0, 3, 1, 2).to(x.dtype).reshape(k, -1))
    return outs


def _avg_backward_single(grad_levels, shape, regions, scales, levels, partition, bin_dtype):
    n_img, c, height, width = shape
    device = grad_levels[0].device
    diff = torch.zeros(n_img, c, height + 1, width + 1, dtype=torch.float64, device=device)
    b = _batch_index(regions)
    ch = torch.arange(c, device=device)
    edges = bins.region_bin_edges(regions, scales, height, width, levels, partition, bin_dtype)
    for g, (r_lo, r_hi, c_lo, c_hi) in zip(grad_levels, edges, strict=True):
        k, bh, bw = r_lo.shape[0], r_lo.shape[1], c_lo.shape[1]
        count = ((r_hi - r_lo)[:, :, None] * (c_hi - c_lo)[:, None, :]).clamp(min=0)
        share = g.view(k, c, bh, bw).to(torch.float64) / count.clamp(min=1)[:, None]
        share = share.masked_fill((count == 0)[:, None], 0.0)
        idx_b = b.view(k, 1, 1, 1).expand(k, c, bh, bw)
        idx_c = ch.view(1, c, 1, 1).expand(k, c, bh, bw)
        for rows, cols, sign in (
            (r_lo, c_lo, 1.0),
            (r_lo, c_hi, -1.0),
            (r_hi, c_lo, -1.0),
            (r_hi, c_hi, 1.0),
        ):
            idx_r = rows.view(k, 1, bh, 1).expand(k, c, bh, bw)
            idx_w = cols.view(k, 1, 1, bw).expand(k, c, bh, bw)
            diff.index_put_((idx_b, idx_c, idx_r, idx_w), sign * share, accumulate=True)
    return diff.cumsum(2).cumsum(3)[:, :, :height, :width]


# ----------------------------------------------------------------------------- entry points
def _map_rows(num_maps: int, feature_index: torch.Tensor | None):
    """``[(f, rows)]`` for the maps that some region reads: ``rows`` (int64) are the regions on
    map ``f``, ``None`` meaning all of them (one map: ``feature_index`` is ``None`` or ignored).
    One sort and one host read, not a mask and a ``nonzero`` per map; an index outside
    ``[0, num_maps)`` selects no map."""
    if num_maps == 1:
        return [(0, None)]
    keys, order = torch.sort(feature_index, stable=True)
    bounds = torch.searchsorted(keys, torch.arange(num_maps + 1, device=keys.device)).tolist()
    return [
        (f, order[bounds[f] : bounds[f + 1]]) for f in range(num_maps) if bounds[f + 1] > bounds[f]
    ]


def pyramid_pool_forward(
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    spatial_scales: list[float],
    levels: Levels,
    mode: str,
    partition: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pooling; returns ``(out [K, C*P], argmax [K, C*P] int32)``; the argmax is an empty
    tensor for avg, and for max when ``with_argmax`` is False (no gradient will be needed)."""
    x_first = features[0]
    k, c = regions.shape[0], x_first.shape[1]
    width_p = c * bins.pyramid_width(levels)
    with_argmax = with_argmax and mode == "max"
    argmax = torch.empty(0, dtype=torch.int32, device=x_first.device)
    if k == 0:
        if with_argmax:
            argmax = torch.empty((0, width_p), dtype=torch.int32, device=x_first.device)
        return x_first.new_zeros(k, width_p), argmax
    maps = _map_rows(len(features), feature_index)
    if maps[0][1] is not None:  # several maps: rows are scattered into one output
        # every row is written unless some index is out of range (rows left at zero, argmax -1)
        covered = sum(rows.numel() for _, rows in maps) == k
        out = x_first.new_empty(k, width_p) if covered else x_first.new_zeros(k, width_p)
        if with_argmax:
            shape, device = (k, width_p), x_first.device
            argmax = (
                torch.empty(shape, dtype=torch.int32, device=device)
                if covered
                else torch.full(shape, -1, dtype=torch.int32, device=device)
            )
    bin_dtype = bins.bin_dtype_for(x_first.dtype)
    for f, rows in maps:
        x = features[f]
        reg = regions if rows is None else regions[rows]
        scale = float(spatial_scales[f]) if partition == "roi" else None
        if mode == "avg":
            val = torch.cat(_avg_single(x, reg, scale, levels, partition, bin_dtype), dim=1)
            arg = None
        elif partition == "roi":
            into = None if rows is None else (out, argmax if with_argmax else None, rows)
            result = _roi_max(x, reg, scale, levels, bin_dtype, with_argmax, into)
            if result is None:  # written into its rows
                continue
            val, arg = result
        else:
            pairs = _adaptive_max(x, reg, levels, with_argmax)
            val = torch.cat([p[0] for p in pairs], dim=1)
            arg = torch.cat([p[1] for p in pairs], dim=1) if with_argmax else None
        if rows is None:  # one map: its result is the output
            return val, (argmax if arg is None else arg)
        out.index_copy_(0, rows, val)
        if arg is not None:
            argmax.index_copy_(0, rows, arg)
    return out, argmax


def _max_backward_cpu(g, argmax, batch, shape, levels):
    """Max backward on CPU: torchvision's ``_roi_pool_backward`` once per level. It adds
    ``g`` at each bin's argmax (``-1`` skipped) in one serial loop (deterministic), needs only the
    RoIs' batch index and writes into one zeroed map per level: no index tensor as large as the
    output is built."""
    n_img, c, height, width = shape
    k = g.shape[0]
    # only column 0 (the batch index) is read
    rois = torch.zeros(k, 5, dtype=g.dtype, device=g.device)
    rois[:, 0] = batch
    grad = None
    for (bh, bw), offset in zip(levels, bins.level_offsets(levels, c), strict=True):
        block = slice(offset, offset + c * bh * bw)
        level_grad = torch.ops.torchvision._roi_pool_backward(
            g[:, block].reshape(k, c, bh, bw),
            rois,
            argmax[:, block].reshape(k, c, bh, bw).contiguous(),  # its argmax must be dense
            1.0,
            bh,
            bw,
            n_img,
            c,
            height,
            width,
        )
        grad = level_grad if grad is None else grad.add_(level_grad)
    return grad


_NUMPY_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed, contiguous gradient map. On CPU it comes from numpy (calloc, and transparent huge
    pages where the kernel allows them), so the OS zeroes the memory when it is first touched
    instead of ``torch.zeros`` writing every byte first: on this project's VM, zeroing a
    2x256x200x336 map, scattering 800k values into it and summing it took 37 ms that way and
    100 ms with ``torch.zeros`` (one thread)."""
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        try:
            import numpy as np
        except ImportError:  # numpy is optional for torch
            pass
        else:
            return torch.from_numpy(np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[dtype]))
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def _max_backward_native(kernel, grad_all, argmax_all, rows, batch, shape, levels):
    """Max backward by the compiled kernel (``spp_triton.native``): one zeroed map (``_zeros``),
    every level's gradient added at its argmax in one serial pass (levels in order, then RoIs:
    for one level torchvision's ``_roi_pool_backward`` order, so the same sums), reading this
    map's ``rows`` of the whole ``grad_all`` / ``argmax_all`` in place."""
    n_img, c, height, width = shape
    grad = _zeros(shape, grad_all.dtype, grad_all.device)
    batch = batch.contiguous()
    if rows is not None:
        rows = rows.contiguous()
    specs = native.level_specs(levels, bins.level_offsets(levels, c))
    status = kernel(
        grad_all.data_ptr(),
        argmax_all.data_ptr(),
        grad_all.shape[1],
        rows.data_ptr() if rows is not None else None,
        batch.data_ptr(),
        batch.shape[0],
        specs,
        len(levels),
        grad.data_ptr(),
        n_img,
        c,
        height,
        width,
    )
    if status != 0:
        raise ValueError(f"regions: a batch index lies outside [0, {n_img - 1}]")
    return grad


def _max_backward_scatter(g, argmax, batch, shape, levels):
    """Max backward on other devices (the deterministic path for CUDA tensors): one 1-D
    ``scatter_add_`` of ``g`` at the flat argmax indices, which PyTorch makes deterministic."""
    n_img, c, height, width = shape
    plane = height * width
    numel = n_img * c * plane
    # Index arithmetic in int32 when the map allows (half the bytes of int64), widened once.
    idx_dtype = torch.int32 if numel < 2**31 - 1 else torch.int64
    column_offset = torch.cat(
        [
            torch.arange(c, device=g.device, dtype=idx_dtype).repeat_interleave(bh * bw) * plane
            for bh, bw in levels
        ]
    )
    flat_idx = argmax.to(idx_dtype) + column_offset
    flat_idx.add_((batch * (c * plane)).to(idx_dtype)[:, None])
    # Empty bins (argmax -1) add into one spare slot past the end: no boolean masking, whose
    # nonzero() costs more than the scatter itself. Most batches have no empty bin: one read of
    # the argmax says so.
    if argmax.numel() and int(argmax.min()) < 0:
        flat_idx.masked_fill_(argmax < 0, numel)
    grad = torch.zeros(numel + 1, dtype=g.dtype, device=g.device)
    grad.scatter_add_(0, flat_idx.to(torch.int64).view(-1), g.reshape(-1))
    return grad[:numel].view(n_img, c, height, width)


def pyramid_pool_backward(
    grad_out: torch.Tensor,
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    spatial_scales: list[float],
    levels: Levels,
    mode: str,
    partition: str,
    argmax: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients w.r.t. each feature map (its shape and dtype); deterministic."""
    grads = []
    c = features[0].shape[1]
    sizes = [c * bh * bw for bh, bw in levels]
    bin_dtype = bins.bin_dtype_for(features[0].dtype)
    reads = dict(_map_rows(len(features), feature_index))
    kernel = None
    if mode == "max" and grad_out.device.type == "cpu":
        kernel = native.roi_max_backward_kernel(bin_dtype)
        if kernel is not None:  # converted once; each map's rows are read in place
            grad_all, argmax_all = grad_out.to(bin_dtype).contiguous(), argmax.contiguous()
    for f, x in enumerate(features):
        if f not in reads or regions.shape[0] == 0:  # no region reads this map
            grads.append(_zeros(x.shape, x.dtype, x.device))
            continue
        rows = reads[f]
        reg = regions if rows is None else regions[rows]
        acc_dtype = bins.bin_dtype_for(x.dtype)
        if kernel is not None:
            grad = _max_backward_native(
                kernel, grad_all, argmax_all, rows, _batch_index(reg), x.shape, levels
            )
            grads.append(grad.to(x.dtype))
            continue
        g = grad_out if rows is None else grad_out[rows]
        if mode == "avg":
            scale = float(spatial_scales[f]) if partition == "roi" else None
            grad = _avg_backward_single(
                list(g.split(sizes, dim=1)), x.shape, reg, scale, levels, partition, bin_dtype
            )
        else:
            a = argmax if rows is None else argmax[rows]
            max_backward = _max_backward_cpu if x.device.type == "cpu" else _max_backward_scatter
            grad = max_backward(g.to(acc_dtype), a, _batch_index(reg), x.shape, levels)
        grads.append(grad.to(x.dtype))
    return grads
