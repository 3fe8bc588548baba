"""Operation counting of the spp_triton ops (spp_triton.profiling).

* detectron2's FlopCountAnalysis of the Shapes SPP model counts the pooling (the traced
  ``spp_triton::pyramid_pool``) with the documented shape-only formula;
* fvcore handles on a plain module (every public function, all through ``pyramid_pool``);
* torchvision's ``roi_align`` / ``roi_pool`` (a detectron2 ``ROIPooler``) are counted too, so a
  RoIAlign box head's FLOPs include its pooler as the spp_triton heads' do;
* torch.utils.flop_counter formulas: exact counts against a loop over the oracle's bins
  (spp_triton.reference), the backward, and the shape-only fallback under fake tensors.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import spp_triton
from spp_triton import profiling, reference

REPO = Path(__file__).resolve().parents[1]
SPP_CONFIG = REPO / "configs" / "Shapes" / "faster_rcnn_R_18_FPN_spp124.yaml"
ROIALIGN_CONFIG = REPO / "configs" / "Shapes" / "faster_rcnn_R_18_FPN_roialignv2.yaml"


@pytest.fixture(autouse=True, scope="module")
def _flop_formulas():
    """The torch.utils.flop_counter formulas, registered by the explicit call."""
    profiling.register_flop_formulas()


pytestmark = pytest.mark.usefixtures("single_thread")


def _boxes(gen, k, n_img, img_h, img_w):
    """Boxes partly outside the map, degenerate and ordinary (image coordinates)."""
    x = torch.rand(k, 2, generator=gen) * img_w * 1.4 - img_w * 0.2
    y = torch.rand(k, 2, generator=gen) * img_h * 1.4 - img_h * 0.2
    b = torch.randint(0, n_img, (k,), generator=gen).float()
    return torch.stack([b, x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], 1)


def _loop_count(shape, rois, scale, levels, mode):
    """The definition, by enumeration of the oracle's bins: max A, avg A + 1 (A > 0) per bin."""
    _, c, h, w = shape
    total = 0
    for r in rois.tolist():
        for n in levels:
            for (h0, h1), (w0, w1) in reference.roi_bins_reference(
                r[1], r[2], r[3], r[4], scale, n, n, h, w, torch.float32
            ):
                area = max(h1 - h0, 0) * max(w1 - w0, 0)
                total += area + (1 if mode == "avg" and area > 0 else 0)
    return c * total


