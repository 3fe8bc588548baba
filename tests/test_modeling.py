"""spp_triton.modeling: configs, poolers, SPPROIHeads, config validation (CPU, no training)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import (  # noqa: E402
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import spp_triton  # noqa: E402
from spp_triton.modeling import (  # noqa: E402
    FiniteCheckpointer,
    SPPROIHeads,
    SPPROIPooler,
    Trainer,
    TritonROIPooler,
    add_spp_config,
    fast_coco_eval_available,
    resolve_device,
    setup,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
YAML_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
SHAPES_BASE = CONFIGS / "Shapes" / "Base-Shapes-FPN.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the test machine's 2 cores are shared, and OpenMP's 2-thread barriers
    under contention are many times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(config_file=None, opts=()):
    cfg = get_cfg()
    add_spp_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _tiny_shapes_cfg(pooler_type="SPP", opts=()):
    """The Shapes FPN model, shrunk (narrow FPN, small heads) for fast CPU tests."""
    return _cfg(
        SHAPES_BASE,
        [
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
            pooler_type,
            "MODEL.FPN.OUT_CHANNELS",
            "16",
            "MODEL.ROI_BOX_HEAD.FC_DIM",
            "32",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "32",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            *opts,
        ],
    )


def _random_images(n=2, size=(96, 112), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, *size, generator=g) * 255, "height": size[0], "width": size[1]}
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("config", YAML_CONFIGS)
def test_every_yaml_config_builds_on_cpu(config):
    cfg = _cfg(CONFIGS / config)
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
            out = model(_random_images(1, (128, 144)))
        assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4


def test_config_names_and_schedules():
    names = set(YAML_CONFIGS)
    for heads in ("roialignv2", "roipool", "spp124"):
        assert f"COCO-Detection/faster_rcnn_R_50_FPN_1x_{heads}.yaml" in names
        assert f"Shapes/faster_rcnn_R_18_FPN_{heads}.yaml" in names
    assert "COCO-Detection/sppnet_R_50_C5_1x_spp1236.yaml" in names
    assert "Shapes/sppnet_R_18_C4_spp1236.yaml" in names
    coco = _cfg(CONFIGS / "COCO-Detection/faster_rcnn_R_50_FPN_1x_spp124.yaml")
    assert (coco.SOLVER.MAX_ITER, coco.SOLVER.IMS_PER_BATCH, coco.SOLVER.BASE_LR) == (
        90000,
        16,
        0.02,
    )
    assert tuple(coco.SOLVER.STEPS) == (60000, 80000)
    sppnet = _cfg(CONFIGS / "COCO-Detection/sppnet_R_50_C5_1x_spp1236.yaml")
    assert list(sppnet.MODEL.SPP.LEVELS) == [1, 2, 3, 6]
    assert list(sppnet.MODEL.ROI_HEADS.IN_FEATURES) == ["res5"]
    shapes_sppnet = _cfg(CONFIGS / "Shapes/sppnet_R_18_C4_spp1236.yaml")
    assert list(shapes_sppnet.MODEL.SPP.LEVELS) == [1, 2, 3, 6]
    assert list(shapes_sppnet.MODEL.ROI_HEADS.IN_FEATURES) == ["res4"]  # stride 16, as SPP-net
    shapes_fpn = _cfg(CONFIGS / "Shapes/faster_rcnn_R_18_FPN_spp124.yaml")
    # the same schedule, images, backbone width and RoI sampling for all four heads
    for node, keys in (
        ("SOLVER", ("MAX_ITER", "STEPS", "WARMUP_ITERS", "IMS_PER_BATCH", "BASE_LR")),
        ("INPUT", ("MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN", "MIN_SIZE_TEST", "MAX_SIZE_TEST")),
        ("MODEL.RESNETS", ("DEPTH", "RES2_OUT_CHANNELS", "STEM_OUT_CHANNELS")),
        ("MODEL.ROI_HEADS", ("BATCH_SIZE_PER_IMAGE", "POSITIVE_FRACTION")),
    ):
        for key in keys:
            a, b = shapes_sppnet, shapes_fpn
            for part in node.split("."):
                a, b = getattr(a, part), getattr(b, part)
            assert getattr(a, key) == getattr(b, key), f"{node}.{key}"
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
    cfgs = [_cfg(CONFIGS / family / f"{n}.yaml") for n in names]
    allowed = {
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
        "MODEL.SPP.LEVELS",
        "MODEL.SPP.MODE",
        "OUTPUT_DIR",
    }
    for other in cfgs[1:]:
        assert _variant_diff(cfgs[0], other) <= allowed


@pytest.mark.parametrize(
    "pooler_type,cls",
    [
        ("ROIAlignV2", ROIPooler),
        ("ROIAlign", ROIPooler),
        ("ROIPool", ROIPooler),
        ("SPP", SPPROIPooler),
        ("TritonROIPool", TritonROIPooler),
    ],
)
def test_pooler_type_alone_swaps_the_pooler(pooler_type, cls):
    torch.manual_seed(0)
    model = build_model(_tiny_shapes_cfg(pooler_type))
    assert type(model.roi_heads.box_pooler) is cls
    if cls is ROIPooler:
        assert model.roi_heads.box_pooler.level_poolers[0].__class__.__name__ in (
            "ROIAlign",
            "RoIPool",
        )
    # everything but the box head input is the same model
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    ref = build_model(_tiny_shapes_cfg("ROIAlignV2"))
    assert backbone_params == sum(p.numel() for p in ref.backbone.parameters())
    model.eval()
    with torch.no_grad():
        model(_random_images(1))


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


# ------------------------------------------------------------------------------ poolers


def _random_boxes(n_boxes, image_size, g, min_side=2.0):
    h, w = image_size
    cx = torch.rand(n_boxes, generator=g) * w
    cy = torch.rand(n_boxes, generator=g) * h
    # log-uniform sides from ~2 px to ~2x the image: every FPN level gets boxes
    bw = torch.exp(torch.rand(n_boxes, generator=g) * math.log(2 * w / min_side)) * min_side
    bh = bw * torch.exp(torch.rand(n_boxes, generator=g) - 0.5)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return Boxes(boxes)


def _pyramid(g, n=2, c=6, image=(512, 640), strides=(4, 8, 16, 32), dtype=torch.float32):
    feats = [
        torch.randn(
            n, c, math.ceil(image[0] / s), math.ceil(image[1] / s), generator=g, dtype=dtype
        )
        for s in strides
    ]
    return feats, tuple(1.0 / s for s in strides)


def _grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def _reference_spp(features, box_lists, scales, levels, mode):
    """detectron2's level assignment + spp_triton.roi_spp_pool on each level separately."""
    min_level = int(round(-math.log2(scales[0])))
    max_level = int(round(-math.log2(scales[-1])))
    rois = convert_boxes_to_pooler_format(box_lists)
    if len(features) > 1:
        assignment = assign_boxes_to_levels(box_lists, min_level, max_level, 224, 4)
    else:
        assignment = torch.zeros(len(rois), dtype=torch.int64)
    c = features[0].shape[1]
    out = features[0].new_zeros(len(rois), c * sum(n * n for n in levels))
    for level, (f, s) in enumerate(zip(features, scales, strict=True)):
        idx = (assignment == level).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = spp_triton.roi_spp_pool(f, rois[idx], levels, spatial_scale=s, mode=mode)
    return out, assignment


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("levels", [[1, 2, 4], [1, 2, 3, 6]])
def test_spp_pooler_equals_per_level_reference(mode, levels):
    g = torch.Generator().manual_seed(1)
    feats, scales = _pyramid(g)
    box_lists = [_random_boxes(57, (512, 640), g), _random_boxes(40, (512, 640), g)]
    pooler = SPPROIPooler(levels=levels, scales=scales, mode=mode)
    out = pooler(feats, box_lists)
    ref, assignment = _reference_spp(feats, box_lists, scales, levels, mode)
    assert set(assignment.tolist()) == {0, 1, 2, 3}, "test boxes should hit every level"
    assert out.shape == (97, 6 * sum(n * n for n in levels))
    if mode == "max":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, ref)
    assert pooler.output_shape(6) == ShapeSpec(
        channels=6 * pooler.bins_per_channel, height=1, width=1
    )


