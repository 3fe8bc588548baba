#!/usr/bin/env python
"""Install detectron2 into the current Python environment, unless one already works.

The installer is :mod:`spp_triton.cli.install_detectron2` (also the console script
``spp-triton-install-detectron2`` of an installed wheel); this script runs it from a checkout
before anything else is installed (``make setup``), with only the standard library and pip:
``.venv/bin/python tools/install_detectron2.py``.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    installer = Path(__file__).resolve().parents[1] / "spp_triton" / "cli" / "install_detectron2.py"
    runpy.run_path(str(installer), run_name="__main__")
