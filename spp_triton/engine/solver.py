"""Optimizers for LazyConfigs: :class:`ClippedSGD`."""

from __future__ import annotations

import torch

__all__ = ["ClippedSGD"]


class ClippedSGD(torch.optim.SGD):
    """``torch.optim.SGD`` that clips each parameter's gradient before the step, as detectron2's
    yacs ``SOLVER.CLIP_GRADIENTS`` (``CLIP_TYPE`` "norm": ``clip_grad_norm_(p, clip_value,
    norm_type)`` per parameter; "value": ``clip_grad_value_(p, clip_value)``) does.

    A LazyConfig ``optimizer`` like any other: ``L(ClippedSGD)(params=..., lr=..., momentum=...,
    clip_type="norm", clip_value=5.0)``; its ``params.model`` is filled in by the trainer.
    """

    def __init__(
        self, params, *, clip_type: str = "norm", clip_value: float = 5.0, norm_type=2.0, **kw
    ):
        if clip_type not in ("norm", "value"):
            raise ValueError(f"ClippedSGD: clip_type must be 'norm' or 'value', got {clip_type!r}")
        if not clip_value > 0:
            raise ValueError(f"ClippedSGD: clip_value must be > 0, got {clip_value!r}")
        super().__init__(params, **kw)
        self.clip_type, self.clip_value, self.norm_type = clip_type, float(clip_value), norm_type

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if self.clip_type == "norm":
                    torch.nn.utils.clip_grad_norm_(p, self.clip_value, self.norm_type)
                else:
                    torch.nn.utils.clip_grad_value_(p, self.clip_value)
        return super().step(closure)
