"""Config keys of the spp_triton detectron2 integration, and their validation.

Call :func:`add_spp_config` on a detectron2 ``get_cfg()`` before ``merge_from_file``; call
:func:`validate_config` after all merges (``tools/train_net.py`` does both through
:func:`spp_triton.engine.setup`). Every error names the offending key.

Each path validates a config once: :func:`spp_triton.engine.setup` validates and then
:func:`freeze_validated`; :func:`build_model` validates any other config (and skips one that
:func:`freeze_validated` froze).
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = [
    "add_spp_config",
    "build_model",
    "validate_config",
    "validate_datasets",
    "freeze_validated",
    "SPP_MODES",
    "SPP_POOLER_TYPES",
    "DETECTRON2_POOLER_TYPES",
    "BOX_POOLER_TYPES",
]

#: Reductions the spp_triton kernels implement over each bin.
SPP_MODES = ("max", "avg")
#: ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` values served by detectron2's own ``ROIPooler``.
DETECTRON2_POOLER_TYPES = ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated")
#: ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` values served by spp_triton (need ``SPPROIHeads``).
SPP_POOLER_TYPES = ("SPP", "TritonROIPool")
BOX_POOLER_TYPES = DETECTRON2_POOLER_TYPES + SPP_POOLER_TYPES


def add_spp_config(cfg: CN) -> CN:
    """Add the ``MODEL.SPP`` keys to ``cfg`` (in place; also returned). Idempotent."""
    if "SPP" in cfg.MODEL:
        return cfg
    _C = cfg
    _C.MODEL.SPP = CN()
    # Pyramid levels of the "SPP" box pooler: level n pools each RoI into n x n bins on its FPN
    # level (or the single feature map), per channel; all levels are concatenated, so the box
    # head sees a vector of C * sum(n * n) values per RoI (SPP-net: [1, 2, 3, 6]).
    # At least one level: a positive integer n (n x n bins) or a pair [bins_h, bins_w].
    _C.MODEL.SPP.LEVELS = [1, 2, 4]
    # Reduction in each bin: "max" (SPP-net, RoIPool) or "avg". Used by the "SPP" and
    # "TritonROIPool" box poolers ("TritonROIPool" with "max" equals detectron2's "ROIPool").
    _C.MODEL.SPP.MODE = "max"
    return cfg


def _fail(key: str, value, why: str) -> None:
    raise ValueError(f"Invalid config: {key} = {value!r}: {why}")


def validate_config(cfg: CN) -> CN:
    """Check the keys this integration reads; raise ``ValueError`` naming the key if wrong.

    Checks ``MODEL.SPP.LEVELS``, ``MODEL.SPP.MODE``, ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` and, for
    the spp_triton poolers, that ``MODEL.ROI_HEADS.NAME`` is ``SPPROIHeads`` (or a subclass) and
    that the box head fits a flat pyramid vector (``NUM_CONV == 0``, ``NUM_FC > 0``).
    Returns ``cfg`` unchanged.
    """
    if "SPP" not in cfg.MODEL:
        raise ValueError(
            "Invalid config: MODEL.SPP is missing; call spp_triton.modeling.add_spp_config(cfg) "
            "before merge_from_file"
        )
    levels = cfg.MODEL.SPP.LEVELS
    from spp_triton._checks import check_levels

    try:  # the Python API's own rule: ints n (n x n bins) or (bins_h, bins_w) pairs
        if not isinstance(levels, (list, tuple)):
            raise ValueError("not a list")
        check_levels(levels, "MODEL.SPP.LEVELS")
    except (ValueError, TypeError) as e:
        _fail(
            "MODEL.SPP.LEVELS",
            levels,
            "must be a non-empty list of levels, each a positive integer n (n x n bins) or a "
            f"pair [bins_h, bins_w] of positive integers, e.g. [1, 2, 4] or [[1, 1], [2, 3]] ({e})",
        )

    mode = cfg.MODEL.SPP.MODE
    if mode not in SPP_MODES:
        _fail("MODEL.SPP.MODE", mode, f"must be one of {list(SPP_MODES)}")

    pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    if pooler_type not in BOX_POOLER_TYPES:
        _fail(
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
            pooler_type,
            f"must be one of {list(BOX_POOLER_TYPES)}",
        )

    if pooler_type in SPP_POOLER_TYPES:
        from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

        name = cfg.MODEL.ROI_HEADS.NAME
        try:
            heads_cls = ROI_HEADS_REGISTRY.get(name)
        except KeyError:
            _fail("MODEL.ROI_HEADS.NAME", name, "is not a registered ROI heads class")
        # SPPROIHeads (spp_triton.modeling.roi_heads, which imports this module) declares the
        # pooler types it serves; so do its subclasses.
        if pooler_type not in getattr(heads_cls, "SPP_POOLER_TYPES", ()):
            _fail(
                "MODEL.ROI_HEADS.NAME",
                name,
                f"MODEL.ROI_BOX_HEAD.POOLER_TYPE = {pooler_type!r} needs SPPROIHeads "
                "(or a subclass of it)",
            )

    if pooler_type == "SPP":
        # The pyramid is a flat vector per RoI: no spatial layout left for 3x3 convs.
        if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV > 0:
            _fail(
                "MODEL.ROI_BOX_HEAD.NUM_CONV",
                cfg.MODEL.ROI_BOX_HEAD.NUM_CONV,
                "must be 0 with MODEL.ROI_BOX_HEAD.POOLER_TYPE = 'SPP' (the pooled pyramid "
                "is a flat C * sum(n * n) vector; convolutions need a spatial map)",
            )
        if cfg.MODEL.ROI_BOX_HEAD.NUM_FC <= 0:
            _fail(
                "MODEL.ROI_BOX_HEAD.NUM_FC",
                cfg.MODEL.ROI_BOX_HEAD.NUM_FC,
                "must be > 0 with MODEL.ROI_BOX_HEAD.POOLER_TYPE = 'SPP' (fc layers map the "
                "pyramid vector to the predictor, as fc6/fc7 in SPP-net)",
            )
    return cfg


# Name prefixes of the datasets detectron2 registers itself (left out of error messages).
_BUILTIN_DATASET_PREFIXES = ("coco_", "keypoints_coco_", "lvis_", "cityscapes_", "voc_", "ade20k_")


def validate_datasets(cfg: CN, *, train: bool = True, test: bool = True) -> CN:
    """Check that every name in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` is registered.

    Raise ``ValueError`` naming the key, the unknown name and the registered names.
    """
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    keys = []
    if train:
        keys.append(("DATASETS.TRAIN", cfg.DATASETS.TRAIN))
    if test:
        keys.append(("DATASETS.TEST", cfg.DATASETS.TEST))
    for key, names in keys:
        unknown = [n for n in names if n not in known]
        if unknown:
            others = sorted(n for n in known if not n.startswith(_BUILTIN_DATASET_PREFIXES))
            raise ValueError(
                f"Invalid config: {key} = {list(names)!r}: dataset(s) {unknown} not registered "
                f"(registered besides detectron2's builtin COCO/LVIS/VOC/Cityscapes names: "
                f"{', '.join(others) or 'none'})"
            )
    return cfg


# Set (outside the config's keys, so never dumped) by freeze_validated on the config it froze.
_VALIDATED = "__spp_triton_validated__"


def freeze_validated(cfg: CN) -> CN:
    """Freeze ``cfg``, which :func:`validate_config` accepted, and mark it so that
    :func:`build_model` does not check it again while it is frozen. The mark stays on clones and
    across ``defrost()`` / ``freeze()``: code that defrosts such a config to change ``MODEL.SPP``
    or ``MODEL.ROI_*`` keys calls :func:`validate_config` itself. Returns ``cfg``."""
    cfg.freeze()
    cfg.__dict__[_VALIDATED] = True
    return cfg


def build_model(cfg):
    """detectron2's ``build_model`` on a valid config: a config that asks for an spp_triton
    pooler without ``SPPROIHeads`` (or with bad ``MODEL.SPP`` values) fails with a message naming
    the key, instead of detectron2's ``Unknown pooler type: SPP``. A config that
    :func:`freeze_validated` froze (:func:`spp_triton.engine.setup`'s) is not checked again.
    (``spp_triton.engine.Trainer.build_model`` is this function.)"""
    from detectron2.modeling import build_model as d2_build_model

    if not (cfg.is_frozen() and cfg.__dict__.get(_VALIDATED)):
        validate_config(cfg)
    return d2_build_model(cfg)
