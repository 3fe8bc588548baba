"""Start the processes of a training job: :func:`launch`.

detectron2's ``launch`` on GPUs; on CPU, gloo processes (``--num-gpus N``) or the processes
``torchrun`` started (``WORLD_SIZE > 1`` in the environment). ``torch.multiprocessing.spawn``
pickles the worker and ``main_func`` by module path: ``main_func`` must be a module-level
function.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

logger = logging.getLogger("spp_triton.engine")

DEFAULT_TIMEOUT = timedelta(minutes=30)


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
