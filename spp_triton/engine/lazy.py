"""LazyConfig (``.py``) training for ``spp-triton-train`` / ``tools/train_net.py``.

detectron2's ``tools/lazyconfig_train_net.py`` conventions (that script ships with neither
detectron2's package nor spp_triton), with spp_triton's training pieces:

* a config has ``model``, ``dataloader.train`` / ``dataloader.test`` / ``dataloader.evaluator``,
  ``optimizer`` (its ``params.model`` is filled with the model), ``lr_multiplier`` (an fvcore
  ``ParamScheduler`` over the whole run) and ``train`` (``output_dir``, ``init_checkpoint``,
  ``max_iter``, ``eval_period``, ``log_period``, ``checkpointer``, ``device``, ``amp``, ``ddp``,
  optional ``seed``; keys it lacks get the values of detectron2's ``common/train.py``);
* trailing command-line arguments are ``key=value`` overrides (``LazyConfig.apply_overrides``);
* :func:`setup_lazy`: everything that can be checked is checked before anything is built or
  written (config file, override syntax and keys, required sections, ``train`` values, dataset
  names), then the CPU fallbacks (``train.device`` cuda without CUDA -> cpu; AMP off on CPU;
  ``COCOEvaluator(use_fast_impl=False)`` without the compiled ``detectron2._C``) and detectron2's
  ``default_setup`` (logger, ``config.yaml``, seeding);
* :func:`do_train`: ``SimpleTrainer`` / ``AMPTrainer`` with detectron2's hooks (IterationTimer,
  LRScheduler, PeriodicCheckpointer, EvalHook, PeriodicWriter) and spp_triton's
  :class:`~spp_triton.engine.checkpoint.FiniteCheckpointer`; ``--resume`` continues exactly as the
  yacs path does (data loader replayed, random states restored); DDP on CPU over gloo;
* :func:`do_test`: ``inference_on_dataset`` with ``dataloader.test`` and ``dataloader.evaluator``
  (``dataloader.evaluator=null`` turns evaluation off);
* :func:`main_lazy`: one process's work (``launch`` runs it in every process).

The pieces LazyConfigs of spp_triton models use live with the model parts and the solver:
:func:`spp_triton.modeling.basic_resnet_stages`, :func:`spp_triton.modeling.spp_pooled_shape`,
:class:`spp_triton.engine.ClippedSGD`.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from spp_triton.engine.checkpoint import FiniteCheckpointer, resume_exactly
from spp_triton.engine.defaults import (
    ensure_evaluator_files,
    fast_coco_eval_available,
    register_datasets,
)
from spp_triton.engine.trainer import create_ddp_model
from spp_triton.modeling.config import _BUILTIN_DATASET_PREFIXES

__all__ = [
    "is_lazy_config",
    "setup_lazy",
    "apply_overrides",
    "do_train",
    "do_test",
    "main_lazy",
    "DEFAULT_TRAIN",
]

#: detectron2's ``configs/common/train.py``: the values of ``train`` keys a config leaves out.
DEFAULT_TRAIN = {
    "output_dir": "./output",
    "init_checkpoint": "",
    "max_iter": 90000,
    "amp": {"enabled": False},
    "ddp": {"broadcast_buffers": False, "find_unused_parameters": False, "fp16_compression": False},
    "checkpointer": {"period": 5000, "max_to_keep": 100},
    "eval_period": 5000,
    "log_period": 20,
    "device": "cuda",
}

_MISSING = object()


def is_lazy_config(config_file) -> bool:
    """Whether ``--config-file`` names a LazyConfig (a ``.py`` file) rather than a yacs one."""
    return os.fspath(config_file or "").endswith(".py")


# --------------------------------------------------------------------------------------------
# Config: load, overrides, validation
# --------------------------------------------------------------------------------------------


def _target(node):
    """The callable a LazyCall node names (its ``_target_``, imported if a string), or None."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            return locate(target)
        except Exception:
            return None
    return target


def _target_name(target) -> str:
    return getattr(target, "__qualname__", None) or str(target)


