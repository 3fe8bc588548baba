"""LazyConfig (.py) training through ``spp-triton-train`` / ``tools/train_net.py`` on CPU.

* the Shapes LazyConfig builds the yacs Shapes SPP model (same modules, parameters, outputs,
  optimizer, gradient clipping, LR schedule, data pipeline);
* errors (missing config file, bad override, unknown dataset) name what is wrong, before anything
  is built or written;
* a tiny run end to end: train (checkpoints, metrics.json, config.yaml, COCO evaluation on 8
  images without the compiled ``detectron2._C``), ``--eval-only``, ``--resume``, 2 gloo processes.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    MINI,
    one_thread,  # noqa: F401  (autouse)
    register_mini_val,
    run_in_repo,
)
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.data import DatasetMapper  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from spp_triton.engine import fast_coco_eval_available, setup  # noqa: E402
from spp_triton.modeling import SPPROIPooler, add_spp_config, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
LAZY_CFG = REPO / "configs" / "LazyConfigs" / "shapes_faster_rcnn_R_18_FPN_spp124.py"
YAML_CFG = REPO / "configs" / "Shapes" / "faster_rcnn_R_18_FPN_spp124.yaml"

# Small and fast (as tests/test_train_net.py's TINY for the yacs config).
TINY = [
    "model.backbone.out_channels=16",
    "model.roi_heads.box_head.fc_dims=[64,64]",
    "model.proposal_generator.post_nms_topk=[64,32]",
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.box_predictor.test_topk_per_image=20",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
    "dataloader.train.mapper.augmentations.0.max_size=128",
    "dataloader.test.mapper.augmentations.0.short_edge_length=96",
    "dataloader.test.mapper.augmentations.0.max_size=128",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    f"dataloader.test.dataset.names={MINI}",
    "optimizer.lr=0.01",
    "train.seed=7",
    "train.log_period=1",
]


@pytest.fixture(scope="module")
def mini_val():
    return register_mini_val()


def _parse(*argv):
    return default_argument_parser().parse_args([str(a) for a in argv])


def _cli(*argv):
    """spp-triton-train's entry point, in this process (the mini dataset is registered here)."""
    from spp_triton.cli.train import invoke_main

    return invoke_main([str(a) for a in argv])


def _yacs_cfg():
    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(str(YAML_CFG))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ------------------------------------------------------------------ the Shapes LazyConfig


def _plain(v):
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v)
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v) if all(_is_plain(x) for x in v) else None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()} if all(map(_is_plain, v.values())) else None
    return v if _is_plain(v) else None


def _is_plain(v):
    if OmegaConf.is_config(v):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _hyperparameters(model):
    """Every plain attribute of every module and of the helper objects modules hold (matchers,
    box transforms, samplers ...): what a config sets besides the weights."""
    out = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            objects = [(f"{name}.{key}", value)]
            if not _is_plain(value) and hasattr(value, "__dict__"):
                if not isinstance(value, (torch.nn.Module, torch.Tensor)):
                    objects = [(f"{name}.{key}.{k}", v) for k, v in vars(value).items()]
            for path, v in objects:
                if _is_plain(v) or isinstance(v, dict):
                    p = _plain(v)
                    if p is not None or v is None:
                        out[path] = p
    return out


def test_shapes_lazy_config_is_the_yacs_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loadable from any folder
    cfg = LazyConfig.load(str(LAZY_CFG))
    model = instantiate(cfg.model)
    pooler = model.roi_heads.box_pooler
    assert isinstance(pooler, SPPROIPooler)
    assert pooler.levels == ((1, 1), (2, 2), (4, 4)) and pooler.mode == "max"

    yacs_cfg = _yacs_cfg()
    ref = build_model(yacs_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert str(model) == str(ref)  # the same modules, in the same order
    assert _hyperparameters(model) == _hyperparameters(ref)

    # Same weights -> the same detections.
    model.load_state_dict(ref.state_dict())
    model.eval()
    ref.eval()
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 120, 136, generator=g) * 255}]
    with torch.no_grad():
        (a,), (b,) = model(images), ref(images)
    a, b = a["instances"], b["instances"]
    assert len(a) > 0 and len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def _augmentations(mapper):
    return [(type(a).__name__, _plain(vars(a))) for a in mapper.augmentations.augs]


