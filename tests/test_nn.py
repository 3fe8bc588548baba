"""spp_triton.nn: the modules wrap the functions (levels validated once, at construction)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torchvision
from api_helpers import random_rois

import spp_triton


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