def _check_override_key(cfg, key: str, text: str) -> None:
    """An override must name a key of the config, or an argument the LazyCall node above it
    takes (so that, e.g., ``model.roi_heads.box_predictor.test_nms_thresh=0.4`` works when the
    file leaves it at its default)."""
    try:
        if OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False) is not (
            _MISSING
        ):
            return
    except Exception as e:  # a path through a value that is not a config
        raise ValueError(f"Invalid command-line config override {text!r}: {e}") from None
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    where = f"{parent_key!r}" if parent_key else "the config's top level"
    target = _target(parent)
    if target is not None:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return
        if leaf in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        takes = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
        raise ValueError(
            f"Invalid command-line config override {text!r}: {key!r} is not in the config and "
            f"{where} ({_target_name(target)}) takes no argument {leaf!r}; it takes "
            f"{', '.join(takes)}"
        )
    # Name the keys of the deepest part of the path that exists.
    parts = key.split(".")[:-1]
    while parts and not OmegaConf.is_config(
        OmegaConf.select(cfg, ".".join(parts), default=None, throw_on_resolution_failure=False)
    ):
        parts.pop()
    node = OmegaConf.select(cfg, ".".join(parts)) if parts else cfg
    where = f"{'.'.join(parts)!r}" if parts else "the config's top level"
    if OmegaConf.is_dict(node):
        keys = ", ".join(str(k) for k in node.keys())
    else:
        keys = f"{len(node)} items"
    raise ValueError(
        f"Invalid command-line config override {text!r}: {key!r} is not in the config "
        f"(keys of {where}: {keys})"
    )


