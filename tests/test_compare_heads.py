"""The main job's tool on a tiny run: trains a few iterations, evaluates on a few images, writes
report.md / report.json / plots, and reuses the finished run when called again."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from spp_triton import compare  # noqa: E402

MINI = "shapes_val_first8"
TINY_OPTS = [
    "SOLVER.MAX_ITER",
    "4",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
    "DATASETS.TEST",
    f"('{MINI}',)",
]


@pytest.fixture(scope="module")
def mini_val():
    import spp_triton.modeling  # noqa: F401  (registers shapes_*)

    if MINI not in DatasetCatalog.list():
        full = MetadataCatalog.get("shapes_val")
        DatasetCatalog.get("shapes_val")  # generate the cache
        DatasetCatalog.register(MINI, lambda: DatasetCatalog.get("shapes_val")[:8])
        meta = {k: v for k, v in full.as_dict().items() if k != "name"}
        MetadataCatalog.get(MINI).set(**meta)
    return MINI


@pytest.mark.slow
def test_tiny_comparison_writes_report_and_reuses_runs(tmp_path, mini_val, capsys):
    config = "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml"
    results = compare.compare([config], tmp_path, TINY_OPTS)
    payload = compare.write_report(results, tmp_path, "pytest tiny run", 1.0)
    (r,) = results
    assert r.pooler == "SPP" and r.train_iters == 4
    assert set(r.ap) == set(compare.AP_KEYS)
    assert r.pooler_rois > 0 and r.pooler_fwd_ms > 0 and r.pooler_fwd_bwd_ms > 0
    assert r.box_head_params > 0 and r.box_head_gflops > 0
    assert r.infer_ms_per_image > 0
    assert r.train_s_per_iter is None or r.train_s_per_iter > 0
    md = (tmp_path / "report.md").read_text()
    for needle in (
        "machine:",
        "device:",
        "date:",
        "git commit:",
        "command: `pytest tiny run`",
        "faster_rcnn_R_18_FPN_spp124",
        "ap.png",
    ):
        assert needle in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["heads"][0]["ap"] == r.ap and data == json.loads(json.dumps(payload))
    for png in ("ap.png", "loss.png", "speed.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / r.name / "metrics.json").is_file()

    capsys.readouterr()
    again = compare.compare([config], tmp_path, TINY_OPTS)
    assert "reusing" in capsys.readouterr().out
    assert again[0].ap == r.ap


def test_fingerprint_changes_with_opts_and_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("SOLVER:\n  MAX_ITER: 5\n")
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\nMODEL:\n  DEVICE: cpu\n')
    a = compare.fingerprint(str(child), [])
    assert a == compare.fingerprint(str(child), [])
    assert a != compare.fingerprint(str(child), ["SOLVER.MAX_ITER", "6"])
    base.write_text("SOLVER:\n  MAX_ITER: 7\n")
    assert a != compare.fingerprint(str(child), [])


def test_train_speed_is_median_after_warmup(tmp_path):
    rows = [{"iteration": i, "time": t} for i, t in [(9, 9.0), (19, 1.0), (39, 2.0), (59, 3.0)]]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad\n")
    metrics = compare.read_metrics(tmp_path)
    assert len(metrics) == 4
    # iterations < 20 are warm-up: the median of the 39 and 59 records
    assert compare.train_seconds_per_iter(metrics) == 2.5


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        compare.compare(["configs/nope.yaml"], tmp_path)
