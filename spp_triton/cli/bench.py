"""``spp-triton-bench``: the kernel benchmark CLI (:mod:`spp_triton.bench.kernels`)."""

from __future__ import annotations

import sys


def cli(argv=None) -> int:
    """Console-script entry point."""
    from spp_triton.bench.kernels import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
