"""Train, evaluate and measure several ROI heads from config files; write one report.

What ``tools/compare_heads.py`` runs (``make demo`` runs it on the four ``configs/Shapes`` heads).
For each config, in ``<output-dir>/<config name>/``:

1. **train** with ``tools/train_net.py`` in a subprocess (detectron2's log and ETA lines stream
   to the terminal; ``log.txt``, ``metrics.json`` and TensorBoard events land in the run folder).
   A run with a ``last_checkpoint`` but no final model is resumed (``--resume``); a finished run
   (``model_final.pth`` and a matching ``result.json``) is reused as it is.
2. **evaluate** on the config's test set with detectron2's ``COCOEvaluator`` (AP, AP50, AP75, APs,
   APm, APl) while timing every forward (inference ms/image: median after warm-up).
3. **measure** the training speed (median of ``metrics.json``'s ``time`` after warm-up, as
   detectron2 logs it), the box pooler's forward and forward+backward time on the head's real
   RoIs (captured from a batch of test images), and the box head's parameters and FLOPs (fvcore,
   with spp_triton's ops counted by :mod:`spp_triton.profiling`).

Then ``report.md``, ``report.json`` and plots (``ap.png``, ``loss.png``, ``speed.png``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
DEFAULT_CONFIGS = [
    "configs/Shapes/faster_rcnn_R_18_FPN_roialignv2.yaml",
    "configs/Shapes/faster_rcnn_R_18_FPN_roipool.yaml",
    "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml",
    "configs/Shapes/sppnet_R_18_C4_spp1236.yaml",
]
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULT_VERSION = 1
WARMUP_IMAGES = 5
TRAIN_WARMUP_ITERS = 20


@dataclass
class HeadResult:
    name: str
    config: str
    pooler: str
    ap: dict[str, float]
    train_s_per_iter: float | None
    train_iters: int
    train_wall_s: float | None
    infer_ms_per_image: float
    pooler_rois: int
    pooler_fwd_ms: float
    pooler_fwd_bwd_ms: float
    box_head_params: int
    box_head_gflops: float
    flops_uncounted_ops: list[str] = field(default_factory=list)
    fingerprint: str = ""


# ----------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(f"[compare_heads] {msg}", flush=True)


def run_name(config: str) -> str:
    return Path(config).stem


def fingerprint(config: str, opts: Sequence[str]) -> str:
    """Identifies a run: the config file chain's text and the opts. A changed config retrains."""
    h = hashlib.sha256()
    path = Path(config)
    seen = set()
    while path and path.is_file() and path not in seen:
        seen.add(path)
        text = path.read_text()
        h.update(text.encode())
        base = next(
            (
                ln.split(":", 1)[1].strip().strip("\"'")
                for ln in text.splitlines()
                if ln.startswith("_BASE_:")
            ),
            None,
        )
        path = (path.parent / base) if base else None
    h.update(json.dumps(list(opts)).encode())
    h.update(str(RESULT_VERSION).encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- train
def _train_command(config: str, run_dir: Path, opts: Sequence[str], num_gpus: int) -> list[str]:
    resume = (run_dir / "last_checkpoint").is_file()
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", config, "--num-gpus", str(num_gpus)]
    if resume:
        cmd.append("--resume")
    # The report evaluates with its own timing; an empty DATASETS.TEST (last, so that it wins over
    # the opts) skips the trainer's end-of-training evaluation, which would run inference twice.
    return cmd + [*opts, "OUTPUT_DIR", str(run_dir), "DATASETS.TEST", "()"]


def train_all(
    jobs: list[tuple[str, Path]], opts: Sequence[str], num_gpus: int = 1, parallel: int = 1
) -> dict[str, float]:
    """Train (or resume) each ``(config, run_dir)`` in a ``tools/train_net.py`` subprocess, up to
    ``parallel`` at a time; on CPU each gets ``cores // parallel`` threads. Returns wall times."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1 and not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    pending, running, walls = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            config, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = _train_command(config, run_dir, opts, num_gpus)
            _log(
                ("resuming" if "--resume" in cmd else "training")
                + f" {run_name(config)}: "
                + " ".join(cmd)
            )
            running.append(
                (
                    config,
                    run_dir,
                    subprocess.Popen(cmd, cwd=REPO_ROOT, env=env),
                    time.perf_counter(),
                )
            )
        time.sleep(1.0)
        for item in list(running):
            config, run_dir, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for _, _, other, _ in running:
                    other.terminate()
                raise RuntimeError(
                    f"training {config} failed (exit {proc.returncode}); see "
                    f"{run_dir / 'log.txt'}. Re-run to resume from its last checkpoint."
                )
            walls[config] = time.perf_counter() - start
            _log(f"{run_name(config)}: training finished in {walls[config] / 60:.1f} min")
    return walls


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def train_seconds_per_iter(metrics: list[dict]) -> float | None:
    """Median of detectron2's logged ``time`` (itself a 20-iteration median) after warm-up."""
    times = [
        r["time"] for r in metrics if "time" in r and r.get("iteration", 0) >= TRAIN_WARMUP_ITERS
    ]
    if not times:
        times = [r["time"] for r in metrics if "time" in r]
    return statistics.median(times) if times else None


# ----------------------------------------------------------------------------- evaluate/measure
class _TimedModel(torch.nn.Module):
    """Wraps a model so that every forward is timed (synchronised on CUDA)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.times: list[float] = []

    def forward(self, inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append((time.perf_counter() - start) / max(len(inputs), 1))
        return out


def _load_cfg(config: str, run_dir: Path, opts: Sequence[str]):
    from detectron2.config import get_cfg

    from spp_triton.modeling import add_spp_config, register_datasets, resolve_device

    register_datasets()
    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    cfg.OUTPUT_DIR = str(run_dir)
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def _training_cost(config: str, run_dir: Path, opts: Sequence[str]) -> float:
    cfg = _load_cfg(config, run_dir, opts)
    return cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH * cfg.INPUT.MIN_SIZE_TEST**2


def evaluate(cfg, model) -> tuple[dict[str, float], float]:
    """COCO AP on the first test dataset and the median inference time per image (ms)."""
    from detectron2.evaluation import inference_on_dataset

    from spp_triton.modeling import Trainer

    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = Trainer.build_evaluator(cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "inference"))
    timed = _TimedModel(model)
    results = inference_on_dataset(timed, loader, evaluator)
    bbox = results.get("bbox", {})
    ap = {k: float(bbox.get(k, float("nan"))) for k in AP_KEYS}
    times = timed.times[WARMUP_IMAGES:] or timed.times
    return ap, statistics.median(times) * 1e3


def _capture_pooler_inputs(cfg, model, num_images: int):
    """Run the model on a batch of test images and keep what the box pooler received."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    batch = [mapper(r) for r in records]
    captured = {}

    def hook(module, args):
        captured["features"], captured["boxes"] = args[0], args[1]

    model.eval()  # inference_on_dataset restores the mode it found
    handle = model.roi_heads.box_pooler.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return captured["features"], captured["boxes"]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and Triton compilation on a GPU)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class _PoolerAndHead(torch.nn.Module):
    """Tensor-only wrapper (for jit tracing): features..., boxes... -> box head features."""

    def __init__(self, pooler, head, num_features: int) -> None:
        super().__init__()
        self.pooler, self.head, self.num_features = pooler, head, num_features

    def forward(self, *tensors):
        from detectron2.structures import Boxes

        features = list(tensors[: self.num_features])
        boxes = [Boxes(b) for b in tensors[self.num_features :]]
        return self.head(self.pooler(features, boxes))


