"""Public functional API: input checks at the boundary, then the ``torch.ops.spp_triton`` ops.

Shapes and semantics (see README "API and semantics" for the full statement):

* ``spp_pool(input[N, C, H, W], levels, mode, image_sizes) -> [N, C * sum(n * n)]``: per image,
  ``F.adaptive_{max,avg}_pool2d`` of its valid region at each level, flattened and concatenated.
* ``roi_pool(input, boxes, output_size, spatial_scale, mode) -> [K, C, oh, ow]``: torchvision's
  ``roi_pool`` (bit-exact for ``mode="max"``), plus ``mode="avg"`` over the same bins.
* ``roi_spp_pool(input, boxes, levels, spatial_scale, mode) -> [K, C * sum(n * n)]``:
  ``cat([roi_pool(input, boxes, n, ...).flatten(1) for n in levels], 1)``.
* ``multilevel_roi_spp_pool(features, rois, feature_index, spatial_scales, levels, mode)``: the
  same, each RoI read from the map ``feature_index`` names (an FPN pooler in one launch).

Max pooling propagates NaN (a bin containing NaN gives NaN), like ``F.adaptive_max_pool2d`` and
unlike ``torchvision.ops.roi_pool``, which skips NaN.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from spp_triton import bins, ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("max", "avg")


# ----------------------------------------------------------------------------- checks
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_input(input, name: str = "input") -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.ndim != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.shape[2] < 1 or input.shape[3] < 1:
        raise ValueError(f"{name} has an empty spatial size {tuple(input.shape[2:])}")


def _check_mode(mode) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{name} must hold positive integers, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must hold positive integers, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must hold positive integers, got {v}")
    return v


def _check_levels(levels, name: str = "levels") -> list[tuple[int, int]]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        if isinstance(levels, torch.Tensor):
            levels = levels.tolist()
        else:
            raise ValueError(
                f"{name} must be a non-empty sequence of positive ints, got {levels!r}"
            )
    if len(levels) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got an empty one")
    pairs = []
    for lv in levels:
        if isinstance(lv, (tuple, list)):
            if len(lv) != 2:
                raise ValueError(
                    f"{name}: a level is an int n or a pair (bins_h, bins_w), got {lv!r}"
                )
            pairs.append((_positive_int(lv[0], name), _positive_int(lv[1], name)))
        else:
            n = _positive_int(lv, name)
            pairs.append((n, n))
    return pairs


def _check_output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"output_size must be an int or (h, w), got {output_size!r}")
        return (
            _positive_int(output_size[0], "output_size"),
            _positive_int(output_size[1], "output_size"),
        )
    n = _positive_int(output_size, "output_size")
    return n, n


def _check_scale(scale, name: str = "spatial_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scale}")
    return scale


def _rois_from_boxes(boxes, input: torch.Tensor, name: str = "boxes") -> torch.Tensor:
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
    if rois.device.type == "cpu" and not _compiling() and rois.shape[0] > 0:
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


def _check_image_sizes(image_sizes, input: torch.Tensor) -> torch.Tensor:
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
        if sizes.device.type == "cpu" and not _compiling():
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


def _flat(levels: Sequence[tuple[int, int]]) -> list[int]:
    return [v for pair in levels for v in pair]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want the max argmax (it is skipped in inference: less work)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- public API
def spp_pool(
    input: torch.Tensor,
    levels: Sequence[int] = (1, 2, 4),
    mode: str = "max",
    image_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Spatial pyramid pooling of whole feature maps (SPP-net).

    Args:
        input: Tensor[N, C, H, W] (float16/bfloat16/float32/float64).
        levels: pyramid levels; level n pools an n x n grid with the adaptive floor/ceil partition.
        mode: "max" or "avg".
        image_sizes: optional Tensor[N, 2] (or list of (h, w)) of each image's valid size in
            feature-map pixels (a padded batch); default: the full H x W.

    Returns:
        Tensor[N, C * sum(n * n)]: level-major, then channel, row, column.
    """
    _check_input(input)
    pairs = _check_levels(levels)
    mode = _check_mode(mode)
    regions = _check_image_sizes(image_sizes, input)
    out, _ = ops.spp_pool_op(input, regions, _flat(pairs), mode, _needs_grad(input))
    return out


