"""The benchmark's outputs: run metadata, the GPU targets' verdicts, ``results.md``,
``results.json`` and the plots."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import torchvision

from spp_triton.bench.cases import OURS
from spp_triton.runinfo import git_commit


# ============================================================================= outputs
def collect_meta(results: list[dict], command: str | None = None) -> dict:
    first = results[0] if results else {}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    notes = sorted({r["compile_note"] for r in results if r.get("compile_note")})
    return {
        "device": first.get("device"),
        "device_name": first.get("device_name"),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(short=False),
        "command": command or " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch_threads": first.get("threads"),
        "spp_triton_cpu_backend": os.environ.get("SPP_TRITON_CPU_BACKEND"),
        "copy_gbps": first.get("copy_gbps"),
        "copy_bytes": first.get("copy_bytes"),
        "timing": (
            "triton.testing.do_bench median, input copies cycled"
            if first.get("device") == "cuda"
            else "torch.utils.benchmark blocked_autorange median, input copies cycled"
        ),
        "bytes_floor": BYTES_FLOOR_TEXT,
        "notes": notes,
    }


BYTES_FLOOR_TEXT = (
    "forward: output bytes + boxes/level-index bytes + bytes of the feature-map elements covered "
    "by at least one RoI window (its quantised rectangle clipped to its map; all channels; "
    "whole-map SPP: the whole input); fwd+bwd: forward + output-gradient bytes + full "
    "input-gradient bytes. GB/s = floor / time; % copy BW against 2*bytes/time of a large "
    "dst.copy_(src) measured in the same run."
)


def _fmt(v, spec=".3f", empty="—"):
    return empty if v is None else format(v, spec)


def evaluate_targets(results: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the GPU targets of benchmarks/NOTES.md, where the sweep
    has the point (1000 RoIs, 256 channels, fp32; whole-map SPP at 256 channels)."""

    def find(label, impl, pass_="fwd", rois=1000, channels=256, dtype="fp32"):
        for r in results:
            if (
                r["label"] == label
                and r["impl"] == impl
                and r["pass"] == pass_
                and r["rois"] == rois
                and r["channels"] == channels
                and r["dtype"] == dtype
                and r.get("time_ms")
            ):
                return r
        return None

    out = []

    def speed(name, label, impl, need, pass_="fwd", rois=1000):
        r = find(label, impl, pass_, rois)
        if r is None or not r.get("speedup"):
            out.append((name, "not in this sweep", "n/a"))
            return
        s = r["speedup"]
        out.append((name, f"{s:.2f}x", "PASS" if s >= need else "FAIL"))

    for lv in ("{1,2,4}", "{1,2,3,6}"):
        speed(
            f"roi_spp{lv} fwd >= 3x torchvision roi_pool/level+cat",
            f"roi_spp{lv}",
            "torchvision roi_pool/level+cat",
            3.0,
        )
        speed(
            f"roi_spp{lv} fwd+bwd >= 2x torchvision roi_pool/level+cat",
            f"roi_spp{lv}",
            "torchvision roi_pool/level+cat",
            2.0,
            "fwd+bwd",
        )
        r = find(f"roi_spp{lv}", OURS)
        out.append(
            (
                f"roi_spp{lv} fwd >= 60% of copy bandwidth (floor)",
                "not in this sweep" if r is None else f"{r['pct_copy_bw']:.0f}%",
                "n/a" if r is None else ("PASS" if r["pct_copy_bw"] >= 60 else "FAIL"),
            )
        )
    speed(
        "roi_spp{1,2,3,6} fwd faster than roi_align 7x7",
        "roi_spp{1,2,3,6}",
        "torchvision roi_align 7x7",
        1.0,
    )
    speed(
        "fpn_pool (7x7, one launch) fwd >= 2x detectron2 ROIPooler(ROIPool)",
        "fpn_pool",
        "detectron2 ROIPooler(ROIPool)",
        2.0,
    )
    for lv in ("{1,2,4}", "{1,2,3,6}"):
        speed(
            f"spp{lv} fwd >= 3x adaptive_max_pool2d/level+cat",
            f"spp{lv}",
            "adaptive_max_pool2d/level+cat",
            3.0,
            rois=None,
        )
        speed(
            f"spp{lv} fwd >= 1.5x its torch.compile version",
            f"spp{lv}",
            "adaptive_max_pool2d/level+cat (torch.compile)",
            1.5,
            rois=None,
        )
    # half precision at least as fast as fp32 (5% noise allowance), every spp_triton point
    worst = None
    for r in results:
        if not r["is_ours"] or r["dtype"] == "fp32" or not r.get("time_ms"):
            continue
        ref = find(r["label"], OURS, r["pass"], r["rois"], r["channels"], "fp32")
        if ref:
            ratio = r["time_ms"] / ref["time_ms"]
            if worst is None or ratio > worst[0]:
                worst = (
                    ratio,
                    f"{r['label']} K={r['rois']} C={r['channels']} {r['dtype']} {r['pass']}",
                )
    if worst is None:
        out.append(("bf16/fp16 at least as fast as fp32 (spp_triton)", "no half/fp32 pairs", "n/a"))
    else:
        out.append(
            (
                "bf16/fp16 at least as fast as fp32 (spp_triton, worst point)",
                f"{worst[0]:.2f}x fp32 time at {worst[1]}",
                "PASS" if worst[0] <= 1.05 else "FAIL",
            )
        )
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# spp_triton kernel benchmark",
        "",
        f"- device: **{meta['device_name']}** ({meta['device']})",
        f"- date: {meta['date']}; git commit: `{meta['git_commit']}`",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, torchvision {meta['torchvision']}, triton {meta['triton']}, "
        f"python {meta['python']}, torch threads {meta['torch_threads']}",
        f"- timing: {meta['timing']}",
        f"- copy bandwidth (same run): **{_fmt(meta['copy_gbps'], '.1f')} GB/s** "
        f"(`dst.copy_(src)`, {meta['copy_bytes'] >> 20 if meta['copy_bytes'] else '?'} MiB)",
        f"- bytes floor: {meta['bytes_floor']}",
        "- speedup = time of the implementation / time of spp_triton (> 1: spp_triton faster).",
    ]
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], r["pass"]), []).append(r)
    for (label, pass_), rows in groups.items():
        lines += [
            "",
            f"## {label} — {pass_}",
            "",
            "| RoIs | C | dtype | implementation | ms | GB/s (floor) | % copy BW | "
            "speedup | check |",
            "|---:|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            name = f"**{r['impl']}**" if r["is_ours"] else r["impl"]
            check = r["check"] + (
                f" ({r['note']})" if r.get("note") and r["check"] in ("error", "skipped") else ""
            )
            lines.append(
                f"| {_fmt(r['rois'], 'd')} | {r['channels']} | {r['dtype']} | {name} | "
                f"{_fmt(r.get('time_ms'))} | {_fmt(r.get('gbps'), '.1f')} | "
                f"{_fmt(r.get('pct_copy_bw'), '.1f')} | {_fmt(r.get('speedup'), '.2f')} | "
                f"{check} |"
            )
    if meta.get("device") == "cuda":
        lines += [
            "",
            "## Targets (set for a CUDA GPU; 1000 RoIs, 256 channels, fp32)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        for name, measured, verdict in evaluate_targets(results):
            lines.append(f"| {name} | {measured} | {verdict} |")
    else:
        lines += [
            "",
            "_Measured on CPU: spp_triton runs its vectorised torch path, not the Triton "
            "kernels. The GPU targets of benchmarks/NOTES.md are evaluated on CUDA runs only._",
        ]
    return "\n".join(lines) + "\n"


def _xticks(ax, values) -> None:
    ticks = sorted({v for v in values if v})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(v) for v in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def _plots(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timed = [r for r in results if r.get("time_ms")]
    if not timed:
        return written
    labels = list(dict.fromkeys(r["label"] for r in timed))
    for pass_ in dict.fromkeys(r["pass"] for r in timed):
        sel = [r for r in timed if r["pass"] == pass_]
        dtype = sel[0]["dtype"] if all(r["dtype"] == sel[0]["dtype"] for r in sel) else "fp32"
        sel = [r for r in sel if r["dtype"] == dtype] or sel
        labs = [lb for lb in labels if any(r["label"] == lb for r in sel)]
        cols = min(3, len(labs))
        rows_n = math.ceil(len(labs) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
        for ax, lab in zip(axes.flat, labs, strict=False):
            rs = [r for r in sel if r["label"] == lab]
            chan = max(r["channels"] for r in rs)
            rs = [r for r in rs if r["channels"] == chan]
            roi_axis = rs[0]["rois"] is not None
            for impl in dict.fromkeys(r["impl"] for r in rs):
                pts = sorted(
                    (r["rois"] if roi_axis else r["channels"], r["time_ms"])
                    for r in sel
                    if r["label"] == lab
                    and r["impl"] == impl
                    and (not roi_axis or r["channels"] == chan)
                )
                ax.plot(
                    *zip(*pts, strict=True), marker="o", lw=2.5 if impl == OURS else 1.2, label=impl
                )
            _xticks(
                ax, [r["rois"] if roi_axis else r["channels"] for r in sel if r["label"] == lab]
            )
            ax.set_yscale("log")
            ax.set_xlabel("RoIs" if roi_axis else "channels")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{lab} {pass_} {dtype}" + (f" C={chan}" if roi_axis else ""), fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(labs) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"time_vs_rois_{pass_.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ours = [r for r in timed if r["is_ours"] and r.get("pct_copy_bw") is not None]
    if ours:
        labs = list(dict.fromkeys(r["label"] for r in ours))
        cols = min(3, len(labs))
        rows_n = math.ceil(len(labs) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
        for ax, lab in zip(axes.flat, labs, strict=False):
            rs = [r for r in ours if r["label"] == lab]
            roi_axis = rs[0]["rois"] is not None
            series = dict.fromkeys(
                (r["pass"], r["dtype"], r["channels"] if roi_axis else None) for r in rs
            )
            for pass_, dtype, chan in series:
                pts = sorted(
                    (r["rois"] if roi_axis else r["channels"], r["pct_copy_bw"])
                    for r in rs
                    if r["pass"] == pass_
                    and r["dtype"] == dtype
                    and (not roi_axis or r["channels"] == chan)
                )
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    label=f"{pass_} {dtype}" + (f" C={chan}" if roi_axis else ""),
                )
            if max(r["pct_copy_bw"] for r in rs) > 30:
                ax.axhline(60, color="grey", ls="--", lw=1, label="60% target")
            ax.set_ylim(bottom=0)
            _xticks(ax, [r["rois"] if roi_axis else r["channels"] for r in rs])
            ax.set_xlabel("RoIs" if roi_axis else "channels")
            ax.set_ylabel("% of copy bandwidth (bytes floor)")
            ax.set_title(f"spp_triton {lab}", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(labs) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / "pct_copy_bandwidth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results: list[dict], out_dir, meta: dict | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the PNG plots to ``out_dir``; return paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or collect_meta(results)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    targets = (  # GPU targets: evaluated on CUDA runs only
        [{"target": t, "measured": m, "verdict": v} for t, m, v in evaluate_targets(results)]
        if meta.get("device") == "cuda"
        else []
    )
    paths["json"].write_text(
        json.dumps({"meta": meta, "targets": targets, "results": results}, indent=1, default=str)
        + "\n"
    )
    paths["markdown"].write_text(markdown(results, meta))
    for i, p in enumerate(_plots(results, out_dir)):
        paths[f"png{i}"] = p
    return paths
