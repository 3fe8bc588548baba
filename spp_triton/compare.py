"""Train, evaluate and measure several ROI heads from config files; write one report.

What ``spp-triton-compare`` (``tools/compare_heads.py``) runs; ``make demo`` runs it on the four
``configs/Shapes`` heads. First every config is loaded and checked as ``spp-triton-train`` checks
it (values, dataset names, a non-empty ``DATASETS.TEST``) and its model is built, so that a bad
config fails before any training starts. Then, for each config, in
``<output-dir>/<config name>-<key>/``, where ``<key>`` hashes the run's full resolved training
config (file chain and overrides, everything but ``OUTPUT_DIR`` and the test settings):

1. **train** with ``spp-triton-train`` in a subprocess (detectron2's log and ETA lines stream
   to the terminal; ``log.txt``, ``metrics.json`` and TensorBoard events land in the run folder).
   A run with a ``last_checkpoint`` but no final model is resumed (``--resume``); a finished run
   is evaluated again only when its ``result.json`` was made with other test settings. A changed
   config or override is a different key, hence a fresh run folder: weights are never reused for
   a config they were not trained with (``run.json`` in each folder records the config; a
   mismatch is an error).
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
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spp_triton.runinfo import git_commit, machine_description

__all__ = [
    "DEFAULT_CONFIGS",
    "HeadResult",
    "Run",
    "plan_runs",
    "compare",
    "write_report",
    "git_commit",
    "machine_description",
]

# Shipped configs (spp_triton.model_zoo.resolve_config finds them from any folder).
DEFAULT_CONFIGS = [
    "configs/Shapes/faster_rcnn_R_18_FPN_roialignv2.yaml",
    "configs/Shapes/faster_rcnn_R_18_FPN_roipool.yaml",
    "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml",
    "configs/Shapes/sppnet_R_18_C4_spp1236_frozen.yaml",
]
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULT_VERSION = 2
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
    seed: int = -1
    run_dir: str = ""
    fingerprint: str = ""


# ----------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(f"[compare_heads] {msg}", flush=True)


@dataclass
class Run:
    """One head's run: its config, where it lives, and the keys that say what it is."""

    config: str  # as the user named it
    path: str  # the resolved file
    name: str  # in the report (config stem; parent folder prepended when stems clash)
    run_dir: Path
    train_key: str  # sha256 of the resolved training config (OUTPUT_DIR, test settings out)
    result_key: str  # train_key + the test settings + RESULT_VERSION
    config_text: str  # the resolved config (yaml), written to run.json
    max_iter: int
    seed: int
    cost: float  # iterations x batch x pixels: longest first when training in parallel
    opts: tuple[str, ...] = ()  # this run's overrides (the shared ones, then its SEED)


def _resolved_cfg(path: str, opts: Sequence[str]):
    """The full config of a run (file chain + opts), unfrozen, nothing else applied."""
    from detectron2.config import get_cfg

    from spp_triton.modeling import add_spp_config

    cfg = get_cfg()
    add_spp_config(cfg)
    cfg.merge_from_file(path)
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:  # yacs asserts on unknown keys and odd-length lists
        raise ValueError(f"Invalid config override {list(opts)}: {e}") from e
    return cfg


def _keys(cfg) -> tuple[str, str, str]:
    """(train key, result key, training config text) of a resolved config."""
    train = cfg.clone()
    train.defrost()
    train.OUTPUT_DIR = ""
    train.DATASETS.TEST = ()
    test_text = cfg.TEST.dump() + repr(tuple(cfg.DATASETS.TEST))
    train.pop("TEST")
    text = train.dump()
    train_key = hashlib.sha256(text.encode()).hexdigest()
    result_key = hashlib.sha256(f"{train_key}\n{test_text}\n{RESULT_VERSION}".encode()).hexdigest()
    return train_key, result_key, text


def fingerprint(config: str, opts: Sequence[str]) -> str:
    """Identifies a run's training: the sha256 of its full resolved config (file chain, opts)."""
    from spp_triton.model_zoo import resolve_config

    return _keys(_resolved_cfg(resolve_config(config), opts))[0]


