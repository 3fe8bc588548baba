"""Operation counts ("FLOPs") for the ``torch.ops.spp_triton`` operators.

Pooling does no multiply-adds, so FLOP counters (fvcore / detectron2 ``FlopCountAnalysis``,
``torch.utils.flop_counter.FlopCounterMode``) count it as zero or skip it with a warning. This
module gives them a count, in one unit: **reduction operations per input element read**.

Definition, per channel and per output bin of area ``A`` pixels (the bin's rectangle after
clipping to the feature map, see :mod:`spp_triton.bins`):

* ``max``: ``A`` (``A - 1`` comparisons plus the first load/compare; i.e. one per element read).
* ``avg``: ``A`` adds plus ``1`` divide, for a non-empty bin; an empty bin (``A == 0``, a RoI
  outside the map) costs ``0`` (the kernels write 0 without dividing).

summed over all bins of all levels, all regions and all channels. The backward
(``spp_triton::pyramid_pool_backward``) counts ``1`` add per routed gradient for ``max`` (one per
output element whose bin is non-empty) and ``A`` adds ``+ 1`` divide per bin for ``avg``.

Bin areas depend on the box *values*, so there are three levels of accuracy:

* **exact** (:func:`count_pool_ops`): from the actual regions. Used by the
  ``torch.utils.flop_counter`` formulas whenever the op receives real tensors (eager
  ``FlopCounterMode``), and available directly.
* **shape-only lower bound** (:func:`estimate_pool_ops` with ``roi_size=None``): every bin is
  assumed to hold one pixel, i.e. ``K * C * P`` for max and ``2 * K * C * P`` for avg, with ``K``
  regions, ``C`` channels, ``P = sum(bh * bw)`` bins per channel. Exact only when every bin is a
  single pixel; real RoIs are usually larger, so this *under*-counts (a 20 x 20-pixel RoI on its
  FPN level costs ~400 per channel at level 1, not 1; on real proposals a trial measured 151,200
  with the fvcore handles against the exact 794,592 of ``FlopCounterMode`` for the same pooling,
  about 5x). **This is what the fvcore/detectron2 handles report by default**: a
  ``FlopCountAnalysis`` total or ``by_operator()`` entry for these ops, and so any "GFLOPs" built
  on it, is a lower bound (``torch.jit`` traces carry shapes, not the values of computed tensors
  such as proposals). Also used by the ``flop_counter`` formulas under fake tensors
  (``torch.compile``, meta).
* **shape-only with a typical RoI size** (``roi_size=(h, w)`` in feature-map pixels, e.g. from
  the mean proposal size): each level costs ``S(h, bh) * S(w, bw)`` per RoI and channel, where
  ``S(e, n)`` is the summed length of the ``n`` RoI-partition bins over an extent of ``e`` pixels
  (``>= max(e, n)``; bins share boundary pixels). Pass it to :func:`make_flop_handles`.

Whole-map SPP (``spp_triton::pyramid_pool`` with ``partition="adaptive"``, i.e. ``spp_pool``) has
no box values: its shape-only count assumes every image's valid region is the full map (exact when
``spp_pool`` was called with ``image_sizes=None``, an upper bound otherwise); with real tensors it
is exact.

torchvision's RoI ops (which fvcore does not count at all) get fvcore handles too, in the same
unit, so that a RoIAlign/RoIPool box head's FLOPs include its pooler as the spp_triton heads' do
(:func:`estimate_roi_align_ops`, :func:`estimate_roi_pool_ops`):

* ``torchvision::roi_align``: per channel and output bin, ``4 * s + 1``: each of the ``s``
  bilinear samples reads (and weights) 4 input elements (fvcore's ``grid_sampler`` and
  ``upsample_bilinear2d`` handles also count 4 per bilinear sample), plus the averaging divide.
  With ``sampling_ratio > 0``, ``s = sampling_ratio ** 2`` and the count is exact from shapes.
  With ``sampling_ratio <= 0`` (adaptive, detectron2's default), ``s = ceil(roi_h / bh) *
  ceil(roi_w / bw)`` depends on the box values: the shape-only count takes ``s = 1`` (a lower
  bound, except for zero-size boxes under ``aligned=True``, which take no sample), or
  ``s`` from ``roi_size`` when given.
* ``torchvision::roi_pool`` (max over integer bins, like spp_triton's RoI max pooling): one read
  per bin as the shape-only lower bound, ``S(h, bh) * S(w, bw)`` per bin grid with ``roi_size``.

Usage::

    from spp_triton import profiling  # importing it registers nothing anywhere
    # detectron2's FlopCountAnalysis with the handles set on it (the detectron2 that
    # spp-triton-install-detectron2 installs; see detectron2_flop_count_analysis)
    flops = profiling.detectron2_flop_count_analysis(model, inputs)
    flops.by_operator()["pyramid_pool"]   # shape-only: a lower bound

    # or on any fvcore analysis (register_flop_handles(analysis) does the same):
    fvcore.nn.FlopCountAnalysis(model, inputs).set_op_handle(**profiling.flop_handles())

    profiling.register_flop_formulas()   # explicit, once; before the mode is built
    with torch.utils.flop_counter.FlopCounterMode() as fc:
        spp_triton.roi_spp_pool(x, boxes, (1, 2, 4), 1 / 16)
    fc.get_total_flops()   # exact count for these boxes
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch

import spp_triton.ops  # noqa: F401  (registers torch.ops.spp_triton.*)
from spp_triton import bins

__all__ = [
    "SPP_TRITON_FLOP_HANDLES",
    "OP_NAMES",
    "count_pool_ops",
    "count_pool_backward_ops",
    "estimate_pool_ops",
    "estimate_spp_pool_ops",
    "estimate_roi_align_ops",
    "estimate_roi_pool_ops",
    "FLOP_HANDLES",
    "TORCHVISION_OP_NAMES",
    "bin_extent_sum",
    "make_flop_handles",
    "flop_handles",
    "register_flop_handles",
    "register_flop_formulas",
    "detectron2_flop_count_analysis",
]

#: The names under which the ops appear in a ``torch.jit`` trace (fvcore handle keys).
OP_NAMES = (
    "spp_triton::pyramid_pool",
    "spp_triton::pyramid_pool_backward",
)

#: torchvision's RoI ops as they appear in a trace (detectron2's ROIPooler calls them; fvcore has
#: no handle for them and lists them in ``unsupported_ops()``).
TORCHVISION_OP_NAMES = (
    "torchvision::roi_align",
    "torchvision::roi_pool",
)


# ----------------------------------------------------------------------------- exact counts
def _bin_lengths(regions, scales, height, width, levels, partition, bin_dtype):
    """Per level, clipped bin lengths ``(rows [K, bh], cols [K, bw])`` (int64, >= 0), from the
    one bin geometry (``bins.region_bin_edges``)."""
    if partition != "roi":  # valid sizes clamped to the map, as the kernels read them
        regions = torch.stack(
            [
                regions[:, 0].to(torch.int64),
                regions[:, 1].to(torch.int64).clamp(1, height),
                regions[:, 2].to(torch.int64).clamp(1, width),
            ],
            1,
        )
    edges = bins.region_bin_edges(regions, scales, height, width, levels, partition, bin_dtype)
    return [
        ((r_hi - r_lo).clamp(min=0), (c_hi - c_lo).clamp(min=0)) for r_lo, r_hi, c_lo, c_hi in edges
    ]


def _area_totals(
    feature_shapes: Sequence[Sequence[int]],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    scales: Sequence[float],
    levels: Sequence[tuple[int, int]],
    partition: str,
) -> tuple[int, int]:
    """``(sum of bin areas, number of non-empty bins)`` over all regions and levels, one channel."""
    regions = regions.detach().to("cpu")
    bin_dtype = bins.bin_dtype_for(regions.dtype)
    regions = regions.to(bin_dtype)
    if feature_index is None:
        feature_index = torch.zeros(regions.shape[0], dtype=torch.int64)
    feature_index = feature_index.detach().to("cpu", torch.int64)
    area_sum, nonempty = 0, 0
    for f, shape in enumerate(feature_shapes):
        sel = regions[feature_index == f]
        if sel.shape[0] == 0:
            continue
        height, width = int(shape[-2]), int(shape[-1])
        for rows, cols in _bin_lengths(
            sel, float(scales[f]), height, width, levels, partition, bin_dtype
        ):
            area = rows[:, :, None] * cols[:, None, :]
            area_sum += int(area.sum())
            nonempty += int((area > 0).sum())
    return area_sum, nonempty


def count_pool_ops(
    feature_shapes: Sequence[Sequence[int]],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    scales: Sequence[float],
    levels: Sequence[tuple[int, int]] | Sequence[int],
    mode: str,
    partition: str = "roi",
) -> int:
    """Exact forward count for real region values (see the module docstring).

    Args:
        feature_shapes: the maps' shapes ``[N, C, H_f, W_f]`` (all the same ``C``).
        regions: ``partition="roi"``: Tensor[K, 5] (batch, x1, y1, x2, y2) in image coordinates;
            ``partition="adaptive"``: Tensor[N, 3] (batch, valid_h, valid_w).
        feature_index: int Tensor[K], the map of each region (``None``: all on map 0).
        scales: one spatial scale per map (ignored for ``"adaptive"``).
        levels: ints ``n`` or ``(bh, bw)`` pairs.
        mode: ``"max"`` or ``"avg"``.
    """
    levels = bins.normalize_levels(levels)
    channels = int(feature_shapes[0][1])
    area_sum, nonempty = _area_totals(
        feature_shapes, regions, feature_index, scales, levels, partition
    )
    return channels * (area_sum + (nonempty if mode == "avg" else 0))


def count_pool_backward_ops(
    feature_shapes: Sequence[Sequence[int]],
    regions: torch.Tensor,
    feature_index: torch.Tensor | None,
    scales: Sequence[float],
    levels: Sequence[tuple[int, int]] | Sequence[int],
    mode: str,
    partition: str = "roi",
    argmax: torch.Tensor | None = None,
) -> int:
    """Exact backward count: max, 1 add per output element with a non-empty bin (from ``argmax``
    when given, else from the bin geometry); avg, the forward count (``A`` adds + 1 divide)."""
    levels = bins.normalize_levels(levels)
    if mode == "max" and argmax is not None and argmax.numel():
        return int((argmax >= 0).sum())
    channels = int(feature_shapes[0][1])
    area_sum, nonempty = _area_totals(
        feature_shapes, regions, feature_index, scales, levels, partition
    )
    return channels * (nonempty if mode == "max" else area_sum + nonempty)


# ----------------------------------------------------------------------------- shape-only estimates
def bin_extent_sum(extent: int, n: int) -> int:
    """``S(e, n)``: summed length of the ``n`` RoI-partition bins over ``e >= 1`` pixels
    (unclipped; bin ``p`` is ``[floor(p * e / n), ceil((p + 1) * e / n))``, in exact integers)."""
    e = max(int(extent), 1)
    return sum(-(-(p + 1) * e // n) - (p * e // n) for p in range(n))


def estimate_pool_ops(
    num_regions: int,
    channels: int,
    levels: Sequence[tuple[int, int]] | Sequence[int],
    mode: str,
    roi_size: tuple[float, float] | None = None,
) -> int:
    """Shape-only forward count (see the module docstring).

    ``roi_size=None``: one pixel per bin, ``K * C * P`` (max) or ``2 * K * C * P`` (avg), a lower
    bound. ``roi_size=(h, w)``: every RoI assumed ``round(h) x round(w)`` feature pixels, inside
    the map: ``K * C * sum_levels S(h, bh) * S(w, bw)`` (+ ``K * C * P`` divides for avg).
    """
    levels = bins.normalize_levels(levels)
    p = bins.pyramid_width(levels)
    if roi_size is None:
        per_roi = p
    else:
        h, w = (max(1, int(round(v))) for v in roi_size)
        per_roi = sum(bin_extent_sum(h, bh) * bin_extent_sum(w, bw) for bh, bw in levels)
    divides = p if mode == "avg" else 0
    return int(num_regions) * int(channels) * (per_roi + divides)


def estimate_spp_pool_ops(
    shape: Sequence[int], levels: Sequence[tuple[int, int]] | Sequence[int], mode: str
) -> int:
    """Whole-map SPP of ``[N, C, H, W]`` with every image's valid region the full map (exact for
    ``image_sizes=None``): adaptive bins ``[floor(p * H / n), ceil((p + 1) * H / n))``."""
    n_img, channels, height, width = (int(v) for v in shape)
    regions = torch.tensor([[0, height, width]], dtype=torch.int64)
    levels = bins.normalize_levels(levels)
    area_sum, nonempty = _area_totals([shape], regions, None, [1.0], levels, "adaptive")
    return n_img * channels * (area_sum + (nonempty if mode == "avg" else 0))


def estimate_roi_align_ops(
    num_regions: int,
    channels: int,
    output_size: tuple[int, int],
    sampling_ratio: int,
    roi_size: tuple[float, float] | None = None,
) -> int:
    """torchvision ``roi_align`` forward count (see the module docstring): ``K * C * bh * bw *
    (4 * s + 1)``, ``s`` bilinear samples per bin: ``sampling_ratio ** 2`` when it is ``> 0``
    (exact); else (adaptive) ``ceil(h / bh) * ceil(w / bw)`` for ``roi_size=(h, w)`` feature
    pixels, or ``1`` without it (a lower bound)."""
    bh, bw = (int(v) for v in output_size)
    if sampling_ratio is not None and sampling_ratio > 0:
        samples = int(sampling_ratio) ** 2
    elif roi_size is not None:
        h, w = (max(float(v), 1.0) for v in roi_size)
        samples = math.ceil(h / bh) * math.ceil(w / bw)
    else:
        samples = 1
    return int(num_regions) * int(channels) * bh * bw * (4 * samples + 1)


def estimate_roi_pool_ops(
    num_regions: int,
    channels: int,
    output_size: tuple[int, int],
    roi_size: tuple[float, float] | None = None,
) -> int:
    """torchvision ``roi_pool`` forward count: its bins are those of a one-level max RoI pyramid,
    so this is :func:`estimate_pool_ops` with level ``output_size`` (one read per bin without
    ``roi_size``, a lower bound)."""
    bh, bw = (int(v) for v in output_size)
    return estimate_pool_ops(num_regions, channels, [(bh, bw)], "max", roi_size)


# ----------------------------------------------------------------------------- fvcore handles
def _jit_shape(value) -> list[int] | None:
    try:
        if value.isCompleteTensor():
            return list(value.type().sizes())
    except RuntimeError:
        pass
    return None


def _jit_constant(value) -> Any:
    """The Python value of a constant (or a list of constants) in a trace; ``None`` if computed."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [_jit_constant(v) for v in node.inputs()]
        return None if any(i is None for i in items) else items
    try:
        return value.toIValue()
    except RuntimeError:
        return None


