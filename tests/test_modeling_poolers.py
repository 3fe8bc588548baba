"""spp_triton.modeling.poolers: SPPROIPooler and TritonROIPooler against references and
detectron2's ROIPooler, one kernel call, empty boxes, constructor checks."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    one_thread,  # noqa: F401  (autouse)
)
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.poolers import (  # noqa: E402
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import Boxes  # noqa: E402

import spp_triton  # noqa: E402
from spp_triton.modeling import (  # noqa: E402
    SPPROIPooler,
    TritonROIPooler,
)


def _random_boxes(n_boxes, image_size, g, min_side=2.0):
    h, w = image_size
    cx = torch.rand(n_boxes, generator=g) * w
    cy = torch.rand(n_boxes, generator=g) * h
    # log-uniform sides from ~2 px to ~2x the image: every FPN level gets boxes
    bw = torch.exp(torch.rand(n_boxes, generator=g) * math.log(2 * w / min_side)) * min_side
    bh = bw * torch.exp(torch.rand(n_boxes, generator=g) - 0.5)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return Boxes(boxes)


def _pyramid(g, n=2, c=6, image=(512, 640), strides=(4, 8, 16, 32), dtype=torch.float32):
    feats = [
        torch.randn(
            n, c, math.ceil(image[0] / s), math.ceil(image[1] / s), generator=g, dtype=dtype
        )
        for s in strides
    ]
    return feats, tuple(1.0 / s for s in strides)


def _grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def _reference_spp(features, box_lists, scales, levels, mode):
    """detectron2's level assignment + spp_triton.roi_spp_pool on each level separately."""
    min_level = int(round(-math.log2(scales[0])))
    max_level = int(round(-math.log2(scales[-1])))
    rois = convert_boxes_to_pooler_format(box_lists)
    if len(features) > 1:
        assignment = assign_boxes_to_levels(box_lists, min_level, max_level, 224, 4)
    else:
        assignment = torch.zeros(len(rois), dtype=torch.int64)
    c = features[0].shape[1]
    out = features[0].new_zeros(len(rois), c * sum(n * n for n in levels))
    for level, (f, s) in enumerate(zip(features, scales, strict=True)):
        idx = (assignment == level).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = spp_triton.roi_spp_pool(f, rois[idx], levels, spatial_scale=s, mode=mode)
    return out, assignment


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("levels", [[1, 2, 4], [1, 2, 3, 6]])
def test_spp_pooler_equals_per_level_reference(mode, levels):
    g = torch.Generator().manual_seed(1)
    feats, scales = _pyramid(g)
    box_lists = [_random_boxes(57, (512, 640), g), _random_boxes(40, (512, 640), g)]
    pooler = SPPROIPooler(levels=levels, scales=scales, mode=mode)
    out = pooler(feats, box_lists)
    ref, assignment = _reference_spp(feats, box_lists, scales, levels, mode)
    assert set(assignment.tolist()) == {0, 1, 2, 3}, "test boxes should hit every level"
    assert out.shape == (97, 6 * sum(n * n for n in levels))
    if mode == "max":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, ref)
    assert pooler.output_shape(6) == ShapeSpec(
        channels=6 * pooler.bins_per_channel, height=1, width=1
    )


def test_spp_pooler_gradients_equal_reference():
    g = torch.Generator().manual_seed(2)
    feats, scales = _pyramid(g, c=4)
    box_lists = [_random_boxes(30, (512, 640), g), _random_boxes(25, (512, 640), g)]
    w = torch.randn(55, 4 * 21, generator=g)
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    (SPPROIPooler([1, 2, 4], scales, mode="avg")(a, box_lists) * w).sum().backward()
    (_reference_spp(b, box_lists, scales, [1, 2, 4], "avg")[0] * w).sum().backward()
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(_grad(fa), _grad(fb))


