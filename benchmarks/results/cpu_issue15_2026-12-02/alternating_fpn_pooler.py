"""TritonROIPooler(7) vs detectron2 ROIPooler(ROIPool) on CPU, alternating every iteration.

Usage (one thread): ``OMP_NUM_THREADS=1 python alternating_fpn_pooler.py K fwd|bwd ITERS`` with the
checkout to measure on PYTHONPATH; FPN P2-P5 maps of a 2-image 800x1344 batch, 256 channels, K
proposal-like boxes (``spp_triton.bench.cases.make_boxes``). Prints the medians and the median of
the per-iteration ratios (ours / detectron2).
"""

import statistics
import sys
import time

import torch
from detectron2.modeling.poolers import ROIPooler

from spp_triton.bench.cases import _box_lists, make_boxes
from spp_triton.modeling import TritonROIPooler


def main() -> None:
    torch.set_num_threads(1)
    k, mode, iters = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 256, 800 // s, 1344 // s, generator=g) for s in strides]
    box_lists = _box_lists(make_boxes(k, 2, (800, 1333), g), 2, torch.float32)
    scales = tuple(1.0 / s for s in strides)
    ours, d2 = TritonROIPooler(7, scales), ROIPooler(7, scales, 0, "ROIPool")
    assert torch.equal(ours(feats, box_lists), d2(feats, box_lists))
    if mode == "bwd":
        feats = [f.requires_grad_() for f in feats]

    def run(pooler):
        out = pooler(feats, box_lists)
        if mode == "bwd":
            out.backward(torch.ones_like(out))

    times = {"ours": [], "d2": []}
    for _ in range(iters):
        for name, pooler in (("ours", ours), ("d2", d2)):
            start = time.perf_counter()
            run(pooler)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["ours"], times["d2"], strict=True))
    print(
        f"K={k} {mode}: ours {statistics.median(times['ours']) * 1e3:.1f} ms, "
        f"d2 {statistics.median(times['d2']) * 1e3:.1f} ms, ratio {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
