"""spp_triton.cpu, the vectorised PyTorch path, called directly (its op contract) against
torchvision's ``roi_pool``, ``F.adaptive_max_pool2d`` and the loop reference.

What is specific to this path: the derivation of coarse max levels from finer ones (and its
fallback where torchvision's float partition does not nest), the -inf treatment of bins clipped
away, the guard and the exact re-pooling of RoIs that read NaN, infinities or values <= -FLT_MAX
(torchvision skips NaN and never returns less than -FLT_MAX), one map without a
``feature_index``, the int32 argmax convention shared with the kernels, and the backward.

Every test runs twice: with the compiled max kernels (``spp_triton.native``, forward and backward,
the default where a C compiler exists) and with torchvision's ``roi_pool`` plus the guard and
``_roi_pool_backward`` (the path without one).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torchvision

from spp_triton import bins, cpu, native, reference


@pytest.fixture(autouse=True, params=["compiled", "torchvision"])
def roi_max_path(request, monkeypatch):
    """The RoI max pooling path under test (see the module docstring)."""
    if request.param == "torchvision":
        monkeypatch.setattr(native, "roi_max_kernel", lambda dtype: None)
        monkeypatch.setattr(native, "roi_max_backward_kernel", lambda dtype: None)
    elif native.roi_max_kernel(torch.float32) is None:
        pytest.skip("no compiled kernel on this machine (no C compiler)")
    return request.param


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _rois(gen, k, n_img, height, width, scale):
    """Boxes inside, across and wholly outside the map (in image coordinates)."""
    img = torch.tensor([width, height, width, height]) / scale
    xy = torch.rand(k, 4, generator=gen) * img * 1.6 - img * 0.3
    x1, x2 = xy[:, 0].minimum(xy[:, 2]), xy[:, 0].maximum(xy[:, 2])
    y1, y2 = xy[:, 1].minimum(xy[:, 3]), xy[:, 1].maximum(xy[:, 3])
    batch = torch.randint(0, n_img, (k,), generator=gen).float()
    return torch.stack([batch, x1, y1, x2, y2], 1)


def _tv(x, rois, levels, scale):
    """torchvision per level + cat: ``(values, int32 argmax)``."""
    outs = [torch.ops.torchvision.roi_pool(x, rois, scale, bh, bw) for bh, bw in levels]
    k = rois.shape[0]
    return (
        torch.cat([v.reshape(k, -1) for v, _ in outs], 1),
        torch.cat([a.reshape(k, -1).to(torch.int32) for _, a in outs], 1),
    )


def _forward(x, rois, levels, scale, mode="max", with_argmax=True):
    levels = bins.normalize_levels(levels)
    return cpu.pyramid_pool_forward([x], rois, None, [scale], levels, mode, "roi", with_argmax)


# ----------------------------------------------------------------------------- max, RoI
@pytest.mark.parametrize("levels", [(1, 2, 4), (1, 2, 3, 6), (2, 4, 8), ((3, 2), (6, 4), 1)])
@pytest.mark.parametrize("with_argmax", [True, False])
def test_roi_max_equals_torchvision(gen, levels, with_argmax):
    """Derived coarse levels (with_argmax=False) and direct ones give torchvision's values; RoIs
    past the map have empty bins, and the map is negative so a 0 from a clipped bin would win."""
    x = -torch.rand(2, 3, 11, 13, generator=gen) - 1.0
    rois = _rois(gen, 60, 2, 11, 13, 0.5)
    out, arg = _forward(x, rois, levels, 0.5, with_argmax=with_argmax)
    ref, ref_arg = _tv(x, rois, bins.normalize_levels(levels), 0.5)
    assert torch.equal(out, ref)
    if with_argmax:
        assert torch.equal(arg, ref_arg)
    else:
        assert arg.numel() == 0


@pytest.mark.parametrize("with_argmax", [True, False])
def test_non_nesting_levels_fall_back_to_direct_pooling(gen, with_argmax):
    """7 bins do not always nest in 1 under torchvision's float partition (ratio 2 always does:
    doubling is exact in floating point; ratio 7 fails at extents 57, 114, 121, ...)."""
    x = torch.randn(1, 2, 130, 130, generator=gen)
    rois = torch.tensor([[0, 0.0, 0.0, float(e), float(e)] for e in range(5, 125)])
    levels = ((1, 1), (7, 7), (14, 14))
    q = cpu._quantise(rois, 1.0, torch.float32, torch.float32)
    geometry = cpu._geometry(q, levels, 130, 130, torch.float32)
    assert cpu._nesting_fails(geometry, (7, 7), (1, 1)).numel() >= 2  # the case does occur
    out, arg = _forward(x, rois, levels, 1.0, with_argmax=with_argmax)
    ref, ref_arg = _tv(x, rois, levels, 1.0)
    assert torch.equal(out, ref)
    if with_argmax:
        assert torch.equal(arg, ref_arg)


def test_derived_argmax_takes_the_first_of_tied_fine_bins(gen):
    """Ties across the fine bins of a coarse bin (small integers), RoIs past the map (empty fine
    bins, which must not win over negative values): the derived argmax is torchvision's."""
    x = -torch.randint(0, 3, (2, 3, 12, 12), generator=gen).float()
    rois = _rois(gen, 80, 2, 12, 12, 1.0)
    levels = bins.normalize_levels((1, 2, 3, 6, (4, 2)))
    out, arg = _forward(x, rois, levels, 1.0)
    ref, ref_arg = _tv(x, rois, levels, 1.0)
    assert torch.equal(out, ref) and torch.equal(arg, ref_arg)
    assert (ref_arg < 0).any()  # some bins were empty


