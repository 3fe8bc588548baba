"""Shapes, box pooler: spatial pyramid {1, 2, 4} with spp_triton, as a LazyConfig.

The twin of the yacs ``configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml`` (over
``Base-Shapes-FPN.yaml``): the same model (3/8-width basic-block R-18 with a 48-channel FPN,
``SPPROIHeads`` whose box pooler is an :class:`spp_triton.modeling.SPPROIPooler` with levels
[1, 2, 4]: 48 * 21 = 1008 values per RoI into two 256-wide fc layers), the same data
(``shapes_train`` / ``shapes_val``, 112-128 px training sizes), optimizer (SGD 0.02 with
per-parameter gradient-norm clipping at 5), schedule (350 iterations of 8 images, decays at 280
and 330, 30 warm-up iterations), the project's pretrained backbone with frozen BN statistics,
and COCO evaluation at the end of training.

    spp-triton-train --config-file configs/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124.py
    spp-triton-train --config-file configs/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124.py \\
        train.max_iter=200 dataloader.train.total_batch_size=4 model.backbone.out_channels=32

As in detectron2's LazyConfigs, ``lr_multiplier`` spans the whole run: with another
``train.max_iter`` the decays and the warm-up stay at the same fractions of it. The FPN width
(``model.backbone.out_channels``) feeds the RPN head and the box head by interpolation, and the
box predictor follows the last of ``model.roi_heads.box_head.fc_dims``. ``train.device`` is
"cuda"; spp-triton-train uses the CPU when CUDA is absent.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from spp_triton.engine import ClippedSGD
from spp_triton.modeling import (
    SPPROIHeads,
    SPPROIPooler,
    basic_resnet_stages,
    spp_pooled_shape,
)

MAX_ITER = 350

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=24, norm="FrozenBN"),
            # 3/8-width R-18: stages 24-48-96-192 (spp_triton.modeling.backbone)
            stages=L(basic_resnet_stages)(
                depth=18, in_channels=24, out_channels=24, norm="FrozenBN"
            ),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,  # trained from scratch: nothing to freeze
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=48,
        norm="",
        top_block=L(LastLevelMaxPool)(),
        fuse_type="sum",
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels="${...backbone.out_channels}", num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[16], [32], [64], [128], [256]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=128,
        positive_fraction=0.5,
        pre_nms_topk=[300, 300],  # (train, test), per level
        post_nms_topk=[200, 150],
        nms_thresh=0.7,
    ),
    roi_heads=L(SPPROIHeads)(
        num_classes=6,  # spp_triton.data.NUM_SHAPES_CLASSES
        batch_size_per_image=64,
        positive_fraction=0.5,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        box_in_features=["p2", "p3", "p4", "p5"],
        # The spatial pyramid of each RoI on its FPN level, all levels in one spp_triton call.
        box_pooler=L(SPPROIPooler)(
            levels=[1, 2, 4],
            scales=[1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32],
            mode="max",
            canonical_box_size=224,
            canonical_level=4,
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=L(spp_pooled_shape)(
                channels="${....backbone.out_channels}", levels="${...box_pooler.levels}"
            ),
            conv_dims=[],  # the pyramid is a flat vector: fc layers only
            fc_dims=[256, 256],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels="${...box_head.fc_dims[1]}"),
            box2box_transform=L(Box2BoxTransform)(weights=[10.0, 10.0, 5.0, 5.0]),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_topk_per_image=50,
            loss_weight={"loss_box_reg": 1.0},
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[57.375, 57.120, 58.395],  # unit-variance inputs: training from scratch
    input_format="BGR",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=[112, 128], max_size=192, sample_style="choice"
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=8,
    num_workers=0,  # small PNGs load in ~1 ms; a worker would only contend for the cores
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192, sample_style="choice")
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=["bbox"],
    output_dir="${train.output_dir}/inference",
)

optimizer = L(ClippedSGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
    # guard: clip each parameter's gradient norm
    clip_type="norm",
    clip_value=5.0,
)

# 350 iterations: x0.1 at 280 and 330, linear warm-up over the first 30 from 0.001.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[280, 330], num_updates=MAX_ITER
    ),
    warmup_length=30 / MAX_ITER,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = dict(
    output_dir="./output/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124",
    # tools/pretrain_backbone.py's weights, as the yaml configs (spp_triton:// = in the package)
    init_checkpoint="spp_triton://Shapes/weights/shapes_R18_w24_pretrained.pth",
    max_iter=MAX_ITER,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=100, max_to_keep=100),
    eval_period=0,  # evaluate once, at the end of training
    log_period=20,
    device="cuda",
    seed=42,
)
