"""Pretrain the Shapes configs' backbone on a classification task drawn from the shapes generator.

detectron2 starts its detectors from ImageNet weights. The Shapes configs use a 3/8-width R-18
(``build_basic_resnet_backbone``: stem 24, stages 24-48-96-192) that has no ImageNet weights, and
SPP-net's own recipe (conv layers pretrained and frozen, only the layers after SPP trained) needs
some. This module makes them, on one CPU core in a few minutes.

The task: "ImageNet of shapes"
    Single-label classification of the six shape classes: each sample is one object of an image
    drawn by :func:`spp_triton.data.shapes.render_image` (the detection data's own renderer, the
    default :class:`~spp_triton.data.shapes.ShapesConfig` apart from the seed), cut out in a square
    window 1.2-2x its longer box side (log-uniform), moved by up to 15% of the window, resized to
    64 x 64 and randomly flipped (the classes are rotation invariant). As in ImageNet the object is
    centred and large; other objects and clutter around it stay in the picture. Multi-label
    "which classes are in this crop" on random crops was tried first: it stayed at chance for
    600 iterations (the signal of a class among 3-6 shapes and clutter is too weak from scratch).

No leakage into shapes_val
    The images come from ``ShapesConfig(seed=data_seed)`` (default 1): split ``train`` for
    training and split ``val`` for the held-out metrics. The detection datasets are seed 0, and
    every image's random stream is seeded from (seed, split, index), so no pretraining image is a
    detection image. ``data_seed`` equal to the detection seed is refused.

The network
    The ResNet that the config's backbone builder makes (``MODEL.RESNETS``: depth, widths), with
    trainable BN, and two linear classifiers: one on the global average of res5 (the
    classification head, as ImageNet pretraining has) and an auxiliary one on the global average
    of res4, the stride-16 map that the C4 configs pool. The auxiliary loss makes res4 features
    linearly separable by class, which is what a frozen-backbone detector (SPP-net's recipe) needs
    from them. Inputs are normalised exactly as the detector normalises them (``INPUT.FORMAT``
    channel order, ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` of the config). AdamW, linear warmup
    and cosine decay (SGD at 0.03-0.1 stalled at chance for hundreds of iterations).

The output
    A detectron2 checkpoint ``{"model": state_dict, "__author__": ..., "matching_heuristics":
    True}`` holding the ResNet's weights and BN statistics only (no classifiers, no
    ``num_batches_tracked``), in float16, under the ResNet's own names (``stem.conv1.weight``,
    ``res2.0.conv1.norm.running_mean``, ...). ``matching_heuristics`` makes detectron2's
    ``DetectionCheckpointer`` match them by name suffix, as it loads its ImageNet weights, so the
    one file loads into ``backbone.bottom_up.*`` (FPN configs) and ``backbone.*`` (C4 configs)
    alike; a C4 model has no res5, so there the ``res5.*`` entries are reported unused. A JSON
    sidecar beside it (:func:`sidecar_path`) records the command, settings, commit, the hash of
    this file, machine, wall time and the held-out metrics (measured with the float16 weights).

Reproducible: the same settings on the same machine (and thread count) give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_CONFIG",
    "PretrainSettings",
    "ShapesObjects",
    "ShapesClassifier",
    "build_classifier",
    "backbone_checkpoint",
    "save_backbone_checkpoint",
    "evaluate_classifier",
    "pretrain_backbone",
    "sidecar_path",
]

#: The config whose backbone is pretrained (every Shapes config has the same ``MODEL.RESNETS``).
DEFAULT_CONFIG = "Shapes/Base-Shapes-FPN.yaml"
_AUTHOR = "spp_triton.modeling.pretrain"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the pretrained weights (all of it goes into the sidecar)."""

    seed: int = 0  # weight init, batch order, crops and flips
    data_seed: int = 1  # ShapesConfig seed of the images; must differ from the detection data's
    num_images: int = 2500  # images rendered for training (split "train" of data_seed)
    num_eval_images: int = 300  # held-out images (split "val" of data_seed)
    iters: int = 1000
    batch_size: int = 64
    input_size: int = 64  # crops are resized to input_size x input_size
    context: tuple[float, float] = (1.2, 2.0)  # window side / object's longer side (log-uniform)
    max_shift: float = 0.15  # window centre moved by up to this fraction of its side
    eval_context: float = 1.5
    base_lr: float = 2e-3  # AdamW (SGD at 0.03-0.1 stalled at chance for hundreds of steps)
    weight_decay: float = 1e-4  # decoupled; none on norms and biases
    warmup_iters: int = 20  # linear warmup, then cosine decay to zero
    aux_res4_weight: float = 1.0  # weight of the res4 classifier's loss

    def __post_init__(self) -> None:
        from spp_triton.data.shapes import ShapesConfig

        if self.data_seed == ShapesConfig().seed:
            raise ValueError(
                f"data_seed = {self.data_seed} is the detection datasets' seed: pretraining "
                "images would be shapes_train / shapes_val images; use another seed"
            )
        if self.num_images < 1 or self.iters < 1 or self.batch_size < 1:
            raise ValueError("num_images, iters and batch_size must be >= 1")
        if self.input_size < 32:
            raise ValueError("input_size must be >= 32 (res5 is input_size / 32 cells wide)")
        if not 1.0 <= self.context[0] <= self.context[1]:
            raise ValueError("context: need 1 <= low <= high")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class ShapesObjects:
    """The objects of one split of ``ShapesConfig(seed=data_seed)``, with their images held in
    memory (uint8, in the detector's channel order ``input_format``), to cut object-centred,
    labelled crops from."""

    def __init__(self, data_seed: int, split: str, num_images: int, input_format: str = "BGR"):
        from spp_triton.data.shapes import NUM_SHAPES_CLASSES, ShapesConfig, render_image

        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT: pretraining supports BGR or RGB, got {input_format!r}")
        self.num_classes = NUM_SHAPES_CLASSES
        config = ShapesConfig(seed=data_seed)
        self.images: list[torch.Tensor] = []  # (3, H, W) uint8
        image_of, boxes, labels = [], [], []
        for index in range(num_images):
            pixels, anns = render_image(config, split, index)
            pixels = pixels[..., ::-1] if input_format == "BGR" else pixels
            self.images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            for ann in anns:
                x, y, w, h = ann["bbox"]
                image_of.append(index)
                boxes.append((x, y, x + w, y + h))
                labels.append(ann["category_id"] - 1)
        self.image_of = np.array(image_of, dtype=np.int64)
        self.boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)  # visible boxes, XYXY
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def crop(
        self, index: int, context: float, shift: tuple[float, float], size: int
    ) -> torch.Tensor:
        """Object ``index`` in a square window ``context`` times its longer box side, moved by
        ``shift`` (fractions of the window side) and kept inside its image, resized to ``size``
        (float32 (3, size, size), pixel values 0..255)."""
        image = self.images[self.image_of[index]]
        height, width = image.shape[1:]
        x0, y0, x1, y1 = self.boxes[index]
        side = min(max(x1 - x0, y1 - y0) * context, height, width)
        side = max(int(round(side)), 8)
        cx = (x0 + x1) / 2 + shift[0] * side
        cy = (y0 + y1) / 2 + shift[1] * side
        left = int(np.clip(round(cx - side / 2), 0, width - side))
        top = int(np.clip(round(cy - side / 2), 0, height - side))
        window = image[:, top : top + side, left : left + side].float()[None]
        return F.interpolate(
            window, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]

    def batch(
        self, rng: np.random.Generator, indices: np.ndarray, settings: PretrainSettings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented crops of the objects ``indices`` (random context, shift and flips):
        images (N, 3, size, size) float32 and class labels (N,)."""
        crops = []
        for index in indices:
            context = float(np.exp(rng.uniform(*np.log(settings.context))))
            shift = tuple(rng.uniform(-settings.max_shift, settings.max_shift, size=2))
            crop = self.crop(int(index), context, shift, settings.input_size)
            if rng.random() < 0.5:
                crop = crop.flip(2)
            if rng.random() < 0.5:
                crop = crop.flip(1)
            crops.append(crop)
        return torch.stack(crops), torch.from_numpy(self.labels[indices])


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class ShapesClassifier(nn.Module):
    """The config's ResNet (res4 and res5 out) with a linear classifier on the global average
    of each; inputs are images in the detector's channel order and pixel range (0..255),
    normalised here as the detector normalises them."""

    def __init__(self, backbone: nn.Module, num_classes: int, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.head_res5 = nn.Linear(shapes["res5"].channels, num_classes)
        self.head_res4 = nn.Linear(shapes["res4"].channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> logits of the res5 and the res4 classifiers, each (N, classes)."""
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        res5 = self.head_res5(features["res5"].mean(dim=(2, 3)))
        res4 = self.head_res4(features["res4"].mean(dim=(2, 3)))
        return res5, res4


def _load_cfg(config_file: str | os.PathLike | None):
    from detectron2.config import get_cfg

    from spp_triton.model_zoo import resolve_config
    from spp_triton.modeling.config import add_spp_config

    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(resolve_config(config_file or DEFAULT_CONFIG))
    return cfg


def build_classifier(cfg, num_classes: int) -> ShapesClassifier:
    """:class:`ShapesClassifier` over the ResNet of ``cfg``'s ``MODEL.RESNETS`` (built by
    ``build_basic_resnet_backbone``, with res4 and res5 out, trainable BN, nothing frozen)."""
    from detectron2.layers import ShapeSpec

    from spp_triton.modeling.backbone import build_basic_resnet_backbone

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_basic_resnet_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    return ShapesClassifier(backbone, num_classes, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------


def backbone_checkpoint(backbone: nn.Module) -> dict:
    """The detectron2 checkpoint dict of ``backbone`` (see the module doc): float16 weights and
    BN statistics under the ResNet's names, ``matching_heuristics`` on."""
    state = {
        name: value.detach().to(torch.float16).clone()
        for name, value in backbone.state_dict().items()
        if not name.endswith("num_batches_tracked")  # FrozenBN has none; BN fills it in
    }
    return {"model": state, "__author__": _AUTHOR, "matching_heuristics": True}


def save_backbone_checkpoint(backbone: nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`backbone_checkpoint` to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(backbone_checkpoint(backbone), tmp)
    os.replace(tmp, path)
    return path


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON record written beside a checkpoint: ``x.pth`` -> ``x.json``."""
    return Path(checkpoint).with_suffix(".json")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_classifier(
    model: ShapesClassifier, data: ShapesObjects, settings: PretrainSettings, batch_size: int = 128
) -> dict[str, float]:
    """Accuracy of both classifiers on every object of ``data``, each centred in a window
    ``settings.eval_context`` times its longer side (no shift, no flip), eval-mode BN: top-1
    accuracy, and the mean over classes of the per-class accuracy."""
    was_training = model.training
    model.eval()
    predicted: dict[str, list[torch.Tensor]] = {"res5": [], "res4": []}
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        images = torch.stack(
            [data.crop(i, settings.eval_context, (0.0, 0.0), settings.input_size) for i in indices]
        )
        res5, res4 = model(images)
        predicted["res5"].append(res5.argmax(1))
        predicted["res4"].append(res4.argmax(1))
    model.train(was_training)
    labels = torch.from_numpy(data.labels)
    metrics: dict[str, float] = {"objects": float(len(data))}
    for head, values in predicted.items():
        correct = (torch.cat(values) == labels).float()
        per_class = [correct[labels == c].mean() for c in range(data.num_classes)]
        metrics[f"{head}_top1"] = float(correct.mean())
        metrics[f"{head}_mean_class_accuracy"] = float(torch.stack(per_class).nanmean())
    return metrics


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _learning_rate(settings: PretrainSettings, it: int) -> float:
    if it < settings.warmup_iters:
        return settings.base_lr * (it + 1) / settings.warmup_iters
    span = max(1, settings.iters - settings.warmup_iters)
    return settings.base_lr * 0.5 * (1.0 + math.cos(math.pi * (it - settings.warmup_iters) / span))


def pretrain_backbone(
    output: str | os.PathLike,
    settings: PretrainSettings | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = print,
    log_period: int = 20,
) -> dict:
    """Pretrain the backbone of ``config_file`` (default :data:`DEFAULT_CONFIG`) as the module doc
    describes; write the checkpoint to ``output`` and its JSON record beside it
    (:func:`sidecar_path`); return that record.

    Runs on the CPU with torch's current thread count. Seeds torch, numpy streams and the data
    from ``settings`` alone; the caller's global torch random state is left as it was.
    """
    from spp_triton.runinfo import git_commit, machine_description

    settings = PretrainSettings() if settings is None else settings
    log = log or (lambda message: None)
    start = time.perf_counter()
    cfg = _load_cfg(config_file)
    input_format = cfg.INPUT.FORMAT

    train = ShapesObjects(settings.data_seed, "train", settings.num_images, input_format)
    held_out = ShapesObjects(settings.data_seed, "val", settings.num_eval_images, input_format)
    render_s = time.perf_counter() - start
    log(
        f"rendered {settings.num_images} + {settings.num_eval_images} images "
        f"({len(train)} + {len(held_out)} objects) in {render_s:.1f} s"
    )

    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0x5EED]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_classifier(cfg, train.num_classes)
    model.train()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or ".norm." in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.base_lr,
    )

    order = np.empty(0, dtype=np.int64)
    train_start = time.perf_counter()
    losses: list[float] = []
    for it in range(settings.iters):
        if len(order) < settings.batch_size:  # epochs of a fresh permutation
            order = np.concatenate([order, rng.permutation(len(train))])
        indices, order = order[: settings.batch_size], order[settings.batch_size :]
        images, labels = train.batch(rng, indices, settings)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, it)
        res5, res4 = model(images)
        loss_res5 = F.cross_entropy(res5, labels)
        loss_res4 = F.cross_entropy(res4, labels)
        loss = loss_res5 + settings.aux_res4_weight * loss_res4
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining diverged at iteration {it}: loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss_res5.detach()))
        if (it + 1) % log_period == 0 or it + 1 == settings.iters:
            recent = float(np.mean(losses[-log_period:]))
            log(
                f"iter {it + 1}/{settings.iters}  loss_res5 {recent:.4f}  "
                f"loss_res4 {float(loss_res4.detach()):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - train_start:.0f} s"
            )
    train_s = time.perf_counter() - train_start

    # What ships is float16: measure the weights as they will be loaded.
    checkpoint = backbone_checkpoint(model.backbone)
    model.backbone.load_state_dict(checkpoint["model"], strict=False)
    metrics = evaluate_classifier(model, held_out, settings)
    output = save_backbone_checkpoint(model.backbone, output)
    wall_s = time.perf_counter() - start
    log(
        "held-out: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("res"))
        + f"; wall {wall_s:.0f} s"
    )

    r = cfg.MODEL.RESNETS
    record = {
        "checkpoint": output.name,
        "sha256": hashlib.sha256(output.read_bytes()).hexdigest(),
        "bytes": output.stat().st_size,
        "command": command,
        "commit": git_commit(),
        "pretrain_source_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        **machine_description(),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall_s, 1),
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "settings": asdict(settings),
        "config_file": str(config_file or DEFAULT_CONFIG),
        "backbone": {
            "builder": "build_basic_resnet_backbone",
            "depth": r.DEPTH,
            "stem_out_channels": r.STEM_OUT_CHANNELS,
            "res2_out_channels": r.RES2_OUT_CHANNELS,
            "norm_in_pretraining": "BN",
            "dtype": "float16",
        },
        "input": {
            "format": input_format,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        },
        "data": {
            "renderer": "spp_triton.data.shapes.render_image",
            "train": f"objects of ShapesConfig(seed={settings.data_seed}) split 'train' "
            f"images 0..{settings.num_images - 1} ({len(train)} objects)",
            "held_out": f"objects of ShapesConfig(seed={settings.data_seed}) split 'val' "
            f"images 0..{settings.num_eval_images - 1} ({len(held_out)} objects)",
        },
        "final_train_loss_res5": round(float(np.mean(losses[-log_period:])), 4),
        "held_out_metrics": {k: round(v, 4) for k, v in metrics.items()},
    }
    sidecar_path(output).write_text(json.dumps(record, indent=1) + "\n")
    return record
