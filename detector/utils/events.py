"""Training metrics: an ``EventStorage`` that collects scalars per iteration, and writers that
print them (``CommonMetricPrinter``), append them to metrics.json (``JSONWriter``) or to a
TensorBoard events file (``TensorboardXWriter``).

Usage::

    with EventStorage(start_iter) as storage:
        for storage.iter in range(start_iter, max_iter):
            get_event_storage().put_scalars(loss=1.0, lr=0.1)
            writer.write()
"""
import datetime
import json
import logging
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from fvcore.common.history_buffer import HistoryBuffer

from .logger import colorize

__all__ = [
    "EventStorage", "get_event_storage", "EventWriter", "JSONWriter", "TensorboardXWriter",
    "CommonMetricPrinter",
]

logger = logging.getLogger(__name__)

_CURRENT_STORAGE_STACK: List["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The innermost active ``EventStorage`` (entered with ``with EventStorage(...)``)."""
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside a 'with EventStorage(...)' block"
        )
    return _CURRENT_STORAGE_STACK[-1]


class EventStorage:
    """Scalars (with history), images and the current iteration of a training run.

    ``put_scalar`` records a value at the current iteration; ``history(name)`` gives an fvcore
    ``HistoryBuffer`` with ``latest()``, ``median(n)``, ``avg(n)`` and ``global_avg()``.
    ``smoothing_hint`` tells writers whether to report a windowed median (losses) or the
    latest raw value (lr, evaluation results).
    """

    def __init__(self, start_iter: int = 0):
        self._history: Dict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: Dict[str, bool] = {}
        self._latest_scalars: Dict[str, Tuple[float, int]] = {}
        self._iter = int(start_iter)
        self._current_prefix = ""
        self._vis_data: List[Tuple[str, torch.Tensor, int]] = []

    @property
    def iter(self) -> int:
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:
        self._iter = int(value)

    def step(self) -> None:
        """Advance to the next iteration."""
        self._iter += 1

    def put_scalar(self, name: str, value, smoothing_hint: bool = True,
                   cur_iter: Optional[int] = None) -> None:
        """Record ``value`` (number or one-element tensor) under ``name`` at ``cur_iter``
        (default: the current iteration)."""
        name = self._current_prefix + name
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
        value = float(value)
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        self._history[name].update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)
        previous = self._smoothing_hints.get(name)
        if previous is not None and previous != smoothing_hint:
            raise ValueError(f"Scalar '{name}' was put with different smoothing hints")
        self._smoothing_hints[name] = smoothing_hint

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: Optional[int] = None,
                    **kwargs) -> None:
        """``put_scalar`` for every keyword argument."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def put_image(self, img_name: str, img_tensor: torch.Tensor) -> None:
        """Queue a (3, H, W) image in [0, 1] or [0, 255] for the TensorBoard writer."""
        self._vis_data.append((img_name, img_tensor.detach().cpu(), self._iter))

    def clear_images(self) -> None:
        self._vis_data = []

    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"No history metric available for '{name}'")
        return self._history[name]

    def histories(self) -> Dict[str, HistoryBuffer]:
        return dict(self._history)

    def latest(self) -> Dict[str, Tuple[float, int]]:
        """{name: (latest value, iteration it was recorded at)}."""
        return dict(self._latest_scalars)

    def latest_with_smoothing_hint(self, window_size: int = 20) -> Dict[str, Tuple[float, int]]:
        """Like ``latest`` but scalars with a smoothing hint are the median of the last
        ``window_size`` values."""
        result = {}
        for name, (value, itr) in self._latest_scalars.items():
            if self._smoothing_hints[name]:
                value = float(self._history[name].median(window_size))
            result[name] = (value, itr)
        return result

    def smoothing_hints(self) -> Dict[str, bool]:
        return dict(self._smoothing_hints)

    @contextmanager
    def name_scope(self, name: str):
        """Prefix every scalar name put inside the block with ``name + "/"``."""
        old_prefix = self._current_prefix
        self._current_prefix = name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self, "EventStorage contexts exited out of order"
        _CURRENT_STORAGE_STACK.pop()


class EventWriter:
    """Base class of writers; ``write()`` is called periodically inside an EventStorage."""

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _new_scalars_by_iter(storage: EventStorage, window_size: int, last_write: int):
    """{iteration: {name: value}} for scalars recorded after ``last_write``."""
    by_iter = defaultdict(dict)
    for name, (value, itr) in storage.latest_with_smoothing_hint(window_size).items():
        if itr > last_write:
            by_iter[itr][name] = value
    return by_iter


class JSONWriter(EventWriter):
    """Appends one JSON object per iteration, ``{"iteration": i, name: value, ...}``, to
    ``json_file`` (metrics.json). Smoothed scalars are medians over ``window_size``."""

    def __init__(self, json_file: str, window_size: int = 20):
        self._path = json_file
        parent = os.path.dirname(json_file)
        if parent:
            os.makedirs(parent, exist_ok=True)
        _drop_partial_last_line(json_file)
        self._file = open(json_file, "a")
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        by_iter = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        if not by_iter:
            return
        lines = "".join(
            json.dumps({"iteration": itr, **by_iter[itr]}, sort_keys=True) + "\n"
            for itr in sorted(by_iter)
        )
        # one write per call so a killed process leaves whole lines behind
        self._file.write(lines)
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._last_write = max(by_iter)

    def close(self) -> None:
        self._file.close()


def _drop_partial_last_line(path: str) -> None:
    """A crash during a write can leave a truncated last line; cut it so the file stays valid
    JSON-lines when a resumed run appends to it."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        keep = content.rfind(b"\n") + 1
        f.truncate(keep)
    logger.warning("Removed a partially written last line from %s", path)


