"""Basic-block ResNets (R-18 / R-34) of any width, plain and with an FPN.

detectron2's ``build_resnet_backbone`` fixes ``MODEL.RESNETS.RES2_OUT_CHANNELS`` at 64 for R-18
and R-34. Training from scratch on the embedded shapes data on a CPU wants narrower ones: at half
width a backbone costs about a quarter of the FLOPs, and the shapes do not need more. These
builders are detectron2's R-18 / R-34 otherwise: the same ``BasicStem``, ``BasicBlock`` stages
(2-2-2-2 or 3-4-6-3 blocks, stride 2 at the first block of res3..res5), stage widths
``RES2_OUT_CHANNELS * (1, 2, 4, 8)``, and the same stage names, strides, ``OUT_FEATURES``,
``NORM`` and ``FREEZE_AT``, so the rest of a config does not change. With
``RES2_OUT_CHANNELS: 64`` they build exactly detectron2's R-18 / R-34.

* ``build_basic_resnet_backbone``: the ResNet alone (single-map detectors, e.g. SPP-net style).
* ``build_basic_resnet_fpn_backbone``: with detectron2's FPN and its P6 max-pool level, as
  ``build_resnet_fpn_backbone`` does.
* ``basic_resnet_stages``: the four stages alone, for LazyConfigs (``L(ResNet)(stages=...)``).
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = [
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "basic_resnet_stages",
]

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _check(cfg) -> None:
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH: the basic-block backbones build 18 or 34, got {r.DEPTH}"
        )
    for key in ("RES2_OUT_CHANNELS", "STEM_OUT_CHANNELS"):
        value = getattr(r, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"MODEL.RESNETS.{key}: expected a positive int, got {value!r}")
    if r.RES5_DILATION != 1:
        raise ValueError("MODEL.RESNETS.RES5_DILATION: basic-block ResNets need 1")
    if r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.NUM_GROUPS / DEFORM_ON_PER_STAGE: basic-block ResNets have no groups "
            "and no deformable convolutions"
        )


def basic_resnet_stages(depth: int = 18, in_channels: int = 64, out_channels: int = 64, norm="BN"):
    """The four basic-block stages (res2..res5) of an R-18 / R-34 of any width, for
    ``L(ResNet)(stages=L(basic_resnet_stages)(...))``: ``in_channels`` is the stem's width,
    ``out_channels`` res2's (stage widths ``out_channels * (1, 2, 4, 8)``): exactly the stages of
    :func:`spp_triton.modeling.build_basic_resnet_backbone` with ``RES2_OUT_CHANNELS`` =
    ``out_channels`` and ``STEM_OUT_CHANNELS`` = ``in_channels``."""
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"basic_resnet_stages: depth must be 18 or 34, got {depth!r}")
    stages = []
    for index, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        first_stride = 1 if index == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return stages


@BACKBONE_REGISTRY.register()
def build_basic_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """R-18 / R-34 with stage widths ``RES2_OUT_CHANNELS * (1, 2, 4, 8)`` (see module doc)."""
    _check(cfg)
    r = cfg.MODEL.RESNETS
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    stages = basic_resnet_stages(r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.NORM)
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """:func:`build_basic_resnet_backbone` under detectron2's FPN (``MODEL.FPN.*``), with P6."""
    bottom_up = build_basic_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
