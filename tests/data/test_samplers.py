import itertools

import pytest

from detector.data import InferenceSampler, TrainingBatchSampler


def _batches(sampler, n):
    return [batch for batch, _ in itertools.islice(iter(sampler), n)]


def _indices(batches):
    return [index for batch in batches for _, index in batch]


def test_schedule_is_deterministic_by_seed():
    def run(seed):
        return _batches(TrainingBatchSampler(50, batch_size=4, seed=seed), 30)

    assert run(7) == run(7) and run(7) != run(8)


def test_schedule_is_endless_and_each_pass_is_a_permutation():
    batches = _batches(TrainingBatchSampler(10, batch_size=5, seed=0), 200)
    positions = [p for b in batches for p, _ in b]
    assert positions == list(range(1000))  # one bucket: the stream in order
    indices = _indices(batches)
    for start in range(0, 1000, 10):
        assert sorted(indices[start:start + 10]) == list(range(10))
    assert indices[:10] != indices[10:20]  # reshuffled between passes


def test_schedule_without_shuffle():
    sampler = TrainingBatchSampler(3, batch_size=1, seed=0, shuffle=False)
    assert _indices(_batches(sampler, 7)) == [0, 1, 2, 0, 1, 2, 0]


def test_index_at_any_position_without_replaying_the_stream():
    sampler = TrainingBatchSampler(7, batch_size=1, seed=3)
    stream = _indices(_batches(sampler, 40))
    fresh = TrainingBatchSampler(7, batch_size=1, seed=3)
    assert [fresh.index_at(p) for p in (39, 3, 22, 0)] == [stream[p] for p in (39, 3, 22, 0)]


def test_ranks_split_each_iteration_and_share_the_state():
    world, size = 3, 20
    single = _batches(TrainingBatchSampler(size, batch_size=2, seed=5, world_size=1, rank=0),
                      3 * 10)
    per_rank = [list(itertools.islice(iter(TrainingBatchSampler(
        size, batch_size=2, seed=5, world_size=world, rank=r)), 10)) for r in range(world)]
    for i in range(10):
        for r in range(world):
            assert per_rank[r][i][0] == single[i * world + r]
        states = [per_rank[r][i][1] for r in range(world)]
        assert states[0] == states[1] == states[2]


def test_aspect_ratio_grouping_keeps_groups_apart_and_loses_nothing():
    group_ids = [0, 1, 0, 1, 1, 0, 0, 1, 1, 1]
    sampler = TrainingBatchSampler(10, batch_size=3, seed=1, group_ids=group_ids)
    batches = _batches(sampler, 20)
    for batch in batches:
        assert len(batch) == 3 and len({group_ids[i] for _, i in batch}) == 1
    positions = sorted(p for b in batches for p, _ in b)
    assert positions == sorted(set(positions))  # nothing repeated
    _, state = list(itertools.islice(iter(sampler), 20))[-1]
    in_buckets = sorted(p for bucket in state["buckets"] for p, _ in bucket)
    # every position handed out or waiting in a bucket, none lost
    assert sorted(positions + in_buckets) == list(range(state["position"]))


@pytest.mark.parametrize("world_after,batch_after", [(2, 3), (1, 2), (4, 1)])
def test_resume_from_state_continues_the_global_stream(world_after, batch_after):
    """A schedule restored from a state (even with another world size or batch size) hands out
    every remaining sample exactly once, the buckets' first."""
    group_ids = [i % 2 for i in range(13)]
    before = TrainingBatchSampler(13, batch_size=3, seed=4, group_ids=group_ids,
                                  world_size=2, rank=0)
    taken = []
    for rank in range(2):
        sampler = TrainingBatchSampler(13, batch_size=3, seed=4, group_ids=group_ids,
                                       world_size=2, rank=rank)
        for batch, state in itertools.islice(iter(sampler), 5):
            taken.extend(batch)
    _, state = list(itertools.islice(iter(before), 5))[-1]
    resumed = []
    for rank in range(world_after):
        sampler = TrainingBatchSampler(13, batch_size=batch_after, seed=99, group_ids=group_ids,
                                       world_size=world_after, rank=rank)
        sampler.load_state_dict(state)
        assert sampler.seed == 4
        for batch, _ in itertools.islice(iter(sampler), 12):
            assert len(batch) == batch_after and len({group_ids[i] for _, i in batch}) == 1
            resumed.extend(batch)
    positions = [p for p, _ in taken + resumed]
    assert len(positions) == len(set(positions))
    # nothing skipped: every position below the furthest handed out is accounted for, except
    # what is still waiting in the last buckets (at most batch_after - 1 per group)
    missing = set(range(max(positions))) - set(positions)
    assert len(missing) <= 2 * (batch_after - 1)
    assert all(index == TrainingBatchSampler(13, batch_size=1, seed=4).index_at(p)
               for p, index in taken + resumed)


def test_malformed_or_foreign_state_is_refused():
    sampler = TrainingBatchSampler(5, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="Malformed data-stream state"):
        sampler.load_state_dict({"position": 3})
    with pytest.raises(ValueError, match="outside the training set of 5"):
        sampler.load_state_dict({"seed": 0, "position": 3, "buckets": [[[1, 9]]]})
    with pytest.raises(ValueError, match="2 groups"):
        sampler.load_state_dict({"seed": 0, "position": 3, "buckets": [[], []]})


@pytest.mark.parametrize("size,world", [(10, 3), (3, 4), (100, 1), (0, 2), (17, 5)])
def test_inference_sampler_covers_everything_once(size, world):
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert sum(shards, []) == list(range(size))  # contiguous and in rank order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)] == \
        list(map(len, shards))
