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

from collections.abc import Sequence

import torch

from spp_triton import _checks, bins, ops


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want the max argmax (it is skipped in inference: less work)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _pyramid_pool(features, regions, feature_index, scales, levels, mode, partition):
    """The one op call behind every public function (all arguments already validated)."""
    out, _ = ops.pyramid_pool_op(
        features,
        regions,
        feature_index,
        scales,
        bins.flatten_levels(levels),
        mode,
        partition,
        _needs_grad(*features),
    )
    return out


# The private ``_name`` twins take levels/scale/mode already validated (pairs, float, str): the
# nn modules and detectron2 poolers validate those once, at construction.
def _spp_pool(input, levels, mode, image_sizes) -> torch.Tensor:
    _checks.check_input(input)
    regions = _checks.check_image_sizes(image_sizes, input)
    return _pyramid_pool([input], regions, None, [], levels, mode, "adaptive")


def _roi_spp_pool(input, boxes, levels, spatial_scale, mode) -> torch.Tensor:
    _checks.check_input(input)
    rois = _checks.rois_from_boxes(boxes, input)
    return _pyramid_pool([input], rois, None, [spatial_scale], levels, mode, "roi")


def _roi_pool(input, boxes, output_size, spatial_scale, mode) -> torch.Tensor:
    out = _roi_spp_pool(input, boxes, (output_size,), spatial_scale, mode)
    return out.view(out.shape[0], input.shape[1], *output_size)


def _multilevel_roi_spp_pool(features, rois, feature_index, spatial_scales, levels, mode):
    """``feature_index=None``: every RoI on the one map (the poolers' single-map case)."""
    features = _checks.check_features(features)
    return _multilevel_checked(features, rois, feature_index, spatial_scales, levels, mode)


def _multilevel_checked(features, rois, feature_index, spatial_scales, levels, mode):
    rois = _checks.rois_from_boxes(rois, features[0], "rois")
    if feature_index is not None:
        feature_index = _checks.check_feature_index(
            feature_index, rois.shape[0], len(features), features[0].device
        )
    return _pyramid_pool(features, rois, feature_index, spatial_scales, levels, mode, "roi")


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
    return _spp_pool(input, _checks.check_levels(levels), _checks.check_mode(mode), image_sizes)


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
    levels = _checks.check_levels(levels)
    scale = _checks.check_scale(spatial_scale)
    return _roi_spp_pool(input, boxes, levels, scale, _checks.check_mode(mode))


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
    size = _checks.check_output_size(output_size)
    scale = _checks.check_scale(spatial_scale)
    return _roi_pool(input, boxes, size, scale, _checks.check_mode(mode))


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
    features = _checks.check_features(features)
    scales = _checks.check_scales(spatial_scales, len(features))
    levels = _checks.check_levels(levels)
    mode = _checks.check_mode(mode)
    return _multilevel_checked(features, rois, feature_index, scales, levels, mode)
