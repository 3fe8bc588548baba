"""spp_triton.engine.trainer: the Trainer's COCO evaluator without compiled detectron2."""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

from d2_helpers import (  # noqa: E402
    SPP_CFG,
    make_cfg,
    one_thread,  # noqa: F401  (autouse)
)

from spp_triton.engine import (  # noqa: E402
    Trainer,
    fast_coco_eval_available,
)


def test_evaluator_uses_slow_coco_eval_without_compiled_detectron2(tmp_path):
    from detectron2 import _C

    cfg = make_cfg(SPP_CFG, ["OUTPUT_DIR", str(tmp_path)])
    evaluator = Trainer.build_evaluator(cfg, "shapes_val")
    assert evaluator._use_fast_impl == fast_coco_eval_available()
    if isinstance(getattr(_C, "_MISSING", None), str):  # spp_triton's placeholder _C
        assert fast_coco_eval_available() is False
