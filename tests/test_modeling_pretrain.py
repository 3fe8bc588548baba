"""spp_triton.modeling.pretrain, the shipped pretrained Shapes backbone, spp_triton:// weights and
the pretrained C4 configs (CPU; tiny pretraining runs only)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import one_thread  # noqa: E402, F401  (autouse: determinism is per thread count)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

from spp_triton.data.shapes import ShapesConfig  # noqa: E402
from spp_triton.model_zoo import get_config_file  # noqa: E402
from spp_triton.modeling import add_spp_config, build_model, validate_config  # noqa: E402
from spp_triton.modeling.pretrain import (  # noqa: E402
    PretrainSettings,
    pretrain_backbone,
    sidecar_path,
)
from spp_triton.modeling.weights import (  # noqa: E402
    SHAPES_R18_W24_PRETRAINED,
    register_weights_handler,
    resolve_shipped_path,
)

REPO = Path(__file__).resolve().parents[1]
NEW_CONFIGS = [
    "Shapes/sppnet_R_18_C4_spp1236_frozen.yaml",
    "Shapes/sppnet_R_18_C4_spp1236_pretrained.yaml",
    "Shapes/faster_rcnn_R_18_C4_roialign7.yaml",
    "Shapes/faster_rcnn_R_18_C4_roipool7.yaml",
]
SHIPPED = Path(resolve_shipped_path(SHAPES_R18_W24_PRETRAINED))
TINY = dict(num_images=3, num_eval_images=2, iters=3, batch_size=4, warmup_iters=2)


@pytest.fixture(scope="module", autouse=True)
def _weights_handler():
    register_weights_handler()


def _cfg(name: str, opts=()):
    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(get_config_file(name))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg)
    return cfg


class _RecordingCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, keeping the incompatible-keys report of its last load."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _load(model, path):
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(path)
    return checkpointer.incompatible


def _resnet(model):
    backbone = model.backbone
    return getattr(backbone, "bottom_up", backbone)


# ------------------------------------------------------------------------------ shipped file


def test_shipped_weights_are_small_float16_resnet_tensors_with_a_record():
    assert SHIPPED.is_file(), f"run tools/pretrain_backbone.py to make {SHIPPED}"
    assert SHIPPED.stat().st_size < 8 * 2**20
    checkpoint = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert checkpoint["matching_heuristics"] is True  # suffix matching, as for ImageNet weights
    state = checkpoint["model"]
    assert all(v.dtype == torch.float16 for v in state.values())
    assert {k.split(".")[0] for k in state} == {"stem", "res2", "res3", "res4", "res5"}
    assert not [k for k in state if k.endswith("num_batches_tracked")]
    assert state["stem.conv1.weight"].shape == (24, 3, 7, 7)
    assert state["res5.1.conv2.weight"].shape == (192, 192, 3, 3)

    record = json.loads(sidecar_path(SHIPPED).read_text())
    assert record["sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    for key in ("command", "commit", "machine", "wall_s", "settings", "held_out_metrics"):
        assert record[key], key
    assert record["settings"]["data_seed"] != ShapesConfig().seed  # no shapes_val leakage
    assert record["held_out_metrics"]["res5_top1"] > 0.5  # far above the 1/6 of chance
    # The configs that load it normalise inputs as pretraining did.
    for name in NEW_CONFIGS:
        cfg = _cfg(name)
        assert cfg.MODEL.WEIGHTS == SHAPES_R18_W24_PRETRAINED
        assert list(cfg.MODEL.PIXEL_MEAN) == record["input"]["pixel_mean"]
        assert list(cfg.MODEL.PIXEL_STD) == record["input"]["pixel_std"]
        assert cfg.INPUT.FORMAT == record["input"]["format"]
        assert cfg.MODEL.RESNETS.STEM_OUT_CHANNELS == record["backbone"]["stem_out_channels"]
        assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == record["backbone"]["res2_out_channels"]


def test_weights_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(PathManager.get_local_path(SHAPES_R18_W24_PRETRAINED)) == SHIPPED
    assert PathManager.isfile(SHAPES_R18_W24_PRETRAINED)
    register_weights_handler()  # idempotent
    with pytest.raises(ValueError, match="outside"):
        resolve_shipped_path("spp_triton://../modeling/pretrain.py")


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_config_loads_the_shipped_backbone_and_runs(name):
    """Every backbone tensor comes from the file (no missing key); the only unused entries are
    res5's, which a C4 model does not have; then one inference pass on a random image."""
    cfg = _cfg(name)
    model = build_model(cfg)
    incompatible = _load(model, cfg.MODEL.WEIGHTS)
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert not incompatible.incorrect_shapes
    assert incompatible.unexpected_keys and all(
        k.startswith("res5.") for k in incompatible.unexpected_keys
    )
    shipped = torch.load(SHIPPED, map_location="cpu", weights_only=True)["model"]
    loaded = _resnet(model).state_dict()
    assert set(loaded) == {k for k in shipped if not k.startswith("res5.")}
    for key, value in loaded.items():
        assert torch.equal(value, shipped[key].float()), key

    model.eval()
    image = torch.rand(3, 128, 144, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        out = model([{"image": image, "height": 128, "width": 144}])
    assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4


def test_shipped_backbone_also_loads_into_the_fpn_configs():
    """The same file under backbone.bottom_up.* (BN or FrozenBN), res5 included: nothing left."""
    for norm in ("BN", "FrozenBN"):
        cfg = _cfg(
            "Shapes/faster_rcnn_R_18_FPN_spp124.yaml",
            ["MODEL.WEIGHTS", SHAPES_R18_W24_PRETRAINED, "MODEL.RESNETS.NORM", norm],
        )
        model = build_model(cfg)
        incompatible = _load(model, cfg.MODEL.WEIGHTS)
        assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
        assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
        weight = model.backbone.bottom_up.res5[1].conv2.weight
        shipped = torch.load(SHIPPED, map_location="cpu", weights_only=True)["model"]
        assert torch.equal(weight, shipped["res5.1.conv2.weight"].float())


def test_frozen_config_freezes_the_backbone_and_the_end_to_end_one_does_not():
    frozen = build_model(_cfg("Shapes/sppnet_R_18_C4_spp1236_frozen.yaml"))
    trained = build_model(_cfg("Shapes/sppnet_R_18_C4_spp1236_pretrained.yaml"))
    for model in (frozen, trained):
        norms = [m for n, m in model.backbone.named_modules() if n.endswith("norm")]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
        assert model.backbone._out_features == ["res4"] and not hasattr(model.backbone, "res5")
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in trained.backbone.parameters())
    for model in (frozen, trained):  # the layers after the backbone train in both
        assert all(p.requires_grad for p in model.proposal_generator.parameters())
        assert all(p.requires_grad for p in model.roi_heads.parameters())


