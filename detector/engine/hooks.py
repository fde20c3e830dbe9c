"""Standard training hooks. Register them in this order so each sees the previous ones' output:
IterationTimer, LRScheduler, EMAUpdate, PeriodicCheckpointer, EvalHook, BestCheckpointer (it
reads the EvalHook's newest results), PeriodicWriter (it
writes what the others put into the EventStorage during the same iteration), StopOnSignal (last,
so that its handlers stay in place until the others' after_train, e.g. the checkpoint written
when training stops early, are done)."""
import datetime
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from detector.checkpoint import CheckpointError, load_checkpoint_file
from detector.checkpoint import PeriodicCheckpointer as _PeriodicCheckpointer
from detector.utils import comm
from detector.utils.events import EventWriter

from .train_loop import HookBase

__all__ = [
    "CallbackHook", "IterationTimer", "LRScheduler", "EMAUpdate", "PeriodicCheckpointer",
    "EvalHook", "BestCheckpointer", "PeriodicWriter", "StopOnSignal", "flatten_results_dict",
    "parse_signals",
]

logger = logging.getLogger(__name__)


class CallbackHook(HookBase):
    """Calls the given functions, each taking the trainer, at the matching moments."""

    def __init__(self, *, before_train: Optional[Callable] = None,
                 after_train: Optional[Callable] = None, before_step: Optional[Callable] = None,
                 after_step: Optional[Callable] = None):
        self._before_train = before_train
        self._after_train = after_train
        self._before_step = before_step
        self._after_step = after_step

    def before_train(self):
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self):
        if self._after_train:
            self._after_train(self.trainer)

    def before_step(self):
        if self._before_step:
            self._before_step(self.trainer)

    def after_step(self):
        if self._after_step:
            self._after_step(self.trainer)


class IterationTimer(HookBase):
    """Puts each iteration's duration ("time": run_step plus the hooks' before_step) into the
    storage and logs the training speed and the time spent in hooks at the end. The first
    ``warmup_iter`` iterations are left out of the speed (they include start-up costs)."""

    def __init__(self, warmup_iter: int = 3):
        self._warmup_iter = warmup_iter
        self._step_start = 0.0
        self._train_start = 0.0
        self._in_steps = 0.0  # seconds between before_step and after_step, all iterations
        self._measured_seconds = 0.0  # the same after the warmup iterations
        self._measured_iters = 0

    def before_train(self):
        self._train_start = time.perf_counter()
        self._in_steps = self._measured_seconds = 0.0
        self._measured_iters = 0

    def before_step(self):
        self._step_start = time.perf_counter()

    def after_step(self):
        seconds = time.perf_counter() - self._step_start
        self._in_steps += seconds
        if self.trainer.iter - self.trainer.start_iter >= self._warmup_iter:
            self._measured_seconds += seconds
            self._measured_iters += 1
        self.trainer.storage.put_scalars(time=seconds)

    def after_train(self):
        total = time.perf_counter() - self._train_start
        if self._measured_iters > 0:
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)", self._measured_iters,
                datetime.timedelta(seconds=int(self._measured_seconds)),
                self._measured_seconds / self._measured_iters,
            )
        logger.info(
            "Total training time: %s (%s on hooks)", datetime.timedelta(seconds=int(total)),
            datetime.timedelta(seconds=int(max(total - self._in_steps, 0.0))),
        )


class LRScheduler(HookBase):
    """Records the learning rate used in the iteration ("lr", of the parameter group with the
    most parameters) and steps the scheduler once per iteration. Without arguments it uses the
    trainer's ``optimizer`` and ``scheduler`` attributes."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None):
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._group_index = 0

    @property
    def scheduler(self):
        return self._scheduler or self.trainer.scheduler

    def before_train(self):
        self._optimizer = self._optimizer or self.trainer.optimizer
        groups = self._optimizer.param_groups
        sizes = [sum(p.numel() for p in g["params"]) for g in groups]
        self._group_index = max(range(len(groups)), key=lambda i: sizes[i])

    def after_step(self):
        lr = self._optimizer.param_groups[self._group_index]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()


class EMAUpdate(HookBase):
    """Moves a :class:`detector.solver.ModelEMA` towards the trainer's model after every
    optimizer step; registered before the checkpointer and EvalHook so both see this
    iteration's average."""

    def __init__(self, ema):
        self.ema = ema

    def after_step(self):
        self.ema.update(self.trainer.model)


