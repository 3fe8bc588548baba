"""spp_triton.modeling.config: validate_config, build_model (a bad config names its key)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    REPO,
    SPP_CFG,
    make_cfg,
    one_thread,  # noqa: F401  (autouse)
    random_images,
)
from detectron2.modeling import build_model  # noqa: E402

from spp_triton.engine import (  # noqa: E402
    Trainer,
)
from spp_triton.modeling import (  # noqa: E402
    validate_config,
)


def test_valid_non_spp_settings_pass():
    for pooler in ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated"):
        validate_config(
            make_cfg(
                SPP_CFG,
                ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", pooler, "MODEL.ROI_BOX_HEAD.NUM_CONV", "2"],
            )
        )
    validate_config(make_cfg(SPP_CFG, ["MODEL.SPP.MODE", "avg", "MODEL.SPP.LEVELS", "[6, 3, 1]"]))
    validate_config(
        make_cfg(
            SPP_CFG,
            ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "TritonROIPool", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2"],
        )
    )


def test_spp_levels_accept_pairs_as_the_python_api_does():
    """MODEL.SPP.LEVELS takes (bins_h, bins_w) pairs beside ints, from a file or the command
    line, and the box head is sized for sum(bins_h * bins_w)."""
    levels = "[1, [2, 3], [4, 1]]"
    cfg = make_cfg(SPP_CFG, ["MODEL.SPP.LEVELS", levels])
    validate_config(cfg)
    model = build_model(cfg)
    channels = model.backbone.output_shape()["p2"].channels
    assert model.roi_heads.box_head.fc1.in_features == channels * (1 + 6 + 4)
    assert model.roi_heads.box_pooler.levels == ((1, 1), (2, 3), (4, 1))
    model.eval()
    with torch.no_grad():
        out = model(random_images(1, (128, 144)))
    assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4


def test_build_model_names_the_key_for_spp_without_spp_heads():
    """A config asking for the SPP pooler with detectron2's StandardROIHeads: building the model
    (spp_triton's build_model, the Trainer's) names the keys, not "Unknown pooler type: SPP"."""
    from spp_triton.modeling import build_model as spp_build_model

    cfg = make_cfg(SPP_CFG, ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    for build in (spp_build_model, Trainer.build_model):
        with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NAME.*SPPROIHeads"):
            build(cfg)


def test_modeling_imports_only_model_parts():
    """``import spp_triton.modeling`` registers the model parts and nothing else: no engine, no
    datasets; config.py does not import roi_heads (roi_heads imports config, one way)."""
    import ast
    import subprocess
    import sys

    code = (
        "import sys, spp_triton.modeling\n"
        "bad = [m for m in ('spp_triton.engine', 'spp_triton.data') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = (REPO / "spp_triton" / "modeling" / "config.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {m for m in imported if m.startswith("spp_triton.modeling")}, imported


def test_build_model_validates_once(monkeypatch):
    """A plain config is validated by build_model, once (SPPROIHeads does not check it again)."""
    import spp_triton.modeling.config as config

    calls = []
    real = config.validate_config
    monkeypatch.setattr(config, "validate_config", lambda cfg: calls.append(1) or real(cfg))
    config.build_model(make_cfg(SPP_CFG))
    assert len(calls) == 1
