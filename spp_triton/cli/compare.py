"""``spp-triton-compare`` (``tools/compare_heads.py``): train, evaluate and compare ROI heads from
config files; write ``report.md``/``report.json`` and plots.

    spp-triton-compare                                  # the four configs/Shapes heads
    spp-triton-compare --configs A.yaml B.yaml --output-dir output/cmp SOLVER.MAX_ITER 100

Every config is checked (and its model built) before the first training starts. Runs are kept in
``<output-dir>/<config>-<key>/``, keyed by the full resolved training config: a finished run of the
same config is reused, an interrupted one resumed, and a changed config or override trains
afresh. See :mod:`spp_triton.compare` for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from spp_triton.compare import DEFAULT_CONFIGS

    parser = argparse.ArgumentParser(
        prog="spp-triton-compare",
        description="Train, evaluate and compare detectron2 ROI heads from config files; write "
        "report.md, report.json and plots (ap.png, loss.png, speed.png).",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        metavar="CONFIG",
        help="yacs config files, one per head: paths, or names of configs shipped with "
        "spp_triton (default: the four configs/Shapes heads)",
    )
    parser.add_argument(
        "--output-dir",
        default=Path("output/compare_heads"),
        type=Path,
        help="folder for the report, the plots and one run folder per head; finished runs there "
        "are reused, interrupted ones resumed (default: output/compare_heads)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per head, with SEED s, s+1, ... from the config's SEED (default 1); the "
        "report gives mean ± std and says which AP differences exceed the spread",
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes per training (spp-triton-train's)"
    )
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
    return parser


def main(argv=None) -> int:
    from spp_triton.compare import compare, write_report

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    parallel = args.parallel
    if parallel is None:  # CPU: one single-threaded training per core beats one 2-thread run
        import torch

        parallel = 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))
    results = compare(
        args.configs, args.output_dir, args.opts, args.num_gpus, parallel, seeds=args.seeds
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["spp-triton-compare", *argv])
    write_report(results, args.output_dir, command, time.perf_counter() - start)
    return 0


def cli(argv=None) -> int:
    """Console-script entry point: a bad config or a failed training is one clear line."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"spp-triton-compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
