"""CPU path speed: spp_triton.roi_spp_pool vs torchvision.ops.roi_pool once per level + cat.

Forward (issue: kernels, target ratio <= 0.6) and forward + backward (issue 15, target ratio
<= 1.0) on 512 RoIs x 256 channels x a 50x68 map for levels {1,2,4} and {1,2,3,6}.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_path_vs_torchvision.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
import torch.utils.benchmark as tb
import torchvision

os.environ.setdefault("SPP_TRITON_CPU_BACKEND", "torch")
import spp_triton  # noqa: E402


def make_case(num_rois: int, channels: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, height, width, generator=g)
    # detectron2-like proposals on a 16x-downsampled 800x1088 image
    img_h, img_w = height * 16, width * 16
    cx, cy = torch.rand(num_rois, generator=g) * img_w, torch.rand(num_rois, generator=g) * img_h
    bw = torch.exp(torch.rand(num_rois, generator=g) * 3.5) * 16
    bh = bw * torch.exp(torch.randn(num_rois, generator=g) * 0.4)
    batch = torch.randint(0, 2, (num_rois,), generator=g).float()
    boxes = torch.stack([batch, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    return x, boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="alternating rounds; the ratio is the median of per-round ratios",
    )
    parser.add_argument(
        "--passes",
        default="fwd,fwd_bwd",
        help="comma-separated: fwd (inference forward), fwd_bwd (forward + backward of a sum)",
    )
    args = parser.parse_args()
    x, boxes = make_case(args.rois, args.channels, 50, 68)
    scale = 1 / 16
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"torch threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"case: {args.rois} RoIs x {args.channels} ch x 50x68 map, fp32")
    print(
        f"timing: {args.rounds} alternating rounds of torch.utils.benchmark blocked_autorange "
        f"(min {args.min_run_time} s each); medians; ratio = median of per-round ratios"
    )
    print("| pass | levels | spp_triton (ms) | torchvision per level + cat (ms) | ratio |")
    print("|---|---|---|---|---|")
    xg = x.clone().requires_grad_()
    for pass_name in args.passes.split(","):
        for levels in ([1, 2, 4], [1, 2, 3, 6]):
            _time_pair(pass_name, x if pass_name == "fwd" else xg, boxes, scale, levels, args)


_STATEMENTS = {
    "fwd": (
        "spp_triton.roi_spp_pool(x, b, L, s)",
        "torch.cat([torchvision.ops.roi_pool(x, b, n, s).flatten(1) for n in L], 1)",
    ),
    "fwd_bwd": (
        "spp_triton.roi_spp_pool(x, b, L, s).backward(g)",
        "torch.cat([torchvision.ops.roi_pool(x, b, n, s).flatten(1) for n in L], 1).backward(g)",
    ),
}


def _time_pair(pass_name, x, boxes, scale, levels, args) -> None:
    """Time one pass of both implementations, alternating; print a table row."""
    ours = spp_triton.roi_spp_pool(x, boxes, levels, scale)
    ref = torch.cat([torchvision.ops.roi_pool(x, boxes, n, scale).flatten(1) for n in levels], 1)
    assert torch.equal(ours, ref), "outputs differ: not timing"
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    if x.requires_grad:
        (ga,) = torch.autograd.grad(ours, x, g)
        (gb,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(ga, gb, msg="gradients differ: not timing")
    env = {
        "x": x,
        "b": boxes,
        "s": scale,
        "L": levels,
        "g": g,
        "spp_triton": spp_triton,
        "torch": torch,
        "torchvision": torchvision,
    }
    ours_stmt, ref_stmt = _STATEMENTS[pass_name]
    ours_timer = tb.Timer(ours_stmt, globals=env)
    ref_timer = tb.Timer(ref_stmt, globals=env)
    # Alternate the two so that a change in machine load hits both alike.
    t_ours, t_ref = [], []
    for _ in range(args.rounds):
        t_ours.append(ours_timer.blocked_autorange(min_run_time=args.min_run_time).median)
        t_ref.append(ref_timer.blocked_autorange(min_run_time=args.min_run_time).median)
    ratio = statistics.median(a / b for a, b in zip(t_ours, t_ref, strict=True))
    print(
        f"| {pass_name} | {levels} | {statistics.median(t_ours) * 1e3:.2f} | "
        f"{statistics.median(t_ref) * 1e3:.2f} | {ratio:.2f} |"
    )


if __name__ == "__main__":
    main()
