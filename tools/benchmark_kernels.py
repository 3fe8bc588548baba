#!/usr/bin/env python
"""Kernel benchmarks against torchvision, detectron2 and PyTorch: ``spp-triton-bench``.

    tools/benchmark_kernels.py --quick
    tools/benchmark_kernels.py --device cpu --rois 64,256 --channels 64,256 --dtypes fp32

See :mod:`spp_triton.bench.kernels` for the cases, the timing and the outputs.
"""

import os
import sys

# Run from a checkout without installing: make the repository's spp_triton importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spp_triton.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