class PeriodicCheckpointer(_PeriodicCheckpointer, HookBase):
    """Saves ``model_<iter>.pth`` every ``period`` iterations (keeping the newest ``max_to_keep``,
    None/0 = all) and ``model_final.pth`` after the last iteration. ``max_iter`` defaults to the
    trainer's. When the trainer stops early on a signal, ``model_<iter>.pth`` of the iteration it
    stopped after is written too (and named in ``trainer.stop_checkpoint``). Same arguments as
    ``detector.checkpoint.PeriodicCheckpointer``."""

    def before_train(self):
        self.max_iter = self.trainer.max_iter

    def after_step(self):
        self.step(self.trainer.iter)

    def after_train(self):
        if self.trainer.stop_signal is not None and self.checkpointer.save_to_disk:
            self.trainer.stop_checkpoint = self.save_now(self.trainer.iter)


SignalSpec = Union[str, int, signal.Signals]


def parse_signals(names: Sequence[SignalSpec], key: str = "signals") -> List[signal.Signals]:
    """Signal names ("SIGTERM", "TERM") or numbers -> ``signal.Signals``, in order, without
    duplicates. Names this platform lacks (SIGUSR1 on Windows) are skipped with a warning.

    Raises:
        ValueError: (one line naming ``key``) an unknown name, or SIGKILL/SIGSTOP, which no
            process can handle.
    """
    result: List[signal.Signals] = []
    for spec in names:
        if isinstance(spec, str):
            name = spec.strip().upper()
            name = name if name.startswith("SIG") else "SIG" + name
            if name not in signal.Signals.__members__:
                if name in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGALRM"):
                    logger.warning("%s: %s does not exist on this platform; ignored", key, spec)
                    continue
                raise ValueError(f"{key}: unknown signal {spec!r}; expected names such as "
                                 "SIGTERM, SIGINT or SIGUSR1")
            sig = signal.Signals[name]
        else:
            try:
                sig = signal.Signals(int(spec))
            except ValueError:
                raise ValueError(f"{key}: unknown signal number {spec!r}") from None
        if sig in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
            raise ValueError(f"{key}: {sig.name} cannot be caught by any process")
        if sig not in result:
            result.append(sig)
    return result


class StopOnSignal(HookBase):
    """During training, the given signals make the trainer stop after the current iteration
    (see ``TrainerBase.request_stop``): it saves a checkpoint (with a PeriodicCheckpointer
    hook) and ``train`` raises ``TrainingInterrupted`` (exit status 128 + signal number). The
    handler only records the signal. The previous handlers are back after training.

    Handlers can only be installed from the main thread; elsewhere the hook warns and does
    nothing. Args: ``signals``: names or numbers, e.g. ``("SIGINT", "SIGTERM", "SIGUSR1")``.
    """

    def __init__(self, signals: Sequence[SignalSpec] = ("SIGINT", "SIGTERM", "SIGUSR1")):
        self.signals = parse_signals(signals)
        self._previous: Dict[signal.Signals, Any] = {}

    def _handle(self, signum, frame):
        self.trainer.request_stop(signum)

    def before_train(self):
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: %s will not stop it with a "
                           "checkpoint", ", ".join(s.name for s in self.signals))
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def after_train(self):
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def flatten_results_dict(results: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"bbox": {"AP": 1.0}} -> {"bbox/AP": 1.0} (any depth)."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_results_dict(value, name))
        else:
            flat[name] = value
    return flat