def roi_spp_pool(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    levels: Sequence[int] = (1, 2, 4),
    spatial_scale: float = 1.0,
    mode: str = "max",
) -> torch.Tensor:
    """Spatial pyramid pooling inside each region of interest, all levels in one launch.

    Args:
        input: Tensor[N, C, H, W].
        boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates, or a list of
            N Tensor[L_i, 4].
        levels: pyramid levels (n x n bins each; RoI partition of torchvision's ``roi_pool``).
        spatial_scale: image-to-feature-map scale (e.g. 1/16).
        mode: "max" or "avg".

    Returns:
        Tensor[K, C * sum(n * n)] equal to
        ``cat([roi_pool(input, boxes, n, spatial_scale, mode).flatten(1) for n in levels], 1)``.
    """
    _check_input(input)
    pairs = _check_levels(levels)
    scale = _check_scale(spatial_scale)
    mode = _check_mode(mode)
    rois = _rois_from_boxes(boxes, input)
    out, _ = ops.roi_spp_pool_op(input, rois, _flat(pairs), scale, mode, _needs_grad(input))
    return out


def roi_pool(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    mode: str = "max",
) -> torch.Tensor:
    """Fast R-CNN RoI pooling: ``torchvision.ops.roi_pool`` (bit-exact for max) plus avg.

    Returns:
        Tensor[K, C, oh, ow].
    """
    _check_input(input)
    oh, ow = _check_output_size(output_size)
    scale = _check_scale(spatial_scale)
    mode = _check_mode(mode)
    rois = _rois_from_boxes(boxes, input)
    out, _ = ops.roi_spp_pool_op(input, rois, [oh, ow], scale, mode, _needs_grad(input))
    return out.view(rois.shape[0], input.shape[1], oh, ow)


def multilevel_roi_spp_pool(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    feature_index: torch.Tensor,
    spatial_scales: Sequence[float],
    levels: Sequence[int] | Sequence[tuple[int, int]] = (1, 2, 4),
    mode: str = "max",
) -> torch.Tensor:
    """RoI pyramid pooling where each RoI reads one of several feature maps (FPN levels).

    Args:
        features: F >= 1 maps Tensor[N, C, H_f, W_f] (same N, C, dtype and device).
        rois: Tensor[K, 5] (batch_index, x1, y1, x2, y2) in image coordinates.
        feature_index: int Tensor[K]: the map each RoI is pooled from.
        spatial_scales: F floats, one per map.
        levels: ints n (n x n bins) or (bins_h, bins_w) pairs.

    Returns:
        Tensor[K, C * sum(bh * bw)]: row k equals ``roi_spp_pool`` of RoI k on its map.
    """
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty list of Tensor[N, C, H, W]")
    for i, f in enumerate(features):
        _check_input(f, f"features[{i}]")
    first = features[0]
    for i, f in enumerate(features[1:], 1):
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype or f.device != first.device:
            raise ValueError(
                f"features[{i}] must match features[0] in N, C, dtype and device: "
                f"{tuple(f.shape)} {f.dtype} {f.device} vs {tuple(first.shape)} {first.dtype} "
                f"{first.device}"
            )
    if isinstance(spatial_scales, (int, float)) or len(spatial_scales) != len(features):
        raise ValueError(
            f"spatial_scales must hold one scale per feature map ({len(features)}), "
            f"got {spatial_scales!r}"
        )
    scales = [_check_scale(s, "spatial_scales") for s in spatial_scales]
    pairs = _check_levels(levels)
    mode = _check_mode(mode)
    rois = _rois_from_boxes(rois, first, "rois")
    if not isinstance(feature_index, torch.Tensor) or feature_index.shape != (rois.shape[0],):
        raise ValueError(
            f"feature_index must be an int Tensor[K] with K = {rois.shape[0]}, got "
            f"{getattr(feature_index, 'shape', type(feature_index).__name__)}"
        )
    if feature_index.is_floating_point():
        raise TypeError(f"feature_index must be integer, got {feature_index.dtype}")
    feature_index = feature_index.to(device=first.device, dtype=torch.int64)
    if feature_index.device.type == "cpu" and not _compiling() and feature_index.numel():
        if bool(((feature_index < 0) | (feature_index >= len(features))).any()):
            raise ValueError(f"feature_index values must lie in [0, {len(features) - 1}]")
    out, _ = ops.multilevel_roi_spp_pool_op(
        list(features), rois, feature_index, scales, _flat(pairs), mode, _needs_grad(*features)
    )
    return out
