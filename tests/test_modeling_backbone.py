"""spp_triton.modeling.backbone: basic-block ResNets of any width, with and without FPN."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    make_cfg,
    one_thread,  # noqa: F401  (autouse)
)
from detectron2.layers import ShapeSpec  # noqa: E402

import spp_triton  # noqa: E402


# --------------------------------------------------------------------------- basic ResNets
def _resnet_cfg(width, depth=18, out_features=("res2", "res3", "res4", "res5")):
    cfg = make_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_resnet_at_width_64_is_detectron2s(depth):
    from detectron2.modeling.backbone import build_resnet_backbone

    from spp_triton.modeling import build_basic_resnet_backbone

    cfg = _resnet_cfg(64, depth)
    ours = build_basic_resnet_backbone(cfg, ShapeSpec(channels=3))
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_basic_resnet_fpn_any_width_shapes():
    from spp_triton.modeling import build_basic_resnet_fpn_backbone

    cfg = _resnet_cfg(24)
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 40
    fpn = build_basic_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    widths = {k: s.channels for k, s in fpn.bottom_up.output_shape().items()}
    assert widths == {"res2": 24, "res3": 48, "res4": 96, "res5": 192}
    out = fpn(torch.randn(2, 3, 128, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        # p6 is a stride-2 subsample of p5 (kernel 1), so its size rounds up
        f"p{i}": (2, 40, -(-128 // (1 << i)), -(-96 // (1 << i)))
        for i in range(2, 7)
    }
    # a single-map backbone stops at the last requested stage
    c4 = spp_triton.modeling.build_basic_resnet_backbone(
        _resnet_cfg(16, out_features=("res4",)), ShapeSpec(channels=3)
    )
    assert not hasattr(c4, "res5")
    assert {k: (s.channels, s.stride) for k, s in c4.output_shape().items()} == {"res4": (64, 16)}


@pytest.mark.parametrize(
    "key,value,name",
    [
        ("DEPTH", 50, "MODEL.RESNETS.DEPTH"),
        ("RES2_OUT_CHANNELS", 0, "MODEL.RESNETS.RES2_OUT_CHANNELS"),
        ("RES5_DILATION", 2, "MODEL.RESNETS.RES5_DILATION"),
        ("NUM_GROUPS", 32, "MODEL.RESNETS.NUM_GROUPS"),
    ],
)
def test_basic_resnet_bad_config_names_the_key(key, value, name):
    cfg = _resnet_cfg(32)
    setattr(cfg.MODEL.RESNETS, key, value)
    with pytest.raises(ValueError, match=re.escape(name)):
        spp_triton.modeling.build_basic_resnet_backbone(cfg, ShapeSpec(channels=3))