def _jit_list_shapes(value) -> list[list[int] | None]:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_jit_shape(v) for v in node.inputs()]
    return [None]


def _levels_from(levels_value, out_width: int | None, channels: int | None):
    levels_hw = _jit_constant(levels_value)
    if levels_hw is not None:
        return bins.unflatten_levels(levels_hw)
    if out_width is not None and channels:
        return [(1, out_width // channels)]  # only P = bins per channel matters to the estimate
    raise ValueError("spp_triton flop handle: cannot determine the pyramid levels from the trace")


def _handle_pyramid_pool(inputs, outputs, roi_size):
    """``spp_triton::pyramid_pool(features, regions, feature_index, scales, levels_hw, mode,
    partition, with_argmax)``: whole-map SPP (``partition="adaptive"``) or RoI pooling."""
    out_shape = _jit_shape(outputs[0])
    shapes = [s for s in _jit_list_shapes(inputs[0]) if s]
    channels = shapes[0][1] if shapes else None
    levels_value, mode_value = inputs[4], inputs[5]
    if _jit_constant(inputs[6]) == "adaptive":
        if not shapes:
            raise ValueError("spp_triton flop handle: the trace carries no input shape")
        levels = _levels_from(levels_value, None, channels)
        return estimate_spp_pool_ops(shapes[0], levels, _jit_constant(mode_value) or "max")
    rois = _jit_shape(inputs[1])
    num = rois[0] if rois else (out_shape[0] if out_shape else 0)
    if channels is None:
        raise ValueError("spp_triton flop handle: the trace carries no feature-map shape")
    levels = _levels_from(levels_value, out_shape[1] if out_shape else None, channels)
    mode = _jit_constant(mode_value) or "max"
    return estimate_pool_ops(num, channels, levels, mode, roi_size)


def _roi_op_dims(inputs, outputs) -> tuple[int, int, int, int]:
    """``(K, C, bh, bw)`` of a torchvision roi_align/roi_pool node: from its output's shape, else
    from the input shapes and the output-size constants."""
    out = _jit_shape(outputs[0])
    if out is not None and len(out) == 4:
        return tuple(int(v) for v in out)
    feat, rois = _jit_shape(inputs[0]), _jit_shape(inputs[1])
    bh, bw = _jit_constant(inputs[3]), _jit_constant(inputs[4])
    if feat is None or rois is None or bh is None or bw is None:
        raise ValueError("torchvision RoI op flop handle: the trace carries no shapes")
    return int(rois[0]), int(feat[1]), int(bh), int(bw)


def make_flop_handles(roi_size: tuple[float, float] | None = None) -> dict:
    """fvcore handles for the spp_triton ops and torchvision's ``roi_align``/``roi_pool`` (keys:
    the names in a ``torch.jit`` trace: ``OP_NAMES + TORCHVISION_OP_NAMES``).

    ``roi_size``: typical RoI size ``(h, w)`` in feature-map pixels for the RoI ops' estimate.
    Default ``None``: the shape-only count, **a lower bound** for the RoI ops (one pixel per bin
    for the spp_triton RoI ops and roi_pool; one bilinear sample per bin for roi_align with
    adaptive sampling); whole-map ``spp_pool`` and roi_align with ``sampling_ratio > 0`` are
    exact from shapes. See the module docstring.
    """

    def pyramid_pool_handle(inputs, outputs):
        return _handle_pyramid_pool(inputs, outputs, roi_size)

    def backward_handle(inputs, outputs):
        # (grad, feature_shapes, regions, feature_index, scales, levels_hw, mode, partition, argmax)
        grad = _jit_shape(inputs[0])
        mode = _jit_constant(inputs[6]) or "max"
        if grad is None:
            return 0
        per_output = 1 if mode == "max" else 2
        return int(math.prod(grad)) * per_output

    def roi_align_handle(inputs, outputs):
        # torchvision::roi_align(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio,
        # aligned); a sampling_ratio computed in the trace counts as adaptive (lower bound)
        k, c, bh, bw = _roi_op_dims(inputs, outputs)
        sampling_ratio = _jit_constant(inputs[5]) if len(inputs) > 5 else None
        return estimate_roi_align_ops(k, c, (bh, bw), sampling_ratio or 0, roi_size)

    def roi_pool_handle(inputs, outputs):
        # torchvision::roi_pool(input, rois, spatial_scale, pooled_h, pooled_w) -> (out, argmax)
        k, c, bh, bw = _roi_op_dims(inputs, outputs)
        return estimate_roi_pool_ops(k, c, (bh, bw), roi_size)

    return {
        "spp_triton::pyramid_pool": pyramid_pool_handle,
        "spp_triton::pyramid_pool_backward": backward_handle,
        "torchvision::roi_align": roi_align_handle,
        "torchvision::roi_pool": roi_pool_handle,
    }


def flop_handles(roi_size: tuple[float, float] | None = None) -> dict:
    """A fresh dict of the fvcore handles (same as :func:`make_flop_handles`), for
    ``analysis.set_op_handle(**flop_handles())``. Without ``roi_size`` the RoI ops' counts are a
    shape-only **lower bound** (see :func:`make_flop_handles`)."""
    return make_flop_handles(roi_size)


#: Default fvcore handles for all ops (spp_triton's and torchvision's RoI ops; shape-only lower
#: bound for the RoI ops), usable as
#: ``FlopCountAnalysis(model, inputs).set_op_handle(**FLOP_HANDLES)``.
FLOP_HANDLES: dict = make_flop_handles()

#: The spp_triton ops' handles only (a subset of ``FLOP_HANDLES``; lower bound for the RoI ops).
SPP_TRITON_FLOP_HANDLES: dict = {name: FLOP_HANDLES[name] for name in OP_NAMES}


# ----------------------------------------------------------------------------- torch flop_counter
def _is_fake(*tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(
        isinstance(t, torch.Tensor) and (is_fake(t) or t.device.type == "meta") for t in tensors
    )


def _pool_formula(
    features,
    regions,
    feature_index,
    scales,
    levels_hw,
    mode,
    partition,
    with_argmax=True,
    *,
    out_val=None,
    **_,
):
    levels = bins.unflatten_levels(levels_hw)
    if _is_fake(*features, regions, feature_index):
        if partition == "adaptive":
            return estimate_spp_pool_ops(features[0].shape, levels, mode)
        return estimate_pool_ops(regions.shape[0], features[0].shape[1], levels, mode)
    shapes = [f.shape for f in features]
    if partition == "adaptive":
        return count_pool_ops(shapes, regions, None, [1.0], levels, mode, "adaptive")
    return count_pool_ops(shapes, regions, feature_index, scales, levels, mode)


def _backward_formula(
    grad,
    feature_shapes,
    regions,
    feature_index,
    spatial_scales,
    levels_hw,
    mode,
    partition,
    argmax,
    out_val=None,
    **_,
):
    if _is_fake(grad, regions, feature_index, argmax):
        return grad.numel() * (1 if mode == "max" else 2)
    shapes = [feature_shapes[i : i + 4] for i in range(0, len(feature_shapes), 4)]
    return count_pool_backward_ops(
        shapes,
        regions,
        feature_index,
        spatial_scales,
        bins.unflatten_levels(levels_hw),
        mode,
        partition,
        argmax,
    )


def _formulas() -> dict:
    ops = torch.ops.spp_triton
    return {
        ops.pyramid_pool: _pool_formula,
        ops.pyramid_pool_backward: _backward_formula,
    }


def register_flop_formulas() -> None:
    """Register the ``torch.utils.flop_counter`` formulas (raw tensors: exact when real, the
    shape-only lower bound when fake), through torch's public ``register_flop_formula``.
    Idempotent; importing this module does not call it. A ``FlopCounterMode`` built *before* this
    ran does not see them (it copies the registry); pass ``custom_mapping`` to such a mode
    instead."""
    from torch.utils import flop_counter

    for target, formula in _formulas().items():
        if target not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(target, get_raw=True)(formula)


def register_flop_handles(analysis, roi_size: tuple[float, float] | None = None):
    """Make the fvcore/detectron2 ``FlopCountAnalysis`` ``analysis`` count the spp_triton ops and
    torchvision's ``roi_align``/``roi_pool``: sets :func:`flop_handles` on it (fvcore's public
    ``set_op_handle``) and returns it. Without ``roi_size`` the RoI ops' counts are the
    shape-only **lower bound** (see :func:`make_flop_handles`).

    This is the one way the handles reach fvcore: importing this module changes none of fvcore's
    tables, so an analysis built without this call (or without
    ``set_op_handle(**flop_handles())``) skips these ops, as fvcore does by default.
    """
    return analysis.set_op_handle(**flop_handles(roi_size))


# ----------------------------------------------------------------------------- detectron2
def _import_detectron2_analysis():
    """``detectron2.utils.analysis`` (whose ``FlopCountAnalysis`` traces through
    ``detectron2.export.TracingAdapter``), or an ``ImportError`` that says how to get it.

    detectron2 v0.6 as released imports the Caffe2 exporter in ``detectron2/export/__init__.py``
    unconditionally (``from caffe2.proto import caffe2_pb2``); PyTorch no longer ships Caffe2, so
    that import fails and takes ``detectron2.utils.analysis`` with it. The v0.6 that
    ``spp-triton-install-detectron2`` (``make setup``) installs guards that import as detectron2's
    main branch does.
    """
    try:
        return importlib.import_module("detectron2.utils.analysis")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("caffe2"):
            raise
        raise ImportError(
            "detectron2.utils.analysis cannot be imported: this detectron2 "
            f"({_detectron2_location()}) imports the Caffe2 exporter unconditionally (v0.6 as "
            "released) and PyTorch no longer ships Caffe2. Reinstall detectron2 with "
            "`spp-triton-install-detectron2` (or `make setup` in a checkout), which guards that "
            "import as detectron2's main branch does."
        ) from err


def _detectron2_location() -> str:
    try:
        import detectron2
    except ImportError:
        return "not importable"
    return str(getattr(detectron2, "__file__", None) or "unknown location")


def detectron2_flop_count_analysis(model, inputs):
    """``detectron2.utils.analysis.FlopCountAnalysis(model, inputs)`` with the handles set
    (:func:`register_flop_handles`: spp_triton's ops and torchvision's roi_align/roi_pool).
    Raises ``ImportError`` naming ``spp-triton-install-detectron2`` for a detectron2 v0.6 install
    that still imports Caffe2 (see :func:`_import_detectron2_analysis`). Counts are computed
    lazily (``.total()``, ``.by_operator()``, ...); for the RoI pooling ops they are the
    shape-only **lower bound** (module docstring), so a total that includes them is a lower bound
    too."""
    analysis = _import_detectron2_analysis().FlopCountAnalysis(model, inputs)
    return register_flop_handles(analysis)
