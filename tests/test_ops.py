"""Public API and torch ops against independent oracles (torch CPU path unless stated).

Oracles: torchvision.ops.roi_pool (max, bit-exact), F.adaptive_*_pool2d (spp_pool) and the
loop-based spp_triton.reference (avg). Inputs are fresh random tensors per test (seeded by the test
name so failures reproduce).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torchvision

import spp_triton
from spp_triton import reference

LEVEL_SETS = [(1, 2, 4), (1, 2, 3, 6), (4, 2, 1), (2, 3)]


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_rois(gen, k, n_img, img_h, img_w, dtype=torch.float32):
    """Boxes of every awkward kind: inside, partly/wholly outside, degenerate, inverted, tiny."""
    x = torch.rand(k, 2, generator=gen) * img_w * 1.6 - img_w * 0.3
    y = torch.rand(k, 2, generator=gen) * img_h * 1.6 - img_h * 0.3
    kind = torch.randint(0, 6, (k,), generator=gen)
    x1, x2 = x.min(1).values, x.max(1).values
    y1, y2 = y.min(1).values, y.max(1).values
    # kind 0: inverted; 1: degenerate point; 2: wholly outside; 3: half-pixel corners
    x1, x2 = torch.where(kind == 0, x2, x1), torch.where(kind == 0, x1, x2)
    x2 = torch.where(kind == 1, x1, x2)
    y2 = torch.where(kind == 1, y1, y2)
    off = torch.where(kind == 2, torch.full_like(x1, img_w * 2.0), torch.zeros_like(x1))
    x1, x2 = x1 + off, x2 + off
    half = kind == 3
    x1 = torch.where(half, torch.floor(x1) + 0.5, x1)
    y2 = torch.where(half, torch.floor(y2) + 0.5, y2)
    b = torch.randint(0, n_img, (k,), generator=gen).to(torch.float32)
    return torch.stack([b, x1, y1, x2, y2], 1).to(dtype)


def tv_roi_spp(x, rois, levels, scale):
    return torch.cat([torchvision.ops.roi_pool(x, rois, n, scale).flatten(1) for n in levels], 1)


# ----------------------------------------------------------------------------- roi_pool
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_pool_max_bit_exact_every_output_size(gen, dtype):
    x = torch.randn(2, 3, 11, 16, generator=gen, dtype=dtype)
    rois = random_rois(gen, 40, 2, 44, 64, dtype)
    for oh in range(1, 15):
        for ow in (oh, max(1, 15 - oh)):
            ours = spp_triton.roi_pool(x, rois, (oh, ow), 0.25)
            ref = torchvision.ops.roi_pool(x, rois, (oh, ow), 0.25)
            assert torch.equal(ours, ref), (oh, ow)


@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 16, 0.3])
def test_roi_pool_max_scales_and_large_rois(gen, scale):
    x = torch.randn(1, 4, 40, 57, generator=gen)
    rois = random_rois(gen, 60, 1, 40 / scale, 57 / scale)
    for n in (7, 14):
        assert torch.equal(
            spp_triton.roi_pool(x, rois, n, scale), torchvision.ops.roi_pool(x, rois, n, scale)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_pool_max_half_dtypes(gen, dtype):
    """Half inputs: bins are computed in float32 (documented); values are exact maxima."""
    x = torch.randn(2, 3, 9, 13, generator=gen).to(dtype)
    rois = random_rois(gen, 30, 2, 36, 52)
    ours = spp_triton.roi_pool(x, rois, 5, 0.25)
    assert ours.dtype == dtype
    ref = torchvision.ops.roi_pool(x.float(), rois, 5, 0.25).to(dtype)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_roi_pool_avg_matches_loop_reference(gen, dtype):
    x = torch.randn(2, 3, 9, 12, generator=gen).to(dtype)
    rois = random_rois(gen, 25, 2, 36, 48)
    for size in [(1, 1), (3, 3), (2, 5), (7, 7)]:
        ours = spp_triton.roi_pool(x, rois, size, 0.25, mode="avg")
        ref = reference.roi_pool_reference(x, rois, size, 0.25, "avg")
        tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)


def test_reference_bins_agree_with_torchvision(gen):
    """The oracle for avg uses the same bins as torchvision's max (checked through max)."""
    x = torch.randn(1, 2, 10, 10, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, 30, 1, 40, 40, torch.float64)
    for n in (2, 7, 14):
        assert torch.equal(
            reference.roi_pool_reference(x, rois, n, 0.25, "max"),
            torchvision.ops.roi_pool(x, rois, n, 0.25),
        )