def check_config(cfg, config: str) -> None:
    """The checks ``spp-triton-train`` makes (values, dataset names), a test set to evaluate on,
    and the model built once; raises ``ValueError`` naming the config and the key."""
    from detectron2.modeling import build_model

    from spp_triton.engine import register_datasets
    from spp_triton.modeling import validate_config, validate_datasets

    register_datasets()
    try:
        validate_config(cfg)
        validate_datasets(cfg, train=True, test=True)
        if len(cfg.DATASETS.TEST) == 0:
            raise ValueError(
                "Invalid config: DATASETS.TEST = (): the comparison evaluates every head on "
                "DATASETS.TEST[0]; name a test dataset (e.g. DATASETS.TEST \"('shapes_val',)\")"
            )
        if len(cfg.DATASETS.TRAIN) == 0:
            raise ValueError("Invalid config: DATASETS.TRAIN = (): nothing to train on")
        probe = cfg.clone()
        probe.defrost()
        probe.MODEL.DEVICE = "cpu"
        probe.MODEL.WEIGHTS = ""
        build_model(probe)
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"{config}: {e}") from e


def plan_runs(
    configs: Sequence[str], output_dir: Path, opts: Sequence[str] = (), seeds: int = 1
) -> list[Run]:
    """Resolve, check and key every config before anything runs; ``seeds`` runs per config
    (``seeds > 1``: ``SEED`` s, s + 1, ... from the config's ``SEED``, or from 0 when it is
    negative). Raises ``FileNotFoundError`` for a missing config and ``ValueError`` for an invalid
    one (naming it)."""
    from spp_triton.model_zoo import resolve_config

    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    paths = [os.path.abspath(resolve_config(c)) for c in configs]
    stems = [Path(p).stem for p in paths]
    runs = []
    for config, path, stem in zip(configs, paths, stems, strict=True):
        cfg = _resolved_cfg(path, opts)
        check_config(cfg, config)
        name = stem if stems.count(stem) == 1 else f"{Path(path).parent.name}/{stem}"
        base = int(cfg.SEED) if int(cfg.SEED) >= 0 else 0
        for k in range(seeds):
            run_opts = tuple(opts) + (("SEED", str(base + k)) if seeds > 1 else ())
            run_cfg = _resolved_cfg(path, run_opts) if seeds > 1 else cfg
            train_key, result_key, text = _keys(run_cfg)
            runs.append(
                Run(
                    config=config,
                    path=path,
                    name=name,
                    run_dir=output_dir / f"{name.replace('/', '__')}-{train_key[:10]}",
                    train_key=train_key,
                    result_key=result_key,
                    config_text=text,
                    max_iter=int(run_cfg.SOLVER.MAX_ITER),
                    seed=int(run_cfg.SEED),
                    cost=run_cfg.SOLVER.MAX_ITER
                    * run_cfg.SOLVER.IMS_PER_BATCH
                    * run_cfg.INPUT.MIN_SIZE_TEST**2,
                    opts=run_opts,
                )
            )
    seen: dict[str, str] = {}
    for run in runs:
        if run.train_key in seen:
            raise ValueError(
                f"{run.config} and {seen[run.train_key]} resolve to the same training config; "
                "list each head once"
            )
        seen[run.train_key] = run.config
    return runs


def _claim_run_dir(run: Run) -> None:
    """Create the run folder with its ``run.json``, or check that an existing one is this run's."""
    marker = run.run_dir / "run.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("train_key") != run.train_key:
            raise RuntimeError(
                f"{run.run_dir} holds a run of another config ({recorded.get('config')!r}, key "
                f"{str(recorded.get('train_key'))[:10]}) than {run.config!r} (key "
                f"{run.train_key[:10]}); move it away or choose another --output-dir"
            )
        return
    if run.run_dir.exists() and any(run.run_dir.iterdir()):
        raise RuntimeError(
            f"{run.run_dir} exists without run.json: it cannot be told whose weights it holds; "
            "move it away or choose another --output-dir"
        )
    run.run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(
        json.dumps(
            {
                "config": run.config,
                "config_file": run.path,
                "train_key": run.train_key,
                "config_yaml": run.config_text,
            },
            indent=2,
        )
    )


# ----------------------------------------------------------------------------- train
def _train_command(run: Run, num_gpus: int) -> list[str]:
    resume = (run.run_dir / "last_checkpoint").is_file()
    cmd = [sys.executable, "-m", "spp_triton.cli.train", "--config-file", run.path]
    cmd += ["--num-gpus", str(num_gpus)]
    if resume:
        cmd.append("--resume")
    # The report evaluates with its own timing; an empty DATASETS.TEST (last, so that it wins over
    # the opts) skips the trainer's end-of-training evaluation, which would run inference twice.
    return cmd + [*run.opts, "OUTPUT_DIR", str(run.run_dir), "DATASETS.TEST", "()"]


