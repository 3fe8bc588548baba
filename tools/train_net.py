#!/usr/bin/env python
"""Train / evaluate detectron2 detectors with spp_triton's box poolers (yacs configs).

    tools/train_net.py --config-file configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml
    tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_spp124.yaml \
        --num-gpus 8
    tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR's last one

Flags are detectron2's ``default_argument_parser``; trailing ``KEY VALUE`` pairs override the
config. Without CUDA the model runs on CPU; ``--num-gpus N`` then starts N gloo CPU processes, and
``torchrun --nproc-per-node N tools/train_net.py ...`` works on CPU and GPU alike.
"""

from __future__ import annotations

import os
import sys

# Run from a checkout without installing: make the repository's spp_triton importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from spp_triton.modeling import Trainer, launch, setup  # noqa: E402


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
