"""Training and evaluation of spp_triton's detectron2 models: what ``spp-triton-train`` /
``tools/train_net.py`` runs. Importing it imports :mod:`spp_triton.modeling` (the model parts)
and :mod:`spp_triton.data` (the embedded datasets) and changes nothing else.

* :mod:`~spp_triton.engine.defaults`: :func:`setup` (yacs config: file, overrides, CPU fallback,
  validation, detectron2's ``default_setup``), :func:`resolve_device`, :func:`register_datasets`,
  :func:`fast_coco_eval_available`.
* :mod:`~spp_triton.engine.trainer`: :class:`Trainer` (detectron2's ``DefaultTrainer`` with COCO
  evaluation, CPU DDP, finite-only checkpoints, exact resume), :func:`create_ddp_model`.
* :mod:`~spp_triton.engine.checkpoint`: :class:`FiniteCheckpointer`, random states,
  :func:`resume_exactly`.
* :mod:`~spp_triton.engine.launch`: :func:`launch` (GPUs, gloo CPU processes, ``torchrun``).
* :mod:`~spp_triton.engine.lazy`: the LazyConfig (``.py``) path, :func:`setup_lazy`,
  :func:`main_lazy`; :mod:`~spp_triton.engine.solver`: :class:`ClippedSGD` for their optimizers.
"""

from spp_triton.engine.checkpoint import FiniteCheckpointer, resume_exactly
from spp_triton.engine.defaults import (
    fast_coco_eval_available,
    register_datasets,
    resolve_device,
    setup,
)
from spp_triton.engine.launch import launch
from spp_triton.engine.lazy import is_lazy_config, main_lazy, setup_lazy
from spp_triton.engine.solver import ClippedSGD
from spp_triton.engine.trainer import Trainer, create_ddp_model

__all__ = [
    "setup",
    "resolve_device",
    "register_datasets",
    "fast_coco_eval_available",
    "Trainer",
    "create_ddp_model",
    "FiniteCheckpointer",
    "resume_exactly",
    "launch",
    "is_lazy_config",
    "setup_lazy",
    "main_lazy",
    "ClippedSGD",
]
