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

Stopping: the spawning process forwards SIGINT, SIGTERM and SIGUSR1 (``forward_signals``) to
its workers and waits for all of them; the trainers stop after the same iteration, rank 0 saves
a checkpoint, and ``launch`` raises :class:`TrainingInterrupted` (a ``SystemExit`` with status
128 + signal number, the workers' own status). Workers get SIGINT when the spawning process
dies (set by torch), so even a killed launcher leaves a checkpoint. Under torchrun, torchrun
forwards the signals it handles itself. A Ctrl-C that interrupts a process before its training
loop started ends it with one line and status 130 instead of a traceback.

Under torchrun, a worker that stopped on a signal also writes its exit status to the file named
by DETECTOR_STOP_STATUS_FILE, if set: torchrun reports any non-zero worker status as a failure
(exit 1), and a node whose workers stopped because a peer node was signalled thus learns that
the stop was a graceful one (docker/entrypoint.sh exits with it, so the job is retried).

Elastic restarts (``torchrun --max-restarts=N``): torchrun's agents share one TCP store with the
workers across rendezvous rounds by default, and a restarted worker can then read a dead
predecessor's address from it and fail to connect. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
for torchrun (docker/entrypoint.sh does): every round then gets a fresh store.
"""
import datetime
import json
import logging
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector.utils import comm

from .train_loop import TrainingInterrupted, signal_exit_status

__all__ = ["launch", "launched_by_torchrun", "default_backend", "check_launch_arguments",
           "run_reporting_errors", "LaunchError", "DEFAULT_TIMEOUT_MINUTES", "FORWARDED_SIGNALS"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = 30
# relayed by the spawning process to its workers (those that exist on this platform)
FORWARDED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                          if hasattr(signal, name))
# exit statuses of processes that stopped on a signal they handle (none can handle these two)
_STOP_STATUSES = frozenset(signal_exit_status(s) for s in signal.Signals
                           if s.name not in ("SIGKILL", "SIGSTOP"))


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
           timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, report_errors: bool = False,
           forward_signals: Sequence[int] = FORWARDED_SIGNALS):
    """Run ``main_func(*args)`` in every process of the job.

    Under torchrun the current process joins the group described by the environment and the
    result of ``main_func`` is returned. Otherwise, with a world size above one, processes are
    spawned locally and rendezvous at ``dist_url`` ("auto": a free local port, one machine only);
    their return values are discarded. With a world size of one ``main_func`` simply runs here
    and its exceptions propagate unchanged, unless ``report_errors`` (as in the command-line
    tools) turns them into a LaunchError too.

    When this process gets one of ``forward_signals`` while spawned processes run, it sends
    the signal to each of them and waits until all have exited.

    Raises:
        LaunchError: a process failed (exception, crash or kill); the others have been stopped.
        TrainingInterrupted: the processes stopped on a signal (status 128 + signal number).
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
    first_rank = machine_rank * num_processes_per_machine
    try:
        with _SignalForwarder(forward_signals) as forwarder:
            context = mp.start_processes(
                _spawned_worker,
                nprocs=num_processes_per_machine,
                args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url,
                      args, timeout, failure_dir),
                daemon=False,
                start_method="spawn",
                join=False,
            )
            forwarder.watch(context.processes)
            _join_workers(context, forwarder, failure_dir, first_rank, world_size)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        # torch has already terminated the surviving processes
        raise _spawn_failure(err, failure_dir, first_rank, world_size) from None
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)
    return None


class _SignalForwarder:
    """While active, relays the given signals to the watched processes and records them."""

    def __init__(self, signals: Sequence[int]):
        self.signals = list(signals)
        self.received: List[int] = []
        self._pids: List[int] = []
        self.finished: set = set()  # pids already reaped, never signalled again
        self._previous = {}

    def __enter__(self) -> "_SignalForwarder":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    def watch(self, processes) -> None:
        self._pids = [p.pid for p in processes]
        for sig in self.received:  # arrived while the processes were starting
            self._send(sig)

    def _forward(self, signum, frame) -> None:
        self.received.append(signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        for pid in self._pids:
            if pid not in self.finished:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass


def _join_workers(context, forwarder: _SignalForwarder, failure_dir: str, first_rank: int,
                  world_size: int) -> None:
    """Wait for the spawned processes. A failure raises as in ``ProcessContext.join``. Once a
    signal was forwarded, or a worker exited with the status of a stop on a signal (after its
    peers agreed to stop too), every process is awaited without terminating any."""
    while not forwarder.received:
        ready = multiprocessing.connection.wait(list(context.sentinels), timeout=0.5)
        if any(context.processes[context.sentinels[s]].exitcode in _STOP_STATUSES for s in ready):
            break
        # success, or a failure: torch then terminates the others and raises
        if context.join(timeout=0):
            return
    for process in context.processes:
        process.join()
        forwarder.finished.add(process.pid)
    codes = [p.exitcode for p in context.processes]
    if all(code == 0 for code in codes):
        return  # the signal came after the processes had finished their work
    if any(name.endswith(".json") for name in os.listdir(failure_dir)):
        index = next((i for i, c in enumerate(codes) if c not in (0, *_STOP_STATUSES)), 0)
        raise _spawn_failure(
            mp.ProcessExitedException(f"process {index} exited with {codes[index]}",
                                      error_index=index, error_pid=context.processes[index].pid,
                                      exit_code=codes[index]),
            failure_dir, first_rank, world_size)
    status = next((c for c in codes if c in _STOP_STATUSES), None)
    signum = status - 128 if status is not None else forwarder.received[0]
    if status is None:
        sys.stderr.write(f"Interrupted by {signal.Signals(signum).name}: the processes ended "
                         f"without saving a checkpoint (exit codes {codes})\n")
        sys.stderr.flush()
    raise TrainingInterrupted(signum)


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
    except KeyboardInterrupt:  # Ctrl-C outside a training loop that handles it: no traceback
        who = f"rank {rank}: " if world_size > 1 else ""
        sys.stderr.write(f"{who}Interrupted by SIGINT; exiting with status "
                         f"{signal_exit_status(signal.SIGINT)}\n")
        sys.stderr.flush()
        raise TrainingInterrupted(signal.SIGINT) from None
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
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("RANK") == "0"):
        logger.warning("torchrun --max-restarts with the rendezvous store shared by its workers: "
                       "restarted workers may fail to connect; set "
                       "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun")
    try:
        result = run_reporting_errors(_torchrun_main, (main_func, args, timeout),
                                      rank=int(os.environ["RANK"]),
                                      world_size=int(os.environ["WORLD_SIZE"]))
    except TrainingInterrupted as stop:
        _write_stop_status(stop.code)
        raise
    # only after success: tearing down a group whose peer died leaves the store shared by
    # torchrun's restarts in a state where the restarted workers cannot connect
    _destroy()
    return result


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
    except KeyboardInterrupt:  # outside a training loop that handles SIGINT
        if local_rank == 0:
            sys.stderr.write(f"Interrupted by SIGINT; exiting with status "
                             f"{signal_exit_status(signal.SIGINT)}\n")
        # torch's wrapper would exit with 0, as if the run had completed
        sys.exit(signal_exit_status(signal.SIGINT))
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


def _write_stop_status(status) -> None:
    path = os.environ.get("DETECTOR_STOP_STATUS_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(f"{int(status)}\n")
    except OSError as err:  # the exit status still says it
        logger.warning("Cannot write the stop status to %s: %s", path, err)


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()