def test_spp_pooler_gradients_equal_reference():
    g = torch.Generator().manual_seed(2)
    feats, scales = _pyramid(g, c=4)
    box_lists = [_random_boxes(30, (512, 640), g), _random_boxes(25, (512, 640), g)]
    w = torch.randn(55, 4 * 21, generator=g)
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    (SPPROIPooler([1, 2, 4], scales, mode="avg")(a, box_lists) * w).sum().backward()
    (_reference_spp(b, box_lists, scales, [1, 2, 4], "avg")[0] * w).sum().backward()
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(_grad(fa), _grad(fb))


def test_spp_pooler_equals_detectron2_roipool_pyramid_with_gradients():
    """Independent of spp_triton's own ops: max SPP = concatenated detectron2 ROIPool("ROIPool",
    torchvision) at n x n for each level, values and input gradients."""
    g = torch.Generator().manual_seed(7)
    feats, scales = _pyramid(g, c=4)
    box_lists = [_random_boxes(40, (512, 640), g), _random_boxes(30, (512, 640), g)]
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    ours = SPPROIPooler([1, 2, 4], scales)(a, box_lists)
    theirs = torch.cat(
        [ROIPooler(n, scales, 0, "ROIPool")(b, box_lists).flatten(1) for n in (1, 2, 4)], dim=1
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    w = torch.randn(ours.shape, generator=g)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(_grad(fa), _grad(fb), rtol=1e-5, atol=1e-5)


def test_spp_pooler_single_feature_map():
    g = torch.Generator().manual_seed(3)
    feats, scales = _pyramid(g, strides=(16,))
    box_lists = [_random_boxes(20, (512, 640), g), _random_boxes(0, (512, 640), g)]
    pooler = SPPROIPooler([1, 2, 3, 6], scales)
    ref, _ = _reference_spp(feats, box_lists, scales, [1, 2, 3, 6], "max")
    torch.testing.assert_close(pooler(feats, box_lists), ref, rtol=0, atol=0)


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (32,)])
def test_triton_roi_pooler_equals_detectron2_roipool(strides):
    g = torch.Generator().manual_seed(4)
    feats, scales = _pyramid(g, strides=strides)
    box_lists = [_random_boxes(33, (512, 640), g), _random_boxes(21, (512, 640), g)]
    ours = TritonROIPooler(7, scales)(feats, box_lists)
    theirs = ROIPooler(7, scales, sampling_ratio=0, pooler_type="ROIPool")(feats, box_lists)
    assert ours.shape == theirs.shape == (54, 6, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_poolers_make_exactly_one_kernel_call(monkeypatch):
    calls = []
    real = spp_triton.multilevel_roi_spp_pool

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("per-level pooling call")

    monkeypatch.setattr(spp_triton, "multilevel_roi_spp_pool", spy)
    monkeypatch.setattr(spp_triton, "roi_spp_pool", forbidden)
    monkeypatch.setattr(spp_triton, "roi_pool", forbidden)
    g = torch.Generator().manual_seed(5)
    feats, scales = _pyramid(g)
    box_lists = [_random_boxes(40, (512, 640), g), _random_boxes(40, (512, 640), g)]
    SPPROIPooler([1, 2, 4], scales)(feats, box_lists)
    TritonROIPooler(7, scales)(feats, box_lists)
    assert calls == [4, 4]


def test_poolers_empty_boxes():
    g = torch.Generator().manual_seed(6)
    feats, scales = _pyramid(g, n=2, c=5)
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    assert SPPROIPooler([1, 2, 4], scales)(feats, empty).shape == (0, 5 * 21)
    assert TritonROIPooler(7, scales)(feats, empty).shape == (0, 5, 7, 7)
    feats0, _ = _pyramid(g, n=0, c=5)
    assert SPPROIPooler([1, 2], scales)(feats0, []).shape == (0, 25)
    with pytest.raises(ValueError, match="box_lists"):
        SPPROIPooler([1], scales)(feats, empty[:1])


def test_pooler_constructor_checks():
    with pytest.raises(ValueError, match="powers of 2"):
        SPPROIPooler([1], scales=(1 / 3,))
    with pytest.raises(ValueError, match="pyramid"):
        SPPROIPooler([1], scales=(1 / 4, 1 / 16))
    with pytest.raises(ValueError, match="level"):
        SPPROIPooler([0, 2], scales=(1 / 4,))
    with pytest.raises(ValueError, match="mode"):
        SPPROIPooler([1], scales=(1 / 4,), mode="min")
    p = SPPROIPooler([1, (2, 3)], scales=(1 / 4,))
    assert p.levels == ((1, 1), (2, 3)) and p.bins_per_channel == 7


# ------------------------------------------------------------------------------ heads


def test_spp_heads_train_step_with_mask_head():
    """Box head on SPP, mask head on its own ROIAlignV2 pooler: a training forward/backward."""
    torch.manual_seed(0)
    cfg = _tiny_shapes_cfg(
        "SPP",
        [
            "MODEL.MASK_ON",
            "True",
            "MODEL.ROI_MASK_HEAD.NUM_CONV",
            "1",
            "MODEL.ROI_MASK_HEAD.CONV_DIM",
            "8",
        ],
    )
    model = build_model(cfg)
    assert isinstance(model.roi_heads.box_pooler, SPPROIPooler)
    assert isinstance(model.roi_heads.mask_pooler, ROIPooler)
    inputs = _random_images(2, (96, 112))
    for x in inputs:
        inst = Instances((96, 112))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 100.0, 90.0]]))
        inst.gt_classes = torch.tensor([1, 4])
        masks = torch.zeros(2, 96, 112, dtype=torch.bool)
        masks[0, 12:60, 10:50] = True
        masks[1, 30:90, 40:100] = True
        inst.gt_masks = BitMasks(masks)
        x["instances"] = inst
    model.train()
    with EventStorage(0):
        losses = model(inputs)
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= losses.keys()
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_head.fc1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(_random_images(1, (96, 112)))
    assert out[0]["instances"].has("pred_masks")


