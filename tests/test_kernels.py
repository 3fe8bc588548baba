"""Tests of the Triton kernels (``spp_triton.kernels``), called directly through their launchers.

Without CUDA they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest before Triton is imported); with CUDA (and no interpreter) the same tests run on the GPU.
Inputs are tiny because the interpreter is slow. Oracles: ``torchvision.ops.roi_pool`` (max, RoI
partition), ``F.adaptive_{max,avg}_pool2d`` (adaptive partition), an explicit-loop reference over
``spp_triton.bins`` edges (avg, NaN, ties), and autograd through those for the backward.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from spp_triton import bins

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need CUDA or Triton's interpreter (TRITON_INTERPRET=1 must be set before "
        "triton is imported; tests/conftest.py does so when no CUDA is present)",
        allow_module_level=True,
    )

triton = pytest.importorskip("triton")
torchvision = pytest.importorskip("torchvision")
import triton.language as tl  # noqa: E402

from spp_triton.kernels import bins as kbins  # noqa: E402
from spp_triton.kernels.pyramid_pool import (  # noqa: E402
    pyramid_pool_backward,
    pyramid_pool_forward,
)

DEV = torch.device("cpu" if INTERPRET else "cuda")

# The interpreter evaluates inf - inf (rounding an infinite coordinate) in numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

LEVEL_SETS = {
    "1-2-4": [(1, 1), (2, 2), (4, 4)],
    "1-2-3-6": [(1, 1), (2, 2), (3, 3), (6, 6)],
    "4-2-1": [(4, 4), (2, 2), (1, 1)],
    "2-3": [(2, 2), (3, 3)],
    "rect-2x3": [(2, 3)],
    "roi7": [(7, 7)],
}


# ----------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_boxes(g, k, n_img, img_h, img_w, dtype=torch.float32, integral=False):
    """Boxes (b, x1, y1, x2, y2): inside, partly outside, wholly outside, inverted, degenerate."""
    lo_x, hi_x = -0.4 * img_w, 1.4 * img_w
    lo_y, hi_y = -0.4 * img_h, 1.4 * img_h
    xs = torch.rand(k, 2, generator=g, dtype=torch.float64) * (hi_x - lo_x) + lo_x
    ys = torch.rand(k, 2, generator=g, dtype=torch.float64) * (hi_y - lo_y) + lo_y
    if integral:  # with scale 1/4: products on quarter pixels, halves included
        xs, ys = xs.round(), ys.round()
    x1, x2 = xs.min(1).values, xs.max(1).values
    y1, y2 = ys.min(1).values, ys.max(1).values
    boxes = torch.stack([x1, y1, x2, y2], 1)
    if k >= 4:
        boxes[1] = torch.tensor([0.0, 0.0, img_w - 1.0, img_h - 1.0])  # whole image
        boxes[2, 2], boxes[2, 3] = boxes[2, 0], boxes[2, 1]  # degenerate: a point
        boxes[3] = boxes[3, [2, 3, 0, 1]]  # inverted
    if k >= 5:
        boxes[4] = torch.tensor([2.0 * img_w, 2.0 * img_h, 3.0 * img_w, 3.0 * img_h])  # outside
    b = torch.randint(0, n_img, (k, 1), generator=g).to(torch.float64)
    return torch.cat([b, boxes], 1).to(dtype)


def bin_dtype(dtype):
    return bins.bin_dtype_for(dtype)


def run_fwd(features, regions, levels, mode, partition="roi", scales=None, index=None):
    features = [f.to(DEV) for f in features]
    k = regions.shape[0]
    if index is None:
        index = torch.zeros(k, dtype=torch.int64)
    if scales is None:
        scales = [1.0] * len(features)
    out, arg = pyramid_pool_forward(
        features, regions.to(DEV), index.to(DEV), scales, levels, mode, partition
    )
    return out.cpu(), arg.cpu()


def run_bwd(
    grad, features, regions, levels, mode, argmax, partition="roi", scales=None, index=None
):
    features = [f.to(DEV) for f in features]
    k = regions.shape[0]
    if index is None:
        index = torch.zeros(k, dtype=torch.int64)
    if scales is None:
        scales = [1.0] * len(features)
    grads = pyramid_pool_backward(
        grad.to(DEV),
        features,
        regions.to(DEV),
        index.to(DEV),
        scales,
        levels,
        mode,
        partition,
        argmax.to(DEV),
    )
    return [gr.cpu() for gr in grads]


def tv_roi_max(x, boxes, levels, scale):
    """torchvision per level, flattened and concatenated (float32 upcast for half types)."""
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    b = boxes.to(x32.dtype)
    vals, args = [], []
    for bh, bw in levels:
        v, a = torch.ops.torchvision.roi_pool(x32, b, scale, bh, bw)
        vals.append(v.flatten(1))
        args.append(a.flatten(1))
    return torch.cat(vals, 1).to(x.dtype), torch.cat(args, 1).to(torch.int32)


def region_edges(region, scale, h_map, w_map, levels, partition, bdtype):
    """Per level ``(row_lo, row_hi, col_lo, col_hi)`` lists for one region (spp_triton.bins)."""
    out = []
    if partition == "roi":
        x0, y0, rw, rh = bins.quantize_rois(region[None, 1:5].to(bdtype), scale, bdtype)
        for bh, bw in levels:
            rl, rhh = bins.roi_bin_edges(y0, rh, bh, h_map, bdtype)
            cl, chh = bins.roi_bin_edges(x0, rw, bw, w_map, bdtype)
            out.append((rl[0].tolist(), rhh[0].tolist(), cl[0].tolist(), chh[0].tolist()))
    else:
        h = torch.tensor([min(max(int(region[1]), 0), h_map)])
        w = torch.tensor([min(max(int(region[2]), 0), w_map)])
        for bh, bw in levels:
            rl, rhh = bins.adaptive_bin_edges(h, bh)
            cl, chh = bins.adaptive_bin_edges(w, bw)
            out.append((rl[0].tolist(), rhh[0].tolist(), cl[0].tolist(), chh[0].tolist()))
    return out


def slow_pool(features, regions, levels, mode, partition="roi", scales=None, index=None):
    """Explicit loops over bins (spp_triton.bins edges). Max: NaN propagates, first NaN / first
    maximal element in row-major order. Avg: float64 mean. Differentiable (avg) when the features
    require grad. Invalid batch / feature index -> zeros, argmax -1."""
    k = regions.shape[0]
    c = features[0].shape[1]
    bdtype = bin_dtype(features[0].dtype)
    if index is None:
        index = torch.zeros(k, dtype=torch.int64)
    if scales is None:
        scales = [1.0] * len(features)
    rows, args = [], []
    for r in range(k):
        f = int(index[r])
        ok = 0 <= f < len(features)
        x = features[f if ok else 0]
        n, _, h_map, w_map = x.shape
        bval = float(regions[r, 0])
        ok = ok and bval == bval and -1 < bval < n
        b = int(bval) if ok else 0
        edges = region_edges(
            regions[r], scales[f if ok else 0], h_map, w_map, levels, partition, bdtype
        )
        vals, idxs = [], []
        for (bh, bw), (rl, rh, cl, ch) in zip(levels, edges, strict=True):
            lv = [[None] * bw for _ in range(bh)]
            li = [[None] * bw for _ in range(bh)]
            for ph in range(bh):
                for pw in range(bw):
                    empty = not ok or rh[ph] <= rl[ph] or ch[pw] <= cl[pw]
                    if empty:
                        lv[ph][pw] = torch.zeros(c, dtype=torch.float64)
                        li[ph][pw] = torch.full((c,), -1, dtype=torch.int64)
                        continue
                    patch = x[b, :, rl[ph] : rh[ph], cl[pw] : ch[pw]].to(torch.float64)
                    pwid = ch[pw] - cl[pw]
                    flat = patch.reshape(c, -1)
                    if mode == "avg":
                        lv[ph][pw] = flat.mean(1)
                        li[ph][pw] = torch.full((c,), -1, dtype=torch.int64)
                        continue
                    fd = flat.detach()
                    nan = fd.isnan()
                    first_nan = nan.to(torch.int64).argmax(1)
                    filled = fd.masked_fill(nan, float("-inf"))
                    first_max = (filled == filled.amax(1, keepdim=True)).to(torch.int64).argmax(1)
                    j = torch.where(nan.any(1), first_nan, first_max)
                    lv[ph][pw] = flat.gather(1, j[:, None])[:, 0]
                    li[ph][pw] = (rl[ph] + j // pwid) * w_map + cl[pw] + j % pwid
            # layout: channel, row, column
            vals.append(torch.stack([torch.stack(row, 1) for row in lv], 1).reshape(c * bh * bw))
            idxs.append(torch.stack([torch.stack(row, 1) for row in li], 1).reshape(c * bh * bw))
        rows.append(torch.cat(vals))
        args.append(torch.cat(idxs))
    return torch.stack(rows), torch.stack(args).to(torch.int32)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    same = (a == b) | (a.isnan() & b.isnan())
    sign_ok = torch.signbit(a) == torch.signbit(b)
    bad = ~(same & (sign_ok | a.isnan()))
    where = bad.nonzero()[:5].tolist()
    assert not bool(bad.any()), f"{int(bad.sum())} mismatches, first at {where}"


# ----------------------------------------------------------------------------- bin helpers
@triton.jit
def _edges_probe(
    reg_ptr, scale_ptr, size_ptr, out_ptr, K, BIN_DTYPE: tl.constexpr, NMAX: tl.constexpr
):
    k = tl.program_id(0)
    row = reg_ptr + k * 4
    scale = tl.load(scale_ptr).to(BIN_DTYPE)
    x0, y0, w, h = kbins.quantize_roi(
        tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), scale, BIN_DTYPE
    )
    o = out_ptr + k * (4 + 4 * NMAX)
    tl.store(o, x0)
    tl.store(o + 1, y0)
    tl.store(o + 2, w)
    tl.store(o + 3, h)
    p = tl.arange(0, NMAX)
    n = tl.load(size_ptr + 1)  # number of bins
    size = tl.load(size_ptr)
    lo, hi = kbins.roi_bin_edges(x0, w, p, n + p * 0, size, BIN_DTYPE)
    tl.store(o + 4 + p, lo, mask=p < n)
    tl.store(o + 4 + NMAX + p, hi, mask=p < n)
    alo, ahi = kbins.adaptive_bin_edges(tl.minimum(w, size), p, n + p * 0)
    tl.store(o + 4 + 2 * NMAX + p, alo, mask=p < n)
    tl.store(o + 4 + 3 * NMAX + p, ahi, mask=p < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.25, 1 / 3, 1.0 / 16])
def test_bin_helpers_match_bins_py(dtype, scale):
    """kernels/bins.py is a bit-exact transcription of spp_triton/bins.py: exact halves (both
    signs), values near halves, huge and infinite coordinates (clamped)."""
    g = gen(11)
    k, nmax, size, n = 96, 16, 37, 13
    boxes = (torch.rand(k, 4, generator=g, dtype=torch.float64) * 400 - 100).round() / 2 / scale
    boxes[:8] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 1e30, -1e30])[:, None] / scale
    boxes[8:16] = torch.rand(8, 4, generator=g, dtype=torch.float64) * 1e8
    boxes[16:24] = torch.rand(8, 4, generator=g, dtype=torch.float64) * 40 - 20
    boxes[24] = torch.tensor([float("inf"), float("-inf"), float("inf"), 3.0])
    boxes = boxes.to(dtype)
    boxes[25:32] = torch.nextafter(boxes[25:32], torch.full_like(boxes[25:32], 1e9))
    out = torch.zeros(k, 4 + 4 * nmax, dtype=torch.int32, device=DEV)
    _edges_probe[(k,)](
        boxes.to(DEV),
        torch.tensor([scale], dtype=torch.float64, device=DEV),
        torch.tensor([size, n], dtype=torch.int32, device=DEV),
        out,
        k,
        BIN_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        NMAX=nmax,
    )
    out = out.cpu().to(torch.int64)
    x0, y0, w, h = bins.quantize_rois(boxes, scale, dtype)
    assert torch.equal(out[:, 0], x0) and torch.equal(out[:, 1], y0)
    assert torch.equal(out[:, 2], w) and torch.equal(out[:, 3], h)
    lo, hi = bins.roi_bin_edges(x0, w, n, size, dtype)
    assert torch.equal(out[:, 4 : 4 + n], lo) and torch.equal(out[:, 4 + nmax : 4 + nmax + n], hi)
    alo, ahi = bins.adaptive_bin_edges(w.clamp(max=size), n)
    assert torch.equal(out[:, 4 + 2 * nmax : 4 + 2 * nmax + n], alo)
    assert torch.equal(out[:, 4 + 3 * nmax : 4 + 3 * nmax + n], ahi)


# ----------------------------------------------------------------------------- RoI max
@pytest.mark.parametrize("name", list(LEVEL_SETS))
def test_roi_max_matches_torchvision(name):
    levels = LEVEL_SETS[name]
    g = gen(1)
    x = torch.randn(2, 3, 9, 11, generator=g)
    boxes = rand_boxes(g, 7, 2, 36, 44, integral=True)
    out, arg = run_fwd([x], boxes, levels, "max", scales=[0.25])
    ref, ref_arg = tv_roi_max(x, boxes, levels, 0.25)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


@pytest.mark.parametrize("size", [1, 3, 5, 13, 14])
def test_roi_max_output_sizes(size):
    g = gen(2 + size)
    x = torch.randn(1, 2, 12, 10, generator=g)
    boxes = rand_boxes(g, 5, 1, 36, 30, integral=False)
    levels = [(size, size), (size, max(1, size - 2))]
    out, arg = run_fwd([x], boxes, levels, "max", scales=[1 / 3])
    ref, ref_arg = tv_roi_max(x, boxes, levels, 1 / 3)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


def _nests(extent: int, fine: int, coarse: int) -> bool:
    """Whether torchvision's float32 partition of ``extent`` pixels nests ``coarse`` in ``fine``."""
    start, ext = torch.zeros(1, dtype=torch.int64), torch.tensor([extent])
    flo, fhi = bins.roi_bin_edges(start, ext, fine, 10**6, torch.float32)
    clo, chi = bins.roi_bin_edges(start, ext, coarse, 10**6, torch.float32)
    r = fine // coarse
    return all(
        clo[0, q] == flo[0, q * r] and chi[0, q] == fhi[0, q * r + r - 1] for q in range(coarse)
    )


