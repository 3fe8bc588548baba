"""Ours vs the reference on CPU, alternating every iteration, in one process (one thread).

* ``python alternating.py fpn K fwd|bwd ITERS``: TritonROIPooler(7) vs detectron2
  ROIPooler(ROIPool) on FPN P2-P5 maps of a 2-image 800x1344 batch, 256 channels, K proposal-like
  boxes (``spp_triton.bench.cases.make_boxes``); ``bwd`` times forward + backward.
* ``python alternating.py roi_spp LEVELS ITERS`` (e.g. ``1,2,3,6``): roi_spp_pool forward +
  backward vs torchvision roi_pool per level + cat on
  ``benchmarks/cpu_path_vs_torchvision.make_case`` (512 RoIs x 256 channels x 50x68, fp32); needs
  ``benchmarks`` on PYTHONPATH.

Run with ``OMP_NUM_THREADS=1`` and the checkout to measure on PYTHONPATH. Prints the medians and
the median of the per-iteration ratios (ours / reference; < 1: ours faster).
"""

import statistics
import sys
import time

import torch


def _fpn(k: int, mode: str):
    from detectron2.modeling.poolers import ROIPooler

    from spp_triton.bench.cases import _box_lists, make_boxes
    from spp_triton.modeling import TritonROIPooler

    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 256, 800 // s, 1344 // s, generator=g) for s in strides]
    box_lists = _box_lists(make_boxes(k, 2, (800, 1333), g), 2, torch.float32)
    scales = tuple(1.0 / s for s in strides)
    ours, d2 = TritonROIPooler(7, scales), ROIPooler(7, scales, 0, "ROIPool")
    assert torch.equal(ours(feats, box_lists), d2(feats, box_lists))
    if mode == "bwd":
        feats = [f.requires_grad_() for f in feats]
    return (lambda: ours(feats, box_lists)), (lambda: d2(feats, box_lists)), mode == "bwd"


def _roi_spp(levels: list[int]):
    import torchvision
    from cpu_path_vs_torchvision import make_case

    import spp_triton

    x, boxes = make_case(512, 256, 50, 68)
    x.requires_grad_()
    ours = lambda: spp_triton.roi_spp_pool(x, boxes, levels, 1 / 16)  # noqa: E731
    ref = lambda: torch.cat(  # noqa: E731
        [torchvision.ops.roi_pool(x, boxes, n, 1 / 16).flatten(1) for n in levels], 1
    )
    return ours, ref, True


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "fpn":
        ours, ref, backward = _fpn(int(sys.argv[2]), sys.argv[3])
    else:
        ours, ref, backward = _roi_spp([int(v) for v in sys.argv[2].split(",")])
    iters = int(sys.argv[-1])

    def run(fn):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))

    times = {"ours": [], "ref": []}
    for _ in range(iters):
        for name, fn in (("ours", ours), ("ref", ref)):
            start = time.perf_counter()
            run(fn)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["ours"], times["ref"], strict=True))
    print(
        f"{' '.join(sys.argv[1:-1])}: ours {statistics.median(times['ours']) * 1e3:.1f} ms, "
        f"reference {statistics.median(times['ref']) * 1e3:.1f} ms, ratio {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
