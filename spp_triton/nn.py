"""nn.Module wrappers of the functional ops (no parameters; they hold the pooling settings).

The settings are validated once, at construction; ``forward`` checks only its tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spp_triton import _checks, bins
from spp_triton import functional as Fn


class SpatialPyramidPool(nn.Module):
    """Whole-map SPP: Tensor[N, C, H, W] -> Tensor[N, C * sum(n * n)]. See ``spp_pool``."""

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> None:
        super().__init__()
        self.levels = _checks.check_levels(levels)
        self.mode = _checks.check_mode(mode)
        self._levels_arg = list(levels)

    @property
    def output_multiplier(self) -> int:
        """Output features per input channel: sum(bh * bw)."""
        return bins.pyramid_width(self.levels)

    def forward(self, input: torch.Tensor, image_sizes=None) -> torch.Tensor:
        return Fn._spp_pool(input, self.levels, self.mode, image_sizes)

    def extra_repr(self) -> str:
        return f"levels={self._levels_arg}, mode={self.mode!r}"


class RoISpatialPyramidPool(nn.Module):
    """RoI SPP: (Tensor[N, C, H, W], boxes) -> Tensor[K, C * sum(n * n)]. See ``roi_spp_pool``."""

    def __init__(
        self, levels: Sequence[int] = (1, 2, 4), spatial_scale: float = 1.0, mode: str = "max"
    ) -> None:
        super().__init__()
        self.levels = _checks.check_levels(levels)
        self.spatial_scale = _checks.check_scale(spatial_scale)
        self.mode = _checks.check_mode(mode)
        self._levels_arg = list(levels)

    @property
    def output_multiplier(self) -> int:
        return bins.pyramid_width(self.levels)

    def forward(self, input: torch.Tensor, boxes) -> torch.Tensor:
        return Fn._roi_spp_pool(input, boxes, self.levels, self.spatial_scale, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self._levels_arg}, spatial_scale={self.spatial_scale}, mode={self.mode!r}"


class RoIPool(nn.Module):
    """Fast R-CNN RoI pooling (torchvision-exact for max): -> Tensor[K, C, oh, ow]."""

    def __init__(
        self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, mode: str = "max"
    ) -> None:
        super().__init__()
        self.output_size = _checks.check_output_size(output_size)
        self.spatial_scale = _checks.check_scale(spatial_scale)
        self.mode = _checks.check_mode(mode)

    def forward(self, input: torch.Tensor, boxes) -> torch.Tensor:
        return Fn._roi_pool(input, boxes, self.output_size, self.spatial_scale, self.mode)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"mode={self.mode!r}"
        )
