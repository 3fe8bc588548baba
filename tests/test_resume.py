"""Training survives interruption: a Shapes run stopped after a checkpoint and resumed with
``--resume`` reaches bitwise the same weights at iteration N as an uninterrupted run (CPU, one
thread, ``DATALOADER.NUM_WORKERS 0``). The trainer replays the data loader to the checkpoint and
restores the random states saved with it (``spp_triton.engine.Trainer.resume_or_load``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.engine import HookBase, default_argument_parser  # noqa: E402

from spp_triton.engine import Trainer, setup  # noqa: E402

CONFIG = "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml"
STOP_AFTER = 3  # 0-based iteration after which the first run "crashes" (a checkpoint is there)


class Interrupted(Exception):
    pass


class CrashAfter(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise Interrupted(f"simulated crash after iteration {self.iteration}")


def _cfg(out_dir, resume=False):
    opts = [
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        str(STOP_AFTER + 1),
        "DATALOADER.NUM_WORKERS",
        "0",
        "DATASETS.TEST",
        "()",
        "MODEL.DEVICE",
        "cpu",
        "OUTPUT_DIR",
        str(out_dir),
    ]
    argv = ["--config-file", CONFIG] + (["--resume"] if resume else []) + opts
    return setup(default_argument_parser().parse_args(argv))  # seeds RNGs from cfg.SEED


def _train(out_dir, resume=False, crash_after=None):
    trainer = Trainer(_cfg(out_dir, resume))
    if crash_after is not None:
        trainer.register_hooks([CrashAfter(crash_after)])
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


@pytest.mark.slow
def test_resumed_run_reaches_the_same_weights(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight, _ = _train(tmp_path / "straight")
        with pytest.raises(Interrupted):
            _train(tmp_path / "interrupted", crash_after=STOP_AFTER)
        assert (tmp_path / "interrupted" / "last_checkpoint").is_file()
        resumed, trainer = _train(tmp_path / "interrupted", resume=True)
    finally:
        torch.set_num_threads(threads)
    assert trainer.start_iter == STOP_AFTER + 1
    assert straight.keys() == resumed.keys()
    differing = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
