"""Box poolers with detectron2's ``ROIPooler`` call signature, backed by spp_triton's kernels.

Both poolers assign every box to one feature map with detectron2's FPN rule (Eqn. 1 of the FPN
paper: a box of ``canonical_box_size`` pixels goes to ``canonical_level``, clamped to the levels
present) and then pool *all* boxes from *all* maps in one call of
:func:`spp_triton.multilevel_roi_spp_pool` (one kernel launch on GPU): no per-level Python loop,
no ``nonzero``, no ``index_put_``.

* :class:`SPPROIPooler`: spatial pyramid pooling, ``[M, C * sum(bh * bw)]`` per call.
* :class:`TritonROIPooler`: RoI pooling to ``output_size``, ``[M, C, R, R]``; with ``mode="max"``
  the same numbers as detectron2's ``ROIPooler(pooler_type="ROIPool")`` (torchvision's
  ``roi_pool``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import poolers as _d2_poolers
from detectron2.structures import Boxes
from torch import nn

from spp_triton import _checks, bins
from spp_triton import functional as Fn
from spp_triton.bins import normalize_levels

__all__ = ["SPPROIPooler", "TritonROIPooler", "normalize_levels"]


# detectron2 (v0.6 and main) exposes its box-to-level rule and the (batch_index, x1, y1, x2, y2)
# conversion as module functions of detectron2.modeling.poolers; use them when present so that the
# assignment is the one detectron2's own ROIPooler makes. The fallbacks restate the same rule.
_assign_boxes_to_levels = getattr(_d2_poolers, "assign_boxes_to_levels", None)
_convert_boxes_to_pooler_format = getattr(_d2_poolers, "convert_boxes_to_pooler_format", None)

if _assign_boxes_to_levels is None:  # pragma: no cover - both exist on detectron2 v0.6 and main

    def _assign_boxes_to_levels(
        box_lists, min_level, max_level, canonical_box_size, canonical_level
    ):
        box_sizes = torch.sqrt(torch.cat([b.area() for b in box_lists]))
        lvl = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
        return torch.clamp(lvl, min=min_level, max=max_level).to(torch.int64) - min_level


if _convert_boxes_to_pooler_format is None:  # pragma: no cover

    def _convert_boxes_to_pooler_format(box_lists):
        boxes = torch.cat([b.tensor for b in box_lists], dim=0)
        sizes = torch.tensor([len(b) for b in box_lists], device=boxes.device)
        idx = torch.repeat_interleave(
            torch.arange(len(box_lists), dtype=boxes.dtype, device=boxes.device), sizes
        )
        return torch.cat([idx[:, None], boxes], dim=1)


class _MultiLevelPoolerBase(nn.Module):
    """Level assignment shared by the spp_triton poolers (detectron2's rule and checks)."""

    def __init__(
        self, scales: Sequence[float], mode: str, canonical_box_size: int, canonical_level: int
    ):
        super().__init__()
        if len(scales) == 0:
            raise ValueError("scales must name at least one feature map")
        scales = tuple(_checks.check_scales(scales, len(scales)))
        mode = _checks.check_mode(mode)
        # Map scale (1 / stride) to its level, assuming power-of-2 strides, as ROIPooler does.
        min_level = -math.log2(scales[0])
        max_level = -math.log2(scales[-1])
        if not (
            math.isclose(min_level, round(min_level)) and math.isclose(max_level, round(max_level))
        ):
            raise ValueError(f"feature map strides must be powers of 2, got scales {scales}")
        self.min_level, self.max_level = int(round(min_level)), int(round(max_level))
        if len(scales) != self.max_level - self.min_level + 1 or not (
            0 <= self.min_level <= self.max_level
        ):
            raise ValueError(
                f"feature maps do not form a pyramid (strides x2 per map): scales {scales}"
            )
        if canonical_box_size <= 0:
            raise ValueError(f"canonical_box_size must be > 0, got {canonical_box_size}")
        self.scales = scales
        self.mode = mode
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def _levels_arg(self) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def _pool(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        """``[M, C * sum(bh * bw)]`` for the boxes of all images (detectron2's order)."""
        if not isinstance(x, (list, tuple)) or not isinstance(box_lists, (list, tuple)):
            raise TypeError("Arguments to pooler must be lists")
        if len(x) != len(self.scales):
            raise ValueError(f"pooler built for {len(self.scales)} feature maps, got {len(x)}")
        if len(box_lists) != x[0].size(0):
            raise ValueError(
                f"feature batch size is {x[0].size(0)}, but box_lists has {len(box_lists)} entries"
            )
        channels = x[0].shape[1]
        width = channels * bins.pyramid_width(self._levels_arg())
        num_boxes = sum(len(b) for b in box_lists)
        if num_boxes == 0:
            return x[0].new_zeros((0, width))

        rois = _convert_boxes_to_pooler_format(list(box_lists)).to(x[0].device)
        feature_index = None  # one map: every box reads it
        if len(x) > 1:
            feature_index = _assign_boxes_to_levels(
                list(box_lists),
                self.min_level,
                self.max_level,
                self.canonical_box_size,
                self.canonical_level,
            ).to(device=rois.device, dtype=torch.int64)
        # levels, scales and mode were validated at construction; only the tensors are checked
        return Fn._multilevel_roi_spp_pool(
            list(x), rois, feature_index, list(self.scales), self._levels_arg(), self.mode
        )


class SPPROIPooler(_MultiLevelPoolerBase):
    """Spatial pyramid pooling of RoIs over one map or an FPN pyramid.

    ``forward(features: list[Tensor[N, C, H_f, W_f]], boxes: list[Boxes]) -> Tensor[M, C * B]``
    with ``B = sum(bh * bw)`` over ``levels``; row ``i`` is the ``i``-th box of the concatenated
    box lists (as detectron2's ``ROIPooler``). Per row, the layout is level-major in the order of
    ``levels``, then channel, bin row, bin column.

    Attributes:
        levels: ``((bh, bw), ...)``; ``bins_per_channel``: ``B``; ``output_size``: ``(1, 1)``,
        the spatial size of the flat vector as a box head sees it (see :meth:`output_shape`).
    """

    def __init__(
        self,
        levels=(1, 2, 4),
        scales: Sequence[float] = (1.0 / 16,),
        mode: str = "max",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(scales, mode, canonical_box_size, canonical_level)
        self.levels = normalize_levels(levels)
        self.bins_per_channel = bins.pyramid_width(self.levels)
        self.output_size = (1, 1)

    def _levels_arg(self):
        return self.levels

    def output_shape(self, in_channels: int) -> ShapeSpec:
        """What the box head receives: ``ShapeSpec(channels=C * B, height=1, width=1)``."""
        return ShapeSpec(channels=in_channels * self.bins_per_channel, height=1, width=1)

    def forward(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        return self._pool(x, box_lists)

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, scales={list(self.scales)}, mode={self.mode!r}, "
            f"canonical_box_size={self.canonical_box_size}, "
            f"canonical_level={self.canonical_level}"
        )


class TritonROIPooler(_MultiLevelPoolerBase):
    """RoI pooling (one ``R x R`` level) with spp_triton's kernels; a drop-in ``ROIPooler``.

    ``forward(features, boxes) -> Tensor[M, C, R, R]``. ``mode="max"`` gives detectron2's
    ``ROIPooler(pooler_type="ROIPool")`` results (torchvision ``roi_pool``).
    """

    def __init__(
        self,
        output_size,
        scales: Sequence[float] = (1.0 / 16,),
        mode: str = "max",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(scales, mode, canonical_box_size, canonical_level)
        self.output_size = _checks.check_output_size(output_size)

    def _levels_arg(self):
        return (self.output_size,)

    def output_shape(self, in_channels: int) -> ShapeSpec:
        return ShapeSpec(
            channels=in_channels, height=self.output_size[0], width=self.output_size[1]
        )

    def forward(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        out = self._pool(x, box_lists)
        return out.reshape(out.shape[0], x[0].shape[1], *self.output_size)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={list(self.scales)}, mode={self.mode!r}, "
            f"canonical_box_size={self.canonical_box_size}, "
            f"canonical_level={self.canonical_level}"
        )