class EvalHook(HookBase):
    """Runs ``eval_function()`` every ``eval_period`` iterations (0: never periodically) and,
    with ``eval_after_train``, once after the last iteration of a complete run. Its result
    (nested dict of numbers) goes into the storage flattened, e.g. "bbox/AP". All ranks call
    the function and wait for each other afterwards.

    After each evaluation, ``last_results`` holds the flattened results of this process and
    ``last_iteration`` the last training iteration done before it (``max_iter - 1`` for the
    evaluation after training), for hooks registered after this one (BestCheckpointer)."""

    def __init__(self, eval_period: int, eval_function: Callable[[], Optional[Dict]],
                 eval_after_train: bool = True):
        self._period = int(eval_period)
        self._func = eval_function
        self._eval_after_train = eval_after_train
        self.last_results: Dict[str, float] = {}
        self.last_iteration: Optional[int] = None

    def before_train(self):
        self.last_results, self.last_iteration = {}, None

    def _do_eval(self):
        results = self._func()
        flat = {}
        if results:
            if not isinstance(results, dict):
                raise TypeError(
                    f"EvalHook: eval_function must return a dict, got {type(results).__name__}"
                )
            for name, value in flatten_results_dict(results).items():
                try:
                    flat[name] = float(value)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"EvalHook: result '{name}' at iteration {self.trainer.iter} is not a "
                        f"number: {value!r}"
                    ) from None
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        # after train, trainer.iter is max_iter: the weights are those of iteration max_iter - 1
        self.last_iteration = min(self.trainer.iter, self.trainer.max_iter - 1)
        self.last_results = flat
        # evaluation can take different times on different ranks
        comm.synchronize()
        return results

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0:
            # the last iteration is evaluated by after_train instead, exactly once
            if not (self._eval_after_train and next_iter == self.trainer.max_iter):
                self._do_eval()

    def after_train(self):
        if self._eval_after_train and self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()