# ----------------------------------------------------------------------------- roi_spp_pool
@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_roi_spp_pool_equals_cat_of_roi_pool(gen, levels):
    x = torch.randn(3, 5, 13, 17, generator=gen)
    rois = random_rois(gen, 80, 3, 52, 68)
    ours = spp_triton.roi_spp_pool(x, rois, levels, 0.25)
    assert ours.shape == (80, 5 * sum(n * n for n in levels))
    assert torch.equal(ours, tv_roi_spp(x, rois, levels, 0.25))
    avg = spp_triton.roi_spp_pool(x, rois, levels, 0.25, mode="avg")
    cat = torch.cat(
        [spp_triton.roi_pool(x, rois, n, 0.25, mode="avg").flatten(1) for n in levels], 1
    )
    assert torch.equal(avg, cat)


def test_roi_spp_pool_nesting_fallback_14_bins(gen):
    """torchvision's float partition does not always nest for 14 bins (e.g. extent 57): the
    derived coarse levels must still equal direct pooling."""
    x = torch.randn(1, 2, 70, 70, generator=gen)
    extents = torch.tensor([57, 114, 121, 62, 10, 33], dtype=torch.float32)
    rois = torch.stack(
        [torch.zeros(6), torch.zeros(6), torch.zeros(6), extents - 1, extents - 1], 1
    )
    levels = [1, 2, 7, 14]
    assert torch.equal(spp_triton.roi_spp_pool(x, rois, levels), tv_roi_spp(x, rois, levels, 1.0))


def test_boxes_as_list_equal_tensor_form(gen):
    x = torch.randn(2, 3, 8, 9, generator=gen)
    per_image = [random_rois(gen, 5, 1, 32, 36)[:, 1:], random_rois(gen, 0, 1, 32, 36)[:, 1:]]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)]
    )
    assert torch.equal(
        spp_triton.roi_spp_pool(x, per_image, (1, 2), 0.25),
        spp_triton.roi_spp_pool(x, rois, (1, 2), 0.25),
    )


def test_non_contiguous_and_channels_last_inputs(gen):
    base = torch.randn(2, 6, 12, 20, generator=gen)
    rois = random_rois(gen, 20, 2, 40, 40)
    variants = [
        base[:, ::2, :, ::2],
        base.to(memory_format=torch.channels_last)[:, :, :, :10],
        base.transpose(2, 3),
    ]
    for x in variants:
        assert not x.is_contiguous()
        for mode in ("max", "avg"):
            assert torch.equal(
                spp_triton.roi_spp_pool(x, rois, (1, 2, 4), 0.3, mode),
                spp_triton.roi_spp_pool(x.contiguous(), rois, (1, 2, 4), 0.3, mode),
            )


def test_empty_box_set_returns_empty(gen):
    x = torch.randn(2, 4, 5, 5, generator=gen, requires_grad=True)
    out = spp_triton.roi_spp_pool(x, torch.zeros(0, 5), (1, 2, 4))
    assert out.shape == (0, 4 * 21) and out.dtype == x.dtype
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert spp_triton.roi_pool(x, [torch.zeros(0, 4)] * 2, 3).shape == (0, 4, 3, 3)


# ----------------------------------------------------------------------------- spp_pool
@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_pool_matches_adaptive_pooling(gen, levels, mode):
    x = torch.randn(4, 3, 9, 14, generator=gen)
    sizes = torch.tensor([[9, 14], [1, 1], [3, 2], [7, 5]])  # incl. maps smaller than the level
    ours = spp_triton.spp_pool(x, levels, mode, sizes)
    ref = reference.spp_pool_reference(x, levels, mode, sizes)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    if mode == "max":
        assert torch.equal(ours, ref)
    full = spp_triton.spp_pool(x, levels, mode)
    torch.testing.assert_close(
        full, reference.spp_pool_reference(x, levels, mode), atol=1e-6, rtol=1e-6
    )


