"""Dataset wrappers used by the loaders: a compact list, a mapped view, a mapped training stream."""
import logging
import pickle
import re
from typing import Callable, List, Optional

import numpy as np
import torch.utils.data as torchdata

from detector.utils import comm

from .dataset_mapper import ImageLoadError

__all__ = ["DatasetFromList", "MapDataset", "MappedTrainingStream", "DataLoader",
           "unwrap_worker_error"]

logger = logging.getLogger("detector.data")


class DatasetFromList(torchdata.Dataset):
    """A list of dataset dicts. With ``serialize`` every dict is pickled into one numpy buffer:
    data-loader workers then share a few large objects instead of touching (and, through
    reference counts, copying) millions of small Python objects. Items are returned as fresh
    copies, so mappers may modify them."""

    def __init__(self, items: List[dict], serialize: bool = True):
        self._serialize = serialize
        if serialize:
            blobs = [
                np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                for x in items
            ]
            self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
            self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
        else:
            self._items = list(items)

    def __len__(self) -> int:
        return len(self._ends) if self._serialize else len(self._items)

    def __getitem__(self, idx: int) -> dict:
        if not self._serialize:
            return self._items[idx]
        start = 0 if idx == 0 else int(self._ends[idx - 1])
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[idx])]))


class MapDataset(torchdata.Dataset):
    """``dataset[i]`` passed through ``mapper``; errors propagate (used for inference)."""

    def __init__(self, dataset, mapper: Callable[[dict], dict]):
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return self.mapper(self.dataset[idx])


class MappedTrainingStream(torchdata.IterableDataset):
    """Endless stream of mapped training dicts: indices from ``sampler`` (already sharded by rank)
    are split again among data-loader workers, then mapped.

    An image that fails to load (``ImageLoadError``: missing or corrupt file) is skipped with a
    warning and counted in ``num_skipped`` (per worker process); the stream moves on to the next
    sampled image. ``max_consecutive_failures`` failures in a row raise, since that means the
    data is broken rather than a few files. A mapper with a ``reseed(seed)`` method gets a seed
    derived from (``seed``, rank, worker id), so augmentations differ across workers and ranks
    and are reproducible for a fixed ``seed``."""

    def __init__(self, dataset, mapper: Callable[[dict], Optional[dict]], sampler, *,
                 seed: int, max_consecutive_failures: int = 20):
        self.dataset = dataset
        self.mapper = mapper
        self.sampler = sampler
        self.seed = seed
        self.max_consecutive_failures = max_consecutive_failures
        self.num_skipped = 0

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if hasattr(self.mapper, "reseed"):
            seq = np.random.SeedSequence([self.seed, comm.get_rank(), worker_id])
            self.mapper.reseed(int(seq.generate_state(1)[0]))
        failures_in_a_row = 0
        for position, idx in enumerate(iter(self.sampler)):
            if position % num_workers != worker_id:
                continue
            try:
                mapped = self.mapper(self.dataset[idx])
            except ImageLoadError as e:
                self.num_skipped += 1
                failures_in_a_row += 1
                if failures_in_a_row >= self.max_consecutive_failures:
                    raise RuntimeError(
                        f"{failures_in_a_row} training images in a row failed to load "
                        f"(last: {e}); check the dataset files"
                    ) from e
                logger.warning("Skipping training image (%d skipped so far%s): %s",
                               self.num_skipped,
                               f" in worker {worker_id}" if info is not None else "", e)
                continue
            failures_in_a_row = 0
            if mapped is not None:  # a mapper may return None to drop an image
                yield mapped


# torch's ExceptionWrapper.reraise: "Caught <Type> in DataLoader worker process <N>.\nOriginal
# Traceback (most recent call last): ... <module>.<Type>: <message>"
_WORKER_ERROR = re.compile(
    r"^Caught (?P<type>\w+) (?P<where>in DataLoader worker process \d+)\.\n"
    r"Original (?P<traceback>.*)$", re.DOTALL)


def _original_message(worker_traceback: str, type_name: str) -> Optional[str]:
    """The message of the exception at the end of a formatted worker traceback."""
    lines = worker_traceback.rstrip("\n").splitlines()
    head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type_name)}(?:: (?P<msg>.*))?$")
    for i in range(len(lines) - 1, -1, -1):
        match = head.match(lines[i])
        if match:
            rest = [match.group("msg") or ""] + lines[i + 1:]
            return "\n".join(rest).strip()
    return None


def unwrap_worker_error(err: BaseException) -> Optional[BaseException]:
    """For an exception that torch re-raised from a data-loader worker (whose message starts
    "Caught X in DataLoader worker process N." and holds the worker's traceback as text), a new
    exception of the same type whose message is the worker's original message; the worker's
    traceback is attached as a note. None for any other exception.

    Errors from bad data name the file and image id in one line; torch's wrapper would turn that
    line into the last of a long message whose first line names only the worker.
    """
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else None
    match = _WORKER_ERROR.match(text) if text is not None else None
    if match is None:
        return None
    type_name = match.group("type")
    message = _original_message(match.group("traceback"), type_name)
    if message is None:
        return None
    new = None
    if type(err).__name__ == type_name:
        try:
            new = type(err)(message)
        except Exception:  # noqa: BLE001 - a constructor taking other arguments
            new = None
    if new is None:  # torch could not rebuild the type either and raised a RuntimeError
        new = RuntimeError(f"{type_name}: {message}")
    new.add_note(f"Raised {match.group('where')}:\n{match.group('traceback').rstrip()}")
    return new


class _OriginalWorkerErrors:
    """Iterator of a DataLoader that re-raises worker errors with their original message."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __next__(self):
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception as err:
            original = unwrap_worker_error(err)
            if original is None:
                raise
            raise original from None


class DataLoader(torchdata.DataLoader):
    """torch's DataLoader, except that an exception raised in a worker process reaches the caller
    with its original one-line message (see :func:`unwrap_worker_error`) and type."""

    def __iter__(self):
        return _OriginalWorkerErrors(super().__iter__())
