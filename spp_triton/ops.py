"""torch.library operators ``torch.ops.spp_triton.*``: dispatch, fake kernels and autograd.

Operators (inputs already validated by ``spp_triton.functional``):

* ``spp_triton::roi_spp_pool(input, rois, levels_hw, spatial_scale, mode) -> (out, argmax)``
* ``spp_triton::multilevel_roi_spp_pool(features, rois, feature_index, spatial_scales, levels_hw,
  mode) -> (out, argmax)``
* ``spp_triton::spp_pool(input, regions, levels_hw, mode) -> (out, argmax)``
* ``spp_triton::pyramid_pool_backward(...)``: the shared backward.

``levels_hw`` is the flat list ``[bh0, bw0, bh1, bw1, ...]``. ``argmax`` is int32 (see
``spp_triton.cpu``); it is empty for ``mode="avg"``.

Dispatch: CUDA tensors run the Triton kernels. CPU tensors run the vectorised torch path, or, when
``SPP_TRITON_CPU_BACKEND=triton`` (the default when ``TRITON_INTERPRET=1``), the same Triton kernels
in Triton's interpreter. The backward uses the torch path (deterministic ``index_put_``) whenever
``torch.are_deterministic_algorithms_enabled()``; otherwise the kernels' atomics. The fake
(meta) kernels only compute shapes and never launch anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from spp_triton import bins, cpu

_NS = "spp_triton"


def _pairs(levels_hw: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(levels_hw[i]), int(levels_hw[i + 1])) for i in range(0, len(levels_hw), 2)]


def cpu_backend() -> str:
    """``"torch"`` or ``"triton"``: how CPU tensors are computed (read at each call)."""
    default = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    choice = os.environ.get("SPP_TRITON_CPU_BACKEND", default)
    if choice not in ("torch", "triton"):
        raise ValueError(f"SPP_TRITON_CPU_BACKEND must be 'torch' or 'triton', got {choice!r}")
    return choice


def _implementation(device: torch.device, backward: bool = False):
    use_triton = device.type == "cuda" or (device.type == "cpu" and cpu_backend() == "triton")
    if backward and torch.are_deterministic_algorithms_enabled():
        use_triton = False
    if use_triton:
        from spp_triton.kernels import pyramid_pool  # triton is imported only when needed

        return pyramid_pool
    return cpu


def _forward(features, regions, feature_index, scales, levels_hw, mode, partition, with_argmax):
    impl = _implementation(features[0].device)
    return impl.pyramid_pool_forward(
        list(features),
        regions,
        feature_index,
        list(scales),
        _pairs(levels_hw),
        mode,
        partition,
        with_argmax=with_argmax,
    )


def _fake_forward(features, regions, levels_hw, mode, with_argmax):
    k = regions.shape[0]
    width = features[0].shape[1] * bins.pyramid_width(_pairs(levels_hw))
    out = features[0].new_empty((k, width))
    if mode == "max" and with_argmax:
        argmax = features[0].new_empty((k, width), dtype=torch.int32)
    else:
        argmax = features[0].new_empty((0,), dtype=torch.int32)
    return out, argmax


# ----------------------------------------------------------------------------- forward ops
@torch.library.custom_op(f"{_NS}::roi_spp_pool", mutates_args=())
def roi_spp_pool_op(
    input: torch.Tensor,
    rois: torch.Tensor,
    levels_hw: list[int],
    spatial_scale: float,
    mode: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return _forward([input], rois, index, [spatial_scale], levels_hw, mode, "roi", with_argmax)


@roi_spp_pool_op.register_fake
def _(input, rois, levels_hw, spatial_scale, mode, with_argmax=True):
    return _fake_forward([input], rois, levels_hw, mode, with_argmax)


@torch.library.custom_op(f"{_NS}::multilevel_roi_spp_pool", mutates_args=())
def multilevel_roi_spp_pool_op(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    feature_index: torch.Tensor,
    spatial_scales: list[float],
    levels_hw: list[int],
    mode: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(
        features, rois, feature_index, spatial_scales, levels_hw, mode, "roi", with_argmax
    )


@multilevel_roi_spp_pool_op.register_fake
def _(features, rois, feature_index, spatial_scales, levels_hw, mode, with_argmax=True):
    return _fake_forward(features, rois, levels_hw, mode, with_argmax)


@torch.library.custom_op(f"{_NS}::spp_pool", mutates_args=())
def spp_pool_op(
    input: torch.Tensor,
    regions: torch.Tensor,
    levels_hw: list[int],
    mode: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.zeros(regions.shape[0], dtype=torch.int64, device=regions.device)
    return _forward([input], regions, index, [1.0], levels_hw, mode, "adaptive", with_argmax)


@spp_pool_op.register_fake
def _(input, regions, levels_hw, mode, with_argmax=True):
    return _fake_forward([input], regions, levels_hw, mode, with_argmax)


# ----------------------------------------------------------------------------- backward op
def _shells(grad: torch.Tensor, feature_shapes: Sequence[int]) -> list[torch.Tensor]:
    """Zero-stride stand-ins that carry each map's shape, dtype and device but no memory."""
    shapes = [tuple(feature_shapes[i : i + 4]) for i in range(0, len(feature_shapes), 4)]
    return [
        torch.empty_strided(s, (0, 0, 0, 0), dtype=grad.dtype, device=grad.device) for s in shapes
    ]


