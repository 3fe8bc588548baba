"""Input validation shared by ``functional``, ``nn`` and the detectron2 poolers.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the offending
argument. Checks of tensor *values* (batch indices, image sizes, feature indices) run only on CPU
tensors and outside ``torch.compile``: on a device they would synchronise, and the kernels treat
invalid rows memory-safely instead (see README).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from spp_triton import bins

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("max", "avg")


def compiling() -> bool:
    return torch.compiler.is_compiling()


def check_input(input, name: str = "input") -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.ndim != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.shape[2] < 1 or input.shape[3] < 1:
        raise ValueError(f"{name} has an empty spatial size {tuple(input.shape[2:])}")


def check_mode(mode) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def check_levels(levels, name: str = "levels") -> tuple[tuple[int, int], ...]:
    """Validated ``(bins_h, bins_w)`` pairs (the codec in ``spp_triton.bins``)."""
    return bins.normalize_levels(levels, name)


def check_output_size(output_size) -> tuple[int, int]:
    """An int ``n`` or a pair ``(h, w)`` as the one level ``(h, w)``."""
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"output_size must be an int or (h, w), got {output_size!r}")
        pair = tuple(output_size)
    else:
        pair = (output_size, output_size)
    return bins.normalize_levels([pair], "output_size")[0]


def check_scale(scale, name: str = "spatial_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scale}")
    return scale


def rois_from_boxes(boxes, input: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """Tensor[K, 5] or a list of N Tensor[L_i, 4] -> Tensor[K, 5] in the bin dtype, on the
    input's device. Checks values on CPU (on CUDA a check would synchronise: the kernels treat
    invalid rows memory-safely instead, see README)."""
    bin_dtype = bins.bin_dtype_for(input.dtype)
    n_img = input.shape[0]
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"{name} must be Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of "
                f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}"
            )
        if not boxes.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")
        rois = boxes.to(device=input.device, dtype=bin_dtype)
    elif isinstance(boxes, (list, tuple)):
        if len(boxes) != n_img:
            raise ValueError(
                f"{name} as a list must hold one Tensor[L, 4] per image ({n_img}), got {len(boxes)}"
            )
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"{name}[{i}] must be Tensor[L, 4], got {shape}")
            if not b.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got {b.dtype}")
            b = b.to(device=input.device, dtype=bin_dtype)
            parts.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
        rois = (
            torch.cat(parts, dim=0)
            if parts
            else torch.zeros(0, 5, dtype=bin_dtype, device=input.device)
        )
    else:
        raise TypeError(
            f"{name} must be Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    if rois.device.type == "cpu" and not compiling() and rois.shape[0] > 0:
        batch = rois[:, 0]
        if not bool(torch.isfinite(rois).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        if bool((batch != torch.trunc(batch)).any()):
            raise ValueError(f"{name}: batch indices (column 0) must be integers")
        if bool(((batch < 0) | (batch >= n_img)).any()):
            lo, hi = batch.min().item(), batch.max().item()
            raise ValueError(
                f"{name}: batch indices (column 0) must lie in [0, {n_img - 1}] for an input of "
                f"{n_img} images, got values in [{lo:g}, {hi:g}]"
            )
    return rois.contiguous()


def check_image_sizes(image_sizes, input: torch.Tensor) -> torch.Tensor:
    n_img, _, height, width = input.shape
    if image_sizes is None:
        sizes = torch.tensor([[height, width]], dtype=torch.int64).expand(n_img, 2)
    else:
        if isinstance(image_sizes, torch.Tensor):
            sizes = image_sizes
        else:
            try:
                sizes = torch.as_tensor(image_sizes)
            except (TypeError, ValueError):
                raise TypeError(
                    f"image_sizes must be a Tensor[N, 2] or a list of (h, w), got {image_sizes!r}"
                ) from None
        if sizes.ndim != 2 or sizes.shape[0] != n_img or sizes.shape[1] != 2:
            raise ValueError(
                f"image_sizes must have shape [N, 2] = [{n_img}, 2], got {tuple(sizes.shape)}"
            )
        if sizes.is_floating_point() or sizes.is_complex() or sizes.dtype == torch.bool:
            raise TypeError(f"image_sizes must be integers, got {sizes.dtype}")
        sizes = sizes.to(torch.int64)
        if sizes.device.type == "cpu" and not compiling():
            bad = (
                (sizes[:, 0] < 1)
                | (sizes[:, 0] > height)
                | (sizes[:, 1] < 1)
                | (sizes[:, 1] > width)
            )
            if bool(bad.any()):
                raise ValueError(
                    f"image_sizes must lie in [1, {height}] x [1, {width}] (the input's H x W), "
                    f"got {sizes[bad].tolist()}"
                )
        else:  # a device tensor: clamp instead of a synchronising check (memory safety)
            sizes = torch.stack([sizes[:, 0].clamp(1, height), sizes[:, 1].clamp(1, width)], 1)
    batch = torch.arange(n_img, dtype=torch.int64, device=sizes.device)
    return torch.cat([batch[:, None], sizes], dim=1).to(input.device)


def check_features(features) -> list[torch.Tensor]:
    """A non-empty list of maps ``[N, C, H_f, W_f]`` with the same N, C, dtype and device."""
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty list of Tensor[N, C, H, W]")
    for i, f in enumerate(features):
        check_input(f, f"features[{i}]")
    first = features[0]
    for i, f in enumerate(features[1:], 1):
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype or f.device != first.device:
            raise ValueError(
                f"features[{i}] must match features[0] in N, C, dtype and device: "
                f"{tuple(f.shape)} {f.dtype} {f.device} vs {tuple(first.shape)} {first.dtype} "
                f"{first.device}"
            )
    return list(features)


def check_scales(spatial_scales, num_maps: int) -> list[float]:
    """One finite positive scale per feature map."""
    if isinstance(spatial_scales, (int, float)) or len(spatial_scales) != num_maps:
        raise ValueError(
            f"spatial_scales must hold one scale per feature map ({num_maps}), "
            f"got {spatial_scales!r}"
        )
    return [check_scale(s, "spatial_scales") for s in spatial_scales]


def check_feature_index(feature_index, num_rois: int, num_maps: int, device) -> torch.Tensor:
    """An integer ``Tensor[K]`` of map indices in ``[0, num_maps)``, as int64 on ``device``."""
    if not isinstance(feature_index, torch.Tensor) or feature_index.shape != (num_rois,):
        raise ValueError(
            f"feature_index must be an int Tensor[K] with K = {num_rois}, got "
            f"{getattr(feature_index, 'shape', type(feature_index).__name__)}"
        )
    if feature_index.is_floating_point():
        raise TypeError(f"feature_index must be integer, got {feature_index.dtype}")
    feature_index = feature_index.to(device=device, dtype=torch.int64)
    if feature_index.device.type == "cpu" and not compiling() and feature_index.numel():
        if bool(((feature_index < 0) | (feature_index >= num_maps)).any()):
            raise ValueError(f"feature_index values must lie in [0, {num_maps - 1}]")
    return feature_index
