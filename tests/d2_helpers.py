"""Shared pieces of the detectron2 tests (tests/test_modeling_*.py, test_engine_*.py,
test_configs.py): the shipped configs' paths, small yacs configs, random images, parsed
``train_net`` arguments, the 8-image ``shapes_val_first8`` test set, and the one-thread fixture
(import it into a test module to use it)."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from spp_triton.modeling import add_spp_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
YAML_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
SHAPES_BASE = CONFIGS / "Shapes" / "Base-Shapes-FPN.yaml"
SPP_CFG = CONFIGS / "Shapes" / "faster_rcnn_R_18_FPN_spp124.yaml"
#: The first 8 shapes_val images, registered by :func:`register_mini_val` (fast evaluations).
MINI = "shapes_val_first8"


def register_mini_val() -> str:
    """Register :data:`MINI` (shapes_val's metadata, its first 8 records); idempotent."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import spp_triton.data  # noqa: F401  (registers shapes_*)

    if MINI not in DatasetCatalog.list():
        full = MetadataCatalog.get("shapes_val")
        DatasetCatalog.get("shapes_val")  # generate the cache
        DatasetCatalog.register(MINI, lambda: DatasetCatalog.get("shapes_val")[:8])
        meta = {k: v for k, v in full.as_dict().items() if k != "name"}
        MetadataCatalog.get(MINI).set(**meta)
    return MINI


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Autouse in every module that imports it: conftest's ``single_thread``."""
    yield


def run_in_repo(cmd, timeout: int = 400) -> subprocess.CompletedProcess:
    """``cmd`` from the checkout's root with one OpenMP thread and the checkout importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def make_cfg(config_file=None, opts=()):
    cfg = get_cfg()
    add_spp_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def tiny_model_opts(fc_dim: int = 32) -> list[str]:
    """Overrides that shrink the Shapes FPN model (narrow FPN, small heads) for fast CPU tests."""
    return [
        "MODEL.FPN.OUT_CHANNELS",
        "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        str(fc_dim),
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "32",
    ]


def tiny_shapes_cfg(pooler_type="SPP", opts=()):
    """The Shapes FPN model, shrunk (:func:`tiny_model_opts`) for fast CPU tests."""
    return make_cfg(
        SHAPES_BASE, ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", pooler_type, *tiny_model_opts(), *opts]
    )


def random_images(n=2, size=(96, 112), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, *size, generator=g) * 255, "height": size[0], "width": size[1]}
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------ configs


def setup_args(config_file="", opts=(), eval_only=False):
    return argparse.Namespace(
        config_file=str(config_file),
        opts=list(opts),
        eval_only=eval_only,
        resume=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )
