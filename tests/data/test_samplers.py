import itertools

import pytest
import torch

from detector.data import AspectRatioGroupedDataset, InferenceSampler, TrainingSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_training_sampler_deterministic_by_seed():
    a = _take(TrainingSampler(50, seed=7), 120)
    b = _take(TrainingSampler(50, seed=7), 120)
    c = _take(TrainingSampler(50, seed=8), 120)
    assert a == b and a != c


def test_training_sampler_is_infinite_and_covers_each_pass():
    indices = _take(TrainingSampler(10, seed=0), 1000)
    assert len(indices) == 1000
    for start in range(0, 1000, 10):  # every pass is a permutation
        assert sorted(indices[start:start + 10]) == list(range(10))
    assert indices[:10] != indices[10:20]  # reshuffled between passes


def test_training_sampler_without_shuffle():
    assert _take(TrainingSampler(3, shuffle=False, seed=0), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_training_sampler_shards_are_disjoint_interleavings():
    world = 3
    full = _take(TrainingSampler(20, seed=5, rank=0, world_size=1), 60)
    shards = [_take(TrainingSampler(20, seed=5, rank=r, world_size=world), 20)
              for r in range(world)]
    for r in range(world):
        assert shards[r] == full[r::world]
    # positions in the global stream are split without overlap: the shards rebuild it exactly
    rebuilt = [shards[i % world][i // world] for i in range(60)]
    assert rebuilt == full


@pytest.mark.parametrize("size,world", [(10, 3), (3, 4), (100, 1), (0, 2), (17, 5)])
def test_inference_sampler_covers_everything_once(size, world):
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert sum(shards, []) == list(range(size))  # contiguous and in rank order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)] == \
        list(map(len, shards))


def test_aspect_ratio_grouping():
    def item(h, w, i):
        return {"image": torch.zeros(3, h, w), "i": i}

    stream = [item(10, 20, 0), item(20, 10, 1), item(10, 20, 2), item(30, 10, 3),
              item(20, 10, 4), item(10, 30, 5), item(10, 40, 6)]
    batches = list(AspectRatioGroupedDataset(stream, 2))
    assert [[d["i"] for d in b] for b in batches] == [[0, 2], [1, 3], [5, 6]]
    for b in batches:
        kinds = {d["image"].shape[-1] > d["image"].shape[-2] for d in b}
        assert len(kinds) == 1
