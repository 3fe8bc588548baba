"""The vectorised PyTorch path: forward and backward of pyramid pooling without Triton.

It has the same interface as ``spp_triton.kernels.pyramid_pool`` (see there for the argument
conventions) and runs on any device. ``spp_triton.ops`` uses it for CPU tensors and for the
deterministic backward (it scatters through ``index_put_(accumulate=True)``, which PyTorch makes
deterministic under ``torch.use_deterministic_algorithms(True)``).

How it is fast without a loop per RoI:

* **max, RoI partition**: one call of torchvision's C++ ``roi_pool`` at each *root* level (a level
  that divides no other requested level); every other level is derived from a finer one whose bins
  nest in it (coarse bin = union of fine bins), so the RoI windows are read once per root level
  instead of once per level. Nesting of torchvision's float partition is checked per RoI, and the
  rare RoIs where it fails (e.g. 14 bins over some extents) are pooled directly. Boxes are handed to
  torchvision already quantised (``spp_triton.bins``) with scale 1, so the partition is ours.
  torchvision skips NaN; bins that contain a NaN are patched to NaN afterwards (only when the input
  has one).
* **max, adaptive partition**: ``F.adaptive_max_pool2d`` on each distinct valid image size.
* **avg, both partitions**: a float64 summed-area table, four lookups per bin; the backward
  scatters ``+-g / count`` at the four corners of each bin and integrates (two cumsums).

Argmax convention (shared with the kernels): int32 flat index ``h * W + w`` of the selected element
in its (image, channel) plane, ``-1`` for an empty bin; ties go to the first maximal element in
row-major order; a bin with a NaN selects its first NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_pool)

from spp_triton import bins

Levels = Sequence[tuple[int, int]]


# ----------------------------------------------------------------------------- region geometry
def region_bin_edges(
    regions: torch.Tensor,
    scales: torch.Tensor | None,
    height: int,
    width: int,
    levels: Levels,
    partition: str,
    bin_dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per level, clipped ``(row_lo, row_hi, col_lo, col_hi)``: int64 ``[K, bh]`` / ``[K, bw]``."""
    if partition == "roi":
        x0, y0, roi_w, roi_h = bins.quantize_rois(regions[:, 1:5], scales, bin_dtype)
        return [
            (
                *bins.roi_bin_edges(y0, roi_h, bh, height, bin_dtype),
                *bins.roi_bin_edges(x0, roi_w, bw, width, bin_dtype),
            )
            for bh, bw in levels
        ]
    valid_h, valid_w = regions[:, 1], regions[:, 2]
    return [
        (*bins.adaptive_bin_edges(valid_h, bh), *bins.adaptive_bin_edges(valid_w, bw))
        for bh, bw in levels
    ]


def _batch_index(regions: torch.Tensor) -> torch.Tensor:
    return regions[:, 0].to(torch.int64)


# ----------------------------------------------------------------------------- max, RoI partition
def _root_plan(levels: Levels) -> list[int | None]:
    """For each level, the index of a finer level it is derived from (``None``: pool it directly).

    A level derives from the coarsest finer level whose bin counts it divides on both axes (the
    fewest values to reduce).
    """
    order = sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1])
    plan: list[int | None] = [None] * len(levels)
    for pos, i in enumerate(order):
        bh, bw = levels[i]
        for j in reversed(order[:pos]):
            fh, fw = levels[j]
            if fh % bh == 0 and fw % bw == 0:
                plan[i] = j
                break
    return plan


def _torchvision_max(x32: torch.Tensor, qrois: torch.Tensor, bh: int, bw: int):
    out, arg = torch.ops.torchvision.roi_pool(x32, qrois, 1.0, bh, bw)
    return out, arg.to(torch.int32)


