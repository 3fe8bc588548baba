"""torch.library operators ``torch.ops.spp_triton.*``: dispatch, fake kernels and autograd.

Two operators (inputs already validated by ``spp_triton.functional``):

* ``spp_triton::pyramid_pool(Tensor[] features, Tensor regions, Tensor? feature_index,
  float[] scales, int[] levels_hw, str mode, str partition, bool with_argmax=True)
  -> (Tensor out, Tensor argmax)``: every public function is one call of it.

  - ``partition="adaptive"`` (``spp_pool``): ``regions`` is ``[N, 3]`` int64
    (batch, valid_h, valid_w); ``scales`` is ignored (pass ``[]``).
  - ``partition="roi"`` (``roi_pool``, ``roi_spp_pool``, ``multilevel_roi_spp_pool``):
    ``regions`` is ``[K, 5]`` (batch, x1, y1, x2, y2) in image coordinates, in the bin dtype;
    ``scales`` holds one spatial scale per map.
  - ``feature_index``: int64 ``[K]``, the map each region reads; ``None`` when there is one map.
  - ``levels_hw``: the flat ``[bh0, bw0, bh1, bw1, ...]`` (``bins.flatten_levels``).
  - ``out``: ``[K, C * sum(bh * bw)]``, level-major, then channel, row, column. ``argmax`` is int32
    of the same shape (see ``spp_triton.cpu``); it is empty for ``mode="avg"`` and when
    ``with_argmax`` is False (no gradient will be needed).

* ``spp_triton::pyramid_pool_backward(grad, feature_shapes, regions, feature_index, scales,
  levels_hw, mode, partition, argmax) -> Tensor[]``: the gradient of each map.

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


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op(f"{_NS}::pyramid_pool", mutates_args=())
def pyramid_pool_op(
    features: list[torch.Tensor],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    scales: list[float],
    levels_hw: list[int],
    mode: str,
    partition: str,
    with_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(features[0].device)
    return impl.pyramid_pool_forward(
        list(features),
        regions,
        feature_index,
        list(scales),
        bins.unflatten_levels(levels_hw),
        mode,
        partition,
        with_argmax=with_argmax,
    )


@pyramid_pool_op.register_fake
def _(features, regions, feature_index, scales, levels_hw, mode, partition, with_argmax=True):
    k = regions.shape[0]
    width = features[0].shape[1] * bins.pyramid_width(bins.unflatten_levels(levels_hw))
    out = features[0].new_empty((k, width))
    if mode == "max" and with_argmax:
        argmax = features[0].new_empty((k, width), dtype=torch.int32)
    else:
        argmax = features[0].new_empty((0,), dtype=torch.int32)
    return out, argmax


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
    feature_index: torch.Tensor | None,
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
        bins.unflatten_levels(levels_hw),
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
def _setup_context(ctx, inputs, output):
    features, regions, feature_index, scales, levels_hw, mode, partition, _with_argmax = inputs
    # The backward needs only the maps' shapes (dtype and device are the gradient's): the feature
    # maps themselves are not kept alive for it.
    ctx.feature_shapes = [int(d) for f in features for d in f.shape]
    # The argmax output never gets a gradient: without this, autograd would allocate a zero
    # tensor as large as the output for it before every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(regions, feature_index, output[1])
    ctx.scales, ctx.levels_hw, ctx.mode, ctx.partition = (
        list(scales),
        list(levels_hw),
        mode,
        partition,
    )


def _backward(ctx, grad_out, _grad_argmax):
    regions, feature_index, argmax = ctx.saved_tensors
    if grad_out is None:  # (grads are not materialised) nothing flowed back into the output
        no_grads = [None] * (len(ctx.feature_shapes) // 4)
        return no_grads, None, None, [] if not ctx.scales else None, None, None, None, None
    if ctx.mode == "max" and argmax.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError(
            "spp_triton: this max-pooling output was computed with with_argmax=False (no input "
            "required grad at the time), so it cannot be differentiated"
        )
    grads = pyramid_pool_backward_op(
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
    # autograd matches the returned structure to the inputs': an empty list input (``scales`` of
    # an adaptive call) needs an empty list back, a non-empty list of floats a None.
    no_scales = [] if not ctx.scales else None
    return list(grads), None, None, no_scales, None, None, None, None


pyramid_pool_op.register_autograd(_backward, setup_context=_setup_context)