def measure_box_head(cfg, model, num_images: int = 8, repeats: int = 10) -> dict:
    """Pooler timings on real RoIs; box-head parameters and FLOPs (pooler + head)."""
    from fvcore.nn import FlopCountAnalysis

    features, boxes = _capture_pooler_inputs(cfg, model, num_images)
    pooler, head = model.roi_heads.box_pooler, model.roi_heads.box_head
    num_rois = sum(len(b) for b in boxes)

    def forward():
        with torch.no_grad():
            pooler(features, boxes)

    feats_grad = [f.detach().requires_grad_() for f in features]

    def forward_backward():
        out = pooler(feats_grad, boxes)
        out.backward(torch.ones_like(out))

    params = sum(p.numel() for p in head.parameters())
    wrapper = _PoolerAndHead(pooler, head, len(features)).eval()
    inputs = tuple(f.detach() for f in features) + tuple(b.tensor for b in boxes)
    flops = FlopCountAnalysis(wrapper, inputs)
    try:
        from spp_triton import profiling

        flops.set_op_handle(**profiling.flop_handles())
    except (ImportError, AttributeError):
        pass
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = flops.total()
    uncounted = sorted(flops.unsupported_ops().keys())
    return {
        "pooler_rois": num_rois,
        "pooler_fwd_ms": _median_ms(forward, repeats),
        "pooler_fwd_bwd_ms": _median_ms(forward_backward, repeats),
        "box_head_params": params,
        "box_head_gflops": total / 1e9 / max(len(boxes), 1),
        "flops_uncounted_ops": uncounted,
    }


