"""The one definition of bin geometry: levels, bin dtype, RoI quantisation and the partitions.

Every pooled value in spp_triton is a reduction over a half-open rectangle
``[h_lo, h_hi) x [w_lo, w_hi)`` of one (image, channel) plane. This module says where those
rectangles are. The CPU path, the FLOP counts (``profiling``) and, through
``spp_triton.kernels.bins`` (a line-for-line Triton transcription checked against this file in
``tests/test_kernels.py``), the Triton kernels all use these formulas; ``tests/test_bins.py``
checks them against torchvision's ``roi_pool`` and ``F.adaptive_max_pool2d``. Only
``spp_triton.reference``, the test oracle, restates them independently (sharing the dtype rule).

Two partitions exist:

* **RoI partition** (``roi_pool``, ``roi_spp_pool``): torchvision's ``roi_pool``. Box corners are
  multiplied by ``spatial_scale`` and rounded half away from zero; the RoI spans
  ``max(end - start + 1, 1)`` pixels; bin ``p`` of ``n`` spans
  ``[floor(p * b), ceil((p + 1) * b))`` offset by the RoI start, where ``b = extent / n`` is
  computed in the *bin dtype* (float32, or float64 for float64 inputs, as torchvision does), then
  clipped to the map. Empty after clipping -> the bin pools nothing (max and avg give 0).
* **Adaptive partition** (``spp_pool``): ``F.adaptive_*_pool2d``'s integer floor/ceil
  partition of a region of ``size`` pixels into ``n`` bins:
  ``[floor(p * size / n), ceil((p + 1) * size / n))``.
  Never empty for ``size >= 1``; bins overlap when ``size < n``.

Levels travel in two forms only: the validated ``(bins_h, bins_w)`` pairs that
:func:`normalize_levels` makes of the user's ints and pairs (once, at the public boundary), and the
flat ``[bh0, bw0, bh1, bw1, ...]`` list of the ``torch.ops.spp_triton`` schemas
(:func:`flatten_levels` / :func:`unflatten_levels`).

Quantised RoI corners are clamped to ``[-COORD_LIMIT, COORD_LIMIT]`` feature pixels so that every
later step is exact in float32 and int32 and no box, however large, indexes outside the map.
Boxes that large are never meaningful; within the limit the result is torchvision's, bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

Levels = Sequence[tuple[int, int]]

# 2**22: extents stay <= 2**23 + 1, exactly representable in float32, products fit in int32.
COORD_LIMIT = 1 << 22


def bin_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The bin dtype rule: float64 for float64 inputs, float32 otherwise (torchvision's ``T``).

    RoI scaling and bin sizes are computed in it, and sums, gradients and pooled half-precision
    values accumulate in it (the reference, the CPU path and the kernels all ask this function).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` rounds half to even). Exact."""
    t = torch.trunc(x)
    # x - trunc(x) is exact in floating point, so this never misrounds 0.49999997-like values.
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def quantize_rois(
    boxes: torch.Tensor, spatial_scale: float | torch.Tensor, bin_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map boxes ``[K, 4]`` (x1, y1, x2, y2, image coordinates) to integer RoIs on the feature map.

    Returns ``(x0, y0, width, height)``, each an int64 ``[K]`` tensor: the RoI's first column and
    row (may be negative or beyond the map) and its extent in pixels (>= 1). ``spatial_scale`` is
    a number or a ``[K]`` tensor (one scale per box, for boxes on different FPN levels). The
    product is taken in ``bin_dtype``, as torchvision multiplies in the input's dtype.
    """
    scale = torch.as_tensor(spatial_scale, dtype=bin_dtype, device=boxes.device)
    if scale.ndim == 1:
        scale = scale[:, None]
    scaled = boxes.to(bin_dtype) * scale
    q = round_half_away_from_zero(scaled).clamp(-COORD_LIMIT, COORD_LIMIT).to(torch.int64)
    x0, y0, x1, y1 = q.unbind(dim=1)
    width = (x1 - x0 + 1).clamp(min=1)
    height = (y1 - y0 + 1).clamp(min=1)
    return x0, y0, width, height


def roi_bin_edges(
    start: torch.Tensor, extent: torch.Tensor, n: int, size: int, bin_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoI-partition edges along one axis: ``[K]`` starts/extents -> ``(lo, hi)`` int64 ``[K, n]``.

    ``size`` is the map's length on that axis; edges are clipped to ``[0, size]``.
    """
    bin_size = extent.to(bin_dtype) / torch.tensor(float(n), dtype=bin_dtype)
    p = torch.arange(n, dtype=bin_dtype, device=extent.device)
    lo = torch.floor(p * bin_size[:, None]).to(torch.int64) + start[:, None]
    hi = torch.ceil((p + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def adaptive_bin_edges(size: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-partition edges: ``[N]`` region sizes -> ``(lo, hi)`` int64 ``[N, n]``."""
    p = torch.arange(n, dtype=torch.int64, device=size.device)
    size = size.to(torch.int64)[:, None]
    lo = torch.div(p * size, n, rounding_mode="floor")
    hi = torch.div((p + 1) * size + n - 1, n, rounding_mode="floor")
    return lo, hi


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError(f"{name} must hold positive integers, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must hold positive integers, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must hold positive integers, got {v}")
    return v


def normalize_levels(levels, name: str = "levels") -> tuple[tuple[int, int], ...]:
    """The user's levels (ints ``n`` for ``n x n`` bins, ``(bins_h, bins_w)`` pairs, or a 1-D int
    tensor) as validated pairs: ``[1, 2, (3, 4)]`` -> ``((1, 1), (2, 2), (3, 4))``.

    Raises ``ValueError`` naming ``name`` for anything else (empty, non-positive, non-integer).
    """
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {levels!r}")
    if len(levels) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got an empty one")
    pairs = []
    for lv in levels:
        if isinstance(lv, (tuple, list)):
            if len(lv) != 2:
                raise ValueError(
                    f"{name}: a level is an int n or a pair (bins_h, bins_w), got {lv!r}"
                )
            pairs.append((_positive_int(lv[0], name), _positive_int(lv[1], name)))
        else:
            n = _positive_int(lv, name)
            pairs.append((n, n))
    return tuple(pairs)


def flatten_levels(levels: Levels) -> list[int]:
    """Pairs -> the ops' flat ``[bh0, bw0, bh1, bw1, ...]`` (a schema cannot hold pairs)."""
    return [int(v) for pair in levels for v in pair]


def unflatten_levels(levels_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The ops' flat ``[bh0, bw0, ...]`` -> pairs (inverse of :func:`flatten_levels`)."""
    return tuple((int(levels_hw[i]), int(levels_hw[i + 1])) for i in range(0, len(levels_hw), 2))


def pyramid_width(levels: Sequence[tuple[int, int]]) -> int:
    """Bins per channel over all levels: ``sum(bh * bw)``."""
    return sum(bh * bw for bh, bw in levels)


def level_offsets(levels: Sequence[tuple[int, int]], channels: int) -> list[int]:
    """Start of each level's block in a flattened pyramid row ``[C * sum(bh * bw)]``.

    The layout is level-major in the order given, then channel, row, column.
    """
    offsets, acc = [], 0
    for bh, bw in levels:
        offsets.append(acc)
        acc += channels * bh * bw
    return offsets


def region_bin_edges(
    regions: torch.Tensor,
    scales: float | torch.Tensor | None,
    height: int,
    width: int,
    levels: Levels,
    partition: str,
    bin_dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per level, the clipped ``(row_lo, row_hi, col_lo, col_hi)`` of every region's bins: int64
    ``[K, bh]`` / ``[K, bw]``. A bin is empty where ``hi <= lo`` (RoI partition only).

    ``partition="roi"``: ``regions`` is ``[K, 5]`` (batch, x1, y1, x2, y2) in image coordinates
    and ``scales`` a number or ``[K]`` tensor; the RoIs are quantised once for all levels.
    ``partition="adaptive"``: ``regions`` is ``[K, 3]`` (batch, valid_h, valid_w); ``scales`` is
    ignored.
    """
    if partition == "roi":
        x0, y0, roi_w, roi_h = quantize_rois(regions[:, 1:5], scales, bin_dtype)
        return [
            (
                *roi_bin_edges(y0, roi_h, bh, height, bin_dtype),
                *roi_bin_edges(x0, roi_w, bw, width, bin_dtype),
            )
            for bh, bw in levels
        ]
    valid_h, valid_w = regions[:, 1], regions[:, 2]
    return [
        (*adaptive_bin_edges(valid_h, bh), *adaptive_bin_edges(valid_w, bw)) for bh, bw in levels
    ]