# ------------------------------------------------------------------------------ validation


def _args(config_file="", opts=(), eval_only=False):
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


SPP_CFG = CONFIGS / "Shapes" / "faster_rcnn_R_18_FPN_spp124.yaml"


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
        setup(_args(SPP_CFG, [*opts, "OUTPUT_DIR", str(out)]))
    assert not out.exists(), "setup must fail before writing anything"


def test_valid_non_spp_settings_pass():
    for pooler in ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated"):
        validate_config(
            _cfg(
                SPP_CFG,
                ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", pooler, "MODEL.ROI_BOX_HEAD.NUM_CONV", "2"],
            )
        )
    validate_config(_cfg(SPP_CFG, ["MODEL.SPP.MODE", "avg", "MODEL.SPP.LEVELS", "[6, 3, 1]"]))
    validate_config(
        _cfg(
            SPP_CFG,
            ["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "TritonROIPool", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2"],
        )
    )


def test_spp_levels_accept_pairs_as_the_python_api_does():
    """MODEL.SPP.LEVELS takes (bins_h, bins_w) pairs beside ints, from a file or the command
    line, and the box head is sized for sum(bins_h * bins_w)."""
    levels = "[1, [2, 3], [4, 1]]"
    cfg = _cfg(SPP_CFG, ["MODEL.SPP.LEVELS", levels])
    validate_config(cfg)
    model = build_model(cfg)
    channels = model.backbone.output_shape()["p2"].channels
    assert model.roi_heads.box_head.fc1.in_features == channels * (1 + 6 + 4)
    assert model.roi_heads.box_pooler.levels == ((1, 1), (2, 3), (4, 1))
    model.eval()
    with torch.no_grad():
        out = model(_random_images(1, (128, 144)))
    assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4


