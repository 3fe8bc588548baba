"""spp_triton.engine.defaults: setup() fails before writing anything, naming the key;
CPU fallback of MODEL.DEVICE."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    CONFIGS,
    SPP_CFG,
    make_cfg,
    one_thread,  # noqa: F401  (autouse)
    setup_args,
)

from spp_triton.engine import Trainer, resolve_device, setup  # noqa: E402
from spp_triton.modeling import SPPROIPooler  # noqa: E402


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.SPP.LEVELS", "[]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[1, 0, 4]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[1, -2]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[1, 2.5]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[1, True]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[[1, 2, 3]]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[[0, 2]]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.LEVELS", "[[1, 2.0], 3]"], "MODEL.SPP.LEVELS"),
        (["MODEL.SPP.MODE", "min"], "MODEL.SPP.MODE"),
        (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "RoIAlign"], "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
        (["MODEL.ROI_BOX_HEAD.NUM_CONV", "2"], "MODEL.ROI_BOX_HEAD.NUM_CONV"),
        (["MODEL.ROI_BOX_HEAD.NUM_FC", "0"], "MODEL.ROI_BOX_HEAD.NUM_FC"),
        (["MODEL.ROI_HEADS.NAME", "StandardROIHeads"], "MODEL.ROI_HEADS.NAME"),
        (["DATASETS.TRAIN", "('no_such_dataset',)"], "DATASETS.TRAIN"),
        (["DATASETS.TEST", "('shapes_val', 'nope_val')"], "DATASETS.TEST"),
    ],
)
def test_bad_config_values_fail_in_setup_naming_the_key(tmp_path, opts, key):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(key)):
        setup(setup_args(SPP_CFG, [*opts, "OUTPUT_DIR", str(out)]))
    assert not out.exists(), "setup must fail before writing anything"


def test_missing_config_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        setup(setup_args(missing))


def test_unknown_key_and_lazy_config_in_setup(tmp_path):
    with pytest.raises(ValueError, match="MODEL.SPP.LEVEL"):
        setup(setup_args(SPP_CFG, ["MODEL.SPP.LEVEL", "[1]"]))
    with pytest.raises(ValueError, match="LazyConfig"):
        setup(setup_args(CONFIGS / "LazyConfigs/faster_rcnn_R_50_FPN_spp124.py"))


def test_device_falls_back_to_cpu_without_cuda():
    cfg = make_cfg(SPP_CFG)
    cfg.MODEL.DEVICE = "cuda"
    note = resolve_device(cfg)
    if torch.cuda.is_available():
        assert note is None and cfg.MODEL.DEVICE == "cuda"
    else:
        assert cfg.MODEL.DEVICE == "cpu" and "cpu" in note


def test_setup_validates_once_for_the_trainers_model(tmp_path, monkeypatch):
    """setup() validates the config; Trainer.build_model on the config setup() made does not
    check it again (the model is still built), and on any other config it does."""
    import spp_triton.engine.defaults as defaults
    import spp_triton.modeling.config as config

    calls = []
    real = config.validate_config

    def counted(cfg):
        calls.append(1)
        return real(cfg)

    monkeypatch.setattr(config, "validate_config", counted)
    monkeypatch.setattr(defaults, "validate_config", counted)
    cfg = setup(setup_args(SPP_CFG, ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", ""]))
    assert len(calls) == 1
    assert isinstance(Trainer.build_model(cfg).roi_heads.box_pooler, SPPROIPooler)
    assert len(calls) == 1
    Trainer.build_model(make_cfg(SPP_CFG))
    assert len(calls) == 2
