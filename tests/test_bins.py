"""spp_triton.bins: the levels codec, the bin dtype rule and the bin geometry, against independent
oracles.

Geometry oracle: pooling a map whose values are the pixels' flat positions. torchvision's
``roi_pool`` (and ``F.adaptive_max_pool2d``) then return, as the argmax of each bin, its last pixel
(``(hi - 1) * W + (hi_c - 1)``); pooling the negated map returns its first (``lo * W + lo_c``);
an empty bin has argmax -1. (The Triton transcription, ``kernels/bins.py``, is checked against
this module in ``tests/test_kernels.py::test_bin_helpers_match_bins_py``.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_pool)

from spp_triton import bins

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- levels codec
@pytest.mark.parametrize(
    "levels,pairs",
    [
        ((1, 2, 4), ((1, 1), (2, 2), (4, 4))),
        ([1, (2, 3), [4, 5]], ((1, 1), (2, 3), (4, 5))),
        (torch.tensor([3, 6]), ((3, 3), (6, 6))),
        (((7, 7),), ((7, 7),)),
    ],
)
def test_normalize_levels_forms(levels, pairs):
    assert bins.normalize_levels(levels) == pairs
    assert bins.unflatten_levels(bins.flatten_levels(pairs)) == pairs
    assert bins.flatten_levels(pairs) == [v for p in pairs for v in p]


@pytest.mark.parametrize(
    "levels", [[], [0], [1, -2], [2.5], [True], "124", 4, None, [(1, 2, 3)], [(1, 0)]]
)
def test_normalize_levels_rejects_with_the_argument_name(levels):
    with pytest.raises(ValueError, match="MODEL.SPP.LEVELS"):
        bins.normalize_levels(levels, "MODEL.SPP.LEVELS")


def test_pyramid_width_and_level_offsets():
    levels = ((1, 1), (2, 3), (4, 4))
    assert bins.pyramid_width(levels) == 1 + 6 + 16
    assert bins.level_offsets(levels, 5) == [0, 5, 5 + 30]


# ----------------------------------------------------------------------------- bin dtype rule
def test_bin_dtype_rule():
    assert [bins.bin_dtype_for(d) for d in DTYPES] == [torch.float32] * 3 + [torch.float64]


# ----------------------------------------------------------------------------- geometry oracles
def _position_maps(n, height, width, dtype):
    pos = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    pos = pos.expand(n, 1, height, width).to(dtype)
    return pos, -pos


def _edges_from_argmax(first, last, width):
    """torchvision/adaptive argmax ``[K, 1, bh, bw]`` of the +/- position maps -> per-bin
    ``(lo, hi, lo_c, hi_c)`` (``-1`` everywhere for an empty bin)."""
    first, last = first[:, 0].to(torch.int64), last[:, 0].to(torch.int64)
    empty = last < 0
    lo, lo_c = first // width, first % width
    hi, hi_c = last // width + 1, last % width + 1
    return [torch.where(empty, -1, t) for t in (lo, hi, lo_c, hi_c)]


def _edges_from_bins(edges):
    """``bins`` edges ``(row_lo, row_hi, col_lo, col_hi)`` -> the same per-bin form."""
    r_lo, r_hi, c_lo, c_hi = edges
    empty = (r_hi <= r_lo)[:, :, None] | (c_hi <= c_lo)[:, None, :]
    k, bh, bw = empty.shape
    grid = [
        r_lo[:, :, None].expand(k, bh, bw),
        r_hi[:, :, None].expand(k, bh, bw),
        c_lo[:, None, :].expand(k, bh, bw),
        c_hi[:, None, :].expand(k, bh, bw),
    ]
    return [torch.where(empty, -1, t) for t in grid]


def _random_boxes(g, k, n_img, height, width, scale, dtype):
    img_h, img_w = height / scale, width / scale
    xy = torch.rand(k, 4, generator=g, dtype=torch.float64)
    xy = (
        xy * torch.tensor([img_w, img_h, img_w, img_h]) * 1.6
        - torch.tensor([img_w, img_h, img_w, img_h]) * 0.3
    )
    xy[: k // 4] = xy[: k // 4].round() / 2  # half-pixel corners: rounding ties
    batch = torch.randint(0, n_img, (k, 1), generator=g).to(torch.float64)
    return torch.cat([batch, xy], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, 1 / 16])
@pytest.mark.parametrize(
    "levels", [((1, 1), (2, 2), (3, 3), (6, 6)), ((7, 7),), ((5, 3), (14, 14))]
)
def test_roi_partition_equals_torchvision(dtype, scale, levels):
    g = torch.Generator().manual_seed(int(scale * 1000) + len(levels))
    n, height, width = 2, 13, 17
    rois = _random_boxes(g, 200, n, height, width, scale, dtype)
    pos, neg = _position_maps(n, height, width, dtype)
    edges = bins.region_bin_edges(
        rois, scale, height, width, levels, "roi", bins.bin_dtype_for(dtype)
    )
    for (bh, bw), level_edges in zip(levels, edges, strict=True):
        last = torch.ops.torchvision.roi_pool(pos, rois, scale, bh, bw)[1]
        first = torch.ops.torchvision.roi_pool(neg, rois, scale, bh, bw)[1]
        expected = _edges_from_argmax(first, last, width)
        ours = _edges_from_bins(level_edges)
        for e, o in zip(expected, ours, strict=True):
            assert torch.equal(e, o)


def test_bin_dtype_rule_is_torchvision_s():
    """Boxes whose float32 and float64 partitions differ: torchvision partitions float32 inputs
    in float32 and float64 inputs in float64, as ``bin_dtype_for`` says."""
    g = torch.Generator().manual_seed(7)
    height = width = 64
    rois = _random_boxes(g, 4000, 1, height, width, 1 / 3, torch.float64)
    f32 = bins.region_bin_edges(rois, 1 / 3, height, width, ((7, 7),), "roi", torch.float32)[0]
    f64 = bins.region_bin_edges(rois, 1 / 3, height, width, ((7, 7),), "roi", torch.float64)[0]
    differ = torch.zeros(rois.shape[0], dtype=torch.bool)
    for a, b in zip(f32, f64, strict=True):
        differ |= (a != b).any(1)
    assert differ.any(), "no box whose partition depends on the bin dtype: widen the search"
    rois = rois[differ]
    for dtype in (torch.float32, torch.float64):
        pos, neg = _position_maps(1, height, width, dtype)
        r = rois.to(dtype)
        last = torch.ops.torchvision.roi_pool(pos, r, 1 / 3, 7, 7)[1]
        first = torch.ops.torchvision.roi_pool(neg, r, 1 / 3, 7, 7)[1]
        edges = bins.region_bin_edges(
            r, 1 / 3, height, width, ((7, 7),), "roi", bins.bin_dtype_for(dtype)
        )[0]
        for e, o in zip(
            _edges_from_argmax(first, last, width), _edges_from_bins(edges), strict=True
        ):
            assert torch.equal(e, o)


def test_per_roi_scales_equal_one_scale_per_call():
    g = torch.Generator().manual_seed(3)
    rois = _random_boxes(g, 50, 1, 20, 20, 0.25, torch.float32)
    scales = torch.tensor([0.25, 0.125] * 25)
    mixed = bins.region_bin_edges(rois, scales, 20, 20, ((2, 3),), "roi", torch.float32)[0]
    for s in (0.25, 0.125):
        sel = scales == s
        alone = bins.region_bin_edges(rois[sel], s, 20, 20, ((2, 3),), "roi", torch.float32)[0]
        for a, m in zip(alone, mixed, strict=True):
            assert torch.equal(a, m[sel])


def test_quantize_rois_rounds_half_away_from_zero_and_clamps():
    boxes = torch.tensor([[0.5, -0.5, 1.5, -1.5], [2.5, -2.5, 1e30, -1e30]], dtype=torch.float64)
    x0, y0, w, h = bins.quantize_rois(boxes, 1.0, torch.float64)
    assert x0.tolist() == [1, 3] and y0.tolist() == [-1, -3]
    assert w.tolist() == [2 - 1 + 1, bins.COORD_LIMIT - 3 + 1]
    assert h.tolist() == [1, 1]  # inverted: at least one pixel


@pytest.mark.parametrize("levels", [((1, 1), (2, 2), (4, 4)), ((3, 5), (6, 2)), ((9, 9),)])
def test_adaptive_partition_equals_adaptive_max_pool2d(levels):
    """Valid regions of every size up to the map (smaller than the levels included)."""
    height, width = 7, 11
    sizes = [(h, w) for h in range(1, height + 1) for w in range(1, width + 1)]
    regions = torch.tensor([[0, h, w] for h, w in sizes])
    edges = bins.region_bin_edges(regions, None, height, width, levels, "adaptive", torch.float32)
    for (bh, bw), level_edges in zip(levels, edges, strict=True):
        ours = _edges_from_bins(level_edges)
        for i, (h, w) in enumerate(sizes):
            pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
            _, last = F.adaptive_max_pool2d(pos, (bh, bw), return_indices=True)
            _, first = F.adaptive_max_pool2d(-pos, (bh, bw), return_indices=True)
            expected = _edges_from_argmax(first, last, w)
            for e, o in zip(expected, ours, strict=True):
                assert torch.equal(e[0], o[i])
