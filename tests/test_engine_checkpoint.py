"""spp_triton.engine.checkpoint: FiniteCheckpointer never writes non-finite weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    one_thread,  # noqa: F401  (autouse)
)

from spp_triton.engine import (  # noqa: E402
    FiniteCheckpointer,
)


def test_finite_checkpointer_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = FiniteCheckpointer(model, str(tmp_path))
    ckpt.save("model_good")
    assert (tmp_path / "model_good.pth").is_file()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ckpt.save("model_bad")
    assert not (tmp_path / "model_bad.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_good.pth"
