"""detectron2 model parts of spp_triton. Importing this package registers ``SPPROIHeads`` and the
basic-block ResNet backbones in detectron2's registries; nothing else happens on import.

* :func:`add_spp_config` / :func:`validate_config`: the ``MODEL.SPP`` keys and their checks;
  :func:`build_model`: detectron2's ``build_model`` after those checks.
* :class:`SPPROIPooler`, :class:`TritonROIPooler`: ``ROIPooler``-compatible box poolers that pool
  every FPN level in one spp_triton call.
* :class:`SPPROIHeads`: ``StandardROIHeads`` whose box pooler follows
  ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` ("SPP", "TritonROIPool", or detectron2's own).
* ``build_basic_resnet_backbone`` / ``build_basic_resnet_fpn_backbone``: R-18 / R-34 of any width
  (detectron2's fix RES2_OUT_CHANNELS at 64), registered as backbones.
* :func:`basic_resnet_stages`, :func:`spp_pooled_shape`: the same parts for LazyConfigs.

Training (config set-up, trainer, launch, the LazyConfig path) is :mod:`spp_triton.engine`; the
embedded datasets are :mod:`spp_triton.data`.
"""

from spp_triton.modeling.backbone import (
    basic_resnet_stages,
    build_basic_resnet_backbone,
    build_basic_resnet_fpn_backbone,
)
from spp_triton.modeling.config import (
    BOX_POOLER_TYPES,
    SPP_MODES,
    add_spp_config,
    build_model,
    freeze_validated,
    validate_config,
    validate_datasets,
)
from spp_triton.modeling.poolers import SPPROIPooler, TritonROIPooler
from spp_triton.modeling.roi_heads import SPPROIHeads, build_spp_box_pooler, spp_pooled_shape

__all__ = [
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "basic_resnet_stages",
    "add_spp_config",
    "build_model",
    "freeze_validated",
    "validate_config",
    "validate_datasets",
    "BOX_POOLER_TYPES",
    "SPP_MODES",
    "SPPROIPooler",
    "TritonROIPooler",
    "SPPROIHeads",
    "build_spp_box_pooler",
    "spp_pooled_shape",
]