def test_build_model_names_the_key_for_spp_without_spp_heads():
    """A config asking for the SPP pooler with detectron2's StandardROIHeads: building the model
    (spp_triton's build_model, the Trainer's) names the keys, not "Unknown pooler type: SPP"."""
    from spp_triton.modeling import Trainer
    from spp_triton.modeling import build_model as spp_build_model

    cfg = _cfg(SPP_CFG, ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    for build in (spp_build_model, Trainer.build_model):
        with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NAME.*SPPROIHeads"):
            build(cfg)


def test_missing_config_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        setup(_args(missing))


def test_unknown_key_and_lazy_config_in_setup(tmp_path):
    with pytest.raises(ValueError, match="MODEL.SPP.LEVEL"):
        setup(_args(SPP_CFG, ["MODEL.SPP.LEVEL", "[1]"]))
    with pytest.raises(ValueError, match="LazyConfig"):
        setup(_args(CONFIGS / "LazyConfigs/faster_rcnn_R_50_FPN_spp124.py"))


def test_device_falls_back_to_cpu_without_cuda():
    cfg = _cfg(SPP_CFG)
    cfg.MODEL.DEVICE = "cuda"
    note = resolve_device(cfg)
    if torch.cuda.is_available():
        assert note is None and cfg.MODEL.DEVICE == "cuda"
    else:
        assert cfg.MODEL.DEVICE == "cpu" and "cpu" in note


def test_evaluator_uses_slow_coco_eval_without_compiled_detectron2(tmp_path):
    from detectron2 import _C

    cfg = _cfg(SPP_CFG, ["OUTPUT_DIR", str(tmp_path)])
    evaluator = Trainer.build_evaluator(cfg, "shapes_val")
    assert evaluator._use_fast_impl == fast_coco_eval_available()
    if isinstance(getattr(_C, "_MISSING", None), str):  # spp_triton's placeholder _C
        assert fast_coco_eval_available() is False


def test_finite_checkpointer_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = FiniteCheckpointer(model, str(tmp_path))
    ckpt.save("model_good")
    assert (tmp_path / "model_good.pth").is_file()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ckpt.save("model_bad")
    assert not (tmp_path / "model_bad.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_good.pth"


# --------------------------------------------------------------------------- basic ResNets
def _resnet_cfg(width, depth=18, out_features=("res2", "res3", "res4", "res5")):
    cfg = _cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_resnet_at_width_64_is_detectron2s(depth):
    from detectron2.modeling.backbone import build_resnet_backbone

    from spp_triton.modeling import build_basic_resnet_backbone

    cfg = _resnet_cfg(64, depth)
    ours = build_basic_resnet_backbone(cfg, ShapeSpec(channels=3))
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_basic_resnet_fpn_any_width_shapes():
    from spp_triton.modeling import build_basic_resnet_fpn_backbone

    cfg = _resnet_cfg(24)
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 40
    fpn = build_basic_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    widths = {k: s.channels for k, s in fpn.bottom_up.output_shape().items()}
    assert widths == {"res2": 24, "res3": 48, "res4": 96, "res5": 192}
    out = fpn(torch.randn(2, 3, 128, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        # p6 is a stride-2 subsample of p5 (kernel 1), so its size rounds up
        f"p{i}": (2, 40, -(-128 // (1 << i)), -(-96 // (1 << i)))
        for i in range(2, 7)
    }
    # a single-map backbone stops at the last requested stage
    c4 = spp_triton.modeling.build_basic_resnet_backbone(
        _resnet_cfg(16, out_features=("res4",)), ShapeSpec(channels=3)
    )
    assert not hasattr(c4, "res5")
    assert {k: (s.channels, s.stride) for k, s in c4.output_shape().items()} == {"res4": (64, 16)}


@pytest.mark.parametrize(
    "key,value,name",
    [
        ("DEPTH", 50, "MODEL.RESNETS.DEPTH"),
        ("RES2_OUT_CHANNELS", 0, "MODEL.RESNETS.RES2_OUT_CHANNELS"),
        ("RES5_DILATION", 2, "MODEL.RESNETS.RES5_DILATION"),
        ("NUM_GROUPS", 32, "MODEL.RESNETS.NUM_GROUPS"),
    ],
)
def test_basic_resnet_bad_config_names_the_key(key, value, name):
    cfg = _resnet_cfg(32)
    setattr(cfg.MODEL.RESNETS, key, value)
    with pytest.raises(ValueError, match=re.escape(name)):
        spp_triton.modeling.build_basic_resnet_backbone(cfg, ShapeSpec(channels=3))