def _group_max(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v.amax(dim)`` for the small group dims of the derivation: a chain of elementwise
    maxima over the slices, much faster on CPU than a reduction over a dim of size 2 or 3."""
    parts = v.unbind(dim)
    out = parts[0]
    for p in parts[1:]:
        out = torch.maximum(out, p)
    return out if len(parts) > 1 else out.clone()


def _derive_max_values(
    fine_val: torch.Tensor,
    fine_rows_empty: torch.Tensor,
    fine_cols_empty: torch.Tensor,
    bh: int,
    bw: int,
) -> torch.Tensor:
    """Coarse (bh, bw) maxima from fine bins grouped ``rh x rw`` (values only), reduced
    separably, columns then rows.

    A fine bin is empty (clipped away) iff its row range or its column range is, so emptiness is
    known from the ``[K, fh]`` / ``[K, fw]`` edge masks without reading the values. Empty fine bins
    hold 0, which must not beat negative maxima: while reducing they are set to -inf in place (and
    back to 0 after); a coarse bin with only empty fine bins gives 0.
    """
    k, c, fh, fw = fine_val.shape
    rh, rw = fh // bh, fw // bw
    any_empty = bool(fine_rows_empty.any() or fine_cols_empty.any())
    if any_empty:
        fine_empty = fine_rows_empty[:, None, :, None] | fine_cols_empty[:, None, None, :]
        fine_val.masked_fill_(fine_empty, float("-inf"))
    v = _group_max(_group_max(fine_val.view(k, c, fh, bw, rw), -1).view(k, c, bh, rh, bw), 3)
    if any_empty:
        fine_val.masked_fill_(fine_empty, 0.0)
        rows_empty = fine_rows_empty.view(k, bh, rh).all(2)
        cols_empty = fine_cols_empty.view(k, bw, rw).all(2)
        v.masked_fill_(rows_empty[:, None, :, None] | cols_empty[:, None, None, :], 0.0)
    return v


# RoIs are pooled in chunks whose finest-level values stay cache-sized (elements).
_CHUNK_ELEMENTS = 1 << 22


def _roi_max_chunked(
    x: torch.Tensor,
    regions: torch.Tensor,
    scales,
    levels: Levels,
    bin_dtype: torch.dtype,
    with_argmax: bool,
):
    """Max over the RoI partition on one feature map. Returns per level
    ``(values [K, C*bh*bw], argmax [K, C*bh*bw] or None)``.

    With ``with_argmax`` (a gradient will be needed) every level is one torchvision call, whose
    argmax comes for free. Without, coarse nested levels are derived from finer ones, in
    cache-sized chunks of RoIs (the derivation makes a few passes over the finest values).
    """
    k, c = regions.shape[0], x.shape[1]
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    has_nan = bool(x32.isnan().any())
    finest = max(bh * bw for bh, bw in levels)
    step = k if with_argmax else max(1, _CHUNK_ELEMENTS // max(1, c * finest))
    parts = [
        _roi_max_single(
            x32,
            regions[i : i + step],
            scales[i : i + step],
            levels,
            bin_dtype,
            has_nan,
            x.dtype,
            with_argmax,
        )
        for i in range(0, max(k, 1), step)
    ]
    if len(parts) == 1:
        return parts[0]
    return [
        (
            torch.cat([p[j][0] for p in parts]),
            torch.cat([p[j][1] for p in parts]) if with_argmax else None,
        )
        for j in range(len(levels))
    ]


def _roi_max_single(
    x32: torch.Tensor,
    regions: torch.Tensor,
    scales,
    levels: Levels,
    bin_dtype: torch.dtype,
    has_nan: bool,
    out_dtype: torch.dtype,
    with_argmax: bool,
):
    """Max over the RoI partition on one (float32/float64) feature map."""
    n_img, c, height, width = x32.shape
    k = regions.shape[0]
    x0, y0, roi_w, roi_h = bins.quantize_rois(regions[:, 1:5], scales, bin_dtype)
    # Quantised RoIs as exact floats with scale 1: torchvision then partitions exactly as bins.py.
    qrois = torch.stack(
        [
            regions[:, 0].to(x32.dtype),
            x0.to(x32.dtype),
            y0.to(x32.dtype),
            (x0 + roi_w - 1).to(x32.dtype),
            (y0 + roi_h - 1).to(x32.dtype),
        ],
        dim=1,
    )

    results: list = [None] * len(levels)
    plan = [None] * len(levels) if with_argmax else _root_plan(levels)
    edges: dict[tuple[int, int], tuple] = {}

    def level_edges(bh, bw):  # clipped (row_lo, row_hi, col_lo, col_hi) of a level's bins
        if (bh, bw) not in edges:
            edges[(bh, bw)] = (
                *bins.roi_bin_edges(y0, roi_h, bh, height, bin_dtype),
                *bins.roi_bin_edges(x0, roi_w, bw, width, bin_dtype),
            )
        return edges[(bh, bw)]

    for i in sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1]):
        bh, bw = levels[i]
        src = plan[i]
        if src is None:
            results[i] = _torchvision_max(x32, qrois, bh, bw)
            continue
        if levels[src] == (bh, bw):
            results[i] = results[src]
            continue
        fh, fw = levels[src]
        f_rlo, f_rhi, f_clo, f_chi = level_edges(fh, fw)
        val = _derive_max_values(results[src][0], f_rhi <= f_rlo, f_chi <= f_clo, bh, bw)
        # torchvision's float partition nests for the usual level sets but not always (e.g. 14
        # bins over some extents): re-pool directly the RoIs where the union differs.
        rlo, rhi, clo, chi = level_edges(bh, bw)
        r_h, r_w = fh // bh, fw // bw
        ok = (
            (rlo == f_rlo[:, ::r_h]).all(1)
            & (rhi == f_rhi[:, r_h - 1 :: r_h]).all(1)
            & (clo == f_clo[:, ::r_w]).all(1)
            & (chi == f_chi[:, r_w - 1 :: r_w]).all(1)
        )
        if not bool(ok.all()):
            bad = ~ok
            val[bad] = _torchvision_max(x32, qrois[bad], bh, bw)[0]
        results[i] = (val, None)

    if has_nan:
        _patch_nan_bins(x32, levels, results, bin_dtype, scales, regions)
    return [
        (
            v.to(out_dtype).reshape(k, c * v.shape[2] * v.shape[3]),
            a.reshape(k, -1) if with_argmax else None,
        )
        for v, a in results
    ]


def _patch_nan_bins(x32, levels, results, bin_dtype, scales, regions):
    """torchvision skips NaN; spp_triton propagates it. Pool a key that is positive exactly at NaNs
    and larger for earlier positions: a positive pooled key marks a NaN bin and locates its first
    NaN."""
    n_img, c, height, width = x32.shape
    plane = height * width
    # The key is pooled in the bin dtype so that torchvision partitions exactly as for x32; its
    # positions are exact below 2**24 pixels per plane (float32).
    flat = torch.arange(plane, device=x32.device, dtype=bin_dtype).view(1, 1, height, width)
    key = torch.where(x32.isnan(), plane - flat, torch.full_like(flat, -1.0))
    key_levels = _roi_max_single(key, regions, scales, levels, bin_dtype, False, key.dtype, False)
    for i, (kv, _) in enumerate(key_levels):
        val, arg = results[i]
        kv = kv.view_as(val)
        has_nan = kv > 0
        results[i] = (
            val.masked_fill(has_nan, float("nan")),
            torch.where(has_nan, (plane - kv).to(torch.int32), arg) if arg is not None else None,
        )


# ----------------------------------------------------------------------------- max, adaptive
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
    edges = region_bin_edges(regions, scales, height, width, levels, partition, bin_dtype)
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
    edges = region_bin_edges(regions, scales, height, width, levels, partition, bin_dtype)
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
def _per_feature(features, feature_index):
    """Yield (f, x, row selector) for the maps that some region reads."""
    if len(features) == 1:
        yield 0, features[0], None
        return
    for f, x in enumerate(features):
        sel = feature_index == f
        if bool(sel.any()):
            yield f, x, sel


def _scales_for(spatial_scales, f, count, device, bin_dtype):
    return torch.full((count,), float(spatial_scales[f]), dtype=bin_dtype, device=device)


def pyramid_pool_forward(
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor,
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
    if k == 0 or len(features) > 1:  # (one map: a single concatenation below, no fill)
        out = x_first.new_zeros(k, width_p)
        if with_argmax:
            argmax = torch.full((k, width_p), -1, dtype=torch.int32, device=x_first.device)
    if k == 0:
        return out, argmax
    bin_dtype = bins.bin_dtype_for(x_first.dtype)
    for f, x, sel in _per_feature(features, feature_index):
        reg = regions if sel is None else regions[sel]
        scales = (
            _scales_for(spatial_scales, f, reg.shape[0], x.device, bin_dtype)
            if partition == "roi"
            else None
        )
        if mode == "avg":
            vals, args = _avg_single(x, reg, scales, levels, partition, bin_dtype), None
        else:
            pairs = (
                _roi_max_chunked(x, reg, scales, levels, bin_dtype, with_argmax)
                if partition == "roi"
                else _adaptive_max_single(x, reg, levels, with_argmax)
            )
            vals = [p[0] for p in pairs]
            args = [p[1] for p in pairs] if with_argmax else None
        if sel is None:  # one map: no zero-fill and copy, one concatenation
            return torch.cat(vals, dim=1), (torch.cat(args, dim=1) if args else argmax)
        out[sel] = torch.cat(vals, dim=1)
        if args:
            argmax[sel] = torch.cat(args, dim=1)
    return out, argmax


def pyramid_pool_backward(
    grad_out: torch.Tensor,
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor,
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
    for f, x in enumerate(features):
        sel = None if len(features) == 1 else feature_index == f
        g = grad_out if sel is None else grad_out[sel]
        reg = regions if sel is None else regions[sel]
        n_img, _, height, width = x.shape
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if reg.shape[0] == 0:
            grads.append(torch.zeros_like(x, memory_format=torch.contiguous_format))
            continue
        if mode == "avg":
            scales = (
                _scales_for(spatial_scales, f, reg.shape[0], x.device, bin_dtype)
                if partition == "roi"
                else None
            )
            grad = _avg_backward_single(
                list(g.split(sizes, dim=1)), x.shape, reg, scales, levels, partition, bin_dtype
            )
        else:
            a = argmax if sel is None else argmax[sel]
            plane = height * width
            channel_of_column = torch.cat(
                [torch.arange(c, device=x.device).repeat_interleave(bh * bw) for bh, bw in levels]
            )
            base = (_batch_index(reg)[:, None] * c + channel_of_column[None, :]) * plane
            hit = a >= 0
            flat_idx = (base + a.to(torch.int64))[hit]
            grad = torch.zeros(n_img * c * plane, dtype=acc_dtype, device=x.device)
            grad.index_put_((flat_idx,), g[hit].to(acc_dtype), accumulate=True)
            grad = grad.view(n_img, c, height, width)
        grads.append(grad.to(x.dtype))
    return grads
