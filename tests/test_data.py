"""Tests of the synthetic shapes dataset (spp_triton.data): determinism, annotation validity,
COCO compatibility, atomic generation and detectron2 registration. All in tmp folders, small."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_triton.data import (
    NUM_SHAPES_CLASSES,
    SHAPES_CLASSES,
    ShapesConfig,
    default_datasets_root,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    is_complete,
    register_shapes_datasets,
    shapes_dataset_dir,
)
from spp_triton.data import shapes as shapes_mod

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = ShapesConfig(seed=3, num_train=6, num_val=4)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _coco(json_file: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(json_file))


@pytest.fixture(scope="module")
def medium_dataset(tmp_path_factory) -> Path:
    """Enough images (60) that every class and every COCO size bucket shows up."""
    cfg = ShapesConfig(seed=11, num_train=50, num_val=10)
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", cfg)


@pytest.fixture
def restore_registration():
    """Put the default registration back after a test that re-registers elsewhere."""
    root = default_datasets_root()  # resolved now, before any monkeypatched environment
    yield
    register_shapes_datasets(root, generate=False)


# ----------------------------------------------------------------------------------------------


def test_classes_constant():
    assert NUM_SHAPES_CLASSES == len(SHAPES_CLASSES) == len(set(SHAPES_CLASSES))
    assert 5 <= NUM_SHAPES_CLASSES <= 6


def test_generation_is_deterministic(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", SMALL)
    b = generate_shapes_dataset(tmp_path / "b", SMALL)
    c = generate_shapes_dataset(tmp_path / "c", ShapesConfig(seed=4, num_train=6, num_val=4))
    for split in ("train", "val"):
        ja, jb, jc = ((d / f"{split}.json").read_text() for d in (a, b, c))
        assert ja == jb
        assert json.loads(ja)["annotations"] != json.loads(jc)["annotations"]
        names = sorted(p.name for p in (a / split).glob("*.png"))
        assert len(names) == SMALL.count(split)
        for name in names:
            pa, pb, pc = (_pixels(d / split / name) for d in (a, b, c))
            np.testing.assert_array_equal(pa, pb)
            assert pa.shape != pc.shape or not np.array_equal(pa, pc)


def test_image_does_not_depend_on_split_size():
    big = ShapesConfig(seed=3, num_train=100, num_val=50)
    for split in ("train", "val"):
        px_small, anns_small = shapes_mod.render_image(SMALL, split, 2)
        px_big, anns_big = shapes_mod.render_image(big, split, 2)
        np.testing.assert_array_equal(px_small, px_big)
        assert [a["bbox"] for a in anns_small] == [a["bbox"] for a in anns_big]
    # train and val images are different streams
    assert not np.array_equal(
        shapes_mod.render_image(SMALL, "train", 0)[0], shapes_mod.render_image(SMALL, "val", 0)[0]
    )


def test_annotations_are_valid(medium_dataset):
    from pycocotools import mask as mask_util

    buckets, classes = set(), set()
    for split in ("train", "val"):
        data = json.loads((medium_dataset / f"{split}.json").read_text())
        assert [c["id"] for c in data["categories"]] == list(range(1, NUM_SHAPES_CLASSES + 1))
        assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
        images = {im["id"]: im for im in data["images"]}
        assert len(images) == len(data["images"])
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
        for im in images.values():
            with Image.open(medium_dataset / split / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"])
                assert f.mode == "RGB"
        per_image = {}
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and a["area"] > 0
            assert a["area"] == pytest.approx(w * h)
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
            assert 1 <= a["category_id"] <= NUM_SHAPES_CLASSES
            assert a["iscrowd"] == 0
            # The visible mask lies inside its box (up to the half-pixel of super-sampling).
            rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
            assert rle["size"] == [im["height"], im["width"]]
            m = mask_util.decode(rle).astype(bool)
            assert m.any()
            ys, xs = np.nonzero(m)
            assert xs.min() >= np.floor(x) and xs.max() + 1 <= np.ceil(x + w)
            assert ys.min() >= np.floor(y) and ys.max() + 1 <= np.ceil(y + h)
            buckets.add(shapes_mod.area_bucket(a["area"]))
            classes.add(a["category_id"])
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert len(per_image) == len(images)  # every image has objects
    assert classes == set(range(1, NUM_SHAPES_CLASSES + 1))
    assert buckets == {"small", "medium", "large"}


def test_json_works_with_pycocotools_eval(medium_dataset):
    """The JSON loads with pycocotools, and ground truth scored as detections gives AP = 1."""
    from pycocotools.cocoeval import COCOeval

    gt = _coco(medium_dataset / "val.json")
    assert sorted(gt.getCatIds()) == list(range(1, NUM_SHAPES_CLASSES + 1))
    assert len(gt.getImgIds()) == 10 and len(gt.getAnnIds()) > 0
    dets = [dict(a, score=1.0) for a in gt.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert ev.stats[1] == pytest.approx(1.0)  # AP50


def test_interrupted_generation_is_not_complete(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real_render = shapes_mod.render_image
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(shapes_mod, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(out, SMALL)
    assert not out.exists() and not is_complete(out, SMALL)
    assert list(tmp_path.iterdir()) == []  # the temporary folder was cleaned up

    # A killed run (no cleanup) leaves a temp folder and maybe a half-written target folder.
    monkeypatch.setattr(shapes_mod, "render_image", real_render)
    out = shapes_dataset_dir(tmp_path, SMALL)
    stale_tmp = tmp_path / f".{out.name}.tmp-999-dead"
    (stale_tmp / "train").mkdir(parents=True)
    (out / "train").mkdir(parents=True)
    (out / "train.json").write_text("{}")
    assert not is_complete(out, SMALL)
    assert ensure_shapes_dataset(tmp_path, SMALL) == out
    assert is_complete(out, SMALL) and not stale_tmp.exists()
    assert len(list((out / "val").glob("*.png"))) == SMALL.num_val


def test_stale_fingerprint_is_regenerated(tmp_path):
    out = ensure_shapes_dataset(tmp_path, SMALL)
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text())
    good = meta["fingerprint"]
    meta["fingerprint"] = "0" * 16  # as if written by another generator version
    meta_file.write_text(json.dumps(meta))
    assert not is_complete(out, SMALL)
    assert ensure_shapes_dataset(tmp_path, SMALL) == out
    assert json.loads(meta_file.read_text())["fingerprint"] == good
    # Different configs get different folders; the default one is shapes_v<version>.
    assert shapes_dataset_dir(tmp_path, SMALL) != shapes_dataset_dir(tmp_path)
    assert shapes_dataset_dir(tmp_path).name == shapes_mod.DATASET_BASENAME


def test_registration_is_idempotent_and_lazy(tmp_path, restore_registration):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    register_shapes_datasets(tmp_path, SMALL, generate=False)
    register_shapes_datasets(tmp_path, SMALL, generate=False)  # no "already registered"
    out = shapes_dataset_dir(tmp_path, SMALL)
    assert not out.exists()  # registering generated nothing

    meta = MetadataCatalog.get("shapes_val")
    assert meta.json_file == str(out / "val.json")
    assert meta.evaluator_type == "coco"
    assert list(meta.thing_classes) == list(SHAPES_CLASSES)

    records = DatasetCatalog.get("shapes_val")  # generates on first use
    assert is_complete(out, SMALL)
    assert len(records) == SMALL.num_val
    for r in records:
        assert os.path.isfile(r["file_name"])
        assert r["annotations"]
        for a in r["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= a["category_id"] < NUM_SHAPES_CLASSES
    assert len(DatasetCatalog.get("shapes_train")) == SMALL.num_train

    register_shapes_datasets(tmp_path, SMALL)  # again, eager: still fine
    assert "shapes_train" in DatasetCatalog.list()


def test_import_registers_without_generating(tmp_path, monkeypatch, restore_registration):
    """Importing spp_triton.data registers both names at the default location, writing nothing."""
    import importlib

    from detectron2.data import DatasetCatalog, MetadataCatalog

    import spp_triton.data

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPP_TRITON_DATASETS", str(cache))
    importlib.reload(spp_triton.data)  # re-runs the import-time registration
    assert {"shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("shapes_train").json_file == str(cache / "shapes_v1" / "train.json")
    assert not cache.exists()
