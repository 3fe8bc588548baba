"""spp_triton.modeling.roi_heads: SPPROIHeads picks the box pooler from POOLER_TYPE alone,
and trains with a mask head beside it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    one_thread,  # noqa: F401  (autouse)
    random_images,
    tiny_shapes_cfg,
)
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import (  # noqa: E402
    ROIPooler,
)
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from spp_triton.modeling import (  # noqa: E402
    SPPROIPooler,
    TritonROIPooler,
)


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
    model = build_model(tiny_shapes_cfg(pooler_type))
    assert type(model.roi_heads.box_pooler) is cls
    if cls is ROIPooler:
        assert model.roi_heads.box_pooler.level_poolers[0].__class__.__name__ in (
            "ROIAlign",
            "RoIPool",
        )
    # everything but the box head input is the same model
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    ref = build_model(tiny_shapes_cfg("ROIAlignV2"))
    assert backbone_params == sum(p.numel() for p in ref.backbone.parameters())
    model.eval()
    with torch.no_grad():
        model(random_images(1))


def test_spp_heads_train_step_with_mask_head():
    """Box head on SPP, mask head on its own ROIAlignV2 pooler: a training forward/backward."""
    torch.manual_seed(0)
    cfg = tiny_shapes_cfg(
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
    inputs = random_images(2, (96, 112))
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
        out = model(random_images(1, (96, 112)))
    assert out[0]["instances"].has("pred_masks")


# ------------------------------------------------------------------------------ validation