def test_root_plan_derives_from_the_coarsest_finer_level():
    assert cpu._root_plan(((1, 1), (2, 2), (4, 4))) == [1, 2, None]
    assert cpu._root_plan(((1, 1), (2, 2), (3, 3), (6, 6))) == [1, 3, 3, None]
    assert cpu._root_plan(((5, 3), (2, 2))) == [None, None]
    # with an argmax, only from levels of at most 16 bins; a repeated level is still shared
    assert cpu._root_plan(((1, 1), (2, 2), (3, 3), (6, 6)), 16) == [1, None, None, None]
    assert cpu._root_plan(((1, 1), (2, 2), (4, 4)), 16) == [1, 2, None]
    assert cpu._root_plan(((6, 6), (6, 6), (3, 3)), 16) == [None, 0, None]


# ----------------------------------------------------------------------------- NaN rule
@pytest.mark.parametrize("with_argmax", [True, False])
def test_nan_inside_a_bin_propagates_and_argmax_is_the_first_nan(gen, with_argmax):
    x = torch.randn(1, 2, 8, 8, generator=gen)
    x[0, 0, 2, 5] = x[0, 0, 3, 1] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 7.0, 7.0], [0, 4.0, 4.0, 7.0, 7.0]])
    out, arg = _forward(x, rois, (1, 2), 1.0, with_argmax=with_argmax)
    ref = reference.roi_spp_pool_reference(x, rois, (1, 2), 1.0, "max")
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), rtol=0, atol=0)
    assert out[0, 0].isnan() and not out[1].isnan().any()  # channel 0 of RoI 0, level 1
    if with_argmax:
        assert arg[0, 0] == 2 * 8 + 5  # the first NaN in row-major order


def test_nan_outside_every_roi_changes_nothing(gen):
    """The guard looks where RoIs read: a NaN elsewhere gives torchvision's numbers exactly."""
    x = torch.randn(2, 3, 12, 12, generator=gen)
    x[0, :, 10:, 10:] = float("nan")
    x[1, 1, 0, 0] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [1, 2.0, 2.0, 11.0, 11.0]])
    for with_argmax in (True, False):
        out, arg = _forward(x, rois, (1, 2, 4), 1.0, with_argmax=with_argmax)
        ref, ref_arg = _tv(x, rois, ((1, 1), (2, 2), (4, 4)), 1.0)
        assert torch.equal(out, ref)
        if with_argmax:
            assert torch.equal(arg, ref_arg)


