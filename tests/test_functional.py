"""spp_triton.functional (the public functions) against independent oracles, on the torch CPU path.

Oracles: torchvision.ops.roi_pool (max, bit-exact), F.adaptive_*_pool2d (spp_pool) and the
loop-based spp_triton.reference (avg). Inputs are fresh random tensors per test (seeded by the test
name so failures reproduce). Results, gradients, ties, determinism and the NaN rule.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torchvision
from api_helpers import LEVEL_SETS, random_rois, tv_roi_spp

import spp_triton
from spp_triton import reference


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
