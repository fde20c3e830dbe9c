"""Index samplers sharded across processes, and batching by aspect ratio."""
import itertools
import os
from typing import Iterator, List, Optional

import torch
from torch.utils.data import IterableDataset, Sampler

from detector.utils import comm

__all__ = ["TrainingSampler", "InferenceSampler", "AspectRatioGroupedDataset", "shared_random_seed"]


def shared_random_seed() -> int:
    """A random seed drawn on rank 0 and shared with every rank (no global RNG involved)."""
    return comm.all_gather(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)[0]


class TrainingSampler(Sampler):
    """Infinite stream of indices of a dataset of ``size``: a fresh permutation (or 0..size-1 in
    order when not ``shuffle``) per pass, from a ``torch.Generator`` seeded with ``seed``.

    Every rank draws the same global stream (so the seed must be shared) and keeps every
    ``world_size``-th index starting at ``rank``: the shards are disjoint and together cover
    the stream."""

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        self.size = size
        self.shuffle = shuffle
        self.seed = int(shared_random_seed() if seed is None else seed)
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self.rank, None, self.world_size)

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=generator).tolist()
            else:
                yield from range(self.size)


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


class AspectRatioGroupedDataset(IterableDataset):
    """Turns a stream of mapped dicts into lists of ``batch_size`` dicts whose images are all
    landscape (width > height) or all portrait, which keeps the padding of a batch small."""

    def __init__(self, dataset, batch_size: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size

    @staticmethod
    def _is_landscape(d: dict) -> bool:
        if "image" in d:
            h, w = d["image"].shape[-2:]
        else:
            h, w = d["height"], d["width"]
        return w > h

    def __iter__(self) -> Iterator[List[dict]]:
        buckets: List[List[dict]] = [[], []]
        for d in self.dataset:
            bucket = buckets[int(self._is_landscape(d))]
            bucket.append(d)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]