@pytest.mark.parametrize(
    "pixel,inside",
    [((7, 6), True), ((3, 2), True), ((8, 6), False), ((7, 7), False), ((2, 2), False)],
)
def test_nan_guard_window_edges(gen, pixel, inside):
    """The guard reads exactly the RoI's bins: rows [3, 8) x cols [2, 7) for this box."""
    x = torch.randn(1, 1, 16, 16, generator=gen)
    x[0, 0, pixel[0], pixel[1]] = float("nan")
    rois = torch.tensor([[0, 2.0, 3.0, 6.0, 7.0]])
    for with_argmax in (True, False):
        out, _ = _forward(x, rois, (1, 2, 4), 1.0, with_argmax=with_argmax)
        assert bool(out[0, 0].isnan()) == inside
        if not inside:
            assert torch.equal(out, _tv(x, rois, ((1, 1), (2, 2), (4, 4)), 1.0)[0])


def test_infinities_and_huge_values_are_not_nan(gen):
    """+inf and -inf, and finite values whose sum overflows, are pooled as numbers."""
    x = torch.randn(1, 2, 9, 9, generator=gen)
    x[0, 0, 1, 1] = float("inf")
    x[0, 0, 2, 2] = float("-inf")
    x[0, 1] = 3e38
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 1.0, 1.0, 3.0, 3.0]])
    for with_argmax in (True, False):
        out, _ = _forward(x, rois, (1, 2), 1.0, with_argmax=with_argmax)
        assert not out.isnan().any()
        assert torch.equal(out, _tv(x, rois, ((1, 1), (2, 2)), 1.0)[0])


def test_fpn_maps_nan_only_in_the_map_a_roi_reads(gen):
    feats = [torch.randn(1, 2, 16, 16, generator=gen), torch.randn(1, 2, 8, 8, generator=gen)]
    feats[1][0, 0, 1, 1] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 31.0, 31.0], [0, 0.0, 0.0, 31.0, 31.0]])
    index = torch.tensor([0, 1])
    out, _ = cpu.pyramid_pool_forward(
        feats, rois, index, [0.5, 0.25], ((1, 1),), "max", "roi", with_argmax=False
    )
    assert not out[0].isnan().any()
    assert out[1, 0].isnan() and not out[1, 1].isnan()


def _rule_argmax(x, rois, levels, scale):
    """The argmax rule by loops (independent of spp_triton.cpu): per RoI, level, channel, bin,
    the first NaN of the bin in row-major order if it has one, else its first maximal element;
    -1 for an empty bin. Bins from the reference's own geometry."""
    n, c, height, width = x.shape
    rows = []
    for roi in rois.tolist():
        b = int(roi[0])
        row = []
        for bh, bw in levels:
            cells = reference.roi_bins_reference(*roi[1:], scale, bh, bw, height, width, x.dtype)
            for ch in range(c):
                for (h0, h1), (w0, w1) in cells:
                    flat = [(h, w) for h in range(h0, h1) for w in range(w0, w1)]
                    vals = [float(x[b, ch, h, w]) for h, w in flat]
                    if not vals:
                        row.append(-1)
                        continue
                    nans = [i for i, v in enumerate(vals) if v != v]
                    i = nans[0] if nans else vals.index(max(vals))
                    row.append(flat[i][0] * width + flat[i][1])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


