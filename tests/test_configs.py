"""The shipped configs (spp_triton/configs: yacs YAML and LazyConfigs): every one builds
and runs on CPU, names and schedules, variants that differ only in the box pooler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    CONFIGS,
    YAML_CONFIGS,
    make_cfg,
    one_thread,  # noqa: F401  (autouse)
    random_images,
)
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import (  # noqa: E402
    ROIPooler,
)

from spp_triton.modeling import (  # noqa: E402
    SPPROIHeads,
    SPPROIPooler,
    TritonROIPooler,
    add_spp_config,
    validate_config,
)


@pytest.mark.parametrize("config", YAML_CONFIGS)
def test_every_yaml_config_builds_on_cpu(config):
    cfg = make_cfg(CONFIGS / config)
    validate_config(cfg)
    model = build_model(cfg)
    heads = model.roi_heads
    assert isinstance(heads, SPPROIHeads)
    pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    expected = {"SPP": SPPROIPooler, "TritonROIPool": TritonROIPooler}.get(pooler_type, ROIPooler)
    assert type(heads.box_pooler) is expected
    channels = model.backbone.output_shape()[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    if pooler_type == "SPP":
        bins = sum(n * n for n in cfg.MODEL.SPP.LEVELS)
        assert heads.box_head.fc1.in_features == channels * bins
        assert len(heads.box_pooler.scales) == len(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    else:
        r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        assert heads.box_head.fc1.in_features == channels * r * r
    if "Shapes" in config:  # small enough to run: one inference pass
        model.eval()
        with torch.no_grad():
            out = model(random_images(1, (128, 144)))
        assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4


def test_config_names_and_schedules():
    names = set(YAML_CONFIGS)
    for heads in ("roialignv2", "roipool", "spp124"):
        assert f"COCO-Detection/faster_rcnn_R_50_FPN_1x_{heads}.yaml" in names
        assert f"Shapes/faster_rcnn_R_18_FPN_{heads}.yaml" in names
    assert "COCO-Detection/sppnet_R_50_C5_1x_spp1236.yaml" in names
    assert "Shapes/sppnet_R_18_C4_spp1236.yaml" in names
    coco = make_cfg(CONFIGS / "COCO-Detection/faster_rcnn_R_50_FPN_1x_spp124.yaml")
    assert (coco.SOLVER.MAX_ITER, coco.SOLVER.IMS_PER_BATCH, coco.SOLVER.BASE_LR) == (
        90000,
        16,
        0.02,
    )
    assert tuple(coco.SOLVER.STEPS) == (60000, 80000)
    sppnet = make_cfg(CONFIGS / "COCO-Detection/sppnet_R_50_C5_1x_spp1236.yaml")
    assert list(sppnet.MODEL.SPP.LEVELS) == [1, 2, 3, 6]
    assert list(sppnet.MODEL.ROI_HEADS.IN_FEATURES) == ["res5"]
    shapes_sppnet = make_cfg(CONFIGS / "Shapes/sppnet_R_18_C4_spp1236.yaml")
    assert list(shapes_sppnet.MODEL.SPP.LEVELS) == [1, 2, 3, 6]
    assert list(shapes_sppnet.MODEL.ROI_HEADS.IN_FEATURES) == ["res4"]  # stride 16, as SPP-net
    shapes_fpn = make_cfg(CONFIGS / "Shapes/faster_rcnn_R_18_FPN_spp124.yaml")
    frozen = make_cfg(CONFIGS / "Shapes/sppnet_R_18_C4_spp1236_frozen.yaml")
    # Every Shapes head: the same backbone (and pretrained weights, except the from-scratch
    # baseline), batch, learning rate, and RoI sampling; the C4 family sees its images at 2x
    # (a 128-px image gives an 8x8 stride-16 map) and trains longer.
    for node, keys in (
        ("SOLVER", ("IMS_PER_BATCH", "BASE_LR", "WARMUP_ITERS")),
        ("MODEL", ("PIXEL_MEAN", "PIXEL_STD")),
        ("MODEL.RESNETS", ("DEPTH", "RES2_OUT_CHANNELS", "STEM_OUT_CHANNELS", "NORM")),
        ("MODEL.ROI_HEADS", ("BATCH_SIZE_PER_IMAGE", "POSITIVE_FRACTION")),
    ):
        for key in keys:
            a, b = frozen, shapes_fpn
            for part in node.split("."):
                a, b = getattr(a, part), getattr(b, part)
            assert getattr(a, key) == getattr(b, key), f"{node}.{key}"
    assert tuple(frozen.INPUT.MIN_SIZE_TRAIN) == tuple(
        2 * s for s in shapes_fpn.INPUT.MIN_SIZE_TRAIN
    )
    assert frozen.INPUT.MIN_SIZE_TEST == 2 * shapes_fpn.INPUT.MIN_SIZE_TEST
    weights = {}  # make_cfg blanks MODEL.WEIGHTS: read the files' own values
    for name in (
        "faster_rcnn_R_18_FPN_spp124",
        "sppnet_R_18_C4_spp1236_frozen",
        "sppnet_R_18_C4_spp1236",
    ):
        cfg = get_cfg()
        add_spp_config(cfg)
        cfg.merge_from_file(str(CONFIGS / "Shapes" / f"{name}.yaml"))
        weights[name] = cfg.MODEL.WEIGHTS
    pretrained = "spp_triton://Shapes/weights/shapes_R18_w24_pretrained.pth"
    assert weights["faster_rcnn_R_18_FPN_spp124"] == pretrained
    assert weights["sppnet_R_18_C4_spp1236_frozen"] == pretrained
    assert weights["sppnet_R_18_C4_spp1236"] == "" and shapes_sppnet.MODEL.RESNETS.NORM == "BN"
    assert frozen.MODEL.BACKBONE.FREEZE_AT == 4  # SPP-net's recipe: conv layers frozen
    for config in YAML_CONFIGS:  # the yaml never pins the device; setup() picks CPU if needed
        cfg = get_cfg()
        add_spp_config(cfg)
        cfg.merge_from_file(str(CONFIGS / config))
        assert cfg.MODEL.DEVICE == "cuda"


def _variant_diff(a, b):
    """Flattened key -> value pairs that differ between two yacs configs."""

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    fa, fb = flat(a), flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.mark.parametrize(
    "family,names",
    [
        (
            "COCO-Detection",
            [
                "faster_rcnn_R_50_FPN_1x_roialignv2",
                "faster_rcnn_R_50_FPN_1x_roipool",
                "faster_rcnn_R_50_FPN_1x_spp124",
            ],
        ),
        (
            "Shapes",
            [
                "faster_rcnn_R_18_FPN_roialignv2",
                "faster_rcnn_R_18_FPN_roipool",
                "faster_rcnn_R_18_FPN_spp124",
            ],
        ),
    ],
)
def test_fpn_variants_differ_only_in_box_pooler(family, names):
    cfgs = [make_cfg(CONFIGS / family / f"{n}.yaml") for n in names]
    allowed = {
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
        "MODEL.SPP.LEVELS",
        "MODEL.SPP.MODE",
        "OUTPUT_DIR",
    }
    for other in cfgs[1:]:
        assert _variant_diff(cfgs[0], other) <= allowed


def test_lazy_config_spp_fpn_builds():
    cfg = LazyConfig.load(str(CONFIGS / "LazyConfigs/faster_rcnn_R_50_FPN_spp124.py"))
    assert "mask_head" not in cfg.model.roi_heads
    assert cfg.train.init_checkpoint.endswith("R-50.pkl")
    model = instantiate(cfg.model)
    assert isinstance(model.roi_heads.box_pooler, SPPROIPooler)
    assert model.roi_heads.box_head.fc1.in_features == 256 * 21
    assert not model.roi_heads.mask_on
    # The self-contained fallback (used when the model zoo's common/ is not packaged) is the
    # same Faster R-CNN with detectron2's ROIAlignV2 pooler.
    common = LazyConfig.load(str(CONFIGS / "LazyConfigs/common/faster_rcnn_R_50_FPN_coco.py"))
    base = instantiate(common.model)
    assert isinstance(base.roi_heads.box_pooler, ROIPooler)
    assert [n for n, _ in base.backbone.named_parameters()] == [
        n for n, _ in model.backbone.named_parameters()
    ]
    model.eval()
    with torch.no_grad():
        model([{"image": torch.rand(3, 96, 96) * 255}])