def apply_overrides(cfg, overrides) -> DictConfig:
    """``LazyConfig.apply_overrides`` one ``key=value`` at a time, each checked first: a
    malformed override (e.g. yacs-style ``KEY VALUE``) or one naming a key the config does not
    have raises ``ValueError`` naming it. Returns ``cfg`` (changed in place)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in list(overrides or []):
        try:
            (override,) = parser.parse_overrides([text])
        except Exception as e:
            raise ValueError(
                f"Invalid command-line config override {text!r}: LazyConfig overrides are "
                f"key=value (e.g. train.max_iter=100 'model.roi_heads.box_head.fc_dims=[256,256]'"
                f"; yacs' KEY VALUE pairs are for .yaml configs): "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None
        if override.is_delete():
            raise ValueError(
                f"Invalid command-line config override {text!r}: deletion (~key) "
                "is not supported; set the key to null instead"
            )
        _check_override_key(cfg, override.key_or_group, text)
        try:
            LazyConfig.apply_overrides(cfg, [text])
        except Exception as e:
            raise ValueError(f"Invalid command-line config override {text!r}: {e}") from None
    return cfg


def _has(cfg, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False) not in (
        _MISSING,
        None,
    )


def _check_sections(cfg, config_file: str, eval_only: bool) -> None:
    if eval_only:
        need = ["model", "dataloader.test", "dataloader.evaluator"]
    else:
        need = ["model", "dataloader.train", "optimizer", "lr_multiplier"]
    missing = [k for k in need if not _has(cfg, k)]
    if missing:
        what = "--eval-only needs" if eval_only else "training needs"
        raise ValueError(
            f"Invalid LazyConfig {config_file!r}: {what} {', '.join(missing)} "
            "(detectron2's lazyconfig_train_net layout: model, dataloader.train/test/evaluator, "
            "optimizer, lr_multiplier, train)"
        )


def _fill_train_defaults(cfg) -> None:
    train = cfg.get("train", None)
    if train is None:
        cfg.train = {}
    elif not OmegaConf.is_dict(train):
        raise ValueError(f"Invalid config: train = {train!r}: must be a dict (output_dir, ...)")
    for key, value in DEFAULT_TRAIN.items():
        if key not in cfg.train:
            cfg.train[key] = value
    for key, default in (("amp", {"enabled": False}), ("ddp", {}), ("checkpointer", {})):
        if cfg.train[key] is None:
            cfg.train[key] = default
        elif not OmegaConf.is_dict(cfg.train[key]):
            raise ValueError(
                f"Invalid config: train.{key} = {cfg.train[key]!r}: must be a dict "
                f"(e.g. {DEFAULT_TRAIN[key]})"
            )
    if "enabled" not in cfg.train.amp:
        cfg.train.amp.enabled = False
    cfg.train.checkpointer.setdefault("period", DEFAULT_TRAIN["checkpointer"]["period"])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_train(cfg) -> None:
    t = cfg.train

    def fail(key, why):
        raise ValueError(f"Invalid config: train.{key} = {OmegaConf.select(t, key)!r}: {why}")

    if not _is_int(t.max_iter) or t.max_iter <= 0:
        fail("max_iter", "must be a positive integer")
    for key in ("eval_period", "log_period"):
        if not _is_int(t[key]) or t[key] < 0:
            fail(key, "must be an integer >= 0")
    if not _is_int(t.checkpointer.period) or t.checkpointer.period <= 0:
        fail("checkpointer.period", "must be a positive integer")
    if not isinstance(t.output_dir, str) or not t.output_dir:
        fail("output_dir", "must be a folder path")
    if t.init_checkpoint is not None and not isinstance(t.init_checkpoint, str):
        fail("init_checkpoint", "must be a path or URL (or empty)")
    try:
        torch.device(str(t.device))
    except RuntimeError:
        fail("device", "not a torch device")


def resolve_lazy_device(cfg) -> list[str]:
    """``train.device`` cuda without CUDA -> cpu, and AMP off on CPU (detectron2's AMPTrainer
    needs CUDA), in place; as :func:`~spp_triton.engine.resolve_device` for yacs'
    ``MODEL.DEVICE``. Returns a message for each change."""
    notes = []
    device = str(cfg.train.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
        notes.append(
            f"train.device = {device!r} but CUDA is not available: using train.device = 'cpu'"
        )
    if cfg.train.amp.enabled and str(cfg.train.device).startswith("cpu"):
        cfg.train.amp.enabled = False
        notes.append(
            "train.amp.enabled = True but train.device is 'cpu' (detectron2's AMPTrainer needs "
            "CUDA): training in fp32, train.amp.enabled = False"
        )
    return notes


def _walk(node, path: str):
    """(path, node) for every dict node under ``node``, including it."""
    if OmegaConf.is_dict(node):
        yield path, node
        for k in node.keys():
            try:
                child = node[k]
            except Exception:  # an interpolation that does not resolve (yet)
                continue
            yield from _walk(child, f"{path}.{k}")
    elif OmegaConf.is_list(node):
        for i, child in enumerate(node):
            yield from _walk(child, f"{path}.{i}")


def dataset_names(cfg, *, train: bool = True) -> dict[str, list[str]]:
    """The dataset names ``cfg.dataloader`` uses, by key: every ``names`` (of
    ``get_detection_dataset_dicts``) and ``dataset_name`` (of evaluators) under it
    (``dataloader.train`` left out with ``train=False``)."""
    found = {}
    dataloader = cfg.get("dataloader", None)
    if dataloader is None:
        return found
    for path, node in _walk(dataloader, "dataloader"):
        if not train and (path == "dataloader.train" or path.startswith("dataloader.train.")):
            continue
        for key in ("names", "dataset_name"):
            if key not in node:
                continue
            try:
                value = node[key]
            except Exception:
                continue
            if isinstance(value, str):
                found[f"{path}.{key}"] = [value]
            elif OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
                found[f"{path}.{key}"] = [str(v) for v in value]
    return found


def validate_lazy_datasets(cfg, *, train: bool = True) -> set[str]:
    """Check that every dataset ``cfg.dataloader`` names is registered; raise ``ValueError``
    naming the key, the unknown name and the registered names. Returns the names."""
    known = set(DatasetCatalog.list())
    used = set()
    for key, names in dataset_names(cfg, train=train).items():
        unknown = [n for n in names if n not in known]
        if unknown:
            others = sorted(n for n in known if not n.startswith(_BUILTIN_DATASET_PREFIXES))
            value = names[0] if len(names) == 1 else names
            raise ValueError(
                f"Invalid config: {key} = {value!r}: dataset(s) {unknown} not registered "
                f"(registered besides detectron2's builtin COCO/LVIS/VOC/Cityscapes names: "
                f"{', '.join(others) or 'none'})"
            )
        used.update(names)
    return used


def use_slow_coco_eval_if_needed(cfg) -> list[str]:
    """Without the compiled ``detectron2._C`` (spp_triton's pure-Python detectron2), set
    ``use_fast_impl=False`` on every ``COCOEvaluator`` (or subclass) node under
    ``dataloader.evaluator`` whose signature has it: detectron2 defaults to the compiled
    evaluator, which fails only after the whole inference pass. Returns messages."""
    evaluator = OmegaConf.select(cfg, "dataloader.evaluator", default=None)
    if evaluator is None or fast_coco_eval_available():
        return []
    notes = []
    for path, node in _walk(evaluator, "dataloader.evaluator"):
        target = _target(node)
        if not (isinstance(target, type) and issubclass(target, COCOEvaluator)):
            continue
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        if "use_fast_impl" in params and node.get("use_fast_impl", True) is not False:
            node.use_fast_impl = False
            notes.append(
                f"{path}.use_fast_impl = False: detectron2's compiled COCO evaluation "
                "(detectron2._C) is not available"
            )
    return notes


def setup_lazy(args):
    """Load, override, check and set up the LazyConfig ``args.config_file`` (parsed
    ``default_argument_parser`` args; ``args.opts`` are ``key=value`` overrides). Returns it.

    Raises ``FileNotFoundError`` naming a missing config file and ``ValueError`` naming a bad
    override, section, ``train`` value or dataset, before any model or data loader is built and
    before anything is written to ``train.output_dir``.
    """
    from spp_triton.model_zoo import resolve_config

    config_file = getattr(args, "config_file", "") or ""
    if not config_file:
        raise ValueError("--config-file is required")
    try:  # a path, or the name of a config shipped with spp_triton
        config_file = resolve_config(config_file)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--config-file: {e}") from None
    if not is_lazy_config(config_file):
        raise ValueError(f"--config-file {config_file!r} is not a LazyConfig (.py)")
    args.config_file = config_file  # default_setup logs the file it names
    register_datasets()  # the names, for validation
    from spp_triton.modeling.weights import register_weights_handler

    register_weights_handler()  # MODEL.WEIGHTS may name spp_triton://... files in the package
    cfg = LazyConfig.load(config_file)
    apply_overrides(cfg, getattr(args, "opts", None))
    eval_only = bool(getattr(args, "eval_only", False))
    _check_sections(cfg, config_file, eval_only)
    _fill_train_defaults(cfg)
    _validate_train(cfg)
    notes = resolve_lazy_device(cfg)
    used = validate_lazy_datasets(cfg, train=not eval_only)
    register_datasets(names=used)  # the files of the embedded datasets, if the config uses them
    notes += use_slow_coco_eval_if_needed(cfg)
    default_setup(cfg, args)
    for note in notes:
        logging.getLogger("detectron2").info(note)
    return cfg


# --------------------------------------------------------------------------------------------
# Train / test
# --------------------------------------------------------------------------------------------


def do_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``; returns the
    results (``{"bbox": {"AP": ...}}``), or None when the config has no evaluator."""
    if OmegaConf.select(cfg, "dataloader.evaluator", default=None) is None:
        logging.getLogger("detectron2").info("No dataloader.evaluator: not evaluating")
        return None
    ensure_evaluator_files(n for names in dataset_names(cfg, train=False).values() for n in names)
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg):
    """Train ``cfg`` (set up by :func:`setup_lazy`); returns the last evaluation's results."""
    log = logging.getLogger("detectron2")
    model = instantiate(cfg.model)
    log.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_cls(model, train_loader, optimizer)
    checkpointer = FiniteCheckpointer(model, cfg.train.output_dir, trainer=trainer)

    last = {}

    def evaluate():
        last["results"] = do_test(cfg, model)
        return last["results"]

    main = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )

    checkpoint = checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = 0
    if args.resume and checkpointer.has_checkpoint():  # as the yacs Trainer: exactly
        start_iter = resume_exactly(trainer, checkpoint)
    trainer.train(start_iter, cfg.train.max_iter)
    return last.get("results")


def main_lazy(args):
    """One process's work for a LazyConfig: train, or evaluate with ``--eval-only``
    (``train.init_checkpoint``; with ``--resume``, the last checkpoint in
    ``train.output_dir`` if there is one). Returns the evaluation results."""
    cfg = setup_lazy(args)
    if not args.eval_only:
        return do_train(args, cfg)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    if not cfg.train.init_checkpoint and not args.resume:
        logging.getLogger("detectron2").warning(
            "--eval-only without train.init_checkpoint: evaluating randomly initialised weights"
        )
    FiniteCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume
    )
    return do_test(cfg, model)