# ------------------------------------------------------------------------------ the tool


def test_pretrain_tool_end_to_end(tmp_path):
    out = tmp_path / "w" / "tiny.pth"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "tools/pretrain_backbone.py", "--output", str(out), *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "held-out" in proc.stdout
    record = json.loads(sidecar_path(out).read_text())
    assert record["command"].startswith("tools/pretrain_backbone.py --output")
    assert record["settings"]["iters"] == TINY["iters"] and record["threads"] == 1
    assert set(record["held_out_metrics"]) >= {"res5_top1", "res4_top1"}
    model = build_model(_cfg("Shapes/sppnet_R_18_C4_spp1236_frozen.yaml"))
    incompatible = _load(model, str(out))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]


def test_same_seed_same_weights(tmp_path):
    def run(name, seed):
        settings = PretrainSettings(seed=seed, **TINY)
        pretrain_backbone(tmp_path / name, settings, log=None)
        return torch.load(tmp_path / name, map_location="cpu", weights_only=True)["model"]

    before = torch.get_rng_state()
    a, b, c = run("a.pth", 0), run("b.pth", 0), run("c.pth", 1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretraining_refuses_the_detection_datasets_seed():
    with pytest.raises(ValueError, match="detection datasets' seed"):
        PretrainSettings(data_seed=ShapesConfig().seed)
