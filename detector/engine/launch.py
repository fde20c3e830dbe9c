"""Start one process per device, or join a process group that torchrun already set up.

Two ways to run data-parallel:
- ``torchrun --nproc_per_node=N tools/train_net.py ...`` (also multi-node with --nnodes/--rdzv-*):
  torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and we initialise from the environment.
- ``tools/train_net.py --num-gpus N``: we spawn N local processes ourselves.
The backend is NCCL when CUDA is available and gloo otherwise.
"""
import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector.utils import comm

__all__ = ["launch", "launched_by_torchrun", "default_backend"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = 30


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(main_func, num_processes_per_machine: int = 1, *, num_machines: int = 1,
           machine_rank: int = 0, dist_url: str = "auto", args=(),
           timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
    """Run ``main_func(*args)`` in every process of the job.

    Under torchrun the current process joins the group described by the environment. Otherwise,
    with a world size above one, processes are spawned locally and rendezvous at ``dist_url``.
    """
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launched_by_torchrun():
        _init_from_env(timeout)
        try:
            return main_func(*args)
        finally:
            _destroy()

    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _spawned_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
        start_method="spawn",
    )


def _init_from_env(timeout):
    local_rank = int(os.environ["LOCAL_RANK"])
    comm.set_local_rank(local_rank)
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    logger.info("Joined process group: rank %d / %d (%s)", dist.get_rank(),
                dist.get_world_size(), backend)


def _spawned_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url,
                    args, timeout):
    global_rank = machine_rank * num_per_machine + local_rank
    comm.set_local_rank(local_rank)
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    try:
        main_func(*args)
    finally:
        _destroy()


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()
