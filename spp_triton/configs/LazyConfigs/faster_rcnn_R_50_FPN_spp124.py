"""R-50 FPN Faster R-CNN with spp_triton's {1, 2, 4} pyramid box pooler, as a LazyConfig.

The box pooler is swapped directly: ``model.roi_heads.box_pooler`` is an
:class:`spp_triton.modeling.SPPROIPooler` (all FPN levels in one spp_triton call) and the box
head takes its flat ``256 * 21`` vector; everything else is detectron2's Faster R-CNN R-50 FPN 1x
on COCO. Model, data, optimizer and schedule come from detectron2's model-zoo ``common/`` lazy
configs when the installed detectron2 packages them, else from the self-contained
``common/faster_rcnn_R_50_FPN_coco.py`` next to this file.

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/LazyConfigs/faster_rcnn_R_50_FPN_spp124.py")
    model = instantiate(cfg.model)

Train it with ``spp-triton-train --config-file configs/LazyConfigs/faster_rcnn_R_50_FPN_spp124.py``
(``tools/train_net.py``; detectron2's lazyconfig_train_net conventions, ``key=value`` overrides).
"""

import os

import detectron2
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

from spp_triton.modeling import SPPROIPooler

SPP_LEVELS = [1, 2, 4]
FPN_CHANNELS = 256

_ZOO_CONFIGS = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")
_ZOO_COMMON = [
    "models/mask_rcnn_fpn.py",
    "data/coco.py",
    "optim.py",
    "coco_schedule.py",
    "train.py",
]


def _zoo_common_available():
    return all(os.path.isfile(os.path.join(_ZOO_CONFIGS, "common", p)) for p in _ZOO_COMMON)


def get_config(path):
    """detectron2's ``model_zoo.get_config``; detectron2 v0.6's model_zoo imports
    ``pkg_resources``, which recent setuptools no longer ship: then load the file directly."""
    try:
        from detectron2.model_zoo import get_config as zoo_get_config
    except ImportError:
        return LazyConfig.load(os.path.join(_ZOO_CONFIGS, path))
    return zoo_get_config(path)


if _zoo_common_available():
    model = get_config("common/models/mask_rcnn_fpn.py").model
    dataloader = get_config("common/data/coco.py").dataloader
    optimizer = get_config("common/optim.py").SGD
    lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
    train = get_config("common/train.py").train
    train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    train.max_iter = 90000
    # Faster R-CNN: drop the mask branch of the zoo's Mask R-CNN.
    for key in ("mask_in_features", "mask_pooler", "mask_head"):
        model.roi_heads.pop(key, None)
    dataloader.train.mapper.use_instance_mask = False
else:
    from .common.faster_rcnn_R_50_FPN_coco import (  # noqa: F401
        dataloader,
        lr_multiplier,
        model,
        optimizer,
        train,
    )

# The swap: spatial pyramid pooling of each RoI on its FPN level, all levels in one call.
model.roi_heads.box_pooler = L(SPPROIPooler)(
    levels=SPP_LEVELS,
    scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
    mode="max",
    canonical_box_size=224,
    canonical_level=4,
)
model.roi_heads.box_head.input_shape = ShapeSpec(
    channels=FPN_CHANNELS * sum(n * n for n in SPP_LEVELS), height=1, width=1
)
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [1024, 1024]
train.output_dir = "./output/LazyConfigs/faster_rcnn_R_50_FPN_spp124"
