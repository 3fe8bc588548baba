"""roi_spp_pool forward + backward vs torchvision roi_pool per level + cat, alternating.

Usage: ``OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks python alternating_roi_spp.py 1,2,3,6 ITERS``
from the checkout to measure (``benchmarks/cpu_path_vs_torchvision.make_case``: 512 RoIs x 256
channels x a 50x68 map, fp32). Prints the medians and the median per-iteration ratio.
"""

import statistics
import sys
import time

import torch
import torchvision
from cpu_path_vs_torchvision import make_case

import spp_triton


def main() -> None:
    torch.set_num_threads(1)
    levels, iters = [int(v) for v in sys.argv[1].split(",")], int(sys.argv[2])
    x, boxes = make_case(512, 256, 50, 68)
    x.requires_grad_()

    def ours():
        out = spp_triton.roi_spp_pool(x, boxes, levels, 1 / 16)
        out.backward(torch.ones_like(out))

    def ref():
        parts = [torchvision.ops.roi_pool(x, boxes, n, 1 / 16).flatten(1) for n in levels]
        out = torch.cat(parts, 1)
        out.backward(torch.ones_like(out))

    times = {"o": [], "r": []}
    for _ in range(iters):
        for key, fn in (("o", ours), ("r", ref)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["o"], times["r"], strict=True))
    print(
        f"{levels} ours {statistics.median(times['o']) * 1e3:.1f} ms, "
        f"ref {statistics.median(times['r']) * 1e3:.1f} ms, ratio {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