def test_roi_max_levels_that_do_not_nest_in_float():
    """{1, 2, 14} pools the coarse levels from the 14x14 cells, except where the float32 edges
    do not nest (57 pixels: 2 bins are not unions of 14): there every level is pooled directly."""
    assert not _nests(57, 14, 2) and _nests(56, 14, 2) and _nests(3, 14, 2)
    g = gen(40)
    x = torch.randn(1, 2, 4, 60, generator=g)
    # Box 0 spans columns 1..57: its last 14-bin cell ends one column (58) past the last 2-bin
    # and 1-bin bins; a maximum there must reach the 14x14 level only.
    x[..., 58] = 100.0
    x[0, 1, 2, 30] = float("nan")
    boxes = torch.tensor(
        [[0, 1.0, 0.0, 57.0, 3.0], [0, 2.0, 1.0, 57.0, 2.0], [0, 40.0, 0.0, 42.0, 3.0]]
    )
    levels = [(1, 1), (2, 2), (14, 14)]
    out, arg = run_fwd([x], boxes, levels, "max")
    slow, slow_arg = slow_pool([x], boxes, levels, "max")
    assert_bitwise(out, slow.float())
    assert torch.equal(arg, slow_arg)
    # Channel 0 has no NaN: torchvision per level is the oracle there.
    ref, ref_arg = tv_roi_max(x[:, :1], boxes, levels, 1.0)
    offsets = bins.level_offsets(levels, 2)
    chan0 = torch.cat(
        [torch.arange(o, o + bh * bw) for o, (bh, bw) in zip(offsets, levels, strict=True)]
    )
    assert_bitwise(out[:, chan0], ref)
    assert torch.equal(arg[:, chan0], ref_arg)


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (3, 1)])
def test_roi_max_maps_smaller_than_level(hw):
    g = gen(3)
    x = torch.randn(2, 3, *hw, generator=g)
    boxes = rand_boxes(g, 6, 2, hw[0] * 4, hw[1] * 4)
    levels = LEVEL_SETS["1-2-3-6"]
    out, arg = run_fwd([x], boxes, levels, "max", scales=[0.25])
    ref, ref_arg = tv_roi_max(x, boxes, levels, 0.25)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_roi_max_dtypes(dtype):
    g = gen(4)
    x = torch.randn(2, 3, 8, 9, generator=g).to(dtype)
    boxes = rand_boxes(
        g, 6, 2, 64, 72, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    levels = LEVEL_SETS["1-2-4"]
    out, arg = run_fwd([x], boxes, levels, "max", scales=[0.125])
    ref, ref_arg = tv_roi_max(x, boxes, levels, 0.125)
    assert out.dtype == dtype
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_roi_max_any_strides(layout):
    g = gen(5)
    base = torch.randn(2, 6, 10, 12, generator=g)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, ::2, 1:, ::2]
    else:
        x = base.transpose(2, 3)
    boxes = rand_boxes(g, 6, 2, x.shape[2] * 2, x.shape[3] * 2)
    levels = LEVEL_SETS["2-3"]
    out, arg = run_fwd([x], boxes, levels, "max", scales=[0.5])
    ref, ref_arg = tv_roi_max(x.contiguous(), boxes, levels, 0.5)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


