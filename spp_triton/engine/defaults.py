"""Config set-up for yacs (``.yaml``) training: :func:`setup` and what it relies on.

* :func:`setup`: ``get_cfg`` + :func:`~spp_triton.modeling.add_spp_config` + file + command-line
  opts, CPU fallback when CUDA is absent, validation (config values, dataset names) before
  anything is built, then detectron2's ``default_setup`` (logger, ``config.yaml`` in OUTPUT_DIR,
  seeding).
* :func:`resolve_device`: ``MODEL.DEVICE`` cuda -> cpu without CUDA.
* :func:`register_datasets`: the embedded shapes datasets' files, generated when a config uses
  them (the names themselves are registered by importing :mod:`spp_triton.data`).
* :func:`ensure_evaluator_files`: the json files ``COCOEvaluator`` opens when it is built.
* :func:`fast_coco_eval_available`: whether detectron2's compiled COCO evaluation is built.
"""

from __future__ import annotations

import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup

import spp_triton.data as data  # registers the shapes datasets' names (their one place)
from spp_triton.modeling.config import (
    add_spp_config,
    freeze_validated,
    validate_config,
    validate_datasets,
)

__all__ = [
    "setup",
    "resolve_device",
    "register_datasets",
    "ensure_evaluator_files",
    "fast_coco_eval_available",
]


def register_datasets(cfg=None, *, names=None) -> None:
    """Make the embedded shapes datasets (``shapes_train`` / ``shapes_val``) usable.

    Their names are registered with detectron2 in one place: importing :mod:`spp_triton.data`
    (which importing this module does). This generates their files when ``cfg`` (yacs:
    ``DATASETS.TRAIN`` / ``DATASETS.TEST``) or ``names`` (the dataset names a LazyConfig uses)
    name them (once, cached on disk; safe from several processes), as ``COCOEvaluator`` reads the
    json when it is built.
    """
    used = set(names or ())
    if cfg is not None:
        used |= set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if set(data.SHAPES_DATASET_NAMES.values()) & used:
        data.register_shapes_datasets()  # same names and place; generates missing files


def ensure_evaluator_files(dataset_names) -> None:
    """``COCOEvaluator`` opens its dataset's ``json_file`` when it is built; datasets registered
    lazily (the shapes datasets generate their files on first load) may not have it yet: loading
    the dataset once creates it."""
    for name in dataset_names:
        json_file = getattr(MetadataCatalog.get(name), "json_file", None)
        if json_file and not os.path.exists(json_file):
            DatasetCatalog.get(name)


def resolve_device(cfg) -> str | None:
    """``MODEL.DEVICE`` cuda without CUDA -> cpu (in place). Returns a message when changed."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        return f"MODEL.DEVICE = {device!r} but CUDA is not available: using MODEL.DEVICE = 'cpu'"
    return None


def fast_coco_eval_available() -> bool:
    """Whether detectron2's compiled COCO evaluation (``detectron2._C``) is really built."""
    try:
        from detectron2 import _C
    except Exception:
        return False
    for name in ("COCOevalAccumulate", "COCOevalEvaluateImages", "InstanceAnnotation"):
        try:  # the placeholder _C raises ImportError (not AttributeError) for every name
            if not callable(getattr(_C, name)):
                return False
        except Exception:
            return False
    return True


def setup(args):
    """Build, validate and freeze the config from parsed ``default_argument_parser`` args.

    Raises ``FileNotFoundError`` naming a missing ``--config-file`` and ``ValueError`` for bad
    values, before any model or data loader is built. The config is validated here once:
    :meth:`Trainer.build_model <spp_triton.engine.Trainer.build_model>` does not check it again.
    """
    config_file = getattr(args, "config_file", "") or ""
    if config_file.endswith(".py"):
        raise ValueError(
            f"--config-file {config_file!r} is a LazyConfig; setup() builds yacs (.yaml) configs: "
            "use spp_triton.engine.setup_lazy(args) (spp-triton-train and "
            "tools/train_net.py do so for .py configs)"
        )
    if config_file:
        from spp_triton.model_zoo import resolve_config

        try:  # a path, or the name of a config shipped with spp_triton
            config_file = resolve_config(config_file)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--config-file: {e}") from None
        args.config_file = config_file  # default_setup copies the file it names
    register_datasets()  # the names, for validation
    from spp_triton.modeling.weights import register_weights_handler

    register_weights_handler()  # MODEL.WEIGHTS may name spp_triton://... files in the package
    cfg = get_cfg()
    add_spp_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    opts = list(getattr(args, "opts", None) or [])
    try:
        cfg.merge_from_list(opts)
    except AssertionError as e:  # yacs asserts on unknown keys and odd-length lists
        raise ValueError(f"Invalid command-line config override {opts}: {e}") from e
    device_note = resolve_device(cfg)
    validate_config(cfg)
    eval_only = bool(getattr(args, "eval_only", False))
    validate_datasets(cfg, train=not eval_only, test=True)
    register_datasets(cfg)  # the files, if the config uses them
    freeze_validated(cfg)
    default_setup(cfg, args)
    if device_note:
        logging.getLogger("detectron2").info(device_note)
    return cfg