def test_spp_pool_one_by_one_map_and_half(gen):
    x = torch.randn(2, 3, 1, 1, generator=gen).half()
    out = spp_triton.spp_pool(x, (1, 2, 4))
    assert out.dtype == torch.float16
    expected = torch.cat([x.flatten(1).repeat_interleave(n * n, dim=1) for n in (1, 2, 4)], 1)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_gradcheck_float64(gen, mode):
    x = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(gen, 6, 2, 28, 32, torch.float64)
    sizes = torch.tensor([[7, 8], [4, 3]])
    feats = [x, torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)]
    idx = torch.tensor([0, 1, 0, 1, 1, 0])
    checks = [
        lambda t: spp_triton.roi_spp_pool(t, rois, (1, 2, 3), 0.25, mode),
        lambda t: spp_triton.roi_pool(t, rois, (2, 3), 0.25, mode),
        lambda t: spp_triton.spp_pool(t, (1, 2, 4), mode, sizes),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    multi = lambda a, b: spp_triton.multilevel_roi_spp_pool(  # noqa: E731
        [a, b], rois, idx, [0.25, 0.125], (1, 2), mode
    )
    assert torch.autograd.gradcheck(multi, tuple(feats), eps=1e-6, atol=1e-6)


def test_max_gradient_with_ties_goes_to_first_row_major(gen):
    """Small integers make ties everywhere: the gradient must follow torchvision's choice (the
    first maximal element in row-major order), including on derived coarse levels."""
    x = torch.randint(0, 3, (2, 3, 10, 12), generator=gen).float().requires_grad_()
    rois = random_rois(gen, 30, 2, 40, 48)
    levels = (1, 2, 4)
    g = torch.randn(30, 3 * 21, generator=gen)
    (ours,) = torch.autograd.grad(spp_triton.roi_spp_pool(x, rois, levels, 0.25), x, g)
    (ref,) = torch.autograd.grad(tv_roi_spp(x, rois, levels, 0.25), x, g)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_gradients_equal_autograd_through_reference(gen, levels):
    x = torch.randn(2, 3, 11, 9, generator=gen, requires_grad=True)
    rois = random_rois(gen, 25, 2, 44, 36)
    sizes = torch.tensor([[11, 9], [5, 2]])
    for mode in ("max", "avg"):
        g = torch.randn(25, 3 * sum(n * n for n in levels), generator=gen)
        (ours,) = torch.autograd.grad(spp_triton.roi_spp_pool(x, rois, levels, 0.25, mode), x, g)
        ref_out = (
            tv_roi_spp(x, rois, levels, 0.25)
            if mode == "max"
            else reference.roi_spp_pool_reference(x, rois, levels, 0.25, mode)
        )
        (ref,) = torch.autograd.grad(ref_out, x, g)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        g2 = torch.randn(2, 3 * sum(n * n for n in levels), generator=gen)
        (ours,) = torch.autograd.grad(spp_triton.spp_pool(x, levels, mode, sizes), x, g2)
        (ref,) = torch.autograd.grad(reference.spp_pool_reference(x, levels, mode, sizes), x, g2)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_deterministic_backward_is_bitwise_repeatable(gen):
    x = torch.randn(2, 4, 12, 12, generator=gen, requires_grad=True)
    rois = random_rois(gen, 200, 2, 48, 48)
    g = torch.randn(200, 4 * 21, generator=gen)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for mode in ("max", "avg"):
            runs = [
                torch.autograd.grad(spp_triton.roi_spp_pool(x, rois, (1, 2, 4), 0.25, mode), x, g)[
                    0
                ]
                for _ in range(3)
            ]
            assert all(torch.equal(runs[0], r) for r in runs[1:])
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------- NaN rule
def test_max_propagates_nan_unlike_torchvision(gen):
    x = torch.randn(1, 2, 8, 8, generator=gen)
    x[0, 0, 2, 3] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 7.0, 7.0], [0, 4.0, 4.0, 7.0, 7.0]])
    ours = spp_triton.roi_pool(x, rois, 2)
    tv = torchvision.ops.roi_pool(x, rois, 2)
    assert torch.isnan(ours[0, 0, 0, 0]) and not torch.isnan(tv[0, 0, 0, 0])  # the difference
    assert not torch.isnan(ours[1]).any() and torch.equal(ours[1], tv[1])
    assert not torch.isnan(ours[0, 1]).any()
    spp = spp_triton.spp_pool(x, (1, 2, 4))
    assert torch.equal(spp.isnan(), reference.spp_pool_reference(x, (1, 2, 4), "max").isnan())
    avg = spp_triton.roi_pool(x, rois, 2, mode="avg")
    assert torch.isnan(avg[0, 0, 0, 0]) and not torch.isnan(avg[1]).any()