def test_max_without_argmax():
    g = gen(22)
    x = torch.randn(2, 3, 8, 8, generator=g)
    boxes = rand_boxes(g, 5, 2, 8, 8)
    levels = LEVEL_SETS["1-2-4"]
    out, arg = run_fwd([x], boxes, levels, "max")
    out2, arg2 = pyramid_pool_forward(
        [x.to(DEV)],
        boxes.to(DEV),
        torch.zeros(5, dtype=torch.int64, device=DEV),
        [1.0],
        levels,
        "max",
        "roi",
        with_argmax=False,
    )
    assert_bitwise(out2.cpu(), out)
    assert arg2.shape == (0,) and arg2.dtype == torch.int32 and arg.shape == out.shape


def test_roi_max_ties_first_row_major():
    g = gen(6)
    x = torch.randint(0, 3, (2, 4, 9, 9), generator=g).to(torch.float32)
    x[0, 0] = 1.0  # a constant plane: every bin ties everywhere
    x[1, 1, ::2] = -0.0  # signed zeros tie with +0.0; the first one's sign must come out
    x[1, 1, 1::2] = 0.0
    boxes = rand_boxes(g, 8, 2, 9, 9)
    boxes[0] = torch.tensor([0, 0, 0, 8, 8])
    boxes[1] = torch.tensor([1, 0, 0, 8, 8])
    levels = LEVEL_SETS["1-2-4"] + [(3, 2)]
    out, arg = run_fwd([x], boxes, levels, "max")
    ref, ref_arg = tv_roi_max(x, boxes, levels, 1.0)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)
    slow, slow_arg = slow_pool([x], boxes, levels, "max")
    assert torch.equal(arg, slow_arg)


