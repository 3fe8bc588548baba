"""detectron2 integration of spp_triton. Importing this package registers ``SPPROIHeads``.

* :func:`add_spp_config` / :func:`validate_config`: the ``MODEL.SPP`` keys and their checks;
  :func:`build_model`: detectron2's ``build_model`` after those checks.
* :class:`SPPROIPooler`, :class:`TritonROIPooler`: ``ROIPooler``-compatible box poolers that pool
  every FPN level in one spp_triton call.
* :class:`SPPROIHeads`: ``StandardROIHeads`` whose box pooler follows
  ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` ("SPP", "TritonROIPool", or detectron2's own).
* ``build_basic_resnet_backbone`` / ``build_basic_resnet_fpn_backbone``: R-18 / R-34 of any width
  (detectron2's fix RES2_OUT_CHANNELS at 64), registered as backbones.
* :class:`Trainer`, :func:`setup`, :func:`launch`: what ``tools/train_net.py`` runs for yacs
  configs; :func:`setup_lazy`, :func:`main_lazy` (:mod:`spp_triton.modeling.lazy`): for
  LazyConfigs (``.py``), with :class:`ClippedSGD`, :func:`basic_resnet_stages` and
  :func:`spp_pooled_shape` for the configs of spp_triton models.

Importing it also registers the embedded datasets of :mod:`spp_triton.data`.
"""

from spp_triton.modeling.backbone import (
    build_basic_resnet_backbone,
    build_basic_resnet_fpn_backbone,
)
from spp_triton.modeling.config import (
    BOX_POOLER_TYPES,
    SPP_MODES,
    add_spp_config,
    build_model,
    validate_config,
    validate_datasets,
)
from spp_triton.modeling.lazy import (
    ClippedSGD,
    basic_resnet_stages,
    main_lazy,
    setup_lazy,
    spp_pooled_shape,
)
from spp_triton.modeling.poolers import SPPROIPooler, TritonROIPooler
from spp_triton.modeling.roi_heads import SPPROIHeads, build_spp_box_pooler
from spp_triton.modeling.train import (
    FiniteCheckpointer,
    Trainer,
    fast_coco_eval_available,
    launch,
    register_datasets,
    resolve_device,
    setup,
)

# The embedded shapes datasets (shapes_train / shapes_val), so configs can name them.
register_datasets()

__all__ = [
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "add_spp_config",
    "build_model",
    "validate_config",
    "validate_datasets",
    "BOX_POOLER_TYPES",
    "SPP_MODES",
    "SPPROIPooler",
    "TritonROIPooler",
    "SPPROIHeads",
    "build_spp_box_pooler",
    "Trainer",
    "FiniteCheckpointer",
    "setup",
    "launch",
    "register_datasets",
    "resolve_device",
    "fast_coco_eval_available",
    "setup_lazy",
    "main_lazy",
    "ClippedSGD",
    "basic_resnet_stages",
    "spp_pooled_shape",
]