def test_nan_gradient_goes_to_the_nan(gen):
    x = torch.randn(1, 1, 6, 6, generator=gen)
    x[0, 0, 1, 4] = float("nan")
    x.requires_grad_()
    out = spp_triton.roi_spp_pool(x, torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]]), (1, 2))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad[0, 0, 1, 4] == 2  # selected by the 1x1 bin and its 2x2 bin


# ----------------------------------------------------------------------------- registration
def test_ops_are_registered():
    for name in ("pyramid_pool", "pyramid_pool_backward"):
        assert hasattr(torch.ops.spp_triton, name)
    for old in ("roi_spp_pool", "multilevel_roi_spp_pool", "spp_pool"):
        assert not hasattr(torch.ops.spp_triton, old)  # one forward op, not one per function


def test_opcheck_cpu(gen):
    """Every call form of the one forward op: RoI SPP and RoI pooling on one map (no
    feature_index), multi-level RoI SPP, and whole-map SPP with image sizes."""
    op = torch.ops.spp_triton.pyramid_pool.default
    x = torch.randn(2, 3, 6, 7, generator=gen, requires_grad=True)
    rois = random_rois(gen, 5, 2, 24, 28)
    regions = torch.tensor([[0, 6, 7], [1, 3, 2]])
    for mode in ("max", "avg"):
        torch.library.opcheck(op, ([x], rois, None, [0.25], [1, 1, 2, 2], mode, "roi"))
        # inference form (no argmax): on a map that does not require grad
        torch.library.opcheck(op, ([x.detach()], rois, None, [0.25], [2, 3], mode, "roi", False))
        torch.library.opcheck(op, ([x], regions, None, [], [1, 1, 2, 3], mode, "adaptive"))
        feats = [x, torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)]
        index = torch.tensor([0, 1, 1, 0, 1])
        torch.library.opcheck(op, (feats, rois, index, [0.25, 0.125], [2, 2], mode, "roi"))


def test_functions_call_the_one_op_with_their_partition(gen, monkeypatch):
    """Each public function is one ``pyramid_pool`` call; one-map calls pass no feature_index."""
    from spp_triton import ops

    calls = []
    real = ops.pyramid_pool_op

    def spy(features, regions, feature_index, scales, levels_hw, mode, partition, with_argmax):
        calls.append((len(features), feature_index, scales, levels_hw, partition, with_argmax))
        return real(
            features, regions, feature_index, scales, levels_hw, mode, partition, with_argmax
        )

    monkeypatch.setattr(ops, "pyramid_pool_op", spy)
    x = torch.randn(1, 2, 8, 8, generator=gen)
    rois = random_rois(gen, 3, 1, 8, 8)
    spp_triton.spp_pool(x, (1, 2))
    spp_triton.roi_spp_pool(x, rois, (1, (2, 3)), 0.5)
    spp_triton.roi_pool(x, rois, (2, 4))
    idx = torch.tensor([0, 1, 0])
    spp_triton.multilevel_roi_spp_pool([x, x[:, :, :4, :4]], rois, idx, [1.0, 0.5], (2,))
    assert [c[4] for c in calls] == ["adaptive", "roi", "roi", "roi"]
    assert [c[1] is None for c in calls] == [True, True, True, False]
    assert [c[3] for c in calls] == [[1, 1, 2, 2], [1, 1, 2, 3], [2, 4], [2, 2]]
    assert [c[2] for c in calls] == [[], [0.5], [1.0], [1.0, 0.5]]
    assert not any(c[5] for c in calls)  # no input requires grad: no argmax


def test_torch_compile_fullgraph_cpu(gen):
    x = torch.randn(2, 3, 10, 12, generator=gen)
    rois = random_rois(gen, 7, 2, 40, 48)

    def fn(t, r):
        return (
            spp_triton.roi_spp_pool(t, r, (1, 2, 4), 0.25).sum(1)
            + spp_triton.roi_pool(t, r, 3, 0.25, "avg").flatten(1).sum(1)
            + spp_triton.spp_pool(t, (1, 2)).sum()
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois), fn(x, rois))