def test_roi_max_nan_propagates_first_nan():
    g = gen(7)
    x = torch.randn(2, 3, 10, 10, generator=g)
    nan_mask = torch.rand(x.shape, generator=g) < 0.04
    x[nan_mask] = float("nan")
    x[0, 0, 2, 3] = float("inf")  # +inf before a NaN in the same bin: NaN still wins
    x[0, 0, 2, 5] = float("nan")
    x[1, 2] = float("-inf")  # a plane of -inf: a real maximum (-inf), argmax its first element
    boxes = rand_boxes(g, 8, 2, 10, 10)
    boxes[0] = torch.tensor([0, 0, 0, 9, 9])
    boxes[1] = torch.tensor([1, 0, 0, 9, 9])
    levels = LEVEL_SETS["1-2-4"]
    out, arg = run_fwd([x], boxes, levels, "max")
    slow, slow_arg = slow_pool([x], boxes, levels, "max")
    assert_bitwise(out, slow.to(torch.float32))
    assert torch.equal(arg, slow_arg)
    assert bool(out.isnan().any())
    # NaN-free bins are torchvision's
    ref, ref_arg = tv_roi_max(
        x.nan_to_num(nan=-1e30, posinf=float("inf"), neginf=-1e30), boxes, levels, 1.0
    )
    clean = ~out.isnan() & (out != float("-inf"))
    assert torch.equal(out[clean], ref[clean]) and torch.equal(arg[clean], ref_arg[clean])


