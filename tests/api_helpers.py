"""Shared by the tests of the public API (functional, nn, ops): level sets, awkward RoIs and the
torchvision oracle."""

from __future__ import annotations

import torch
import torchvision

LEVEL_SETS = [(1, 2, 4), (1, 2, 3, 6), (4, 2, 1), (2, 3)]


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
