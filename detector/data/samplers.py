"""Index samplers sharded across processes: the training batch schedule and inference shards."""
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from detector.utils import comm, seeding

__all__ = ["TrainingBatchSampler", "InferenceSampler", "shared_random_seed"]

# a sample of the training stream: (global position, dataset index)
Sample = Tuple[int, int]


def shared_random_seed() -> int:
    """A random seed drawn on rank 0 and shared with every rank (no global RNG involved)."""
    return comm.all_gather(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)[0]


class TrainingBatchSampler(Sampler):
    """The endless schedule of training batches of every process, computed alike on every rank.

    The *stream* is one permutation of the dataset per pass (pass ``e`` drawn from
    ``derive_seed(seed, SAMPLER, e)``, or the dataset in order without ``shuffle``); the
    stream's *position* ``p`` is the global sample index, the key of the sample's augmentation
    randomness (:mod:`detector.utils.seeding`). Samples are put, in stream order, into one bucket
    per group (``group_ids``, e.g. landscape / portrait for aspect-ratio grouping; one bucket
    without); a full bucket of ``batch_size`` samples is the next batch. Iteration ``i`` takes
    the next ``world_size`` batches, of which process ``rank`` gets number ``rank``.

    Groups are known from the dataset dicts (no image is read), so every rank computes the same
    schedule, and the state after an iteration (the next position and the half-filled buckets,
    :meth:`state_dict`) is the same on every rank: a checkpoint written by one rank restores them
    all, and a run resumed from it, even with another world size or batch size, neither loses
    nor repeats a sample.

    Iterating yields ``(batch, state)``: this rank's list of ``(position, dataset index)``
    samples and the schedule's state once the iteration's batches are taken.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int,
        seed: int,
        group_ids: Optional[Sequence[int]] = None,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if dataset_size <= 0:
            raise ValueError(f"The training set is empty (size {dataset_size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if group_ids is None:
            self.group_ids = np.zeros(self.dataset_size, dtype=np.int64)
        else:
            self.group_ids = np.asarray(group_ids, dtype=np.int64)
            if self.group_ids.shape != (self.dataset_size,) or (self.group_ids < 0).any():
                raise ValueError(f"group_ids must be {self.dataset_size} non-negative integers")
        self.num_groups = int(self.group_ids.max()) + 1
        self._start = {"position": 0, "buckets": [[] for _ in range(self.num_groups)]}
        self._permutation: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def index_at(self, position: int) -> int:
        """The dataset index at global stream ``position``."""
        epoch, offset = divmod(int(position), self.dataset_size)
        if not self.shuffle:
            return offset
        if self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(
                seeding.derive_seed(self.seed, seeding.SAMPLER, epoch))
            self._permutation = (epoch, torch.randperm(self.dataset_size,
                                                       generator=generator).numpy())
        return int(self._permutation[1][offset])

    def _state(self, position: int, buckets: List[List[Sample]]) -> dict:
        return {"seed": self.seed, "position": position,
                "buckets": [[list(s) for s in b] for b in buckets]}

    def state_dict(self) -> dict:
        """The state iteration starts from (set by :meth:`load_state_dict`)."""
        return self._state(self._start["position"], self._start["buckets"])

    def load_state_dict(self, state: dict) -> None:
        """Start from ``state`` (from a checkpoint); its seed replaces ours, its buckets may hold
        more samples than our batch size (a resume with fewer images per process)."""
        try:
            position = int(state["position"])
            buckets = [[(int(p), int(i)) for p, i in b] for b in state["buckets"]]
            seed = int(state["seed"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Malformed data-stream state ({type(err).__name__}: {err})") from None
        if position < 0 or len(buckets) != self.num_groups:
            raise ValueError(f"Data-stream state with position {position} and {len(buckets)} "
                             f"groups does not fit a dataset with {self.num_groups} group(s)")
        if any(not 0 <= i < self.dataset_size for b in buckets for _, i in b):
            raise ValueError(f"Data-stream state names images outside the training set of "
                             f"{self.dataset_size}: was the dataset changed?")
        self.seed = seed
        self._permutation = (-1, None)
        self._start = {"position": position, "buckets": buckets}

    def __iter__(self) -> Iterator[Tuple[List[Sample], dict]]:
        position = self._start["position"]
        buckets: List[List[Sample]] = [list(b) for b in self._start["buckets"]]
        while True:
            batches = []
            for _ in range(self.world_size):
                # a bucket may start over-full after a resume with a smaller batch size
                full = next((b for b in buckets if len(b) >= self.batch_size), None)
                while full is None:
                    index = self.index_at(position)
                    bucket = buckets[self.group_ids[index]]
                    bucket.append((position, index))
                    position += 1
                    if len(bucket) >= self.batch_size:
                        full = bucket
                batches.append(full[:self.batch_size])
                del full[:self.batch_size]
            yield batches[self.rank], self._state(position, buckets)


class InferenceSampler(Sampler):
    """Contiguous shard of range(size) for this rank; the shards of all ranks cover every index
    exactly once (the first ``size % world_size`` ranks get one more)."""

    def __init__(self, size: int, *, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.size = size
        rank = comm.get_rank() if rank is None else rank
        world_size = comm.get_world_size() if world_size is None else world_size
        base, extra = divmod(size, world_size)
        begin = rank * base + min(rank, extra)
        self._indices = range(begin, begin + base + (1 if rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)