def test_multiple_feature_maps():
    g = gen(8)
    maps = [
        torch.randn(2, 3, 12, 12, generator=g),
        torch.randn(2, 3, 6, 7, generator=g),
        torch.randn(2, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
    ]
    scales = [1 / 4, 1 / 8, 1 / 16]
    boxes = rand_boxes(g, 9, 2, 48, 48, integral=True)
    index = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2, 0])
    levels = LEVEL_SETS["1-2-3-6"]
    for mode in ("max", "avg"):
        out, arg = run_fwd(maps, boxes, levels, mode, scales=scales, index=index)
        slow, slow_arg = slow_pool(maps, boxes, levels, mode, scales=scales, index=index)
        if mode == "max":
            for r in range(boxes.shape[0]):
                f = int(index[r])
                ref, ref_arg = tv_roi_max(maps[f], boxes[r : r + 1], levels, scales[f])
                assert_bitwise(out[r : r + 1], ref)
                assert torch.equal(arg[r : r + 1], ref_arg)
            assert torch.equal(arg, slow_arg)
        else:
            torch.testing.assert_close(out, slow.float(), rtol=1e-5, atol=1e-6)
            assert arg.numel() == 0 and arg.dtype == torch.int32


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Force 4-channel blocks (and 8-element backward blocks): with 10 channels, three channel
    programs per region, the last half past the channels (reads clamped, stores masked)."""
    from spp_triton.kernels import pyramid_pool as pp

    monkeypatch.setattr(pp, "_block_c", lambda *args: 4)
    monkeypatch.setattr(pp, "_BWD_MAX_BLOCK", 8)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("partition", ["roi", "adaptive"])
def test_tiny_blocks(tiny_blocks, mode, partition):
    g = gen(21)
    x = torch.randint(0, 3, (2, 10, 7, 9), generator=g).to(torch.float64)
    x[0, 1, 3, 4] = float("nan")
    x[1, 9, 0, 8] = float("nan")
    levels = LEVEL_SETS["1-2-3-6"] + [(2, 3)]
    if partition == "roi":
        regions = rand_boxes(g, 6, 2, 7, 9, dtype=torch.float64)
        regions[0] = torch.tensor([0, 0, 0, 8, 6])
        regions[1] = torch.tensor([1, 0, 0, 8, 6])
    else:
        regions = adaptive_regions(g, 6, 2, 7, 9)
        regions[1] = torch.tensor([1, 7, 9])
    out, arg = run_fwd([x], regions, levels, mode, partition=partition)
    slow, slow_arg = slow_pool([x], regions, levels, mode, partition=partition)
    if mode == "max":
        assert_bitwise(out, slow)
        assert torch.equal(arg, slow_arg)
    else:
        torch.testing.assert_close(out, slow, rtol=1e-12, atol=1e-12, equal_nan=True)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (gx,) = run_bwd(grad, [x], regions, levels, mode, arg, partition=partition)
    xr = x.clone().requires_grad_(True)
    if mode == "max":  # route by the reference argmax
        ref_g = torch.zeros_like(x).view(2, 10, -1)
        chan = torch.cat([torch.arange(10).repeat_interleave(bh * bw) for bh, bw in levels])
        for r in range(regions.shape[0]):
            b = int(regions[r, 0])
            hit = slow_arg[r] >= 0
            ref_g[b].index_put_((chan[hit], slow_arg[r][hit].long()), grad[r][hit], accumulate=True)
        ref_g = ref_g.view_as(x)
    else:
        ref, _ = slow_pool([xr], regions, levels, mode, partition=partition)
        (ref_g,) = torch.autograd.grad(ref, xr, grad)
    torch.testing.assert_close(gx, ref_g, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- RoI avg
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["1-2-4", "4-2-1", "rect-2x3"])
def test_roi_avg_matches_loop_reference(dtype, name):
    levels = LEVEL_SETS[name]
    g = gen(9)
    x = torch.randn(2, 3, 9, 10, generator=g).to(dtype)
    boxes = rand_boxes(
        g,
        6,
        2,
        36,
        40,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        integral=True,
    )
    out, arg = run_fwd([x], boxes, levels, "avg", scales=[0.25])
    ref, _ = slow_pool([x], boxes, levels, "avg", scales=[0.25])
    tol = {
        torch.float64: (1e-12, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.float16: (2e-3, 1e-3),
        torch.bfloat16: (1.6e-2, 1e-2),
    }[dtype]
    assert out.dtype == dtype and arg.numel() == 0
    torch.testing.assert_close(out.double(), ref, rtol=tol[0], atol=tol[1])
    # empty bins are exactly 0
    assert bool((out[ref == 0] == 0).all())


def test_roi_avg_small_maps_and_outside():
    g = gen(10)
    x = torch.randn(1, 2, 2, 1, generator=g)
    boxes = rand_boxes(g, 6, 1, 8, 4)
    levels = LEVEL_SETS["1-2-3-6"]
    out, _ = run_fwd([x], boxes, levels, "avg", scales=[0.25])
    ref, _ = slow_pool([x], boxes, levels, "avg", scales=[0.25])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- adaptive
def adaptive_regions(g, k, n_img, h_map, w_map):
    b = torch.randint(0, n_img, (k,), generator=g)
    h = torch.randint(1, h_map + 1, (k,), generator=g)
    w = torch.randint(1, w_map + 1, (k,), generator=g)
    r = torch.stack([b, h, w], 1)
    r[0, 1:] = torch.tensor([h_map, w_map])
    if k > 1:
        r[1, 1:] = torch.tensor([1, 1])
    if k > 2:
        r[2, 1:] = torch.tensor([2, min(3, w_map)])  # smaller than most levels: bins overlap
    return r


def adaptive_ref(x, regions, levels, mode):
    rows, args = [], []
    w_map = x.shape[3]
    for b, h, w in regions.tolist():
        crop = x[b : b + 1, :, :h, :w]
        vals, idxs = [], []
        for lv in levels:
            if mode == "max":
                v, i = F.adaptive_max_pool2d(crop, lv, return_indices=True)
                idxs.append(((i // w) * w_map + i % w).flatten())
            else:
                v = F.adaptive_avg_pool2d(crop, lv)
            vals.append(v.flatten())
        rows.append(torch.cat(vals))
        if idxs:
            args.append(torch.cat(idxs))
    out = torch.stack(rows)
    return out, (torch.stack(args).to(torch.int32) if args else None)


@pytest.mark.parametrize("name", ["1-2-4", "1-2-3-6", "4-2-1", "rect-2x3"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_adaptive_matches_torch(name, mode):
    levels = LEVEL_SETS[name]
    g = gen(12)
    x = torch.randn(3, 4, 7, 9, generator=g)
    regions = adaptive_regions(g, 6, 3, 7, 9)
    out, arg = run_fwd([x], regions, levels, mode, partition="adaptive")
    ref, ref_arg = adaptive_ref(x, regions, levels, mode)
    if mode == "max":
        assert_bitwise(out, ref)
        assert torch.equal(arg, ref_arg)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_adaptive_dtypes_and_channels_last(dtype):
    g = gen(13)
    x = torch.randn(2, 3, 6, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    regions = adaptive_regions(g, 5, 2, 6, 5)
    levels = LEVEL_SETS["1-2-3-6"]
    out, arg = run_fwd([x], regions, levels, "max", partition="adaptive")
    ref, ref_arg = adaptive_ref(x.float(), regions, levels, "max")
    assert_bitwise(out, ref.to(dtype))
    assert torch.equal(arg, ref_arg)
    out, _ = run_fwd([x], regions, levels, "avg", partition="adaptive")
    ref, _ = adaptive_ref(x.double(), regions, levels, "avg")
    tol = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_adaptive_ties_and_nan():
    g = gen(14)
    x = torch.randint(0, 2, (2, 3, 6, 6), generator=g).to(torch.float32)
    x[1, 2, 1, 1] = float("nan")
    x[1, 2, 4, 0] = float("nan")
    regions = adaptive_regions(g, 5, 2, 6, 6)
    regions[3] = torch.tensor([1, 6, 6])
    levels = LEVEL_SETS["1-2-4"]
    out, arg = run_fwd([x], regions, levels, "max", partition="adaptive")
    slow, slow_arg = slow_pool([x], regions, levels, "max", partition="adaptive")
    assert_bitwise(out, slow.float())
    assert torch.equal(arg, slow_arg)


# ----------------------------------------------------------------------------- robustness
def test_invalid_regions_are_empty_and_safe():
    g = gen(15)
    x = torch.randn(2, 3, 6, 6, generator=g)
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor(
        [
            [-1, 0, 0, 5, 5],  # batch index below 0
            [2, 0, 0, 5, 5],  # batch index == N
            [1e10, 0, 0, 5, 5],
            [nan, 0, 0, 5, 5],
            [inf, 0, 0, 5, 5],
            [-inf, 0, 0, 5, 5],
            [0, 0, 0, 5, 5],  # feature index 3 (F == 1)
            [1, 0, 0, 5, 5],  # feature index -1
            [0, nan, nan, nan, nan],  # NaN coordinates count as 0
            [1, nan, 1, 4, nan],
            [0, -inf, -inf, inf, inf],  # clamped: the whole map
            [1, inf, inf, inf, inf],  # clamped: far outside
            [0, -1e30, 2, 1e30, 3],
            [1, 0, 0, 5, 5],  # a plain valid one
        ]
    )
    n_bad = 8
    equivalent = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [1, 0, 1, 4, 0],
            [0, -1e9, -1e9, 1e9, 1e9],
            [1, 1e9, 1e9, 1e9, 1e9],
            [0, -1e9, 2, 1e9, 3],
            [1, 0, 0, 5, 5],
        ]
    )
    levels = LEVEL_SETS["1-2-4"]
    index = torch.zeros(boxes.shape[0], dtype=torch.int64)
    index[6], index[7] = 3, -1
    for mode in ("max", "avg"):
        out, arg = run_fwd([x], boxes, levels, mode, index=index)
        assert bool(out[:n_bad].eq(0).all())
        if mode == "max":
            assert bool(arg[:n_bad].eq(-1).all())
        ref, ref_arg = slow_pool([x], equivalent, levels, mode)
        torch.testing.assert_close(out[n_bad:].double(), ref, rtol=1e-6, atol=1e-6)
        if mode == "max":
            assert torch.equal(arg[n_bad:], ref_arg)
        grads = run_bwd(torch.ones_like(out), [x], boxes, levels, mode, arg, index=index)
        ref_grads = run_bwd(
            torch.ones_like(out[n_bad:]),
            [x],
            equivalent,
            levels,
            mode,
            arg[n_bad:] if mode == "max" else arg,
        )
        torch.testing.assert_close(grads[0], ref_grads[0])
    # adaptive: bad batch indices and sizes outside [0, H] x [0, W]
    regions = torch.tensor(
        [[-1, 3, 3], [2, 3, 3], [0, 0, 4], [1, -5, 2], [0, 100, 2**40], [1, 6, 6]]
    )
    out, arg = run_fwd([x], regions, levels, "max", partition="adaptive")
    assert bool(out[:4].eq(0).all()) and bool(arg[:4].eq(-1).all())
    ref, ref_arg = adaptive_ref(x, torch.tensor([[0, 6, 6], [1, 6, 6]]), levels, "max")
    assert_bitwise(out[4:], ref)
    assert torch.equal(arg[4:], ref_arg)


def test_empty_k_and_no_launch():
    x = torch.randn(2, 3, 5, 5)
    levels = LEVEL_SETS["1-2-4"]
    for mode, partition, regions in (
        ("max", "roi", torch.zeros(0, 5)),
        ("avg", "roi", torch.zeros(0, 5)),
        ("max", "adaptive", torch.zeros(0, 3, dtype=torch.int64)),
    ):
        out, arg = run_fwd([x], regions, levels, mode, partition=partition)
        assert out.shape == (0, 3 * 21) and out.dtype == x.dtype
        assert arg.dtype == torch.int32
        assert arg.shape == ((0, 3 * 21) if mode == "max" else (0,))
        grads = run_bwd(out, [x], regions, levels, mode, arg, partition=partition)
        assert grads[0].shape == x.shape and bool(grads[0].eq(0).all())


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_max_backward_matches_torchvision(dtype):
    g = gen(16)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=dtype)
    boxes = rand_boxes(g, 7, 2, 36, 32, dtype=dtype, integral=True)
    levels = LEVEL_SETS["1-2-3-6"] + [(2, 3)]
    out, arg = run_fwd([x], boxes, levels, "max", scales=[0.25])
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    (gx,) = run_bwd(grad, [x], boxes, levels, "max", arg, scales=[0.25])
    xr = x.clone().requires_grad_(True)
    ref = torch.cat([torchvision.ops.roi_pool(xr, boxes, lv, 0.25).flatten(1) for lv in levels], 1)
    (ref_g,) = torch.autograd.grad(ref, xr, grad)
    assert gx.dtype == dtype
    torch.testing.assert_close(
        gx,
        ref_g,
        rtol=1e-6 if dtype == torch.float32 else 1e-12,
        atol=1e-6 if dtype == torch.float32 else 1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_avg_backward_matches_autograd(dtype):
    g = gen(17)
    x = torch.randn(2, 2, 7, 8, generator=g, dtype=dtype)
    boxes = rand_boxes(g, 6, 2, 28, 32, dtype=dtype, integral=True)
    levels = LEVEL_SETS["1-2-4"] + [(2, 3)]
    out, arg = run_fwd([x], boxes, levels, "avg", scales=[0.25])
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    (gx,) = run_bwd(grad, [x], boxes, levels, "avg", arg, scales=[0.25])
    xr = x.double().requires_grad_(True)
    ref, _ = slow_pool([xr], boxes, levels, "avg", scales=[0.25])
    (ref_g,) = torch.autograd.grad(ref, xr, grad.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gx.double(), ref_g, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_adaptive_backward_matches_autograd(mode):
    g = gen(18)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    regions = adaptive_regions(g, 5, 2, 6, 7)
    levels = LEVEL_SETS["1-2-3-6"]
    out, arg = run_fwd([x], regions, levels, mode, partition="adaptive")
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (gx,) = run_bwd(grad, [x], regions, levels, mode, arg, partition="adaptive")
    xr = x.clone().requires_grad_(True)
    ref, _ = adaptive_ref(xr, regions, levels, mode)
    (ref_g,) = torch.autograd.grad(ref, xr, grad)
    torch.testing.assert_close(gx, ref_g, rtol=1e-12, atol=1e-12)


def test_backward_multiple_maps_channels_last_and_strided_grad():
    g = gen(19)
    maps = [
        torch.randn(2, 2, 8, 8, generator=g).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 2, 4, 5, generator=g),
    ]
    scales = [1 / 4, 1 / 8]
    boxes = rand_boxes(g, 6, 2, 32, 32, integral=True)
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    levels = LEVEL_SETS["1-2-4"]
    for mode in ("max", "avg"):
        out, arg = run_fwd(maps, boxes, levels, mode, scales=scales, index=index)
        grad_full = torch.randn(out.shape[0], out.shape[1] * 2, generator=g)
        grad = grad_full[:, ::2]  # non-contiguous grad_out
        grads = run_bwd(grad, maps, boxes, levels, mode, arg, scales=scales, index=index)
        xr = [m.double().requires_grad_(True) for m in maps]
        if mode == "max":
            ref = torch.cat(
                [
                    torch.cat(
                        [
                            torchvision.ops.roi_pool(
                                xr[int(index[r])],
                                boxes[r : r + 1].double(),
                                lv,
                                scales[int(index[r])],
                            ).flatten(1)
                            for lv in levels
                        ],
                        1,
                    )
                    for r in range(boxes.shape[0])
                ]
            )
        else:
            ref, _ = slow_pool(xr, boxes, levels, mode, scales=scales, index=index)
        ref_g = torch.autograd.grad(ref, xr, grad.double())
        for gx, rg, m in zip(grads, ref_g, maps, strict=True):
            assert gx.shape == m.shape and gx.dtype == m.dtype
            torch.testing.assert_close(gx.double(), rg, rtol=1e-5, atol=1e-5)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_backward_half_precision():
    g = gen(20)
    x = torch.randn(1, 2, 6, 6, generator=g).to(torch.bfloat16)
    boxes = rand_boxes(g, 5, 1, 6, 6)
    levels = LEVEL_SETS["2-3"]
    for mode in ("max", "avg"):
        out, arg = run_fwd([x], boxes, levels, mode)
        grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
        (gx,) = run_bwd(grad, [x], boxes, levels, mode, arg)
        xr = x.double().requires_grad_(True)
        if mode == "max":
            ref = torch.cat(
                [torchvision.ops.roi_pool(xr, boxes.double(), lv, 1.0).flatten(1) for lv in levels],
                1,
            )
        else:
            ref, _ = slow_pool([xr], boxes, levels, mode)
        (ref_g,) = torch.autograd.grad(ref, xr, grad.double())
        assert gx.dtype == torch.bfloat16
        torch.testing.assert_close(gx.double(), ref_g, rtol=1.6e-2, atol=1e-2)


# ----------------------------------------------------------------------------- compiled path
_COMPILE_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from spp_triton.kernels import pyramid_pool as pp

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    def build(kernel, args, kwargs):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
        c = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                           options=options.__dict__)
        ptx = c.asm["ptx"]
        assert "div.full.f32" not in ptx, "approximate float32 division in a kernel"

    x = torch.randn(2, 32, 9, 11)
    small = x[:, :, :5, :6].contiguous(memory_format=torch.channels_last)
    # (dtypes, K, levels, maps): K = 600 gives 32-channel blocks, K = 2 small ones.
    configs = [
        ((torch.float32, torch.bfloat16, torch.float64), 2, [(1, 1), (2, 2), (3, 3), (2, 3)], 2),
        ((torch.float32, torch.float64), 600, [(1, 1), (2, 2), (4, 4)], 1),
        ((torch.float32,), 600, [(7, 7)], 5),
        ((torch.float16,), 600, [(1, 1), (2, 2), (3, 3), (6, 6), (13, 13)], 1),
    ]
    for dtypes, k, levels, nmaps in configs:
        index = torch.zeros(k, dtype=torch.int64)
        for dtype in dtypes:
            maps = ([x.to(dtype), small.to(dtype)] * 3)[:nmaps]
            scales = [0.25 / (i + 1) for i in range(nmaps)]
            boxes = torch.zeros(k, 5, dtype=torch.float64 if dtype == torch.float64
                                else torch.float32)
            regions = torch.zeros(k, 3, dtype=torch.int64)
            for mode in ("max", "avg"):
                for part, reg in (("roi", boxes), ("adaptive", regions)):
                    if part == "adaptive" and nmaps > 1:
                        continue
                    fwd = pp.forward_launch(maps, reg, index, scales, levels, mode, part)
                    build(fwd.kernel, fwd.args, fwd.kwargs)
                    out, am = fwd.outputs
                    if mode == "max" and dtype == torch.float32:  # no argmax stored
                        launch = pp.forward_launch(maps, reg, index, scales, levels, mode, part,
                                                   with_argmax=False)
                        build(launch.kernel, launch.args, launch.kwargs)
                    bwd = pp.backward_launch(out, maps, reg, index, scales, levels, mode, part, am)
                    build(bwd.kernel, bwd.args, bwd.kwargs)
    print("compiled-ok")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter accepts things the compiler rejects: compile every kernel variant to PTX
    and cubin for sm_90 (needs Triton's bundled ptxas, not a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    internals_differ = ("ImportError" in proc.stderr or "AttributeError" in proc.stderr) and (
        "spp_triton" not in proc.stderr
    )
    if proc.returncode != 0 and internals_differ:
        pytest.skip(f"this Triton's compiler internals differ: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled-ok" in proc.stdout


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_roi_max_matches_torchvision(dtype):
    g = gen(30)
    x = torch.randn(2, 64, 25, 31, generator=g).to(dtype).cuda()
    boxes = rand_boxes(g, 50, 2, 100, 124).cuda()
    levels = LEVEL_SETS["1-2-4"] + [(7, 7)]
    idx = torch.zeros(50, dtype=torch.int64, device="cuda")
    out, arg = pyramid_pool_forward([x], boxes, idx, [0.25], levels, "max", "roi")
    ref, ref_arg = tv_roi_max(x, boxes, levels, 0.25)
    assert_bitwise(out, ref)
    assert torch.equal(arg, ref_arg)


@pytest.mark.gpu
def test_gpu_adaptive_avg_and_backward():
    g = gen(31)
    x = torch.randn(3, 32, 13, 17, generator=g, dtype=torch.float64).cuda()
    regions = adaptive_regions(g, 6, 3, 13, 17).cuda()
    levels = LEVEL_SETS["1-2-3-6"]
    idx = torch.zeros(6, dtype=torch.int64, device="cuda")
    for mode in ("avg", "max"):
        out, arg = pyramid_pool_forward([x], regions, idx, [1.0], levels, mode, "adaptive")
        ref, _ = adaptive_ref(x, regions.cpu(), levels, mode)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(out)
        (gx,) = pyramid_pool_backward(grad, [x], regions, idx, [1.0], levels, mode, "adaptive", arg)
        xr = x.clone().requires_grad_(True)
        ref, _ = adaptive_ref(xr, regions.cpu(), levels, mode)
        (ref_g,) = torch.autograd.grad(ref, xr, grad)
        torch.testing.assert_close(gx, ref_g, rtol=1e-10, atol=1e-10)