def test_shapes_lazy_config_trains_as_the_yacs_config():
    """Optimizer (param groups, per-parameter gradient clipping), LR schedule, data pipeline,
    evaluation and the train section follow the yacs config."""
    from detectron2.solver import LRMultiplier, build_lr_scheduler, build_optimizer

    cfg = LazyConfig.load(str(LAZY_CFG))
    yacs_cfg = _yacs_cfg()
    ref = build_model(yacs_cfg)
    model = copy.deepcopy(ref)

    ref_opt = build_optimizer(yacs_cfg, ref)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)

    def groups(o):
        return [
            (len(g["params"]), g["lr"], g["weight_decay"], g["momentum"], g["nesterov"])
            for g in o.param_groups
        ]

    assert groups(opt) == groups(ref_opt)
    g = torch.Generator().manual_seed(1)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        p.grad = torch.randn(p.shape, generator=g) * 10  # large: clipping at norm 5 matters
        q.grad = p.grad.clone()
    opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name

    ref_sched = build_lr_scheduler(yacs_cfg, ref_opt)
    sched = LRMultiplier(opt, instantiate(cfg.lr_multiplier), max_iter=cfg.train.max_iter)
    for _ in range(yacs_cfg.SOLVER.MAX_ITER):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        sched.step()
        ref_sched.step()

    for is_train, node in ((True, cfg.dataloader.train), (False, cfg.dataloader.test)):
        mapper, ref_mapper = instantiate(node.mapper), DatasetMapper(yacs_cfg, is_train)
        assert _augmentations(mapper) == _augmentations(ref_mapper)
        for key in ("is_train", "image_format", "use_instance_mask", "use_keypoint"):
            assert getattr(mapper, key) == getattr(ref_mapper, key), key
    assert cfg.dataloader.train.dataset.names == "shapes_train"
    assert cfg.dataloader.test.dataset.names == "shapes_val"
    assert cfg.dataloader.train.total_batch_size == yacs_cfg.SOLVER.IMS_PER_BATCH
    assert cfg.dataloader.evaluator.dataset_name == "shapes_val"
    assert cfg.train.max_iter == yacs_cfg.SOLVER.MAX_ITER
    assert cfg.train.checkpointer.period == yacs_cfg.SOLVER.CHECKPOINT_PERIOD
    assert cfg.train.eval_period == yacs_cfg.TEST.EVAL_PERIOD
    assert cfg.train.seed == yacs_cfg.SEED
    # the same pretrained weights (make_cfg blanks MODEL.WEIGHTS: read the file's own value)
    assert cfg.train.init_checkpoint == _yacs_file_weights()
    assert cfg.train.init_checkpoint.startswith("spp_triton://")


def _yacs_file_weights() -> str:
    from detectron2.config import get_cfg

    from spp_triton.modeling import add_spp_config

    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml"))
    return cfg.MODEL.WEIGHTS


# ------------------------------------------------------------------ set-up and its errors


def test_setup_lazy_validates_before_writing(tmp_path, mini_val):
    from spp_triton.engine import setup_lazy

    out = tmp_path / "out"
    base = ["--config-file", LAZY_CFG, f"train.output_dir={out}"]

    missing = tmp_path / "nowhere" / "missing.py"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        setup_lazy(_parse("--config-file", missing))
    with pytest.raises(ValueError, match=r"train\.max_iters"):
        setup_lazy(_parse(*base, "train.max_iters=3"))
    with pytest.raises(ValueError, match=r"key=value.*'train\.max_iter'|'train\.max_iter'.*key="):
        setup_lazy(_parse(*base, "train.max_iter"))  # yacs-style "KEY VALUE"
    with pytest.raises(ValueError, match=r"model\.roi_heads\.box_predictor\.no_such_arg"):
        setup_lazy(_parse(*base, "model.roi_heads.box_predictor.no_such_arg=1"))
    with pytest.raises(ValueError, match=r"dataloader\.test\.dataset\.names.*no_such_dataset"):
        setup_lazy(_parse(*base, "dataloader.test.dataset.names=no_such_dataset"))
    with pytest.raises(ValueError, match=r"train\.max_iter"):
        setup_lazy(_parse(*base, "train.max_iter=0"))
    assert not out.exists()  # nothing written before the config is known to be good

    # An argument the target takes but the file does not set is a valid override.
    cfg = setup_lazy(
        _parse(
            "--eval-only",
            *base,
            "model.roi_heads.box_predictor.test_nms_thresh=0.4",
            "train.amp.enabled=True",
            f"dataloader.test.dataset.names={mini_val}",
        )
    )
    assert cfg.model.roi_heads.box_predictor.test_nms_thresh == 0.4
    assert (out / "config.yaml").is_file()
    if not torch.cuda.is_available():
        assert cfg.train.device == "cpu"
        assert cfg.train.amp.enabled is False  # detectron2's AMPTrainer needs CUDA
    if not fast_coco_eval_available():
        assert cfg.dataloader.evaluator.use_fast_impl is False


