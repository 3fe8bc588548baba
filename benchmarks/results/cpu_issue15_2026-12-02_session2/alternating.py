"""The first session's ``../cpu_issue15_2026-12-02/alternating.py`` (cases and timing loop, see
its docstring), run unchanged, plus one diagnostic switch.

``SPP_BENCH_NO_NAN_GUARD=1`` (for checkouts that have ``spp_triton.cpu._nan_rois``) turns the CPU
path's NaN guard off, to show what it costs; results are then wrong for NaN inputs.
"""

import os
import runpy
from pathlib import Path

if os.environ.get("SPP_BENCH_NO_NAN_GUARD") == "1":
    from spp_triton import cpu

    cpu._nan_rois = lambda *args: None

runpy.run_path(
    str(Path(__file__).resolve().parent.parent / "cpu_issue15_2026-12-02" / "alternating.py"),
    run_name="__main__",
)
