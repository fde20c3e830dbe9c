"""Dataset wrappers used by the loaders: a compact list, a mapped view, the training samples and
the training loader."""
import collections
import logging
import pickle
import re
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detector.utils import seeding

from .dataset_mapper import ImageLoadError
from .stitch import stitch_batch

__all__ = ["DatasetFromList", "MapDataset", "TrainingSamples", "TrainingDataLoader", "DataLoader",
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


class TrainingSamples(torchdata.Dataset):
    """Map-style view of the training set keyed by stream samples ``(position, index)``:
    ``dataset[index]`` mapped with the augmentation randomness of ``position``
    (``seeding.sample_rng``), so a sample is the same whichever process or worker maps it, and
    again after a resume.

    The mapper gets its randomness through ``mapper.reseed(seed)`` (called before every sample;
    a mapper without ``reseed`` must not draw random numbers, or runs stop being reproducible).
    An image that fails to load (``ImageLoadError``: missing or corrupt file), or that the
    mapper drops by returning None, is replaced by a randomly drawn other image of the training
    set (drawn from the position, so a resumed run replaces it alike); the failures travel with
    the sample and :class:`TrainingDataLoader` logs and counts them. ``max_attempts`` failures in
    a row for one sample raise, since that means the data is broken rather than a few files.

    Returns ``(mapped dict, [failure messages])``."""

    def __init__(self, dataset, mapper: Callable[[dict], Optional[dict]], *, seed: int,
                 max_attempts: int = 20):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)
        self.max_attempts = max_attempts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sample: Tuple[int, int]) -> Tuple[dict, List[str]]:
        position, index = (int(v) for v in sample)
        failures: List[str] = []
        for attempt in range(self.max_attempts):
            if attempt > 0:
                replacement = seeding.derive_seed(self.seed, seeding.REPLACEMENT, position, attempt)
                index = replacement % len(self.dataset)
            if hasattr(self.mapper, "reseed"):
                # the same stream for the replacement: it takes the failed sample's place
                self.mapper.reseed(seeding.derive_seed(self.seed, seeding.AUGMENTATION, position))
            try:
                mapped = self.mapper(self.dataset[index])
            except ImageLoadError as e:
                failures.append(str(e))
                continue
            if mapped is None:
                failures.append(f"the mapper dropped dataset index {index}")
                continue
            return mapped, failures
        raise RuntimeError(f"{self.max_attempts} training images in a row failed to load "
                           f"(sample {position}; last: {failures[-1]}); check the dataset files")


def _collate_samples(samples):
    return samples


class TrainingDataLoader:
    """The endless training loader: batches of mapped dicts on the schedule of a
    :class:`~detector.data.samplers.TrainingBatchSampler`, mapped by ``num_workers`` worker
    processes (0: in this process) that prefetch ahead.

    :meth:`state_dict` is the schedule's state after the last batch *handed out* (not after the
    last one prefetched), so a checkpoint of it resumes exactly after the batches trained on.
    Replaced images (see :class:`TrainingSamples`) are logged as warnings and counted in
    ``num_skipped``. With ``stitch_prob`` > 0 each batch goes through
    :func:`~detector.data.stitch.stitch_batch`, drawing from ``seeding.batch_rng`` of the
    batch's first stream position, so a resumed run stitches alike."""

    def __init__(self, samples: TrainingSamples, batch_sampler, *, num_workers: int,
                 worker_init_fn=None, stitch_prob: float = 0.0):
        if not 0.0 <= stitch_prob <= 1.0:
            raise ValueError(f"INPUT.STITCH must be a probability in [0, 1], got {stitch_prob}")
        self.stitch_prob = float(stitch_prob)
        self.samples = samples
        self.batch_sampler = batch_sampler
        self.num_workers = int(num_workers)
        self.worker_init_fn = worker_init_fn
        self.num_skipped = 0
        self._state = batch_sampler.state_dict()

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.batch_size

    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
        self.samples.seed = self.batch_sampler.seed
        self._state = self.batch_sampler.state_dict()

    def __iter__(self):
        pending_states = collections.deque()

        def index_batches():
            for batch, state in self.batch_sampler:
                pending_states.append((state, batch[0][0]))  # the first sample's position
                yield batch

        # the workers' base seed comes from this generator, not from torch's global one
        generator = torch.Generator().manual_seed(self.batch_sampler.seed)
        loader = DataLoader(self.samples, batch_sampler=index_batches(),
                            num_workers=self.num_workers, collate_fn=_collate_samples,
                            worker_init_fn=self.worker_init_fn, generator=generator)
        for batch in loader:
            self._state, first_position = pending_states.popleft()
            for _, failures in batch:
                for message in failures:
                    self.num_skipped += 1
                    logger.warning("Skipping training image (%d skipped so far; a random other "
                                   "image takes its place): %s", self.num_skipped, message)
            mapped = [m for m, _ in batch]
            if self.stitch_prob > 0:
                rng = seeding.batch_rng(self.samples.seed, first_position)
                mapped = stitch_batch(mapped, rng, self.stitch_prob)
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
