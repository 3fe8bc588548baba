#!/usr/bin/env python
"""Pretrain the Shapes configs' R-18 backbone on shape classification (one CPU core, ~5 min).

    tools/pretrain_backbone.py                       # rewrites the shipped weights
    tools/pretrain_backbone.py --output /tmp/w.pth --iters 5 --batch-size 4 --num-images 8

One intra-op thread unless --num-threads says otherwise (set OMP_NUM_THREADS=1 too on a shared
machine). Writes a detectron2 checkpoint (float16, ResNet names, loaded by name-suffix matching
into FPN and C4 models alike) and a ``.json`` record beside it. See
:mod:`spp_triton.modeling.pretrain`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields

# Run from a checkout without installing: make the repository's spp_triton importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spp_triton.modeling.pretrain import (  # noqa: E402
    DEFAULT_CONFIG,
    PretrainSettings,
    pretrain_backbone,
)
from spp_triton.modeling.weights import (  # noqa: E402
    SHAPES_R18_W24_PRETRAINED,
    resolve_shipped_path,
)

# The file the Shapes C4 configs name (inside the package, wherever the command runs).
DEFAULT_OUTPUT = resolve_shipped_path(SHAPES_R18_W24_PRETRAINED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain the Shapes backbone on classifying object-centred crops of images "
        "drawn by the shapes generator (seed disjoint from shapes_train/shapes_val)."
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"checkpoint to write (default: the shipped one, {SHAPES_R18_W24_PRETRAINED})",
    )
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        help="config whose MODEL.RESNETS, PIXEL_MEAN/STD and INPUT.FORMAT are used "
        f"(default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch intra-op threads (default 1)"
    )
    defaults = PretrainSettings()
    for field in fields(PretrainSettings):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(
                flag,
                type=type(value[0]),
                nargs=len(value),
                default=list(value),
                help=f"(default {value})",
            )
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    values = {f.name: getattr(args, f.name) for f in fields(PretrainSettings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    command = shlex.join(["tools/pretrain_backbone.py", *(sys.argv[1:] if argv is None else argv)])
    return pretrain_backbone(
        args.output,
        PretrainSettings(**values),
        config_file=args.config_file,
        command=command,
    )


if __name__ == "__main__":
    main()
