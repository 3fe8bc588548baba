#!/usr/bin/env python
"""Train, evaluate and compare ROI heads from config files: ``spp-triton-compare``.

    tools/compare_heads.py                                  # the four configs/Shapes heads
    tools/compare_heads.py --configs A.yaml B.yaml --output-dir output/cmp SOLVER.MAX_ITER 100

See :mod:`spp_triton.cli.compare` and :mod:`spp_triton.compare`.
"""

import os
import sys

# Run from a checkout without installing: make the repository's spp_triton importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spp_triton.cli.compare import cli, main  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(cli())
