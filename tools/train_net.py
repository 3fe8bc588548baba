#!/usr/bin/env python
"""Train / evaluate detectron2 detectors with spp_triton's box poolers: ``spp-triton-train``.

    tools/train_net.py --config-file configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml
    tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    tools/train_net.py --config-file CFG --resume
    tools/train_net.py --config-file configs/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124.py \
        train.max_iter=200          # LazyConfigs: key=value overrides

See :mod:`spp_triton.cli.train` for everything it does.
"""

import os
import sys

# Run from a checkout without installing: make the repository's spp_triton importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spp_triton.cli.train import cli, invoke_main, main  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(cli())
