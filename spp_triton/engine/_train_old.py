"""Training pieces for ``tools/train_net.py``: config set-up, the ``Trainer``, and ``launch``.

* :func:`setup`: ``get_cfg`` + :func:`add_spp_config` + file + command-line opts, CPU fallback when
  CUDA is absent, validation (config values, dataset names) before anything is built, then
  detectron2's ``default_setup`` (logger, ``config.yaml`` in OUTPUT_DIR, seeding).
* :class:`Trainer`: detectron2's ``DefaultTrainer`` with a COCO evaluator, DDP on CPU (gloo)
  and a checkpointer that never writes non-finite weights (a diverging run stops with detectron2's
  ``FloatingPointError``; ``last_checkpoint`` keeps naming the last good checkpoint).
* :func:`launch`: detectron2's ``launch`` on GPUs; on CPU, gloo processes (``--num-gpus N``) or
  the processes ``torchrun`` started (``WORLD_SIZE > 1`` in the environment).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import launch as d2_launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from spp_triton.modeling.config import add_spp_config, validate_config, validate_datasets

__all__ = [
    "Trainer",
    "setup",
    "launch",
    "register_datasets",
    "resolve_device",
    "fast_coco_eval_available",
    "FiniteCheckpointer",
]

logger = logging.getLogger("spp_triton.modeling")

DEFAULT_TIMEOUT = timedelta(minutes=30)


# --------------------------------------------------------------------------------------------
# Datasets, device, evaluation capabilities
# --------------------------------------------------------------------------------------------


def register_datasets(cfg=None, *, names=None) -> None:
    """Make the embedded shapes datasets (``shapes_train`` / ``shapes_val``) usable.

    Without ``cfg`` or ``names``: register the names with detectron2 (nothing is generated).
    With ``cfg`` (yacs) or ``names`` (the dataset names a LazyConfig uses): if ``DATASETS.TRAIN``
    / ``DATASETS.TEST`` or ``names`` name them, also generate their files now (once, cached on
    disk; safe from several processes), as ``COCOEvaluator`` reads the json when it is built.
    """
    from detectron2.data import DatasetCatalog

    import spp_triton.data as data

    register = getattr(data, "register_shapes_datasets", None)
    if register is None:  # spp_triton.data without the shapes datasets
        return
    shapes = set(getattr(data, "SHAPES_DATASET_NAMES", {}).values()) or {
        "shapes_train",
        "shapes_val",
    }
    if cfg is None and names is None:
        if not shapes <= set(DatasetCatalog.list()):
            register(generate=False)
        return
    used = set(names or ())
    if cfg is not None:
        used |= set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if shapes & used:
        register()


def resolve_device(cfg) -> str | None:
    """``MODEL.DEVICE`` cuda without CUDA -> cpu (in place). Returns a message when changed."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        return f"MODEL.DEVICE = {device!r} but CUDA is not available: using MODEL.DEVICE = 'cpu'"
    return None