class BestCheckpointer(HookBase):
    """Keeps ``<save_dir>/model_best.pth``: the weights with the best value of one evaluation
    result so far. Register it right after ``eval_hook``; after each of its evaluations the value
    of ``metric`` (a flattened name such as "bbox/AP", see ``EvalHook``) is compared with the
    best one and, if strictly better, the trainer's checkpointer state is written to
    ``model_best.pth`` (atomically, only where the checkpointer saves to disk: rank 0).

    - A ``metric`` absent from the results is logged once as a warning naming the metric and the
      available ones; training goes on. A NaN or infinite value is never taken as the best.
    - The file also holds ``"iteration"`` and ``"best_metric"`` = {"name", "mode", "value",
      "iteration"}. That record is the hook's state: when training resumes (start iteration
      > 0), it is read back from ``model_best.pth``, so the file and the best value it is
      compared with never disagree, whichever checkpoint the run resumes from. A training
      started from iteration 0 ignores an existing file and replaces it at its first valid
      evaluation; a record of another metric or mode is ignored with a warning.

    Args:
        eval_hook: the EvalHook whose results are read.
        checkpointer: the trainer's ``DetectionCheckpointer`` (model and checkpointables).
        metric: flattened result name; with several test datasets "<dataset>/bbox/AP".
        mode: "max" (higher is better) or "min".
        file_prefix: the file is ``<file_prefix>.pth``.
    """

    def __init__(self, eval_hook: EvalHook, checkpointer, *, metric: str = "bbox/AP",
                 mode: str = "max", file_prefix: str = "model_best"):
        if mode not in ("max", "min"):
            raise ValueError(f"BestCheckpointer: mode must be 'max' or 'min' "
                             f"(SOLVER.BEST_CHECKPOINT.MODE), got {mode!r}")
        if not metric:
            raise ValueError("BestCheckpointer: metric must be a result name such as 'bbox/AP'")
        self.eval_hook = eval_hook
        self.checkpointer = checkpointer
        self.metric = metric
        self.mode = mode
        self.file_prefix = file_prefix
        self.best_value: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self._seen_iteration: Optional[int] = None
        self._warned_missing = False

    @property
    def path(self) -> str:
        return os.path.join(self.checkpointer.save_dir, self.file_prefix + ".pth")

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def before_train(self):
        self.best_value = self.best_iteration = None
        self._seen_iteration = None
        if self.trainer.start_iter > 0:
            self._restore_record()

    def _restore_record(self) -> None:
        """Take the best value and its iteration from an existing ``model_best.pth``."""
        if not self.checkpointer.save_dir or not os.path.isfile(self.path):
            return
        try:
            saved = load_checkpoint_file(self.path)
        except (CheckpointError, OSError) as err:  # the message names the file
            logger.warning("Cannot read the best %s so far (%s): the next evaluation replaces "
                           "the file", self.metric, err)
            return
        record = saved.get("best_metric") if isinstance(saved, dict) else None
        fields = {"name", "mode", "value", "iteration"}
        if not isinstance(record, dict) or not fields <= set(record):
            logger.warning("%s has no best_metric record: the next evaluation replaces it",
                           self.path)
            return
        if (record["name"], record["mode"]) != (self.metric, self.mode):
            logger.warning("%s was chosen by %s (%s), not %s (%s): the next evaluation replaces "
                           "it", self.path, record["name"], record["mode"], self.metric,
                           self.mode)
            return
        self.best_value, self.best_iteration = float(record["value"]), int(record["iteration"])
        logger.info("Resuming with the best %s = %.4f of iteration %d (%s)", self.metric,
                    self.best_value, self.best_iteration, self.path)

    def after_step(self):
        self._check_new_results()

    def after_train(self):
        self._check_new_results()

    def _check_new_results(self) -> None:
        iteration = self.eval_hook.last_iteration
        if iteration is None or iteration == self._seen_iteration:
            return
        self._seen_iteration = iteration
        results = self.eval_hook.last_results
        if self.metric not in results:
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning("BestCheckpointer: metric '%s' is not among the evaluation "
                               "results (available: %s); %s is not written", self.metric,
                               ", ".join(sorted(results)) or "none", self.path)
            return
        value = results[self.metric]
        if not math.isfinite(value):
            logger.warning("BestCheckpointer: %s = %s at iteration %d is not a number that can "
                           "be compared; the best stays unchanged", self.metric, value, iteration)
            return
        previous = ("none" if self.best_value is None
                    else f"{self.best_value:.4f} at iteration {self.best_iteration}")
        if not self._is_better(value):
            logger.info("%s = %.4f at iteration %d does not beat the best %s", self.metric,
                        value, iteration, previous)
            return
        self.best_value, self.best_iteration = value, iteration
        saved = self._save(iteration)
        logger.info("New best %s = %.4f at iteration %d (previous best: %s)%s", self.metric,
                    value, iteration, previous, f"; saved {saved}" if saved else "")

    def _save(self, iteration: int) -> Optional[str]:
        ckpt = self.checkpointer
        if not ckpt.save_dir or not ckpt.save_to_disk:
            return None
        # not tagged in last_checkpoint: --resume must not go back to the best iteration
        ckpt.save(self.file_prefix, tag_last=False, iteration=iteration,
                  best_metric={"name": self.metric, "mode": self.mode,
                               "value": float(self.best_value), "iteration": int(iteration)})
        return self.path


class PeriodicWriter(HookBase):
    """Calls every writer's ``write()`` every ``period`` iterations and after the last one;
    at the end of training writes once more and closes them."""

    def __init__(self, writers: Sequence[EventWriter], period: int = 20):
        self._writers: List[EventWriter] = list(writers)
        for w in self._writers:
            if not isinstance(w, EventWriter):
                raise TypeError(f"PeriodicWriter expects EventWriters, got {type(w).__name__}")
        if period <= 0:
            raise ValueError(f"PeriodicWriter period must be positive, got {period}")
        self._period = int(period)

    def after_step(self):
        itr = self.trainer.iter
        if (itr + 1) % self._period == 0 or itr == self.trainer.max_iter - 1:
            for writer in self._writers:
                writer.write()

    def after_train(self):
        for writer in self._writers:
            writer.write()
            writer.close()