def _child_env(parallel: int) -> dict[str, str]:
    """The trainings' environment: this spp_triton first on the path (a checkout or a wheel)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    if parallel > 1 and not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def train_all(runs: Sequence[Run], num_gpus: int = 1, parallel: int = 1) -> dict[str, float]:
    """Train (or resume) each run in a ``spp-triton-train`` subprocess, up to ``parallel`` at a
    time; on CPU each gets ``cores // parallel`` threads. Returns wall times by run folder."""
    env = _child_env(parallel)
    pending, running, walls = list(runs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            run = pending.pop(0)
            _claim_run_dir(run)
            cmd = _train_command(run, num_gpus)
            verb = "resuming" if "--resume" in cmd else "training"
            _log(f"{verb} {run.name} (seed {run.seed}) in {run.run_dir}: " + " ".join(cmd))
            running.append((run, subprocess.Popen(cmd, env=env), time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            run, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                log = run.run_dir / "log.txt"
                where = f"see {log}" if log.is_file() else "its output is above (no log.txt yet)"
                raise RuntimeError(
                    f"training {run.config} failed (exit {proc.returncode}); {where}. "
                    "Re-run to resume from its last checkpoint."
                )
            walls[str(run.run_dir)] = time.perf_counter() - start
            _log(f"{run.name}: training finished in {walls[str(run.run_dir)] / 60:.1f} min")
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


def _load_cfg(run: Run):
    """The run's config as its training saw it (plus the test set), for evaluation."""
    from spp_triton.engine import register_datasets, resolve_device

    cfg = _resolved_cfg(run.path, run.opts)
    cfg.OUTPUT_DIR = str(run.run_dir)
    register_datasets(cfg)  # the files, if the config uses the embedded datasets
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def evaluate(cfg, model) -> tuple[dict[str, float], float]:
    """COCO AP on the first test dataset and the median inference time per image (ms)."""
    from detectron2.evaluation import inference_on_dataset

    from spp_triton.engine import Trainer

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


def _median_ms(fn) -> float:
    """The benchmark harness's timing (``do_bench`` on CUDA, ``blocked_autorange`` on CPU)."""
    from spp_triton.bench.harness import time_fn

    fn()  # warm-up (and Triton compilation on a GPU)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return time_fn(fn, device, min_run_time=0.5) * 1e3


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


def measure_box_head(cfg, model, num_images: int = 8) -> dict:
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
        "pooler_fwd_ms": _median_ms(forward),
        "pooler_fwd_bwd_ms": _median_ms(forward_backward),
        "box_head_params": params,
        "box_head_gflops": total / 1e9 / max(len(boxes), 1),
        "flops_uncounted_ops": uncounted,
    }


def evaluate_and_measure(run: Run) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer

    from spp_triton.engine import Trainer

    cfg = _load_cfg(run)
    model = Trainer.build_model(cfg)
    weights = run.run_dir / "model_final.pth"
    DetectionCheckpointer(model, save_dir=str(run.run_dir)).load(str(weights))
    model.eval()
    ap, infer_ms = evaluate(cfg, model)
    measures = measure_box_head(cfg, model)
    return {
        "ap": ap,
        "infer_ms_per_image": infer_ms,
        "pooler": cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        **measures,
    }


def _cached_result(run: Run) -> HeadResult | None:
    path = run.run_dir / "result.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("fingerprint") != run.result_key:
        return None
    try:
        return HeadResult(**data)
    except TypeError:  # written by another version of this module
        return None


def compare(
    configs: Sequence[str],
    output_dir: Path,
    opts: Sequence[str] = (),
    num_gpus: int = 1,
    parallel: int = 1,
    seeds: int = 1,
) -> list[HeadResult]:
    """Check every config, train what is not trained (``seeds`` runs per config, ``parallel``
    at a time), then evaluate and measure each run in turn (alone on the machine, so that
    timings compare). Returns one :class:`HeadResult` per run, in config then seed order."""
    output_dir = Path(output_dir)
    runs = plan_runs(configs, output_dir, opts, seeds)  # raises before anything is trained
    output_dir.mkdir(parents=True, exist_ok=True)
    cached: dict[str, HeadResult] = {}
    to_train = []
    for i, run in enumerate(runs, 1):
        result = _cached_result(run)
        if result is not None:
            _claim_run_dir(run)  # refuses a folder that is not this run's
            _log(f"[{i}/{len(runs)}] {run.name}: finished run found, reusing {run.run_dir}")
            cached[str(run.run_dir)] = result
        elif not (run.run_dir / "model_final.pth").is_file():
            to_train.append(run)
        else:
            _claim_run_dir(run)
    # Longest first, so that parallel runs end together: cost ~ iterations x batch x pixels.
    to_train.sort(key=lambda r: -r.cost)
    walls = train_all(to_train, num_gpus, parallel) if to_train else {}

    results = []
    for i, run in enumerate(runs, 1):
        if str(run.run_dir) in cached:
            results.append(cached[str(run.run_dir)])
            continue
        _log(f"[{i}/{len(runs)}] {run.name} (seed {run.seed}): evaluating and measuring")
        m = evaluate_and_measure(run)
        result = HeadResult(
            name=run.name,
            config=run.config,
            pooler=m.pop("pooler"),
            ap=m.pop("ap"),
            train_s_per_iter=train_seconds_per_iter(read_metrics(run.run_dir)),
            train_iters=run.max_iter,
            train_wall_s=walls.get(str(run.run_dir)),
            seed=run.seed,
            run_dir=str(run.run_dir),
            fingerprint=run.result_key,
            **m,
        )
        (run.run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2))
        _log(
            f"[{i}/{len(runs)}] {run.name} done: AP {result.ap['AP']:.1f}, AP50 "
            f"{result.ap['AP50']:.1f}, train {result.train_s_per_iter or float('nan'):.3f} "
            f"s/iter, inference {result.infer_ms_per_image:.1f} ms/img"
        )
        results.append(result)
    return results


# ----------------------------------------------------------------------------- report
#: What the summary reports as mean +- std over a head's runs: (label, getter, digits).
SUMMARY_METRICS = (
    *((k, (lambda r, k=k: r.ap.get(k)), 1) for k in AP_KEYS),
    ("train s/iter", lambda r: r.train_s_per_iter, 3),
    ("inference ms/img", lambda r: r.infer_ms_per_image, 1),
    ("pooler fwd ms", lambda r: r.pooler_fwd_ms, 2),
    ("pooler fwd+bwd ms", lambda r: r.pooler_fwd_bwd_ms, 2),
)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and v not in (float("inf"), float("-inf"))


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` with fewer than 2 finite values)."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


@dataclass
class HeadSummary:
    """A head's runs (one per seed) and their mean and spread."""

    name: str
    pooler: str
    runs: list[HeadResult]

    def stat(self, label: str) -> tuple[float | None, float | None]:
        getter = next(g for lab, g, _ in SUMMARY_METRICS if lab == label)
        return mean_std(getter(r) for r in self.runs)

    def to_dict(self) -> dict:
        first = self.runs[0]
        return {
            "name": self.name,
            "pooler": self.pooler,
            "config": first.config,
            "runs": len(self.runs),
            "seeds": [r.seed for r in self.runs],
            "train_iters": sorted({r.train_iters for r in self.runs}),
            **{
                label: dict(zip(("mean", "std"), self.stat(label), strict=True))
                for label, _, _ in SUMMARY_METRICS
            },
            "pooler_rois": first.pooler_rois,
            "box_head_params": first.box_head_params,
            "box_head_gflops": first.box_head_gflops,
        }


def summarize(results: Sequence[HeadResult]) -> list[HeadSummary]:
    """Group runs by head, in the order the heads first appear."""
    heads: dict[str, HeadSummary] = {}
    for r in results:
        heads.setdefault(r.name, HeadSummary(r.name, r.pooler, [])).runs.append(r)
    return list(heads.values())


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.{digits}f}"


def _fmt_ms(mean, std, digits=1) -> str:
    if std is None:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _seed_text(seed: int) -> str:
    return str(seed) if seed >= 0 else "random"


def table_markdown(results: Sequence[HeadResult]) -> str:
    """One row per head: mean ± std over its runs (a single run: its values)."""
    labels = [label for label, _, _ in SUMMARY_METRICS]
    head = (
        "| head | box pooler | runs | "
        + " | ".join(labels)
        + " | iterations | RoIs | box-head params (M) | box-head GFLOPs/img (lower bound) |"
    )
    rows = [head, "|" + "---|" * (len(labels) + 7)]
    for h in summarize(results):
        cells = [_fmt_ms(*h.stat(label), digits) for label, _, digits in SUMMARY_METRICS]
        first = h.runs[0]
        iters = "/".join(str(i) for i in sorted({r.train_iters for r in h.runs}))
        rows.append(
            f"| {h.name} | {h.pooler} | {len(h.runs)} | "
            + " | ".join(cells)
            + f" | {iters} | {first.pooler_rois} | {first.box_head_params / 1e6:.2f} | "
            f"{_fmt(first.box_head_gflops, 3)} |"
        )
    return "\n".join(rows)


def runs_markdown(results: Sequence[HeadResult]) -> str:
    """One row per run (head, seed)."""
    rows = [
        "| head | seed | AP | AP50 | AP75 | train s/iter | inference ms/img | train wall min | "
        "run folder |",
        "|" + "---|" * 9,
    ]
    for r in results:
        wall = None if r.train_wall_s is None else r.train_wall_s / 60
        rows.append(
            f"| {r.name} | {_seed_text(r.seed)} | {_fmt(r.ap.get('AP'))} | "
            f"{_fmt(r.ap.get('AP50'))} | {_fmt(r.ap.get('AP75'))} | "
            f"{_fmt(r.train_s_per_iter, 3)} | {_fmt(r.infer_ms_per_image)} | {_fmt(wall)} | "
            f"{Path(r.run_dir).name} |"
        )
    return "\n".join(rows)


def pairwise_verdicts(results: Sequence[HeadResult], key: str = "AP") -> list[dict]:
    """For each pair of heads: the difference of their mean ``key`` and whether it exceeds the
    spread, i.e. ``|difference| > std_a + std_b`` (the mean ± std ranges do not overlap).
    Undecided (``exceeds`` None) when a head has fewer than two runs."""
    heads = summarize(results)
    out = []
    for i, a in enumerate(heads):
        for b in heads[i + 1 :]:
            (ma, sa), (mb, sb) = a.stat(key), b.stat(key)
            if ma is None or mb is None:
                continue
            diff = ma - mb
            exceeds = None if sa is None or sb is None else abs(diff) > sa + sb
            out.append(
                {
                    "a": a.name,
                    "b": b.name,
                    "metric": key,
                    "difference": diff,
                    "spread": None if exceeds is None else sa + sb,
                    "exceeds": exceeds,
                }
            )
    return out


def verdict_sentences(verdicts: Sequence[dict]) -> list[str]:
    lines = []
    for v in verdicts:
        better, worse = (v["a"], v["b"]) if v["difference"] >= 0 else (v["b"], v["a"])
        d = abs(v["difference"])
        if v["exceeds"] is None:
            lines.append(
                f"- {better} vs {worse}: {v['metric']} {d:.1f} higher, from one run per head: "
                "the spread is unknown, so this is not evidence either way."
            )
        elif v["exceeds"]:
            lines.append(
                f"- {better} beats {worse} by {d:.1f} {v['metric']}, more than the spread "
                f"({v['spread']:.1f} = the two heads' standard deviations added)."
            )
        else:
            lines.append(
                f"- {better} vs {worse}: {v['metric']} {d:.1f} higher, within the spread "
                f"({v['spread']:.1f}): these runs cannot tell the two heads apart."
            )
    return lines


def write_plots(results: Sequence[HeadResult], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = summarize(results)
    names = [h.name for h in heads]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for j, key in enumerate(("AP", "AP50", "AP75")):
        xs = [i + (j - 1) * width for i in range(len(heads))]
        stats = [h.stat(key) for h in heads]
        means = [m or 0.0 for m, _ in stats]
        errs = [sd or 0.0 for _, sd in stats]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        for x, h in zip(xs, heads, strict=True):  # the individual runs
            vals = [r.ap.get(key) for r in h.runs if _finite(r.ap.get(key))]
            if len(vals) > 1:
                ax.scatter([x] * len(vals), vals, s=9, color="black", zorder=3)
    ax.set_xticks(range(len(heads)), names, rotation=12, fontsize=8)
    ax.set_ylabel("COCO box AP (%)")
    runs = sorted({len(h.runs) for h in heads})
    ax.set_title(
        "Accuracy per ROI head (mean ± std over " + "/".join(map(str, runs)) + " runs; dots: runs)"
        if max(runs) > 1
        else "Accuracy per ROI head (one run each)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "ap.png", dpi=110)
    plt.close(fig)
    written.append("ap.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        rows = [m for m in read_metrics(Path(r.run_dir)) if "total_loss" in m]
        if rows:
            label = r.name if len(results) == len(heads) else f"{r.name} (seed {r.seed})"
            ax.plot([m["iteration"] for m in rows], [m["total_loss"] for m in rows], label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total_loss (20-iter median)")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = [
        ("training", "seconds per iteration", ["train s/iter"]),
        ("inference", "ms per image (batch 1)", ["inference ms/img"]),
        (
            "box pooler (fwd / fwd+bwd)",
            "ms per batch of RoIs",
            ["pooler fwd ms", "pooler fwd+bwd ms"],
        ),
    ]
    for ax, (title, ylabel, labels) in zip(axes, panels, strict=True):
        n = len(labels)
        for j, label in enumerate(labels):
            stats = [h.stat(label) for h in heads]
            xs = [i + (j - (n - 1) / 2) * (0.8 / n) for i in range(len(heads))]
            ax.bar(
                xs,
                [m or 0.0 for m, _ in stats],
                0.8 / n,
                yerr=[sd or 0.0 for _, sd in stats],
                capsize=3,
                label=label if n > 1 else None,
            )
        if n > 1:
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(heads)), names, rotation=25, fontsize=7, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
    fig.tight_layout()
    fig.savefig(output_dir / "speed.png", dpi=110)
    plt.close(fig)
    written.append("speed.png")
    return written


def write_report(
    results: Sequence[HeadResult], output_dir: Path, command: str, elapsed_s: float | None = None
) -> dict:
    """``report.md``, ``report.json`` and the plots for the runs in ``results``."""
    output_dir = Path(output_dir)
    info = machine_description()
    info.update(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        commit=git_commit(),
        command=command,
    )
    if elapsed_s is not None:
        info["elapsed_s"] = round(elapsed_s, 1)
    heads = summarize(results)
    plots = write_plots(results, output_dir)
    table = table_markdown(results)
    verdicts = pairwise_verdicts(results, "AP")
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
    iters = sorted({r.train_iters for r in results})
    seeds = sorted({r.seed for r in results})
    per_head = sorted({len(h.runs) for h in heads})
    lines += [
        f"- training: {', '.join(map(str, iters))} iterations per run; seeds "
        f"{', '.join(_seed_text(s) for s in seeds)} (SEED -1: detectron2 draws one and logs it); "
        f"{len(heads)} heads, {'/'.join(map(str, per_head))} run(s) each, {len(results)} runs",
        "",
        table,
        "",
        "Each cell: mean ± sample standard deviation over the head's runs (one value for a single "
        "run). AP columns: detectron2 COCOEvaluator on each config's test set (%). Training "
        "s/iter: median of detectron2's logged iteration time after warm-up. Inference: median "
        f"per image after {WARMUP_IMAGES} warm-up images, batch 1. Pooler: median time (CUDA "
        "do_bench, CPU blocked_autorange; the kernel benchmark's timer) on the RoIs the head "
        "received for a batch of test images. FLOPs: fvcore (1 "
        "multiply-add = 1 flop), box pooler + box head, per image, a lower bound: fvcore sees "
        "only shapes, so RoI pooling (spp_triton's ops, torchvision roi_pool, roi_align with "
        "sampling_ratio 0) is counted as one input read (or one bilinear sample) per bin, "
        "while real RoIs read more (one trial: 151,200 counted vs 794,592 exact from torch's "
        "FlopCounterMode); roi_align with a fixed sampling_ratio is counted exactly (4 reads "
        "per sample + 1 divide per bin).",
        "",
        "## Which differences exceed the spread (AP)",
        "",
        "A difference exceeds the spread when it is larger than the two heads' standard "
        "deviations added (their mean ± std ranges do not overlap); a rough rule with few "
        "runs, not a significance test.",
        "",
        *(verdict_sentences(verdicts) or ["- (one head: nothing to compare)"]),
        "",
        "## Runs",
        "",
        runs_markdown(results),
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]
    uncounted = sorted({op for r in results for op in r.flops_uncounted_ops})
    if uncounted:
        lines.append(f"Ops fvcore did not count (0 FLOPs): {', '.join(uncounted)}")
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")
    payload = {
        "info": info,
        "heads": [h.to_dict() for h in heads],
        "comparisons": verdicts,
        "runs": [r.__dict__ for r in results],
        "plots": plots,
    }
    (output_dir / "report.json").write_text(json.dumps(payload, indent=2))
    print("\n" + table + "\n", flush=True)
    print("\n".join(verdict_sentences(verdicts)) + "\n", flush=True)
    _log(f"report: {output_dir / 'report.md'}")
    return payload
