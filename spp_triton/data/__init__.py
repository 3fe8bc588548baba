"""Datasets for spp_triton: a deterministic synthetic "shapes" detection set, in COCO format.

The data
--------
Every image (sides 120-136 px) holds 3-6 filled shapes of six classes, ``SHAPES_CLASSES`` =
ellipse, rectangle, triangle, star, cross, hexagon (``NUM_SHAPES_CLASSES`` = 6), each randomly
stretched, rotated and coloured (the colour says nothing about the class), at three scales picked
by COCO's box-area thresholds (< 32^2 small, < 96^2 medium, else large, in absolute pixels), so
APs, APm and APl are all measured. Smaller shapes may partly occlude larger ones (each keeps at
least 80% of its pixels; boxes cover the visible part). Backgrounds are gradients with stripes,
colour blobs, checkerboards or speckle, plus clutter that is not an object (lines, curves,
scribbles, dot sprays, spiky splats), pixel noise and occasional blur. Details of the renderer
are in :mod:`spp_triton.data.shapes`.

Splits: ``shapes_train`` (1500 images) and ``shapes_val`` (200 images), fixed seed 0. Each image
has its own random stream seeded from (seed, split, index), so the files are bit-for-bit
reproducible and train and val never overlap.

The cache
---------
Files are generated once, on first use, into ``$SPP_TRITON_DATASETS/shapes_v1/`` or, when that
variable is unset, ``<repo root>/datasets/shapes_v1/`` (git-ignored) in a source checkout, or
``~/.cache/spp_triton/datasets/shapes_v1/`` for an installed wheel::

    shapes_v1/train/000000.png ...  shapes_v1/train.json   (COCO instances format)
    shapes_v1/val/000000.png ...    shapes_v1/val.json
    shapes_v1/meta.json             (config fingerprint; written last)

Generation (about 25 s for the default 1800 images, on one core) writes to a hidden temporary
folder and renames it into place, under a file lock, so a crash or a concurrent run never leaves a
half dataset that looks complete. A cache made with another config or another revision of
``shapes.py`` (the fingerprint hashes both) is regenerated. Non-default configs
(:class:`~spp_triton.data.shapes.ShapesConfig`) live in ``shapes_v1_<fingerprint>/``.

Registration
------------
Importing this package registers ``shapes_train`` and ``shapes_val`` with detectron2's
``DatasetCatalog``/``MetadataCatalog`` (when detectron2 is installed) *without* generating
anything; this is the one place their names are registered (:mod:`spp_triton.engine` imports
this package, and its ``register_datasets(cfg)`` only generates the files a config uses).
Each is registered with a loader that first calls :func:`ensure_shapes_dataset` (a
no-op once the cache is complete) and then ``load_coco_json``, and with the metadata that
``register_coco_instances`` would set (``json_file``, ``image_root``, ``evaluator_type="coco"``)
plus ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``. ``COCOEvaluator`` reads
``json_file`` when it is built, so training/eval scripts should call
:func:`register_shapes_datasets` (which generates eagerly) before building an evaluator::

    from spp_triton.data import NUM_SHAPES_CLASSES, register_shapes_datasets

    register_shapes_datasets()  # idempotent; generates the cache if needed
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_SHAPES_CLASSES

Real COCO instead
-----------------
detectron2 registers COCO itself (``detectron2.data.datasets.builtin``): put the data under
``$DETECTRON2_DATASETS/coco/`` (``annotations/instances_train2017.json``, ``train2017/``,
``val2017/``, ...), export ``DETECTRON2_DATASETS`` to that folder's parent, and set
``DATASETS.TRAIN = ("coco_2017_train",)``, ``DATASETS.TEST = ("coco_2017_val",)`` and
``MODEL.ROI_HEADS.NUM_CLASSES = 80``.
"""

from __future__ import annotations

import os
from pathlib import Path

from spp_triton.data.shapes import (
    GENERATOR_VERSION,
    NUM_SHAPES_CLASSES,
    SHAPES_CLASSES,
    ShapesConfig,
    default_datasets_root,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    is_complete,
    shapes_dataset_dir,
)

__all__ = [
    "SHAPES_CLASSES",
    "NUM_SHAPES_CLASSES",
    "SHAPES_DATASET_NAMES",
    "GENERATOR_VERSION",
    "ShapesConfig",
    "default_datasets_root",
    "shapes_dataset_dir",
    "is_complete",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "register_shapes_datasets",
]

#: detectron2 dataset names, by split.
SHAPES_DATASET_NAMES: dict[str, str] = {"train": "shapes_train", "val": "shapes_val"}


def _loader(name: str, json_file: str, image_root: str, root: Path, config: ShapesConfig):
    def load():
        from detectron2.data.datasets import load_coco_json

        ensure_shapes_dataset(root, config)
        return load_coco_json(json_file, image_root, name)

    return load


def register_shapes_datasets(
    root: str | os.PathLike | None = None,
    config: ShapesConfig | None = None,
    *,
    generate: bool = True,
) -> None:
    """Register ``shapes_train`` and ``shapes_val`` with detectron2; idempotent.

    Args:
        root: folder holding the dataset caches; ``None`` means ``default_datasets_root()``
            (``$SPP_TRITON_DATASETS``, the checkout's ``datasets/`` or the user cache), resolved
            at each call.
        config: generator parameters; ``None`` is the default dataset.
        generate: generate the files now if they are missing or stale (default). With ``False``
            nothing is written now; the registered loader generates on first
            ``DatasetCatalog.get``.

    Calling it again with the same location is a no-op (apart from ``generate``). Calling it with
    another ``root``/``config`` replaces the earlier registration of both names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    config = ShapesConfig() if config is None else config
    # Resolve the root now, so the registered paths and the loader agree even if the
    # environment changes later.
    root_path = default_datasets_root() if root is None else Path(root)
    out_dir = shapes_dataset_dir(root_path, config)
    if generate:
        ensure_shapes_dataset(root_path, config)
    for split, name in SHAPES_DATASET_NAMES.items():
        json_file, image_root = str(out_dir / f"{split}.json"), str(out_dir / split)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if getattr(meta, "json_file", None) == json_file:
                continue  # already registered here
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, _loader(name, json_file, image_root, root_path, config))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SHAPES_CLASSES),  # a list, as load_coco_json sets it
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(NUM_SHAPES_CLASSES)},
        )


def _register_at_import() -> None:
    try:
        import detectron2.data  # noqa: F401
    except ImportError:  # the generator works without detectron2
        return
    register_shapes_datasets(generate=False)


_register_at_import()
