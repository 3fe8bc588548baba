"""Checkpoints that never hold non-finite weights, and exact resumption.

* :class:`FiniteCheckpointer`: a ``DetectionCheckpointer`` that refuses to write NaN/Inf weights
  and stores the random states with every checkpoint.
* :func:`resume_exactly`: after a checkpoint was loaded into a detectron2 ``SimpleTrainer``,
  replay its data loader and restore the random states, so that the resumed run continues as an
  uninterrupted one would.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["FiniteCheckpointer", "rng_state", "set_rng_state", "resume_exactly"]


def rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when present) random states, in types that
    ``torch.load(weights_only=True)`` accepts (tensors, numbers, tuples)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class FiniteCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that refuses to write weights containing NaN/Inf, and that
    stores the random states with each checkpoint (so that a resumed run continues exactly).

    A diverging run then leaves the checkpoints (and ``last_checkpoint``) of its last good state.
    """

    def save(self, name: str, **kwargs) -> None:
        kwargs.setdefault("rng", rng_state())
        bad = [
            k
            for k, v in self.model.state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            logging.getLogger("detectron2").error(
                f"Not saving checkpoint {name!r}: non-finite values in {len(bad)} tensors "
                f"(first: {bad[0]}); last_checkpoint still names the last finite checkpoint."
            )
            return
        super().save(name, **kwargs)


def resume_exactly(trainer, checkpoint) -> int:
    """Continue a resumed run where ``checkpoint`` was taken: replay the data loader of
    ``trainer`` (a detectron2 ``SimpleTrainer``, or a ``DefaultTrainer``) to there (same batches,
    same augmentations) and restore the random states saved with the checkpoint. ``trainer.iter``
    is the checkpoint's iteration (loading it set it). Returns the iteration to start at. A
    resumed run so reaches the weights an uninterrupted run reaches (bitwise on CPU with
    deterministic settings and no data loader workers)."""
    start_iter = trainer.iter + 1  # the checkpoint holds the iteration that had just finished
    inner = getattr(trainer, "_trainer", trainer)  # DefaultTrainer wraps a SimpleTrainer
    data = inner._data_loader_iter  # an attribute on v0.6, a property on main
    for _ in range(start_iter):
        next(data)
    if checkpoint and "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    return start_iter