def evaluate_and_measure(config: str, run_dir: Path, opts: Sequence[str]) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer

    from spp_triton.modeling import Trainer

    cfg = _load_cfg(config, run_dir, opts)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(run_dir)).load(str(run_dir / "model_final.pth"))
    model.eval()
    ap, infer_ms = evaluate(cfg, model)
    measures = measure_box_head(cfg, model)
    return {
        "ap": ap,
        "infer_ms_per_image": infer_ms,
        "pooler": cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        "max_iter": cfg.SOLVER.MAX_ITER,
        **measures,
    }


def compare(
    configs: Sequence[str],
    output_dir: Path,
    opts: Sequence[str] = (),
    num_gpus: int = 1,
    parallel: int = 1,
) -> list[HeadResult]:
    """Train what is not trained (``parallel`` runs at a time), then evaluate and measure each
    head in turn (alone on the machine, so that the timings are comparable)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file not found: {config}")
    cached: dict[str, HeadResult] = {}
    to_train = []
    for i, config in enumerate(configs, 1):
        name, run_dir = run_name(config), output_dir / run_name(config)
        result_file = run_dir / "result.json"
        if result_file.is_file():
            data = json.loads(result_file.read_text())
            if data.get("fingerprint") == fingerprint(config, opts):
                _log(f"[{i}/{len(configs)}] {name}: finished run found, reusing {result_file}")
                cached[config] = HeadResult(**data)
                continue
        if not (run_dir / "model_final.pth").is_file():
            to_train.append((config, run_dir))
    # Longest first, so that parallel runs end together: cost ~ iterations x batch x pixels.
    to_train.sort(key=lambda job: -_training_cost(job[0], job[1], opts))
    walls = train_all(to_train, opts, num_gpus, parallel) if to_train else {}

    results = []
    for i, config in enumerate(configs, 1):
        if config in cached:
            results.append(cached[config])
            continue
        name, run_dir = run_name(config), output_dir / run_name(config)
        _log(f"[{i}/{len(configs)}] {name}: evaluating and measuring")
        m = evaluate_and_measure(config, run_dir, opts)
        result = HeadResult(
            name=name,
            config=config,
            pooler=m.pop("pooler"),
            ap=m.pop("ap"),
            train_s_per_iter=train_seconds_per_iter(read_metrics(run_dir)),
            train_iters=m.pop("max_iter"),
            train_wall_s=walls.get(config),
            fingerprint=fingerprint(config, opts),
            **m,
        )
        (run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2))
        _log(
            f"[{i}/{len(configs)}] {name} done: AP {result.ap['AP']:.1f}, AP50 "
            f"{result.ap['AP50']:.1f}, train {result.train_s_per_iter or float('nan'):.3f} "
            f"s/iter, inference {result.infer_ms_per_image:.1f} ms/img"
        )
        results.append(result)
    return results


# ----------------------------------------------------------------------------- report
def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.{digits}f}"


def table_markdown(results: Sequence[HeadResult]) -> str:
    head = (
        "| head | box pooler | AP | AP50 | AP75 | APs | APm | APl | train s/iter | "
        "inference ms/img | pooler fwd ms | pooler fwd+bwd ms | RoIs | box-head params (M) | "
        "box-head GFLOPs/img |"
    )
    sep = "|" + "---|" * 15
    rows = [head, sep]
    for r in results:
        rows.append(
            f"| {r.name} | {r.pooler} | "
            + " | ".join(_fmt(r.ap.get(k)) for k in AP_KEYS)
            + f" | {_fmt(r.train_s_per_iter, 3)} | {_fmt(r.infer_ms_per_image)} | "
            f"{_fmt(r.pooler_fwd_ms, 2)} | {_fmt(r.pooler_fwd_bwd_ms, 2)} | {r.pooler_rois} | "
            f"{r.box_head_params / 1e6:.2f} | {_fmt(r.box_head_gflops, 3)} |"
        )
    return "\n".join(rows)


def write_plots(results: Sequence[HeadResult], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for j, key in enumerate(("AP", "AP50", "AP75")):
        xs = [i + (j - 1) * width for i in range(len(results))]
        vals = [r.ap.get(key, 0.0) for r in results]
        bars = ax.bar(xs, vals, width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(results)), names, rotation=12, fontsize=8)
    ax.set_ylabel("COCO box AP (%)")
    ax.set_title("Accuracy per ROI head")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "ap.png", dpi=110)
    plt.close(fig)
    written.append("ap.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        rows = [m for m in read_metrics(output_dir / r.name) if "total_loss" in m]
        if rows:
            ax.plot([m["iteration"] for m in rows], [m["total_loss"] for m in rows], label=r.name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total_loss (20-iter median)")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = [
        ("training s/iter", [r.train_s_per_iter or 0.0 for r in results]),
        ("inference ms/image", [r.infer_ms_per_image for r in results]),
        ("box pooler ms (fwd / fwd+bwd)", None),
    ]
    for ax, (title, vals) in zip(axes, panels, strict=True):
        if vals is None:
            xs = range(len(results))
            ax.bar([x - 0.2 for x in xs], [r.pooler_fwd_ms for r in results], 0.4, label="fwd")
            ax.bar(
                [x + 0.2 for x in xs], [r.pooler_fwd_bwd_ms for r in results], 0.4, label="fwd+bwd"
            )
            ax.legend(fontsize=8)
        else:
            ax.bar(range(len(results)), vals)
        ax.set_xticks(range(len(results)), names, rotation=25, fontsize=7, ha="right")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output_dir / "speed.png", dpi=110)
    plt.close(fig)
    written.append("speed.png")
    return written


def write_report(
    results: Sequence[HeadResult], output_dir: Path, command: str, elapsed_s: float | None = None
) -> dict:
    info = machine_description()
    info.update(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        commit=git_commit(),
        command=command,
    )
    if elapsed_s is not None:
        info["elapsed_s"] = round(elapsed_s, 1)
    plots = write_plots(results, output_dir)
    table = table_markdown(results)
    lines = [
        "# ROI head comparison",
        "",
        f"- machine: {info['machine']}",
        f"- device: {info['device']}",
        f"- date: {info['date']}",
        f"- git commit: {info['commit']}",
        f"- command: `{command}`",
        f"- python {info['python']}, torch {info['torch']}",
    ]
    if elapsed_s is not None:
        lines.append(f"- wall time of this invocation: {elapsed_s / 60:.1f} min")
    lines += [
        "",
        table,
        "",
        "AP columns: detectron2 COCOEvaluator on each config's test set (%). Training s/iter: "
        "median of detectron2's logged iteration time after warm-up. Inference: median per image "
        f"after {WARMUP_IMAGES} warm-up images, batch 1. Pooler: median over repeats on the RoIs "
        "the head received for a batch of test images. FLOPs: fvcore (1 multiply-add = 1 flop), "
        "box pooler + box head, per image.",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]
    uncounted = sorted({op for r in results for op in r.flops_uncounted_ops})
    if uncounted:
        lines.append(f"Ops fvcore did not count (0 FLOPs): {', '.join(uncounted)}")
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")
    payload = {"info": info, "heads": [r.__dict__ for r in results], "plots": plots}
    (output_dir / "report.json").write_text(json.dumps(payload, indent=2))
    print("\n" + table + "\n", flush=True)
    _log(f"report: {output_dir / 'report.md'}")
    return payload