def test_yacs_setup_points_lazy_configs_to_the_lazy_path():
    with pytest.raises(ValueError, match="LazyConfig.*setup_lazy"):
        setup(_parse("--config-file", LAZY_CFG))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config-file", "{tmp}/nowhere/missing.py"], ["FileNotFoundError", "{tmp}/nowhere"]),
        (
            [
                "--config-file",
                LAZY_CFG,
                "--eval-only",
                "train.output_dir={tmp}/o",
                "train.max_itr=3",
            ],
            ["ValueError", "train.max_itr"],
        ),
    ],
    ids=["missing-config", "bad-override"],
)
def test_train_net_cli_errors_name_the_problem(tmp_path, argv, expected):
    argv = [str(a).format(tmp=tmp_path) for a in argv]
    proc = run_in_repo([sys.executable, TRAIN_NET, *argv], timeout=300)
    assert proc.returncode != 0
    for text in expected:
        assert text.format(tmp=tmp_path) in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini_val):
    """3 iterations through the CLI (checkpoint every 2), evaluated on 8 images at the end."""
    out = tmp_path_factory.mktemp("lazy_train") / "out"
    results = _cli(
        "--config-file",
        LAZY_CFG,
        *TINY,
        "train.max_iter=3",
        "train.checkpointer.period=2",
        "train.eval_period=0",
        f"train.output_dir={out}",
    )
    return out, results


def _records(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def _check_ap(results):
    ap = results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= ap.keys()
    assert all(isinstance(v, float) for v in ap.values())
    assert math.isfinite(ap["AP"]) and 0.0 <= ap["AP"] <= 100.0
    return ap


@pytest.mark.slow
def test_lazy_training_writes_outputs_and_evaluates(trained):
    out, results = trained
    _check_ap(results)
    for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "log.txt").is_file() and list(out.glob("events.out.tfevents.*"))
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2 and "rng" in final
    assert "optimizer" in final["trainer"]  # SimpleTrainer state: momentum buffers
    records = _records(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1, 2]
    assert all(math.isfinite(r["total_loss"]) for r in records if "total_loss" in r)
    assert any("bbox/AP" in r for r in records)  # the EvalHook's results
    # config.yaml: the full config as run, loadable again.
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.train.max_iter == 3 and saved.train.output_dir == str(out)
    assert saved.model.roi_heads.box_pooler._target_.endswith("SPPROIPooler")
    assert saved.dataloader.test.dataset.names == MINI
    if not fast_coco_eval_available():
        assert saved.dataloader.evaluator.use_fast_impl is False
    log = (out / "log.txt").read_text()
    if not torch.cuda.is_available():
        assert "CUDA is not available" in log


@pytest.mark.slow
def test_lazy_eval_only_loads_init_checkpoint(trained, tmp_path):
    out, train_results = trained
    results = _cli(
        "--eval-only",
        "--config-file",
        LAZY_CFG,
        *TINY,
        f"train.init_checkpoint={out / 'model_final.pth'}",
        f"train.output_dir={tmp_path / 'eval'}",
    )
    ap = _check_ap(results)
    assert ap == pytest.approx(train_results["bbox"], nan_ok=True)
    # The trained weights: the very detections the end-of-training evaluation made.
    name = "inference/coco_instances_results.json"
    detections = json.loads((tmp_path / "eval" / name).read_text())
    assert detections and detections == json.loads((out / name).read_text())
    assert not list((tmp_path / "eval").glob("model_*.pth"))