def test_torch_compile_fullgraph_multilevel_forward_and_backward(gen):
    feats = [torch.randn(2, 3, s, s + 2, generator=gen, requires_grad=True) for s in (8, 4)]
    rois = random_rois(gen, 9, 2, 32, 40)
    index = torch.randint(0, 2, (9,), generator=gen)

    def fn(a, b, r, i):
        return spp_triton.multilevel_roi_spp_pool([a, b], r, i, [0.25, 0.125], (1, 2), "max")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*feats, rois, index)
    ref = fn(*feats, rois, index)
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, generator=gen)
    torch.testing.assert_close(
        torch.autograd.grad(out, feats, g), torch.autograd.grad(ref, feats, g)
    )


# ----------------------------------------------------------------------------- modules
def test_modules_wrap_functions(gen):
    x = torch.randn(2, 3, 9, 9, generator=gen)
    rois = random_rois(gen, 4, 2, 36, 36)
    assert torch.equal(
        spp_triton.SpatialPyramidPool((1, 3), "avg")(x), spp_triton.spp_pool(x, (1, 3), "avg")
    )
    m = spp_triton.RoISpatialPyramidPool((1, 2), 0.25)
    assert m.output_multiplier == 5 and "levels=[1, 2]" in repr(m)
    assert torch.equal(m(x, rois), spp_triton.roi_spp_pool(x, rois, (1, 2), 0.25))
    assert torch.equal(
        spp_triton.RoIPool((2, 3), 0.25)(x, rois), torchvision.ops.RoIPool((2, 3), 0.25)(x, rois)
    )


def test_multilevel_equals_per_map_pooling(gen):
    feats = [torch.randn(2, 4, s, s + 3, generator=gen) for s in (16, 8, 4)]
    scales = [1 / 4, 1 / 8, 1 / 16]
    rois = random_rois(gen, 30, 2, 64, 76)
    idx = torch.randint(0, 3, (30,), generator=gen)
    for mode in ("max", "avg"):
        out = spp_triton.multilevel_roi_spp_pool(feats, rois, idx, scales, (1, 2, 4), mode)
        for f in range(3):
            sel = idx == f
            assert torch.equal(
                out[sel], spp_triton.roi_spp_pool(feats[f], rois[sel], (1, 2, 4), scales[f], mode)
            )


def test_levels_accept_rectangular_pairs(gen):
    x = torch.randn(1, 2, 9, 9, generator=gen)
    rois = random_rois(gen, 5, 1, 9, 9)
    out = spp_triton.multilevel_roi_spp_pool(
        [x], rois, torch.zeros(5, dtype=torch.long), [1.0], [(2, 3)]
    )
    assert torch.equal(out, torchvision.ops.roi_pool(x, rois, (2, 3)).flatten(1))


# ----------------------------------------------------------------------------- Triton interpreter
@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_public_api_through_triton_kernels_forward_and_backward(gen, mode):
    """The same checks through the Triton kernels (Triton's interpreter on CPU)."""
    x = torch.randn(2, 3, 9, 11, generator=gen, requires_grad=True)
    rois = random_rois(gen, 12, 2, 36, 44)
    levels = (1, 2, 3, 6)
    g = torch.randn(12, 3 * 50, generator=gen)
    out = spp_triton.roi_spp_pool(x, rois, levels, 0.25, mode)
    ref_out = (
        tv_roi_spp(x, rois, levels, 0.25)
        if mode == "max"
        else reference.roi_spp_pool_reference(x, rois, levels, 0.25, mode)
    )
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    (ours,) = torch.autograd.grad(out, x, g)
    (ref,) = torch.autograd.grad(ref_out, x, g)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    sizes = torch.tensor([[9, 11], [2, 3]])
    spp = spp_triton.spp_pool(x, (1, 2, 4), mode, sizes)
    torch.testing.assert_close(
        spp, reference.spp_pool_reference(x, (1, 2, 4), mode, sizes), atol=1e-5, rtol=1e-5
    )


@pytest.mark.usefixtures("triton_cpu")
def test_triton_path_deterministic_flag_uses_torch_backward(gen):
    x = torch.randn(1, 2, 8, 8, generator=gen, requires_grad=True)
    rois = random_rois(gen, 30, 1, 32, 32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [
            torch.autograd.grad(spp_triton.roi_spp_pool(x, rois, (1, 2), 0.25).sum(), x)[0]
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(grads[0], grads[1])
    (ref,) = torch.autograd.grad(tv_roi_spp(x, rois, (1, 2), 0.25).sum(), x)
    torch.testing.assert_close(grads[0], ref)
