"""Benchmark spp_triton's pooling against torchvision, detectron2 and PyTorch's adaptive pooling.

Cases (every implementation of a case gets the same inputs; outputs are checked before timing):

* ``spp``: whole-map SPP of ``[spp_batch, C, H/16, W/16]`` (the stride-16 map of the image):
  ``spp_triton.spp_pool`` vs ``F.adaptive_max_pool2d`` per level + cat, eager and under
  ``torch.compile``.
* ``roi_spp``: RoI SPP on the stride-16 map: ``spp_triton.roi_spp_pool`` vs
  ``torchvision.ops.roi_pool`` per level + cat (equal), and ``torchvision.ops.roi_align`` 7x7
  (the RoIAlign head's op: a different result, only timed).
* ``roi_pool``: RoI pooling 7x7: ``spp_triton.roi_pool`` vs ``torchvision.ops.roi_pool`` (equal)
  and ``roi_align`` 7x7 (timed).
* ``fpn_pool``: all FPN levels P2-P5 (strides 4, 8, 16, 32), 7x7, boxes assigned to levels by
  detectron2's rule: ``spp_triton.modeling.TritonROIPooler`` (one launch) vs detectron2
  ``ROIPooler(ROIPool)`` (equal) and ``ROIPooler(ROIAlignV2)`` (timed).
* ``fpn_spp``: the same with a spatial pyramid: ``SPPROIPooler`` vs ``ROIPooler(ROIPool)`` once
  per pyramid level + cat (equal) and ``ROIPooler(ROIAlignV2)`` 7x7 (timed).

All pooling is ``max`` (SPP-net, Fast R-CNN). The sweep runs over RoI count, channels, dtype and
pass (``fwd``, ``fwd+bwd``). Timing: CUDA, ``triton.testing.do_bench`` (median; it warms up and
flushes L2 before each call) on several input copies cycled so that no two consecutive calls read
the same memory; CPU, ``torch.utils.benchmark`` ``blocked_autorange`` median, also on cycled
copies.

Bytes floor (the least memory traffic any implementation needs; see benchmarks/NOTES.md):

* forward = output bytes + boxes (and level index) bytes + the bytes of the feature-map elements
  covered by at least one RoI window (all channels; whole-map SPP: the whole input). A RoI's window
  is its quantised rectangle clipped to its map, i.e. the union of its bins;
* fwd+bwd = forward + output-gradient bytes (read) + the full input-gradient bytes (written:
  the gradient map is dense, zeros included).

GB/s = floor / time; "% copy BW" = GB/s over the device's copy bandwidth, measured in the same run
as ``2 * bytes / time`` of a large ``dst.copy_(src)``. GB/s is reported for spp_triton and for
the alternatives that compute the same result (same floor); for the others ("timed only") only
time and the ratio. "speedup" = time of an implementation / time of spp_triton.

Usage::

    spp-triton-bench --quick                        # seconds, CI smoke test
    spp-triton-bench                                 # full GPU sweep
    spp-triton-bench --device cpu --rois 64,256 --channels 64,256 --dtypes fp32

Writes ``results.json``, ``results.md``, ``time_vs_rois_<pass>.png``, ``pct_copy_bandwidth.png``
(and with ``--profile`` ``profile/*.json`` chrome traces) to ``--output-dir`` (default
``output/benchmarks/<device>-<date>/``). Importable: :func:`run_sweep`, :func:`write_outputs`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from spp_triton.bench.cases import (  # noqa: F401  (the tool's API, used by tests and gpu_check)
    CASES,
    DTYPES,
    FPN_STRIDES,
    OURS,
    PASSES,
    Impl,
    Point,
    SweepConfig,
    _amp,
    _covered_pixels,
    _padded,
    make_boxes,
)
from spp_triton.bench.harness import (  # noqa: F401
    _n_copies,
    check_impl,
    default_output_dir,
    device_name,
    run_sweep,
    time_fn,
)
from spp_triton.bench.report import (  # noqa: F401
    collect_meta,
    evaluate_targets,
    markdown,
    write_outputs,
)


# ============================================================================= CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _image(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SweepConfig, Path | None]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--quick", action="store_true", help="tiny sweep for smoke tests (seconds on CPU)"
    )
    p.add_argument("--cases", type=_names, default=CASES, help=f"comma list of {CASES}")
    p.add_argument(
        "--levels",
        default="1,2,4;1,2,3,6",
        help="pyramid level sets, ';'-separated (default '1,2,4;1,2,3,6')",
    )
    p.add_argument("--rois", type=_ints, help="RoI counts (default 64,256,1000,4096)")
    p.add_argument("--channels", type=_ints, help="channel counts (default 64,256,1024)")
    p.add_argument("--dtypes", type=_names, help="fp32,fp16,bf16 (default all; CPU quick: fp32)")
    p.add_argument("--passes", type=_names, default=PASSES, help="fwd,fwd+bwd")
    p.add_argument("--batch", type=int, default=2, help="images in the RoI cases")
    p.add_argument("--spp-batch", type=int, help="images in whole-map SPP (default 8)")
    p.add_argument("--image", type=_image, help="image HxW before padding (default 800x1333)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time the torch.compile baseline (default: on, except --quick on CPU)",
    )
    comp.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler chrome trace of one spp_triton iteration per case",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        help="folder for results.json/.md and plots (default output/benchmarks/<device>-<date>/)",
    )
    p.add_argument("--min-run-time", type=float, help="CPU: seconds per measurement")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU: torch intra-op threads (default: 1 with --quick, else torch's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    levels = tuple(_ints(s) for s in a.levels.split(";") if s.strip())
    cmd = " ".join(
        shlex.quote(v) for v in ["spp-triton-bench"] + list(sys.argv[1:] if argv is None else argv)
    )
    cfg = SweepConfig(
        device=a.device,
        quick=a.quick,
        cases=a.cases,
        levels=levels,
        rois=a.rois,
        channels=a.channels,
        dtypes=a.dtypes,
        passes=a.passes,
        batch=a.batch,
        spp_batch=a.spp_batch,
        image=a.image,
        compile=a.compile,
        profile=a.profile,
        output_dir=str(a.output_dir) if a.output_dir else None,
        min_run_time=a.min_run_time,
        threads=a.threads,
        seed=a.seed,
        progress=not a.no_progress,
        command=cmd,
    )
    return cfg, a.output_dir


def main(argv: Sequence[str] | None = None) -> int:
    # CPU rows time the torch CPU path, also when TRITON_INTERPRET=1 is set in the shell.
    os.environ.setdefault("SPP_TRITON_CPU_BACKEND", "torch")
    cfg, out_dir = parse_args(argv)
    resolved = cfg.resolved()
    out_dir = out_dir or default_output_dir(resolved.device)
    cfg.output_dir = str(out_dir)
    t0 = time.time()
    results = run_sweep(cfg)
    meta = collect_meta(results, cfg.command)
    meta["wall_seconds"] = round(time.time() - t0, 1)
    paths = write_outputs(results, out_dir, meta)
    print((out_dir / "results.md").read_text())
    print("wrote:", ", ".join(str(p) for p in paths.values()))
    bad = [r for r in results if r["check"].startswith("MISMATCH")]
    for r in bad:
        print(
            f"MISMATCH: {r['label']} K={r['rois']} C={r['channels']} {r['dtype']} {r['pass']}: "
            f"{r['check']}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