@pytest.mark.slow
def test_lazy_resume_continues_from_last_checkpoint(trained, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    results = _cli(
        "--resume",
        "--config-file",
        LAZY_CFG,
        *TINY,
        "train.max_iter=5",
        "train.checkpointer.period=2",
        f"train.output_dir={resumed}",
    )
    _check_ap(results)
    assert "Starting training from iteration 3" in (resumed / "log.txt").read_text()
    final = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 4
    iterations = [r["iteration"] for r in _records(resumed) if "total_loss" in r]
    assert iterations == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_lazy_resume_is_exact(tmp_path):
    """Resuming from an intermediate checkpoint reaches bitwise the weights of the uninterrupted
    run (data loader replayed, random states restored), as the yacs path does."""
    opts = [o for o in TINY if not o.startswith("dataloader.test.dataset.names")] + [
        "dataloader.evaluator=null",
        "train.max_iter=4",
        "train.checkpointer.period=2",
    ]
    full = tmp_path / "full"
    _cli("--config-file", LAZY_CFG, *opts, f"train.output_dir={full}")
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "model_0000001.pth", part)
    (part / "last_checkpoint").write_text("model_0000001.pth")
    _cli("--resume", "--config-file", LAZY_CFG, *opts, f"train.output_dir={part}")
    a, b = (
        torch.load(d / "model_final.pth", map_location="cpu", weights_only=False)
        for d in (full, part)
    )
    assert a["iteration"] == b["iteration"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_lazy_run_matches_yacs_run(tmp_path):
    """The same tiny settings through the yacs config and the LazyConfig: the same seed, model,
    data, optimizer and (constant) learning rate reach bitwise the same weights."""
    from spp_triton.engine import Trainer, main_lazy

    yacs_opts = {
        "MODEL.FPN.OUT_CHANNELS": "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM": "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32",
        "TEST.DETECTIONS_PER_IMAGE": "20",
        "INPUT.MIN_SIZE_TRAIN": "(96,)",
        "INPUT.MAX_SIZE_TRAIN": "128",
        "INPUT.MIN_SIZE_TEST": "96",
        "INPUT.MAX_SIZE_TEST": "128",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.BASE_LR": "0.01",
        "SOLVER.WARMUP_ITERS": "0",
        "SOLVER.STEPS": "()",
        "SOLVER.MAX_ITER": "3",
        "DATASETS.TEST": "()",
        "SEED": "7",
        "OUTPUT_DIR": str(tmp_path / "yacs"),
    }
    cfg = setup(_parse("--config-file", YAML_CFG, *[x for kv in yacs_opts.items() for x in kv]))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lazy_opts = [o for o in TINY if not o.startswith("dataloader.test.dataset.names")] + [
        "lr_multiplier.scheduler.values=[1.0]",
        "lr_multiplier.scheduler.milestones=[]",
        "lr_multiplier.warmup_length=0",
        "dataloader.evaluator=null",
        "train.max_iter=3",
        f"train.output_dir={tmp_path / 'lazy'}",
    ]
    assert main_lazy(_parse("--config-file", LAZY_CFG, *lazy_opts)) is None  # no evaluator
    final = {
        d: torch.load(tmp_path / d / "model_final.pth", map_location="cpu", weights_only=False)
        for d in ("yacs", "lazy")
    }
    assert final["lazy"]["iteration"] == final["yacs"]["iteration"] == 2
    a, b = final["lazy"]["model"], final["yacs"]["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (
        _records(tmp_path / "lazy")[-1]["total_loss"]
        == _records(tmp_path / "yacs")[-1]["total_loss"]
    )


@pytest.mark.slow
def test_lazy_two_process_gloo_training_on_cpu(tmp_path):
    """tools/train_net.py --num-gpus 2 without CUDA: 2 gloo processes train one LazyConfig."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU (gloo) path")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        str(TRAIN_NET),
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--config-file",
        "configs/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124.py",
        *[t for t in TINY if not t.startswith("dataloader.test.dataset.names")],
        "dataloader.train.total_batch_size=4",
        "dataloader.evaluator=null",  # no evaluation: the full shapes_val is too slow here
        "train.max_iter=2",
        f"train.output_dir={out}",
    ]
    proc = run_in_repo(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in (out / "log.txt").read_text()
    assert (out / "log.txt.rank1").is_file()
    assert (
        torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"]
        == 1
    )
