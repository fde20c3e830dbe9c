"""Start one process per device, or join a process group that torchrun already set up.

Two ways to run data-parallel:
- ``torchrun --nproc_per_node=N tools/train_net.py ...`` (also multi-node with --nnodes and
  --rdzv-backend/--rdzv-endpoint or --node_rank/--master_addr): torchrun sets RANK/WORLD_SIZE/
  LOCAL_RANK/MASTER_ADDR/MASTER_PORT and we initialise from the environment. torchrun watches the
  workers and stops the others when one fails.
- ``tools/train_net.py --num-gpus N [--num-machines M --machine-rank K --dist-url tcp://H:P]``:
  we spawn N local processes ourselves; when one fails the others are terminated at once.
The backend is NCCL when CUDA is available and gloo otherwise. Collectives that wait longer than
``timeout_minutes`` (DIST.TIMEOUT_MINUTES) fail instead of hanging, e.g. when a peer on another
machine died.

A failing process's traceback is shown once on stderr (not again when the trainer already logged
it to the terminal), then ``launch`` raises :class:`LaunchError` with a one-line summary naming
the rank; the command-line tools print that line and exit with status 1.
"""
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector.utils import comm

__all__ = ["launch", "launched_by_torchrun", "default_backend", "check_launch_arguments",
           "run_reporting_errors", "LaunchError", "DEFAULT_TIMEOUT_MINUTES"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = 30


class LaunchError(RuntimeError):
    """A process of a distributed run failed. ``str()`` is one line naming the rank(s) and the
    error; ``rank`` is the failed rank (or the first of them)."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


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
           timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, report_errors: bool = False):
    """Run ``main_func(*args)`` in every process of the job.

    Under torchrun the current process joins the group described by the environment and the
    result of ``main_func`` is returned. Otherwise, with a world size above one, processes are
    spawned locally and rendezvous at ``dist_url`` ("auto": a free local port, one machine only);
    their return values are discarded. With a world size of one ``main_func`` simply runs here
    and its exceptions propagate unchanged, unless ``report_errors`` (as in the command-line
    tools) turns them into a LaunchError too.

    Raises:
        LaunchError: a process failed (exception, crash or kill); the others have been stopped.
    """
    check_launch_arguments(num_processes_per_machine, num_machines=num_machines,
                           machine_rank=machine_rank, dist_url=dist_url,
                           timeout_minutes=timeout_minutes)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launched_by_torchrun():
        return _run_torchrun_worker(main_func, args, timeout)
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        if report_errors:
            return run_reporting_errors(main_func, args)
        return main_func(*args)
    if dist_url == "auto":
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    failure_dir = tempfile.mkdtemp(prefix="detector-launch-")
    try:
        mp.start_processes(
            _spawned_worker,
            nprocs=num_processes_per_machine,
            args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
                  timeout, failure_dir),
            daemon=False,
            start_method="spawn",
        )
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        # torch has already terminated the surviving processes
        raise _spawn_failure(err, failure_dir, machine_rank * num_processes_per_machine,
                             world_size) from None
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)
    return None


def check_launch_arguments(num_processes_per_machine: int, *, num_machines: int = 1,
                           machine_rank: int = 0, dist_url: str = "auto",
                           timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """One-line ValueError for launch arguments that cannot work (checked before any process
    starts)."""
    if not timeout_minutes > 0:
        raise ValueError(f"DIST.TIMEOUT_MINUTES must be positive, got {timeout_minutes}")
    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(f"--num-gpus ({num_processes_per_machine}) and --num-machines "
                         f"({num_machines}) must be at least 1")
    world_size = num_machines * num_processes_per_machine
    if launched_by_torchrun():
        torchrun_world = int(os.environ["WORLD_SIZE"])
        if world_size not in (1, torchrun_world):
            raise ValueError(f"--num-gpus {num_processes_per_machine} x --num-machines "
                             f"{num_machines} contradicts torchrun's WORLD_SIZE={torchrun_world}; "
                             "under torchrun give only --nproc_per_node/--nnodes to torchrun")
        return
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank} must be in [0, {num_machines})")
    if dist_url == "auto" and num_machines != 1:
        raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")


def _init_process_group(backend: str, timeout: datetime.timedelta, **kwargs) -> None:
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    logger.info("Joined process group: rank %d / %d (%s, collective timeout %s)",
                dist.get_rank(), dist.get_world_size(), backend, timeout)


def run_reporting_errors(main_func, args=(), *, rank: int = 0, world_size: int = 1):
    """``main_func(*args)``; if it raises, print the traceback (unless a "detector" logger has
    already shown it on the terminal) and raise a one-line LaunchError instead."""
    recorder = _ShownExceptions.install()
    try:
        return main_func(*args)
    except Exception as err:  # noqa: BLE001 - reported once, then summarised
        if not recorder.was_shown(err):
            _print_traceback(rank if world_size > 1 else None, traceback.format_exc())
        raise LaunchError(_describe_exception(rank, world_size, err), rank=rank) from None
    finally:
        recorder.uninstall()


def _torchrun_main(main_func, args, timeout):
    local_rank = int(os.environ["LOCAL_RANK"])
    comm.set_local_rank(local_rank)
    if default_backend() == "nccl":
        torch.cuda.set_device(local_rank)
    _init_process_group(default_backend(), timeout, init_method="env://")
    return main_func(*args)


def _run_torchrun_worker(main_func, args, timeout):
    try:
        return run_reporting_errors(_torchrun_main, (main_func, args, timeout),
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    finally:
        _destroy()


def _spawned_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url,
                    args, timeout, failure_dir):
    global_rank = machine_rank * num_per_machine + local_rank
    comm.set_local_rank(local_rank)
    backend = default_backend()
    recorder = _ShownExceptions.install()
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # like torchrun: N processes with all cores each would oversubscribe the CPU
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
        _init_process_group(backend, timeout, init_method=dist_url, world_size=world_size,
                            rank=global_rank)
        main_func(*args)
    except Exception as err:  # noqa: BLE001 - handed to the parent, which reports it once
        record = {
            "rank": global_rank,
            "time": time.time(),
            "summary": _describe_exception(global_rank, world_size, err),
            "traceback": None if recorder.was_shown(err) else traceback.format_exc(),
        }
        path = os.path.join(failure_dir, f"rank{global_rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        sys.exit(1)  # not an exception: torch's spawn wrapper would print it a second time
    finally:
        _destroy()


def _spawn_failure(err: Exception, failure_dir: str, first_rank: int,
                   world_size: int) -> LaunchError:
    """One LaunchError for a failed spawn: the root failure first, then the ranks that failed
    after it; prints the traceback of the first Python exception that was not shown yet."""
    records = []
    for name in os.listdir(failure_dir):
        if name.endswith(".json"):
            with open(os.path.join(failure_dir, name)) as f:
                records.append(json.load(f))
    records.sort(key=lambda r: r["time"])
    failed_rank = first_rank + getattr(err, "error_index", 0)
    parts: List[str] = []
    root_rank = records[0]["rank"] if records else failed_rank
    if failed_rank not in {r["rank"] for r in records}:
        exit_code = getattr(err, "exit_code", None)
        signal_name = getattr(err, "signal_name", None)
        pid = getattr(err, "error_pid", "?")
        root_rank = failed_rank
        if isinstance(err, mp.ProcessRaisedException):  # raised outside our worker's handler
            _print_traceback(failed_rank, err.msg.strip())
            last_line = err.msg.strip().splitlines()[-1]
            parts.append(f"rank {failed_rank} of {world_size} failed with {last_line}")
        else:
            how = (f"was killed by {signal_name}" if signal_name
                   else f"exited with code {exit_code}")
            parts.append(f"rank {failed_rank} of {world_size} (pid {pid}) {how} without raising "
                         "a Python exception (os._exit, a crash in native code or a kill)")
    for record in records:
        parts.append(record["summary"])
    printed = next((r for r in records if r["traceback"]), None)
    if printed is not None:
        _print_traceback(printed["rank"], printed["traceback"])
    return LaunchError("; then ".join(parts) + "; the other processes were stopped",
                       rank=root_rank)


def _describe_exception(rank: int, world_size: int, err: BaseException) -> str:
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else ""
    if len(first_line) > 400:
        first_line = first_line[:400] + "..."
    who = f"rank {rank} of {world_size} failed" if world_size > 1 else "failed"
    return f"{who} with {type(err).__name__}: {first_line}"


def _print_traceback(rank: Optional[int], text: str) -> None:
    sys.stderr.write(text if rank is None else f"[rank {rank}] {text}")
    if not text.endswith("\n"):
        sys.stderr.write("\n")
    sys.stderr.flush()


class _ShownExceptions(logging.Handler):
    """Remembers exceptions that a "detector" logger already printed with their traceback to
    the terminal (rank 0's console; e.g. the trainer's "Exception during training"), so that the
    launcher does not print the same traceback again."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self._shown: List[BaseException] = []
        self._logger = logging.getLogger("detector")

    @classmethod
    def install(cls) -> "_ShownExceptions":
        handler = cls()
        handler._logger.addHandler(handler)
        return handler

    def uninstall(self) -> None:
        self._logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and self._logger_prints_to_terminal():
            self._shown.append(exc)

    def _logger_prints_to_terminal(self) -> bool:
        return any(type(h) is logging.StreamHandler and h.level <= logging.ERROR
                   and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                   for h in self._logger.handlers)

    def was_shown(self, err: BaseException) -> bool:
        return any(e is err for e in self._shown)


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()
