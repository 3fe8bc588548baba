"""spp_triton.reference, the loop oracle, checked where it can be: against torchvision and ATen.

(reference.py is deliberately independent of spp_triton.bins, so these checks are not circular.)
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from api_helpers import random_rois

from spp_triton import reference


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def test_reference_bins_agree_with_torchvision(gen):
    """The oracle for avg uses the same bins as torchvision's max (checked through max)."""
    x = torch.randn(1, 2, 10, 10, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, 30, 1, 40, 40, torch.float64)
    for n in (2, 7, 14):
        assert torch.equal(
            reference.roi_pool_reference(x, rois, n, 0.25, "max"),
            torchvision.ops.roi_pool(x, rois, n, 0.25),
        )


def test_reference_bins_are_torchvision_bins_one_by_one(gen):
    """roi_bins_reference per box against pooling one-hot probes: the bins that read pixel (h, w)
    are exactly those whose max over the probe of (h, w) is 1."""
    height, width = 9, 11
    rois = random_rois(gen, 12, 1, height * 4, width * 4)
    probes = torch.eye(height * width).view(height * width, 1, height, width)
    for roi in rois.tolist():
        cells = reference.roi_bins_reference(*roi[1:], 0.25, 3, 2, height, width, torch.float32)
        for pixel in range(height * width):
            h, w = divmod(pixel, width)
            inside = [(h0 <= h < h1 and w0 <= w < w1) for (h0, h1), (w0, w1) in cells]
            got = torchvision.ops.roi_pool(
                probes[pixel : pixel + 1], torch.tensor([[0.0, *roi[1:]]]), (3, 2), 0.25
            )
            assert torch.equal(got.flatten() == 1, torch.tensor(inside))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_pool_reference_is_adaptive_pooling_of_the_valid_region(gen, mode):
    x = torch.randn(2, 3, 7, 9, generator=gen)
    sizes = torch.tensor([[7, 9], [4, 5]])
    out = reference.spp_pool_reference(x, (1, 2, 3), mode, sizes)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    for i, (h, w) in enumerate(sizes.tolist()):
        expected = torch.cat([pool(x[i : i + 1, :, :h, :w], n).flatten() for n in (1, 2, 3)])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_roi_spp_pool_reference_concatenates_levels(gen):
    x = torch.randn(2, 2, 8, 8, generator=gen)
    rois = random_rois(gen, 5, 2, 32, 32)
    out = reference.roi_spp_pool_reference(x, rois, (1, 2), 0.25, "max")
    assert torch.equal(
        out,
        torch.cat([torchvision.ops.roi_pool(x, rois, n, 0.25).flatten(1) for n in (1, 2)], 1),
    )