def test_spp_pooler_equals_detectron2_roipool_pyramid_with_gradients():
    """Independent of spp_triton's own ops: max SPP = concatenated detectron2 ROIPool("ROIPool",
    torchvision) at n x n for each level, values and input gradients."""
    g = torch.Generator().manual_seed(7)
    feats, scales = _pyramid(g, c=4)
    box_lists = [_random_boxes(40, (512, 640), g), _random_boxes(30, (512, 640), g)]
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    ours = SPPROIPooler([1, 2, 4], scales)(a, box_lists)
    theirs = torch.cat(
        [ROIPooler(n, scales, 0, "ROIPool")(b, box_lists).flatten(1) for n in (1, 2, 4)], dim=1
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    w = torch.randn(ours.shape, generator=g)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(_grad(fa), _grad(fb), rtol=1e-5, atol=1e-5)


def test_spp_pooler_single_feature_map():
    g = torch.Generator().manual_seed(3)
    feats, scales = _pyramid(g, strides=(16,))
    box_lists = [_random_boxes(20, (512, 640), g), _random_boxes(0, (512, 640), g)]
    pooler = SPPROIPooler([1, 2, 3, 6], scales)
    ref, _ = _reference_spp(feats, box_lists, scales, [1, 2, 3, 6], "max")
    torch.testing.assert_close(pooler(feats, box_lists), ref, rtol=0, atol=0)


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (32,)])
def test_triton_roi_pooler_equals_detectron2_roipool(strides):
    g = torch.Generator().manual_seed(4)
    feats, scales = _pyramid(g, strides=strides)
    box_lists = [_random_boxes(33, (512, 640), g), _random_boxes(21, (512, 640), g)]
    ours = TritonROIPooler(7, scales)(feats, box_lists)
    theirs = ROIPooler(7, scales, sampling_ratio=0, pooler_type="ROIPool")(feats, box_lists)
    assert ours.shape == theirs.shape == (54, 6, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_poolers_make_exactly_one_kernel_call(monkeypatch):
    from spp_triton import ops

    calls = []
    real = ops.pyramid_pool_op

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("per-level pooling call")

    monkeypatch.setattr(ops, "pyramid_pool_op", spy)  # the one forward op: one call per pooler
    monkeypatch.setattr(spp_triton, "roi_spp_pool", forbidden)
    monkeypatch.setattr(spp_triton, "roi_pool", forbidden)
    g = torch.Generator().manual_seed(5)
    feats, scales = _pyramid(g)
    box_lists = [_random_boxes(40, (512, 640), g), _random_boxes(40, (512, 640), g)]
    SPPROIPooler([1, 2, 4], scales)(feats, box_lists)
    TritonROIPooler(7, scales)(feats, box_lists)
    assert calls == [4, 4]


def test_poolers_empty_boxes():
    g = torch.Generator().manual_seed(6)
    feats, scales = _pyramid(g, n=2, c=5)
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    assert SPPROIPooler([1, 2, 4], scales)(feats, empty).shape == (0, 5 * 21)
    assert TritonROIPooler(7, scales)(feats, empty).shape == (0, 5, 7, 7)
    feats0, _ = _pyramid(g, n=0, c=5)
    assert SPPROIPooler([1, 2], scales)(feats0, []).shape == (0, 25)
    with pytest.raises(ValueError, match="box_lists"):
        SPPROIPooler([1], scales)(feats, empty[:1])


def test_pooler_constructor_checks():
    with pytest.raises(ValueError, match="powers of 2"):
        SPPROIPooler([1], scales=(1 / 3,))
    with pytest.raises(ValueError, match="pyramid"):
        SPPROIPooler([1], scales=(1 / 4, 1 / 16))
    with pytest.raises(ValueError, match="level"):
        SPPROIPooler([0, 2], scales=(1 / 4,))
    with pytest.raises(ValueError, match="mode"):
        SPPROIPooler([1], scales=(1 / 4,), mode="min")
    p = SPPROIPooler([1, (2, 3)], scales=(1 / 4,))
    assert p.levels == ((1, 1), (2, 3)) and p.bins_per_channel == 7


# ------------------------------------------------------------------------------ heads
