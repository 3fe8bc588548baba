"""The main job's tool on a tiny run: trains a few iterations, evaluates on a few images, writes
report.md / report.json / plots, and reuses the finished run when called again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from d2_helpers import MINI, register_mini_val  # noqa: E402

from spp_triton import compare  # noqa: E402

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
    return register_mini_val()


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
    assert json.dumps(data["runs"][0]["ap"]) == json.dumps(r.ap)
    assert json.dumps(data) == json.dumps(json.loads(json.dumps(payload)))
    ap = r.ap["AP"]
    assert data["heads"][0]["AP"]["mean"] == (pytest.approx(ap) if ap == ap else None)
    for png in ("ap.png", "loss.png", "speed.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (Path(r.run_dir) / "metrics.json").is_file() and Path(r.run_dir).parent == tmp_path
    assert "iterations per run" in md and "1 run(s) each" in md

    capsys.readouterr()
    again = compare.compare([config], tmp_path, TINY_OPTS)
    assert "reusing" in capsys.readouterr().out
    assert json.dumps(again[0].ap) == json.dumps(r.ap)  # NaN-safe (4 iterations may detect nothing)

    # Changed overrides into the same folder: a fresh run with its own weights, never the old
    # model_final.pth (which has another box-head shape), and the first run stays as it was.
    changed = compare.compare([config], tmp_path, [*TINY_OPTS, "MODEL.SPP.LEVELS", "[1, 2]"])
    out = capsys.readouterr().out
    assert "reusing" not in out and "training faster_rcnn_R_18_FPN_spp124" in out
    (c,) = changed
    assert c.run_dir != r.run_dir and c.fingerprint != r.fingerprint
    assert c.box_head_params < r.box_head_params  # fc1 sized for 5 bins, not 21
    log = (tmp_path / Path(c.run_dir).name / "log.txt").read_text()
    assert "Skip loading parameter" not in log
    old = json.loads((Path(r.run_dir) / "result.json").read_text())["ap"]
    assert json.dumps(old) == json.dumps(r.ap)


SPP124 = "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml"
ROIPOOL = "configs/Shapes/faster_rcnn_R_18_FPN_roipool.yaml"


def test_run_folders_are_keyed_by_the_resolved_config(tmp_path):
    a = compare.plan_runs([SPP124, ROIPOOL], tmp_path)
    assert [r.name for r in a] == ["faster_rcnn_R_18_FPN_spp124", "faster_rcnn_R_18_FPN_roipool"]
    assert a[0].run_dir != a[1].run_dir and all(r.run_dir.parent == tmp_path for r in a)
    # the same config again (here by its shipped name): the same run folder, resumable
    again = compare.plan_runs(["Shapes/faster_rcnn_R_18_FPN_spp124.yaml"], tmp_path)
    assert again[0].run_dir == a[0].run_dir and again[0].result_key == a[0].result_key
    # any training override: another folder
    b = compare.plan_runs([SPP124], tmp_path, ["SOLVER.BASE_LR", "0.001"])
    assert b[0].run_dir != a[0].run_dir
    # test settings only: the same training (folder), another result
    t = compare.plan_runs([SPP124], tmp_path, ["TEST.DETECTIONS_PER_IMAGE", "20"])
    assert t[0].run_dir == a[0].run_dir and t[0].result_key != a[0].result_key


def test_configs_with_the_same_file_name_do_not_collide(tmp_path):
    other = tmp_path / "mine" / "faster_rcnn_R_18_FPN_spp124.yaml"
    other.parent.mkdir()
    base = Path(compare.plan_runs([SPP124], tmp_path)[0].path).parent / "Base-Shapes-FPN.yaml"
    other.write_text(
        f'_BASE_: "{base}"\nMODEL:\n  ROI_BOX_HEAD:\n    POOLER_TYPE: "SPP"\n'
        "  SPP:\n    LEVELS: [1, 2]\n"
    )
    runs = compare.plan_runs([SPP124, str(other)], tmp_path / "out")
    assert runs[0].run_dir != runs[1].run_dir
    assert runs[0].name != runs[1].name and runs[1].name.startswith("mine/")
    # the very same training twice is refused rather than run twice into one folder
    same = tmp_path / "copy" / "faster_rcnn_R_18_FPN_spp124.yaml"
    same.parent.mkdir()
    shutil.copy(compare.plan_runs([SPP124], tmp_path)[0].path, same)
    (same.parent / "Base-Shapes-FPN.yaml").write_text(base.read_text())
    (same.parent.parent / "Base-RCNN-FPN.yaml").write_text(
        (base.parent.parent / "Base-RCNN-FPN.yaml").read_text()
    )
    with pytest.raises(ValueError, match="same training config"):
        compare.plan_runs([SPP124, str(same)], tmp_path / "out")


def test_a_run_folder_of_another_config_is_refused(tmp_path):
    (run,) = compare.plan_runs([SPP124], tmp_path)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "model_final.pth").write_bytes(b"not these weights")
    with pytest.raises(RuntimeError, match="without run.json"):
        compare._claim_run_dir(run)
    (run.run_dir / "run.json").write_text(json.dumps({"train_key": "0" * 64, "config": "x"}))
    with pytest.raises(RuntimeError, match="another config"):
        compare.compare([SPP124], tmp_path)


@pytest.mark.parametrize(
    "opts,key",
    [
        (["DATASETS.TEST", "()"], "DATASETS.TEST"),
        (["DATASETS.TEST", "('nope_val',)"], "DATASETS.TEST"),
        (["DATASETS.TRAIN", "('nope_train',)"], "DATASETS.TRAIN"),
        (["MODEL.SPP.MODE", "min"], "MODEL.SPP.MODE"),
        (["MODEL.ROI_HEADS.NAME", "StandardROIHeads"], "MODEL.ROI_HEADS.NAME"),
    ],
)
def test_every_config_is_checked_before_any_training(tmp_path, monkeypatch, opts, key):
    """A bad second config (or override) fails before the first head trains, naming the key."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the configs were checked")

    monkeypatch.setattr(compare, "train_all", no_training)
    monkeypatch.setattr(compare.subprocess, "Popen", no_training)
    with pytest.raises(ValueError, match=re.escape(key)):
        compare.compare([ROIPOOL, SPP124], tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()


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


# ----------------------------------------------------------------------------- seeds and spread
def test_seeds_plan_one_run_per_seed(tmp_path):
    runs = compare.plan_runs([SPP124, ROIPOOL], tmp_path, seeds=3)
    assert [(r.name, r.seed) for r in runs] == [
        ("faster_rcnn_R_18_FPN_spp124", 42),
        ("faster_rcnn_R_18_FPN_spp124", 43),
        ("faster_rcnn_R_18_FPN_spp124", 44),
        ("faster_rcnn_R_18_FPN_roipool", 42),
        ("faster_rcnn_R_18_FPN_roipool", 43),
        ("faster_rcnn_R_18_FPN_roipool", 44),
    ]
    assert len({r.run_dir for r in runs}) == 6
    assert all(r.opts[-2:] == ("SEED", str(r.seed)) for r in runs)
    assert "SEED" in compare._train_command(runs[1], 1)
    with pytest.raises(ValueError, match="seeds"):
        compare.plan_runs([SPP124], tmp_path, seeds=0)


def _fake(name, seed, ap, train=0.5, tmp=None):
    return compare.HeadResult(
        name=name,
        config=f"{name}.yaml",
        pooler="SPP",
        ap={k: ap + i for i, k in enumerate(compare.AP_KEYS)},
        train_s_per_iter=train,
        train_iters=100,
        train_wall_s=60.0,
        infer_ms_per_image=10.0 + seed,
        pooler_rois=100,
        pooler_fwd_ms=1.0,
        pooler_fwd_bwd_ms=2.0,
        box_head_params=1000,
        box_head_gflops=0.1,
        seed=seed,
        run_dir=str(tmp / f"{name}-{seed}"),
    )


def test_report_gives_mean_std_runs_and_plain_verdicts(tmp_path):
    results = [
        _fake("a", 1, 50.0, tmp=tmp_path),
        _fake("a", 2, 52.0, tmp=tmp_path),
        _fake("b", 1, 40.0, tmp=tmp_path),
        _fake("b", 2, 41.0, tmp=tmp_path),
        _fake("c", 1, 50.5, tmp=tmp_path),
        _fake("c", 2, 49.5, tmp=tmp_path),
    ]
    payload = compare.write_report(results, tmp_path, "pytest", 1.0)
    heads = {h["name"]: h for h in payload["heads"]}
    assert heads["a"]["runs"] == 2 and heads["a"]["seeds"] == [1, 2]
    assert heads["a"]["AP"]["mean"] == pytest.approx(51.0)
    assert heads["a"]["AP"]["std"] == pytest.approx(2**0.5)  # sample std of 50, 52
    verdicts = {(v["a"], v["b"]): v for v in payload["comparisons"]}
    assert verdicts[("a", "b")]["exceeds"] is True  # 10.5 apart, spreads 1.41 + 0.71
    assert verdicts[("a", "c")]["exceeds"] is False  # 1.0 apart, spreads 1.41 + 0.71
    md = (tmp_path / "report.md").read_text()
    assert "| a | SPP | 2 | 51.0 ± 1.4 |" in md
    assert "a beats b by 10.5 AP, more than the spread" in md
    assert "a vs c: AP 1.0 higher, within the spread" in md
    assert "## Runs" in md and md.count("| a | ") == 3  # summary row + 2 runs
    assert "3 heads, 2 run(s) each, 6 runs" in md
    assert len(payload["runs"]) == 6
    for png in ("ap.png", "loss.png", "speed.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_single_runs_are_not_called_evidence(tmp_path):
    results = [_fake("a", 42, 50.0, tmp=tmp_path), _fake("b", 42, 40.0, tmp=tmp_path)]
    payload = compare.write_report(results, tmp_path, "pytest", None)
    assert payload["comparisons"][0]["exceeds"] is None
    md = (tmp_path / "report.md").read_text()
    assert "the spread is unknown, so this is not evidence" in md
    assert "| a | SPP | 1 | 50.0 |" in md
