"""Slow, obviously-correct references: the test oracle for everything spp_triton computes.

Written independently of ``spp_triton.bins`` (only its dtype rule is shared): plain Python
scalars, a loop per RoI and per bin, numpy float32 for torchvision's float32 bin sizes. Max
pooling propagates NaN (``torch.amax``). Gradients through these functions are autograd's; for max,
``torch.amax`` splits the gradient among tied maxima, so gradient tests of max use torchvision /
``F.adaptive_max_pool2d`` (which pick the first maximal element, as spp_triton does) or tie-free
inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The one rule shared with the code under test (a dtype choice, not geometry: the bin edges below
# are computed independently of spp_triton.bins).
from spp_triton.bins import bin_dtype_for


def _c_round(v: float) -> int:
    """C ``round``: half away from zero."""
    t = math.trunc(v)
    return t + (int(math.copysign(1, v)) if abs(v - t) >= 0.5 else 0)


def _scalar(dtype: torch.dtype):
    """numpy scalar type of the bin dtype (the dtype rule is ``bins.bin_dtype_for``'s)."""
    return {torch.float64: np.float64, torch.float32: np.float32}[bin_dtype_for(dtype)]


def roi_bins_reference(x1, y1, x2, y2, scale, bins_h, bins_w, height, width, dtype):
    """torchvision ``roi_pool``'s bins for one box, as a list of ((h0, h1), (w0, w1)) row-major."""
    f = _scalar(dtype)
    limit = 1 << 22  # the documented clamp of quantised coordinates (README, "Limits")

    def q(v):
        return min(max(_c_round(float(f(v) * f(scale))), -limit), limit)

    start_w, start_h, end_w, end_h = q(x1), q(y1), q(x2), q(y2)
    roi_w, roi_h = max(end_w - start_w + 1, 1), max(end_h - start_h + 1, 1)
    size_h, size_w = f(roi_h) / f(bins_h), f(roi_w) / f(bins_w)
    out = []
    for ph in range(bins_h):
        h0 = min(max(math.floor(f(ph) * size_h) + start_h, 0), height)
        h1 = min(max(math.ceil(f(ph + 1) * size_h) + start_h, 0), height)
        for pw in range(bins_w):
            w0 = min(max(math.floor(f(pw) * size_w) + start_w, 0), width)
            w1 = min(max(math.ceil(f(pw + 1) * size_w) + start_w, 0), width)
            out.append(((h0, h1), (w0, w1)))
    return out


def _pool_window(plane: torch.Tensor, h: tuple[int, int], w: tuple[int, int], mode: str):
    """plane [C, H, W] -> [C]: max (NaN-propagating) or mean of the window; 0 if empty."""
    if h[1] <= h[0] or w[1] <= w[0]:
        return plane.new_zeros(plane.shape[0])
    window = plane[:, h[0] : h[1], w[0] : w[1]]
    if mode == "max":
        return window.amax(dim=(1, 2))
    return window.to(bin_dtype_for(plane.dtype)).mean(dim=(1, 2)).to(plane.dtype)


def roi_pool_reference(
    input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float, mode: str
) -> torch.Tensor:
    """``roi_pool`` by loops: Tensor[K, 5] rois -> Tensor[K, C, oh, ow]."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    n, c, height, width = input.shape
    bin_dtype = bin_dtype_for(input.dtype)
    rows = []
    for roi in rois.tolist():
        b = int(roi[0])
        cells = roi_bins_reference(*roi[1:], spatial_scale, oh, ow, height, width, bin_dtype)
        vals = [_pool_window(input[b], h, w, mode) for h, w in cells]
        rows.append(torch.stack(vals, dim=1).view(c, oh, ow))
    if not rows:
        return input.new_zeros(0, c, oh, ow)
    return torch.stack(rows)


def roi_spp_pool_reference(input, rois, levels: Sequence[int], spatial_scale, mode):
    """The specification of ``roi_spp_pool``: per-level ``roi_pool``, flattened, concatenated."""
    return torch.cat(
        [roi_pool_reference(input, rois, n, spatial_scale, mode).flatten(1) for n in levels], 1
    )


def spp_pool_reference(input, levels: Sequence[int], mode: str, image_sizes=None):
    """The specification of ``spp_pool``: per image, adaptive pooling of its valid region."""
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    rows = []
    for i in range(input.shape[0]):
        h, w = (
            (input.shape[2], input.shape[3])
            if image_sizes is None
            else (int(image_sizes[i][0]), int(image_sizes[i][1]))
        )
        region = input[i, :, :h, :w]
        if mode == "avg" and input.dtype in (torch.float16, torch.bfloat16):
            rows.append(
                torch.cat([pool(region.float(), n).flatten() for n in levels]).to(input.dtype)
            )
        else:
            rows.append(torch.cat([pool(region, n).flatten() for n in levels]))
    return torch.stack(rows)