def fast_coco_eval_available() -> bool:
    """Whether detectron2's compiled COCO evaluation (``detectron2._C``) is really built."""
    try:
        from detectron2 import _C
    except Exception:
        return False
    for name in ("COCOevalAccumulate", "COCOevalEvaluateImages", "InstanceAnnotation"):
        try:  # the placeholder _C raises ImportError (not AttributeError) for every name
            if not callable(getattr(_C, name)):
                return False
        except Exception:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def setup(args):
    """Build, validate and freeze the config from parsed ``default_argument_parser`` args.

    Raises ``FileNotFoundError`` naming a missing ``--config-file`` and ``ValueError`` for bad
    values, before any model or data loader is built.
    """
    config_file = getattr(args, "config_file", "") or ""
    if config_file.endswith(".py"):
        raise ValueError(
            f"--config-file {config_file!r} is a LazyConfig; setup() builds yacs (.yaml) configs: "
            "use spp_triton.modeling.lazy.setup_lazy(args) (spp-triton-train and "
            "tools/train_net.py do so for .py configs)"
        )
    if config_file:
        from spp_triton.model_zoo import resolve_config

        try:  # a path, or the name of a config shipped with spp_triton
            config_file = resolve_config(config_file)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--config-file: {e}") from None
        args.config_file = config_file  # default_setup copies the file it names
    register_datasets()  # the names, for validation
    cfg = get_cfg()
    add_spp_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    opts = list(getattr(args, "opts", None) or [])
    try:
        cfg.merge_from_list(opts)
    except AssertionError as e:  # yacs asserts on unknown keys and odd-length lists
        raise ValueError(f"Invalid command-line config override {opts}: {e}") from e
    device_note = resolve_device(cfg)
    validate_config(cfg)
    eval_only = bool(getattr(args, "eval_only", False))
    validate_datasets(cfg, train=not eval_only, test=True)
    register_datasets(cfg)  # the files, if the config uses them
    cfg.freeze()
    default_setup(cfg, args)
    if device_note:
        logging.getLogger("detectron2").info(device_note)
    return cfg


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _ddp_device_ids_for_cpu():
    """DefaultTrainer wraps the model with ``device_ids=[local_rank]``, which DDP rejects for CPU
    modules; while the trainer is built, give CPU models ``device_ids=None``."""
    import detectron2.engine.defaults as d2_defaults

    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        first = next(model.parameters(), None)
        if comm.get_world_size() > 1 and first is not None and first.device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` + COCO evaluation, CPU DDP and finite-only checkpoints."""

    def __init__(self, cfg):
        with _ddp_device_ids_for_cpu():
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        """detectron2's ``build_model`` after :func:`validate_config`, so that a config error
        names its key (not detectron2's ``Unknown pooler type: SPP``)."""
        validate_config(cfg)
        return super().build_model(cfg)

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
        """detectron2's resume, made exact: a resumed run also replays the data loader to where
        the checkpoint was taken (same batches, same augmentations) and restores the random
        states saved with the checkpoint, so that it reaches the weights an uninterrupted run
        reaches (bitwise on CPU with deterministic settings and ``DATALOADER.NUM_WORKERS 0``)."""
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
            data = self._trainer._data_loader_iter  # an attribute on v0.6, a property on main
            for _ in range(self.start_iter):
                next(data)
            if checkpoint and "rng" in checkpoint:
                set_rng_state(checkpoint["rng"])
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
        # COCOEvaluator opens the metadata's json_file when it is built. Datasets registered
        # lazily (the shapes datasets generate their files on first load) may not have it yet:
        # loading the dataset once creates it.
        json_file = getattr(MetadataCatalog.get(dataset_name), "json_file", None)
        if json_file and not os.path.exists(json_file):
            DatasetCatalog.get(dataset_name)
        return COCOEvaluator(
            dataset_name, tasks=tuple(tasks), distributed=True, output_dir=output_folder, **kwargs
        )


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------


def _set_local_process_group(num_per_machine: int) -> None:
    """detectron2's per-machine process group (``comm.get_local_rank`` etc.)."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(num_per_machine)
        return
    # detectron2 v0.6: launch() fills comm._LOCAL_PROCESS_GROUP itself; do the same.
    world, rank = dist.get_world_size(), dist.get_rank()
    machine = rank // num_per_machine
    for i in range(world // num_per_machine):
        pg = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = pg


def _run_in_group(main_func, args, num_per_machine: int):
    _set_local_process_group(num_per_machine)
    comm.synchronize()
    try:
        return main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    # N processes share this machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    _run_in_group(main_func, args, num_per_machine)


def launch(
    main_func,
    num_gpus_per_machine: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in every process of the job.

    * started by ``torchrun`` (``WORLD_SIZE > 1``): join its process group (NCCL with CUDA,
      gloo without) and run here;
    * CUDA available: detectron2's ``launch`` (one NCCL process per GPU);
    * no CUDA and ``num_gpus_per_machine * num_machines > 1``: that many gloo CPU processes;
    * otherwise: just call it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        return _run_in_group(main_func, args, local)
    if torch.cuda.is_available():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logger.warning(
        f"CUDA is not available: launching {num_gpus_per_machine} CPU processes "
        f"(gloo) per machine instead of GPU workers"
    )
    torch.multiprocessing.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