def _special_map(gen, dtype):
    """NaN, +-inf, -FLT_MAX and (float64) values below -FLT_MAX, scattered and as whole planes."""
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=dtype)
    u = torch.rand(x.shape, generator=gen)
    lowest32 = torch.finfo(torch.float32).min
    x[u < 0.04] = float("nan")
    x[(u >= 0.04) & (u < 0.12)] = float("-inf")
    x[(u >= 0.12) & (u < 0.16)] = lowest32
    x[(u >= 0.16) & (u < 0.18)] = float("inf")
    if dtype == torch.float64:
        x[(u >= 0.18) & (u < 0.3)] = -1e100
    x[0, 1] = float("-inf")  # bins with nothing but -inf
    x[1, 2, :5] = lowest32  # bins with nothing but -FLT_MAX
    x[1, 2, 5:] = float("-inf")
    return x


@pytest.mark.parametrize("guard", ["windows", "whole map"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_argmax", [True, False])
def test_values_torchvision_mishandles_follow_the_rule(gen, monkeypatch, guard, dtype, with_argmax):
    """torchvision skips NaN and returns -FLT_MAX / argmax -1 where every number is <= -FLT_MAX;
    spp_triton's rule (the kernels', the reference's) propagates NaN and keeps -inf, -FLT_MAX and
    smaller float64 values as the real maximum at its first position. Both guard strategies."""
    if guard == "windows":
        monkeypatch.setattr(cpu, "_NS_PER_MAP_ELEMENT", float("inf"))
    else:
        monkeypatch.setattr(cpu, "_NS_PER_MAP_ELEMENT", 0.0)
    x = _special_map(gen, dtype)
    rois = _rois(gen, 14, 2, 9, 11, 1.0).to(dtype)
    levels = ((1, 1), (2, 2), (3, 3), (6, 6))
    out, arg = _forward(x, rois, levels, 1.0, with_argmax=with_argmax)
    ref = reference.roi_spp_pool_reference(x, rois, (1, 2, 3, 6), 1.0, "max")
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(0.0, 1.0, -1.0), ref.nan_to_num(0.0, 1.0, -1.0))
    assert torch.equal(out == float("-inf"), ref == float("-inf"))
    assert (out == float("-inf")).any() and out.isnan().any()  # the cases did occur
    if with_argmax:
        assert torch.equal(arg, _rule_argmax(x, rois, levels, 1.0))


@pytest.mark.parametrize("chunk", [1, 64, 1 << 22])
def test_exact_path_chunks_give_the_same_result(gen, monkeypatch, chunk):
    """The exact re-pooling in chunks of RoIs and of channels (chunk 1: one channel at a time)."""
    x = _special_map(gen, torch.float32)
    rois = _rois(gen, 9, 2, 9, 11, 1.0)
    levels = ((1, 1), (2, 3), (6, 6))
    full, full_arg = _forward(x, rois, levels, 1.0)
    monkeypatch.setattr(cpu, "_EXACT_CHUNK_ELEMENTS", chunk)
    out, arg = _forward(x, rois, levels, 1.0)
    assert torch.equal(out.isnan(), full.isnan())
    assert torch.equal(out.nan_to_num(0.0), full.nan_to_num(0.0)) and torch.equal(arg, full_arg)
    assert torch.equal(arg, _rule_argmax(x, rois, levels, 1.0))


def test_a_bin_of_minus_inf_is_minus_inf_and_gets_the_gradient():
    """Regression: this path gave torchvision's -FLT_MAX and no gradient."""
    import spp_triton

    x = torch.full((1, 1, 4, 4), float("-inf"))
    x[0, 0, 0, 0] = 1.0
    x.requires_grad_()
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]])
    out = spp_triton.roi_spp_pool(x, rois, (1, 2), 1.0)
    assert torch.equal(out, torch.full((1, 5), float("-inf")))
    out.sum().backward()
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 1] = 2.0  # the first element of the 1x1 bin and of bin (0, 0)
    expected[0, 0, 1, 2] = expected[0, 0, 2, 1] = expected[0, 0, 2, 2] = 1.0
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_adaptive_max_argmax_is_the_first_nan(gen, padded):
    """ATen's adaptive_max_pool2d indexes a bin's last NaN; the rule is its first."""
    x = _special_map(gen, torch.float32)[:, :, :8, :10].contiguous()
    sizes = [[8, 10], [5, 7]] if padded else [[8, 10], [8, 10]]
    regions = torch.tensor([[b, h, w] for b, (h, w) in enumerate(sizes)])
    levels = ((1, 1), (2, 2), (3, 4))
    out, arg = cpu.pyramid_pool_forward([x], regions, None, [], levels, "max", "adaptive", True)
    expected = []
    for b, h, w in regions.tolist():
        row = []
        for bh, bw in levels:
            for ch in range(x.shape[1]):
                for i in range(bh):
                    for j in range(bw):
                        h0, h1 = i * h // bh, -(-(i + 1) * h // bh)
                        w0, w1 = j * w // bw, -(-(j + 1) * w // bw)
                        cells = [(r, q) for r in range(h0, h1) for q in range(w0, w1)]
                        vals = [float(x[b, ch, r, q]) for r, q in cells]
                        nans = [n for n, v in enumerate(vals) if v != v]
                        pick = nans[0] if nans else vals.index(max(vals))
                        row.append(cells[pick][0] * x.shape[3] + cells[pick][1])
        expected.append(row)
    assert out.isnan().any()
    assert torch.equal(arg, torch.tensor(expected, dtype=torch.int32))