class TensorboardXWriter(EventWriter):
    """Writes scalars (and queued images) to a TensorBoard events file in ``log_dir``."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs):
        self._log_dir = log_dir
        self._window_size = window_size
        self._kwargs = kwargs
        self._writer = None
        self._last_write = -1

    def _get_writer(self):
        if self._writer is None:
            # imported lazily: tensorboard is slow to import and only rank 0 writes
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._log_dir, **self._kwargs)
        return self._writer

    def write(self) -> None:
        storage = get_event_storage()
        by_iter = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        writer = self._get_writer() if (by_iter or storage._vis_data) else None
        for itr in sorted(by_iter):
            for name, value in by_iter[itr].items():
                writer.add_scalar(name, value, itr)
        if by_iter:
            self._last_write = max(by_iter)
        if storage._vis_data:
            for img_name, img, itr in storage._vis_data:
                if img.dtype == torch.uint8 or img.max() > 1.0:
                    img = img.float() / 255.0
                writer.add_image(img_name, img, itr)
            storage.clear_images()
        if writer is not None:
            writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _max_memory_text() -> Optional[str]:
    """Peak CUDA memory allocated by this process, else the process' peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "max_mem: {:.0f}M".format(torch.cuda.max_memory_allocated() / 1024.0 ** 2)
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS and kilobytes on Linux
    mb = peak / 1024.0 ** 2 if sys.platform == "darwin" else peak / 1024.0
    return "max_rss: {:.0f}M".format(mb)


class CommonMetricPrinter(EventWriter):
    """Logs one line per call: ETA, iteration, losses (windowed medians), iteration and data
    time, learning rate and peak memory. Needs ``max_iter`` for the ETA."""

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20):
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: Optional[Tuple[int, float]] = None  # (iteration, wall time)

    def _eta_seconds(self, storage: EventStorage, iteration: int) -> Optional[float]:
        if self._max_iter is None:
            return None
        remaining = self._max_iter - iteration - 1
        histories = storage.histories()
        if "time" in histories:
            return float(histories["time"].median(1000)) * remaining
        # no IterationTimer: estimate from the wall time between two writes
        eta = None
        now = time.perf_counter()
        if self._last_write is not None and iteration > self._last_write[0]:
            per_iter = (now - self._last_write[1]) / (iteration - self._last_write[0])
            eta = per_iter * remaining
        self._last_write = (iteration, now)
        return eta

    def write(self) -> None:
        storage = get_event_storage()
        iteration = storage.iter
        if self._max_iter is not None and iteration >= self._max_iter:
            # after training ends only evaluation results are new: not this writer's business
            return
        histories = storage.histories()
        w = self._window_size
        parts: List[Tuple[str, Optional[str]]] = []  # (text, colour)
        eta = self._eta_seconds(storage, iteration)
        if eta is not None:
            parts.append(("eta: " + str(datetime.timedelta(seconds=int(eta))), "cyan"))
        if self._max_iter is not None:
            parts.append((f"iter: {iteration}/{self._max_iter}", None))
        else:
            parts.append((f"iter: {iteration}", None))
        loss_names = [k for k in histories if "loss" in k]
        loss_names.sort(key=lambda k: (k != "total_loss", k))
        for name in loss_names:
            colour = "yellow" if name == "total_loss" else None
            parts.append((f"{name}: {histories[name].median(w):.4g}", colour))
        if "time" in histories:
            parts.append((f"time: {histories['time'].median(w):.4f}", None))
        if "data_time" in histories:
            parts.append((f"data_time: {histories['data_time'].avg(w):.4f}", None))
        if "lr" in histories:
            parts.append((f"lr: {histories['lr'].latest():.5g}", "green"))
        memory = _max_memory_text()
        if memory:
            parts.append((memory, None))
        plain = "  ".join(text for text, _ in parts)
        coloured = "  ".join(colorize(t, c) if c else t for t, c in parts)
        # the terminal formatter of detector.utils.logger shows ``colored_message``; files and
        # other handlers get the plain line
        logger.info(plain, extra={"colored_message": coloured})
