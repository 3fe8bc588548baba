"""Malformed calls raise a clear ValueError/TypeError naming the argument, and leave the process
able to compute correct results afterwards."""

from __future__ import annotations

import pytest
import torch
import torchvision

import spp_triton

X = torch.randn(2, 3, 8, 8)
ROIS = torch.tensor([[0, 0.0, 0.0, 7.0, 7.0], [1, 2.0, 1.0, 5.0, 6.0]])


def _inf_rois():
    r = ROIS.clone()
    r[0, 3] = float("inf")
    return r


CASES = [
    # (callable, exception, words the message must contain)
    (lambda: spp_triton.spp_pool(X[0]), ValueError, ["input", "4-D"]),
    (lambda: spp_triton.spp_pool(X.int()), TypeError, ["input", "float"]),
    (lambda: spp_triton.spp_pool("x"), TypeError, ["input", "Tensor"]),
    (lambda: spp_triton.spp_pool(torch.zeros(2, 3, 0, 4)), ValueError, ["input", "empty"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS[:, :4]), ValueError, ["boxes", "[K, 5]"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS.long()), TypeError, ["boxes", "floating"]),
    (lambda: spp_triton.roi_spp_pool(X, [ROIS[:, 1:]]), ValueError, ["boxes", "one"]),
    (lambda: spp_triton.roi_spp_pool(X, [ROIS[:, 1:3], ROIS[:, 1:3]]), ValueError, ["boxes[0]"]),
    (lambda: spp_triton.roi_spp_pool(X, "boxes"), TypeError, ["boxes"]),
    (
        lambda: spp_triton.roi_spp_pool(X, ROIS * torch.tensor([-1.0, 1, 1, 1, 1])),
        ValueError,
        ["boxes", "batch"],
    ),
    (
        lambda: spp_triton.roi_spp_pool(X, ROIS + torch.tensor([2.0, 0, 0, 0, 0])),
        ValueError,
        ["boxes", "batch", "[0, 1]"],
    ),
    (
        lambda: spp_triton.roi_spp_pool(X, ROIS + torch.tensor([0.5, 0, 0, 0, 0])),
        ValueError,
        ["boxes", "integer"],
    ),
    (lambda: spp_triton.roi_spp_pool(X, ROIS * float("nan")), ValueError, ["boxes", "finite"]),
    (lambda: spp_triton.roi_spp_pool(X, _inf_rois()), ValueError, ["boxes", "finite"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels=[]), ValueError, ["levels", "empty"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels=[1, 0]), ValueError, ["levels", "positive"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels=[1, -2]), ValueError, ["levels"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels=[1, 2.5]), ValueError, ["levels"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels="124"), ValueError, ["levels"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, levels=4), ValueError, ["levels"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, mode="mean"), ValueError, ["mode", "'max'"]),
    (lambda: spp_triton.spp_pool(X, mode=None), ValueError, ["mode"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, spatial_scale=0), ValueError, ["spatial_scale"]),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, spatial_scale=-1.0), ValueError, ["spatial_scale"]),
    (
        lambda: spp_triton.roi_spp_pool(X, ROIS, spatial_scale=float("inf")),
        ValueError,
        ["spatial_scale", "finite"],
    ),
    (
        lambda: spp_triton.roi_spp_pool(X, ROIS, spatial_scale=float("nan")),
        ValueError,
        ["spatial_scale"],
    ),
    (lambda: spp_triton.roi_spp_pool(X, ROIS, spatial_scale="1"), TypeError, ["spatial_scale"]),
    (lambda: spp_triton.roi_pool(X, ROIS, 0), ValueError, ["output_size"]),
    (lambda: spp_triton.roi_pool(X, ROIS, (2, 0)), ValueError, ["output_size"]),
    (lambda: spp_triton.roi_pool(X, ROIS, (2, 2, 2)), ValueError, ["output_size"]),
    (lambda: spp_triton.roi_pool(X, ROIS, 2.0), ValueError, ["output_size"]),
    (
        lambda: spp_triton.spp_pool(X, image_sizes=torch.tensor([[8, 8]])),
        ValueError,
        ["image_sizes", "[2, 2]"],
    ),
    (
        lambda: spp_triton.spp_pool(X, image_sizes=torch.tensor([[8, 8], [9, 8]])),
        ValueError,
        ["image_sizes", "[1, 8]"],
    ),
    (
        lambda: spp_triton.spp_pool(X, image_sizes=torch.tensor([[8, 8], [0, 8]])),
        ValueError,
        ["image_sizes"],
    ),
    (
        lambda: spp_triton.spp_pool(X, image_sizes=torch.tensor([[8.0, 8], [4, 8]])),
        TypeError,
        ["image_sizes", "integer"],
    ),
    (
        lambda: spp_triton.multilevel_roi_spp_pool(
            [X, X[:, :2]], ROIS, torch.tensor([0, 1]), [1.0, 0.5]
        ),
        ValueError,
        ["features[1]"],
    ),
    (
        lambda: spp_triton.multilevel_roi_spp_pool([X], ROIS, torch.tensor([0, 1]), [1.0]),
        ValueError,
        ["feature_index"],
    ),
    (
        lambda: spp_triton.multilevel_roi_spp_pool([X, X], ROIS, torch.tensor([0]), [1.0, 1.0]),
        ValueError,
        ["feature_index"],
    ),
    (
        lambda: spp_triton.multilevel_roi_spp_pool([X, X], ROIS, torch.tensor([0, 1]), [1.0]),
        ValueError,
        ["spatial_scales"],
    ),
    (
        lambda: spp_triton.multilevel_roi_spp_pool(X, ROIS, torch.tensor([0, 0]), [1.0]),
        TypeError,
        ["features"],
    ),
    (lambda: spp_triton.SpatialPyramidPool(levels=[]), ValueError, ["levels"]),
    (
        lambda: spp_triton.RoISpatialPyramidPool((1, 2), spatial_scale=0),
        ValueError,
        ["spatial_scale"],
    ),
    (lambda: spp_triton.RoIPool(0), ValueError, ["output_size"]),
]


@pytest.mark.parametrize("call,exc,words", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_raises_clear_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_process_still_correct_after_bad_calls():
    for call, exc, _ in CASES:
        with pytest.raises(exc):
            call()
    x = torch.randn(2, 4, 9, 11)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [1, -5.0, -5.0, 50.0, 50.0]])
    out = spp_triton.roi_spp_pool(x, rois, (1, 2, 4), 0.3)
    ref = torch.cat([torchvision.ops.roi_pool(x, rois, n, 0.3).flatten(1) for n in (1, 2, 4)], 1)
    assert torch.equal(out, ref)