# ----------------------------------------------------------------------------- one map, no index
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("partition", ["roi", "adaptive"])
def test_no_feature_index_equals_all_zero_index(gen, mode, partition):
    x = torch.randn(2, 3, 9, 10, generator=gen, requires_grad=True)
    if partition == "roi":
        regions, scales = _rois(gen, 7, 2, 9, 10, 0.5), [0.5]
    else:
        regions, scales = torch.tensor([[0, 9, 10], [1, 4, 3]]), []
    levels = ((1, 1), (2, 3))
    zero = torch.zeros(regions.shape[0], dtype=torch.int64)
    a = cpu.pyramid_pool_forward([x], regions, None, scales, levels, mode, partition)
    b = cpu.pyramid_pool_forward([x], regions, zero, scales, levels, mode, partition)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = torch.randn(a[0].shape, generator=gen)
    ga = cpu.pyramid_pool_backward(g, [x], regions, None, scales, levels, mode, partition, a[1])
    gb = cpu.pyramid_pool_backward(g, [x], regions, zero, scales, levels, mode, partition, b[1])
    assert torch.equal(ga[0], gb[0])


# ----------------------------------------------------------------------------- backward
def test_max_backward_equals_torchvision(gen):
    x = torch.randn(2, 3, 10, 12, generator=gen, requires_grad=True)
    rois = _rois(gen, 20, 2, 10, 12, 0.25)
    levels = ((1, 1), (2, 2), (4, 4))
    out, arg = _forward(x.detach(), rois, levels, 0.25)
    g = torch.randn(out.shape, generator=gen)
    (ours,) = cpu.pyramid_pool_backward(g, [x], rois, None, [0.25], levels, "max", "roi", arg)
    ref = torch.cat([torchvision.ops.roi_pool(x, rois, n, 0.25).flatten(1) for n in (1, 2, 4)], 1)
    (expected,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(ours, expected)


def test_avg_forward_and_backward_equal_the_loop_reference(gen):
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _rois(gen, 15, 2, 9, 11, 0.5).double()
    levels = ((1, 1), (2, 2), (3, 3))
    out, _ = cpu.pyramid_pool_forward([x.detach()], rois, None, [0.5], levels, "avg", "roi")
    ref = reference.roi_spp_pool_reference(x, rois, (1, 2, 3), 0.5, "avg")
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    empty = torch.empty(0, dtype=torch.int32)
    (ours,) = cpu.pyramid_pool_backward(g, [x], rois, None, [0.5], levels, "avg", "roi", empty)
    (expected,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(ours, expected)
