#!/usr/bin/env python
"""Long property-based fuzzing of spp_triton against its references (`make fuzz`).

    tools/fuzz.py --cases 10000 [--interpreted 200] [--seed S]

Runs CASES random cases through the torch CPU path and INTERPRETED more through the Triton kernels
in Triton's interpreter (slow: seconds each), prints the count, and on a mismatch prints the
shrunk counter-example and exits 1. See spp_triton/testing.py for what a case is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The interpreter must be chosen before Triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPP_TRITON_CPU_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from spp_triton.testing import case_strategy, check_case  # noqa: E402


def run(label: str, cases: int, backend: str, rng_seed: int | None) -> int:
    os.environ["SPP_TRITON_CPU_BACKEND"] = backend
    count = 0

    @settings(
        max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=case_strategy())
    def fuzz(case):
        nonlocal count
        count += 1
        check_case(case)

    if rng_seed is not None:
        fuzz = seed(rng_seed)(fuzz)
    start = time.perf_counter()
    try:
        fuzz()
    except Exception as exc:  # hypothesis re-raises the shrunk failure
        print(f"[fuzz] {label}: FAILED after {count} cases: {exc}", flush=True)
        return 1
    print(
        f"[fuzz] {label}: {count} cases, 0 mismatches ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument(
        "--interpreted",
        type=int,
        default=200,
        help="cases through the Triton interpreter (0 to skip)",
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    failed = run("torch CPU path", args.cases, "torch", args.seed)
    if args.interpreted:
        failed |= run("Triton kernels (interpreter)", args.interpreted, "triton", args.seed)
    return failed


if __name__ == "__main__":
    sys.exit(main())
