"""The yacs-config :class:`Trainer`, and DDP that also wraps CPU models.

* :class:`Trainer`: detectron2's ``DefaultTrainer`` with a COCO evaluator, DDP on CPU (gloo),
  a :class:`~spp_triton.engine.checkpoint.FiniteCheckpointer` (a diverging run stops with
  detectron2's ``FloatingPointError``; ``last_checkpoint`` keeps naming the last good
  checkpoint) and exact resumption.
* :func:`create_ddp_model`: detectron2's ``create_ddp_model``, with ``device_ids=None`` for CPU
  models (DDP rejects ``[local_rank]`` for them).
"""

from __future__ import annotations

import contextlib
import inspect
import os

from detectron2.engine import DefaultTrainer
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from spp_triton.engine.checkpoint import FiniteCheckpointer, resume_exactly
from spp_triton.engine.defaults import ensure_evaluator_files, fast_coco_eval_available
from spp_triton.modeling.config import build_model

__all__ = ["Trainer", "create_ddp_model"]


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``; a CPU model gets ``device_ids=None`` (DDP rejects
    ``[local_rank]`` for CPU modules)."""
    first = next(model.parameters(), None)
    if comm.get_world_size() > 1 and first is not None and first.device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _cpu_aware_ddp_in_default_trainer():
    """``DefaultTrainer.__init__`` calls the ``create_ddp_model`` of its own module, with
    ``device_ids=[local_rank]``; while our trainer is built (and only then), it calls
    :func:`create_ddp_model` instead."""
    import detectron2.engine.defaults as d2_defaults

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = d2_create_ddp_model


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` + COCO evaluation, CPU DDP, finite-only checkpoints and
    exact resumption."""

    def __init__(self, cfg):
        with _cpu_aware_ddp_in_default_trainer():
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        """:func:`spp_triton.modeling.build_model`: detectron2's ``build_model`` on a valid
        config, so that a config error names its key (not detectron2's ``Unknown pooler type:
        SPP``); a config :func:`~spp_triton.engine.setup` made was checked there already."""
        return build_model(cfg)

    def build_hooks(self):
        # Called at the end of DefaultTrainer.__init__, before the checkpoint hook is made.
        old = self.checkpointer
        self.checkpointer = FiniteCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        return super().build_hooks()

    # detectron2 v0.6's DefaultTrainer checkpoints neither the optimizer (momentum buffers) nor
    # the grad scaler (its SimpleTrainer has them in state_dict, but DefaultTrainer does not
    # forward to it; detectron2 main does). Forward when the installed version does not.
    _FORWARDS_INNER_STATE = "state_dict" in vars(DefaultTrainer)

    def state_dict(self):
        ret = super().state_dict()
        if not self._FORWARDS_INNER_STATE:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self._FORWARDS_INNER_STATE and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume: bool = True):
        """detectron2's resume, made exact (:func:`~spp_triton.engine.checkpoint.resume_exactly`:
        data loader replayed, random states restored)."""
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = resume_exactly(self, checkpoint)
        return checkpoint

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        tasks = ["bbox"]
        if cfg.MODEL.MASK_ON:
            tasks.append("segm")
        if cfg.MODEL.KEYPOINT_ON:
            tasks.append("keypoints")
        params = inspect.signature(COCOEvaluator).parameters
        kwargs = {}
        if "use_fast_impl" in params:
            kwargs["use_fast_impl"] = fast_coco_eval_available()
        if cfg.MODEL.KEYPOINT_ON and "kpt_oks_sigmas" in params:
            kwargs["kpt_oks_sigmas"] = cfg.TEST.KEYPOINT_OKS_SIGMAS
        ensure_evaluator_files([dataset_name])
        return COCOEvaluator(
            dataset_name, tasks=tuple(tasks), distributed=True, output_dir=output_folder, **kwargs
        )
