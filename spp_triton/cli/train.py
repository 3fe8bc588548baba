"""``spp-triton-train`` (``tools/train_net.py``): train / evaluate detectron2 detectors with
spp_triton's box poolers.

    spp-triton-train --config-file configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml
    spp-triton-train --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_spp124.yaml \\
        --num-gpus 8
    spp-triton-train --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    spp-triton-train --config-file CFG --resume          # continue from OUTPUT_DIR's last one

LazyConfigs (``.py``) train with detectron2's ``lazyconfig_train_net`` conventions
(:mod:`spp_triton.engine.lazy`); trailing ``key=value`` arguments override them:

    spp-triton-train --config-file configs/LazyConfigs/shapes_faster_rcnn_R_18_FPN_spp124.py \
        train.max_iter=100 dataloader.train.total_batch_size=4
    spp-triton-train --config-file X.py --eval-only train.init_checkpoint=output/.../model_final.pth

Flags are detectron2's ``default_argument_parser``; for yacs configs, trailing ``KEY VALUE`` pairs
override the config. ``--config-file`` is a path, or the name of a config shipped with spp_triton
(``configs/Shapes/...``; see :mod:`spp_triton.model_zoo`). Without CUDA the model runs on CPU;
``--num-gpus N`` then starts N gloo CPU processes, and ``torchrun --nproc-per-node N
tools/train_net.py ...`` works on CPU and GPU alike.
"""

from __future__ import annotations

import sys


def main(args):
    """One process's work: train, or evaluate with ``--eval-only``; a ``.py`` config goes to the
    LazyConfig path (:func:`spp_triton.engine.main_lazy`), anything else to yacs."""
    from spp_triton.engine import is_lazy_config

    if is_lazy_config(getattr(args, "config_file", "")):
        from spp_triton.engine import main_lazy

        return main_lazy(args)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    from spp_triton.engine import Trainer, setup

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


def build_parser():
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.prog = "spp-triton-train"
    return parser


def invoke_main(argv=None):
    from spp_triton.engine import launch

    args = build_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def cli(argv=None) -> int:
    """Console-script entry point."""
    invoke_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
