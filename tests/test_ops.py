"""spp_triton.ops: the registered torch ops (opcheck, the one op behind every function,
torch.compile) and their dispatch to the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import zlib

import pytest
import torch
from api_helpers import random_rois, tv_roi_spp

import spp_triton
from spp_triton import reference


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