# ------------------------------------------------------------------------------ detectron2
def test_detectron2_flop_analysis_counts_spp_pooling(monkeypatch):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from spp_triton.modeling import add_spp_config

    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(str(SPP_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "SPP"

    calls = []
    original = spp_triton.functional._multilevel_roi_spp_pool

    def spy(features, rois, feature_index, spatial_scales, levels, mode):
        calls.append(
            dict(
                shapes=[tuple(f.shape) for f in features],
                rois=rois.detach().clone(),
                index=feature_index.detach().clone(),
                scales=list(spatial_scales),
                levels=list(levels),
                mode=mode,
            )
        )
        return original(features, rois, feature_index, spatial_scales, levels, mode)

    monkeypatch.setattr(spp_triton.functional, "_multilevel_roi_spp_pool", spy)
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "height": 96, "width": 128}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = profiling.detectron2_flop_count_analysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
        unsupported = analysis.unsupported_ops()

    assert len(calls) == 1, "the SPP head pools all FPN levels in one op call"
    call = calls[0]
    k, c = call["rois"].shape[0], call["shapes"][0][1]
    levels = [(n, n) if isinstance(n, int) else tuple(n) for n in call["levels"]]
    expected = profiling.estimate_pool_ops(k, c, levels, call["mode"])
    assert k > 0 and expected == k * c * 21
    assert by_op["pyramid_pool"] == expected > 0
    assert "spp_triton::pyramid_pool" not in unsupported
    assert by_op["conv"] > 0 and by_op["linear"] > 0  # the rest of the model is still counted
    # the shape-only count is a lower bound of the exact count for these proposals
    exact = profiling.count_pool_ops(
        call["shapes"], call["rois"], call["index"], call["scales"], levels, call["mode"]
    )
    assert exact >= expected


def test_detectron2_flop_analysis_counts_roialign_pooler():
    """The RoIAlignV2 head of the same benchmark: its pooler (torchvision::roi_align, one call per
    FPN level) is counted, 4 reads per bilinear sample + 1 divide per output element: exact for a
    fixed sampling_ratio (sampling_ratio**2 samples), a lower bound (1 sample) for 0."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from spp_triton.modeling import add_spp_config

    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(str(ROIALIGN_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    box = cfg.MODEL.ROI_BOX_HEAD
    assert box.POOLER_TYPE == "ROIAlignV2"
    samples = box.POOLER_SAMPLING_RATIO**2 if box.POOLER_SAMPLING_RATIO > 0 else 1

    outputs = []
    handle = model.roi_heads.box_pooler.register_forward_hook(lambda m, i, o: outputs.append(o))
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "height": 96, "width": 128}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = profiling.detectron2_flop_count_analysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
        unsupported = analysis.unsupported_ops()
    handle.remove()

    k, c, ph, pw = outputs[-1].shape
    assert k > 0 and (ph, pw) == (box.POOLER_RESOLUTION, box.POOLER_RESOLUTION)
    assert by_op["roi_align"] == k * c * ph * pw * (4 * samples + 1) > 0
    assert "torchvision::roi_align" not in unsupported
    assert by_op["conv"] > 0 and by_op["linear"] > 0


def test_detectron2_flop_analysis_with_an_unpatched_v06(tmp_path):
    """With a detectron2 v0.6 whose export package imports the Caffe2 exporter unconditionally
    (an install that spp_triton's installer did not make): a clear ImportError that names the
    installer, and no edits of sys.modules. A copy of the installed package with v0.6's original
    export/__init__.py, first on the path of a fresh interpreter."""
    import detectron2

    copy = tmp_path / "site" / "detectron2"
    shutil.copytree(
        Path(detectron2.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "export" / "__init__.py").write_text(
        "# -*- coding: utf-8 -*-\n\n"
        "from .api import *\n"
        "from .flatten import TracingAdapter\n"
        "from .torchscript import scripting_with_instances, dump_torchscript_IR\n\n"
        '__all__ = [k for k in globals().keys() if not k.startswith("_")]\n'
    )
    code = textwrap.dedent(
        f"""
        import sys, warnings
        sys.path.insert(0, {str(copy.parent)!r})
        import torch
        import detectron2
        assert detectron2.__file__.startswith({str(copy)!r}), detectron2.__file__
        try:
            import detectron2.utils.analysis
        except ModuleNotFoundError as err:
            assert err.name.startswith("caffe2"), err
        else:
            raise AssertionError("this copy should fail on caffe2")
        from spp_triton import profiling

        before = set(sys.modules)
        try:
            profiling.detectron2_flop_count_analysis(torch.nn.Identity(), (torch.zeros(1),))
        except ImportError as err:
            assert "spp-triton-install-detectron2" in str(err), err
        else:
            raise AssertionError("expected an ImportError")
        assert "detectron2.export.api" not in sys.modules or "detectron2.export.api" in before
        print("clear error ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clear error ok" in proc.stdout


def test_importing_profiling_registers_nothing():
    """Importing spp_triton.profiling changes neither fvcore's default handles nor torch's
    flop_counter registry; register_flop_formulas() and register_flop_handles(analysis) do."""
    code = textwrap.dedent(
        """
        import importlib
        import torch
        from torch.utils import flop_counter
        fvcore_defaults = importlib.import_module("fvcore.nn.flop_count")._DEFAULT_SUPPORTED_OPS
        before = (dict(fvcore_defaults), dict(flop_counter.flop_registry))
        from spp_triton import profiling
        assert (dict(fvcore_defaults), dict(flop_counter.flop_registry)) == before
        profiling.register_flop_formulas()
        assert dict(fvcore_defaults) == before[0]
        assert all(op in flop_counter.flop_registry for op in profiling._formulas())
        from fvcore.nn import FlopCountAnalysis
        fca = profiling.register_flop_handles(FlopCountAnalysis(torch.nn.Identity(), torch.ones(1)))
        assert set(profiling.flop_handles()) <= set(fca._op_handles)
        assert dict(fvcore_defaults) == before[0]
        print("clean import ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clean import ok" in proc.stdout
    assert set(profiling.SPP_TRITON_FLOP_HANDLES) == set(profiling.OP_NAMES)
    assert set(profiling.flop_handles()) == set(profiling.OP_NAMES) | set(
        profiling.TORCHVISION_OP_NAMES
    )


# ------------------------------------------------------------------------------ torchvision ops
class _Pooler(torch.nn.Module):
    """A detectron2 ROIPooler over four FPN levels, as a box head uses it."""

    def __init__(self, pooler_type, sampling_ratio=0, output_size=7):
        super().__init__()
        from detectron2.modeling.poolers import ROIPooler

        self.pooler = ROIPooler(
            output_size=output_size,
            scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
            sampling_ratio=sampling_ratio,
            pooler_type=pooler_type,
        )

    def forward(self, f2, f3, f4, f5, boxes_a, boxes_b):
        from detectron2.structures import Boxes

        return self.pooler([f2, f3, f4, f5], [Boxes(boxes_a), Boxes(boxes_b)])


def _pooler_inputs(channels=6):
    g = torch.Generator().manual_seed(5)
    feats = tuple(torch.randn(2, channels, 96 // s, 128 // s, generator=g) for s in (4, 8, 16, 32))
    # small, medium and large boxes (in image pixels) so that every FPN level gets some
    sizes = torch.tensor([12.0, 30, 60, 110, 200, 350, 20, 90, 16])
    xy = torch.rand(len(sizes), 2, generator=g) * 80
    boxes = torch.cat([xy, xy + sizes[:, None]], 1)
    return feats, boxes[:5], boxes[5:]


def _pooler_flops(module, inputs, handles):
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs)
        fca.set_op_handle(**handles)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fca.by_operator(), fca.unsupported_ops()


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_fvcore_counts_roialign_pooler(sampling_ratio):
    """ROIPooler(ROIAlignV2): one torchvision::roi_align per level; per output element 4 reads per
    bilinear sample + 1 divide, with sampling_ratio**2 samples (exact) or, for the adaptive
    sampling_ratio=0, one sample (the shape-only lower bound)."""
    feats, boxes_a, boxes_b = _pooler_inputs()
    module = _Pooler("ROIAlignV2", sampling_ratio)
    by_op, unsupported = _pooler_flops(module, (*feats, boxes_a, boxes_b), profiling.flop_handles())
    samples = sampling_ratio**2 if sampling_ratio > 0 else 1
    k, c = len(boxes_a) + len(boxes_b), feats[0].shape[1]
    assert by_op["roi_align"] == k * c * 7 * 7 * (4 * samples + 1) > 0
    assert not [name for name in unsupported if "roi_align" in name]
    assert unsupported  # (the pooler's box arithmetic is still reported, as before)
    if sampling_ratio == 0:  # a lower bound of torchvision's adaptive sample count
        from detectron2.modeling.poolers import assign_boxes_to_levels
        from detectron2.structures import Boxes

        boxes = torch.cat([boxes_a, boxes_b])
        levels = assign_boxes_to_levels([Boxes(boxes_a), Boxes(boxes_b)], 2, 5, 224, 4)
        exact = 0
        for box, level in zip(boxes.tolist(), levels.tolist(), strict=True):
            scale = 1 / 2 ** (level + 2)
            h, w = (box[3] - box[1]) * scale, (box[2] - box[0]) * scale  # aligned=True
            exact += c * 7 * 7 * (4 * math.ceil(h / 7) * math.ceil(w / 7) + 1)
        assert exact > by_op["roi_align"]


def test_fvcore_roialign_adaptive_sampling_with_roi_size_hint():
    """With every RoI 20 x 9 feature pixels, adaptive sampling takes ceil(20/7) x ceil(9/7) = 3 x 2
    samples per bin, whatever the level."""
    feats, boxes_a, boxes_b = _pooler_inputs(channels=3)
    module = _Pooler("ROIAlignV2", 0)
    handles = profiling.make_flop_handles(roi_size=(20, 9))
    by_op, _ = _pooler_flops(module, (*feats, boxes_a, boxes_b), handles)
    assert by_op["roi_align"] == 9 * 3 * 49 * (4 * 3 * 2 + 1)


def test_fvcore_counts_roipool_pooler():
    """ROIPooler(ROIPool): torchvision::roi_pool, a max over each bin: one read per bin as the
    lower bound (as for spp_triton's max pooling); with a RoI size hint, the bins' summed area."""
    feats, boxes_a, boxes_b = _pooler_inputs()
    module = _Pooler("ROIPool")
    by_op, unsupported = _pooler_flops(module, (*feats, boxes_a, boxes_b), profiling.flop_handles())
    assert by_op["roi_pool"] == 9 * 6 * 7 * 7
    assert not [name for name in unsupported if "roi_pool" in name]
    hinted, _ = _pooler_flops(
        module, (*feats, boxes_a, boxes_b), profiling.make_flop_handles(roi_size=(10, 10))
    )
    # 10 pixels in 7 bins: [0,2) [1,3) [2,5) [4,6) [5,8) [7,9) [8,10) -> 2+2+3+2+3+2+2 = 16
    assert hinted["roi_pool"] == 9 * 6 * 16 * 16


# ------------------------------------------------------------------------------ fvcore
class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def _fvcore_pool_count(fn, inputs) -> int:
    """fvcore's count of the ``spp_triton::pyramid_pool`` node(s) that ``fn(*inputs)`` traces."""
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(_Call(fn), inputs)
        fca.set_op_handle(**profiling.SPP_TRITON_FLOP_HANDLES)
        fca.unsupported_ops_warnings(False)
        return fca.by_operator()["pyramid_pool"]


def test_fvcore_handles_count_each_op():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 12, 17, generator=g)
    rois = _boxes(g, 9, 2, 48, 68)
    index = torch.randint(0, 2, (9,), generator=g)
    roi_spp = _fvcore_pool_count(
        lambda x, r: spp_triton.roi_spp_pool(x, r, (1, 2, 4), 0.25, "avg"), (x, rois)
    )
    assert roi_spp == 2 * 9 * 5 * 21  # avg: 1 read + 1 divide per bin (lower bound)
    multi = _fvcore_pool_count(
        lambda x, r, i: spp_triton.multilevel_roi_spp_pool(
            [x, x[:, :, ::2, ::2]], r, i, [0.25, 0.125]
        ),
        (x, rois, index),
    )
    assert multi == 9 * 5 * 21
    # whole-map SPP is exact from shapes: per channel, level 1 reads 12*17, level 3 reads the
    # adaptive bins (12 -> 3 bins of 4 rows; 17 -> [0,6) [5,12) [11,17): 6 + 7 + 6 columns)
    spp = _fvcore_pool_count(lambda x: spp_triton.spp_pool(x, (1, 3), "max"), (x,))
    assert spp == 2 * 5 * (12 * 17 + 12 * 19)
    exact = profiling.count_pool_ops(
        [x.shape], torch.tensor([[0, 12, 17]]), None, [1.0], (1, 3), "max", "adaptive"
    )
    assert spp == 2 * exact
    # all three in one trace: one operator name, the sum of the three counts
    both = _fvcore_pool_count(
        lambda x, r: (
            spp_triton.roi_spp_pool(x, r, (1, 2, 4), 0.25, "avg"),
            spp_triton.spp_pool(x, (1, 3), "max"),
        ),
        (x, rois),
    )
    assert both == roi_spp + spp


def test_roi_size_hint_matches_exact_count_for_uniform_boxes():
    """With every RoI e x e feature pixels inside the map, the hinted estimate is exact."""
    from fvcore.nn import FlopCountAnalysis

    class One(torch.nn.Module):
        def forward(self, x, rois):
            return spp_triton.roi_spp_pool(x, rois, (1, 2, 3, 6), 1.0)

    x = torch.randn(1, 3, 30, 30)
    e = 11  # corners x0..x0+10 -> 11 pixels
    rois = torch.tensor([[0.0, s, s + 1, s + e - 1, s + e] for s in (0, 4, 9, 15)])
    exact = profiling.count_pool_ops([x.shape], rois, None, [1.0], (1, 2, 3, 6), "max")
    assert exact == _loop_count(x.shape, rois, 1.0, (1, 2, 3, 6), "max")
    assert profiling.estimate_pool_ops(4, 3, (1, 2, 3, 6), "max", roi_size=(e, e)) == exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(One(), (x, rois))
        fca.set_op_handle(**profiling.make_flop_handles(roi_size=(e, e)))
        assert fca.total() == exact


def test_bin_extent_sum():
    assert profiling.bin_extent_sum(8, 4) == 8  # bins tile exactly
    assert profiling.bin_extent_sum(7, 2) == 8  # [0,4) [3,7): the middle pixel is read twice
    assert profiling.bin_extent_sum(2, 6) == 6  # more bins than pixels: one pixel each
    for e in range(1, 30):
        for n in (1, 2, 3, 6, 7):
            assert max(e, n) <= profiling.bin_extent_sum(e, n) <= e + n - 1 or e < n


# ------------------------------------------------------------------------------ flop_counter
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_flop_counter_counts_a_direct_call_exactly(mode):
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 10, 13, generator=g, requires_grad=True)
    rois = _boxes(g, 12, 2, 40, 52)
    levels = (1, 2, 4)
    with FlopCounterMode(display=False) as fc:
        out = spp_triton.roi_spp_pool(x, rois, levels, 0.25, mode)
    counts = fc.get_flop_counts()["Global"]
    fwd = counts[torch.ops.spp_triton.pyramid_pool]
    assert fwd == _loop_count(x.shape, rois, 0.25, levels, mode) > 0
    assert fwd == profiling.count_pool_ops([x.shape], rois, None, [0.25], levels, mode)

    with FlopCounterMode(display=False) as fc:
        out = spp_triton.roi_spp_pool(x, rois, levels, 0.25, mode)
        out.backward(torch.ones_like(out))
    bwd = fc.get_flop_counts()["Global"][torch.ops.spp_triton.pyramid_pool_backward]
    if mode == "max":  # one routed add per output element whose bin is non-empty
        nonempty = _loop_count((1, 1, 10, 13), rois, 0.25, levels, "avg") - _loop_count(
            (1, 1, 10, 13), rois, 0.25, levels, "max"
        )
        assert bwd == 4 * nonempty
    else:
        assert bwd == fwd


def test_flop_counter_spp_and_multilevel():
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 14, generator=g)
    small = torch.randn(2, 3, 5, 7, generator=g)
    rois = _boxes(g, 10, 2, 36, 56)
    index = torch.randint(0, 2, (10,), generator=g)
    with FlopCounterMode(display=False) as fc:
        spp_triton.spp_pool(x, (1, 2, 4), "avg", image_sizes=[(9, 14), (5, 6)])
    spp_count = fc.get_flop_counts()["Global"][torch.ops.spp_triton.pyramid_pool]
    with FlopCounterMode(display=False) as fc:
        spp_triton.multilevel_roi_spp_pool([x, small], rois, index, [0.25, 0.125], (1, 2))
    multi_count = fc.get_flop_counts()["Global"][torch.ops.spp_triton.pyramid_pool]

    def adaptive(size, n):  # summed lengths of the adaptive bins
        return sum(math.ceil((p + 1) * size / n) - (p * size) // n for p in range(n))

    per_img = [
        sum(adaptive(h, n) * adaptive(w, n) + n * n for n in (1, 2, 4))
        for h, w in ((9, 14), (5, 6))
    ]
    assert spp_count == 3 * sum(per_img)
    expected = _loop_count(x.shape, rois[index == 0], 0.25, (1, 2), "max") + _loop_count(
        small.shape, rois[index == 1], 0.125, (1, 2), "max"
    )
    assert multi_count == expected


def test_flop_counter_fake_tensors_fall_back_to_shape_estimate():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 20, 30)
        rois = torch.empty(7, 5)
        with FlopCounterMode(display=False) as fc:
            torch.ops.spp_triton.pyramid_pool(
                [x], rois, None, [0.0625], [1, 1, 2, 2, 3, 3, 6, 6], "max", "roi"
            )
    assert fc.get_total_flops() == 7 * 8 * 50
