#!/usr/bin/env python
"""Train, evaluate and compare ROI heads from config files; write report.md/.json and plots.

    tools/compare_heads.py                                  # the four configs/Shapes heads
    tools/compare_heads.py --configs A.yaml B.yaml --output-dir output/cmp SOLVER.MAX_ITER 100

Finished runs in the output folder are reused and interrupted ones resumed. See
spp_triton/compare.py for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spp_triton.compare import DEFAULT_CONFIGS, compare, write_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        metavar="CONFIG",
        help="yacs config files, one per head (default: the four Shapes heads)",
    )
    parser.add_argument("--output-dir", default="output/compare_heads", type=Path)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="trainings run at a time (default: 1 with a GPU; 2 on a CPU-only "
        "machine with >= 2 cores, one thread each)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides applied to every head"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parallel = args.parallel
    if parallel is None:  # CPU: one single-threaded training per core beats one 2-thread run
        import torch

        parallel = 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))
    results = compare(args.configs, args.output_dir, args.opts, args.num_gpus, parallel)
    command = " ".join(shlex.quote(a) for a in ["tools/compare_heads.py", *(argv or sys.argv[1:])])
    write_report(results, args.output_dir, command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
