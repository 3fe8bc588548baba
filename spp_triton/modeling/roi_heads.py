"""``SPPROIHeads``: detectron2's ``StandardROIHeads`` with the box pooler picked by the config.

``MODEL.ROI_BOX_HEAD.POOLER_TYPE``:

* ``"SPP"``: :class:`~spp_triton.modeling.poolers.SPPROIPooler` with ``MODEL.SPP.LEVELS`` and
  ``MODEL.SPP.MODE``; the box head (``build_box_head``, e.g. ``FastRCNNConvFCHead``) is fed
  ``ShapeSpec(channels=C * sum(n * n), height=1, width=1)``: fc layers only.
* ``"TritonROIPool"``: :class:`~spp_triton.modeling.poolers.TritonROIPooler`, RoI pooling to
  ``POOLER_RESOLUTION`` with the same kernels (``MODEL.SPP.MODE`` reduction).
* anything else: detectron2's own ``ROIPooler`` and box head, exactly as ``StandardROIHeads``.

:func:`spp_pooled_shape` is what a box head receives from an ``SPPROIPooler``, for LazyConfigs.

Mask and keypoint heads are untouched (their own poolers and POOLER_TYPEs).
"""

from __future__ import annotations

import inspect

from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    FastRCNNOutputLayers,
    StandardROIHeads,
    build_box_head,
)
from omegaconf import ListConfig, OmegaConf

from spp_triton.modeling.config import SPP_POOLER_TYPES
from spp_triton.modeling.poolers import SPPROIPooler, TritonROIPooler, normalize_levels

__all__ = ["SPPROIHeads", "build_spp_box_pooler", "spp_pooled_shape"]


def build_spp_box_pooler(cfg, input_shape):
    """The spp_triton box pooler for ``cfg`` and the ``ShapeSpec`` its output has.

    ``input_shape``: dict of feature name -> ShapeSpec (the backbone's output shape).
    Returns ``(pooler, pooled_shape)``; raises ``ValueError`` for a non-spp_triton POOLER_TYPE.
    """
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    if pooler_type not in SPP_POOLER_TYPES:
        raise ValueError(
            f"MODEL.ROI_BOX_HEAD.POOLER_TYPE = {pooler_type!r} is not an spp_triton "
            f"pooler ({list(SPP_POOLER_TYPES)})"
        )
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"Invalid config: MODEL.ROI_HEADS.IN_FEATURES = {list(in_features)!r}: "
            f"{missing} not produced by the backbone ({sorted(input_shape)})"
        )
    scales = tuple(1.0 / input_shape[f].stride for f in in_features)
    # Box head weights are shared across FPN levels: every level must have the same width.
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(
            f"MODEL.ROI_HEADS.IN_FEATURES {list(in_features)} have different "
            f"channel counts {sorted(channels)}"
        )
    (in_channels,) = channels
    if pooler_type == "SPP":
        pooler = SPPROIPooler(
            levels=list(cfg.MODEL.SPP.LEVELS), scales=scales, mode=cfg.MODEL.SPP.MODE
        )
    else:
        pooler = TritonROIPooler(
            output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            scales=scales,
            mode=cfg.MODEL.SPP.MODE,
        )
    return pooler, pooler.output_shape(in_channels)


def spp_pooled_shape(channels: int, levels) -> ShapeSpec:
    """What a box head receives from an ``SPPROIPooler(levels=levels)`` on ``channels``-wide
    features: ``ShapeSpec(channels=channels * sum(bh * bw), height=1, width=1)``. Lets a config
    derive the box head's input from the FPN width and the levels by interpolation."""
    if isinstance(levels, ListConfig):
        levels = OmegaConf.to_container(levels)
    bins = sum(bh * bw for bh, bw in normalize_levels(levels))
    return ShapeSpec(channels=int(channels) * bins, height=1, width=1)


@ROI_HEADS_REGISTRY.register()
class SPPROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose box pooler follows ``MODEL.ROI_BOX_HEAD.POOLER_TYPE``.

    Built by detectron2's ``build_roi_heads`` with ``MODEL.ROI_HEADS.NAME: SPPROIHeads``; works
    on FPN (``IN_FEATURES: [p2, p3, p4, p5]``) and on a single map (``[res4]``, ``[res5]``).
    The config is not validated here: :func:`spp_triton.modeling.build_model` (and
    :func:`spp_triton.engine.setup`) do that once, before anything is built.
    """

    #: The ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` values this class builds a pooler for;
    #: :func:`~spp_triton.modeling.validate_config` accepts a heads class that declares them.
    SPP_POOLER_TYPES = SPP_POOLER_TYPES

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
        if pooler_type not in SPP_POOLER_TYPES:
            # detectron2's own poolers: exactly StandardROIHeads' construction.
            return super()._init_box_head(cfg, input_shape)
        box_pooler, pooled_shape = build_spp_box_pooler(cfg, input_shape)
        box_head = build_box_head(cfg, pooled_shape)
        box_predictor = FastRCNNOutputLayers(cfg, box_head.output_shape)
        return {
            "box_in_features": list(cfg.MODEL.ROI_HEADS.IN_FEATURES),
            "box_pooler": box_pooler,
            "box_head": box_head,
            "box_predictor": box_predictor,
        }


# detectron2's StandardROIHeads.from_config only calls _init_box_head when it is a classmethod
# (``inspect.ismethod`` on the class attribute); ours must stay one.
if not inspect.ismethod(SPPROIHeads._init_box_head):  # pragma: no cover
    raise TypeError("SPPROIHeads._init_box_head must be a classmethod")