@torch.library.custom_op(f"{_NS}::pyramid_pool_backward", mutates_args=())
def pyramid_pool_backward_op(
    grad: torch.Tensor,
    feature_shapes: list[int],
    regions: torch.Tensor,
    feature_index: torch.Tensor,
    spatial_scales: list[float],
    levels_hw: list[int],
    mode: str,
    partition: str,
    argmax: torch.Tensor,
) -> list[torch.Tensor]:
    impl = _implementation(grad.device, backward=True)
    grads = impl.pyramid_pool_backward(
        grad.contiguous(),
        _shells(grad, feature_shapes),
        regions,
        feature_index,
        list(spatial_scales),
        _pairs(levels_hw),
        mode,
        partition,
        argmax,
    )
    return [g.contiguous() for g in grads]


@pyramid_pool_backward_op.register_fake
def _(
    grad, feature_shapes, regions, feature_index, spatial_scales, levels_hw, mode, partition, argmax
):
    return [
        torch.empty(s.shape, dtype=grad.dtype, device=grad.device)
        for s in _shells(grad, feature_shapes)
    ]


# ----------------------------------------------------------------------------- autograd
def _save(ctx, features, regions, feature_index, scales, levels_hw, mode, partition, argmax):
    # The backward needs only the maps' shapes (dtype and device are the gradient's): the feature
    # maps themselves are not kept alive for it.
    ctx.feature_shapes = [int(d) for f in features for d in f.shape]
    ctx.save_for_backward(regions, feature_index, argmax)
    ctx.scales, ctx.levels_hw, ctx.mode, ctx.partition = (
        list(scales),
        list(levels_hw),
        mode,
        partition,
    )


def _run_backward(ctx, grad_out):
    regions, feature_index, argmax = ctx.saved_tensors
    if ctx.mode == "max" and argmax.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError(
            "spp_triton: this max-pooling output was computed with with_argmax=False (no input "
            "required grad at the time), so it cannot be differentiated"
        )
    return pyramid_pool_backward_op(
        grad_out,
        ctx.feature_shapes,
        regions,
        feature_index,
        ctx.scales,
        ctx.levels_hw,
        ctx.mode,
        ctx.partition,
        argmax,
    )


def _roi_setup(ctx, inputs, output):
    input, rois, levels_hw, spatial_scale, mode, _with_argmax = inputs
    index = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    _save(ctx, [input], rois, index, [spatial_scale], levels_hw, mode, "roi", output[1])


def _roi_backward(ctx, grad_out, _grad_argmax):
    (grad_input,) = _run_backward(ctx, grad_out)
    return grad_input, None, None, None, None, None


def _multi_setup(ctx, inputs, output):
    features, rois, feature_index, spatial_scales, levels_hw, mode, _with_argmax = inputs
    _save(ctx, features, rois, feature_index, spatial_scales, levels_hw, mode, "roi", output[1])


def _multi_backward(ctx, grad_out, _grad_argmax):
    grads = _run_backward(ctx, grad_out)
    return list(grads), None, None, None, None, None, None


def _spp_setup(ctx, inputs, output):
    input, regions, levels_hw, mode, _with_argmax = inputs
    index = torch.zeros(regions.shape[0], dtype=torch.int64, device=regions.device)
    _save(ctx, [input], regions, index, [1.0], levels_hw, mode, "adaptive", output[1])


def _spp_backward(ctx, grad_out, _grad_argmax):
    (grad_input,) = _run_backward(ctx, grad_out)
    return grad_input, None, None, None, None


roi_spp_pool_op.register_autograd(_roi_backward, setup_context=_roi_setup)
multilevel_roi_spp_pool_op.register_autograd(_multi_backward, setup_context=_multi_setup)
spp_pool_op.register_autograd(_spp_backward, setup_context=_spp_setup)
