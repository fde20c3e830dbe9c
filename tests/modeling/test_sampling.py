import pytest
import torch

from detector.modeling.sampling import SamplingRNG, subsample_labels


def test_fraction_and_fill_with_negatives():
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, -1, 2])  # 5 foreground (1, 2), 6 bg
    g = torch.Generator().manual_seed(0)
    pos, neg = subsample_labels(labels, num_samples=8, positive_fraction=0.25, bg_label=0,
                                generator=g)
    assert len(pos) == 2 and len(neg) == 6
    assert set(pos.tolist()) <= {0, 1, 2, 3, 11} and set(neg.tolist()) == {4, 5, 6, 7, 8, 9}
    # few positives: negatives fill the batch; ignored (-1) never sampled
    pos, neg = subsample_labels(torch.tensor([0, 0, 0, -1, 3]), 4, 0.5, 0, generator=g)
    assert pos.tolist() == [4] and sorted(neg.tolist()) == [0, 1, 2]


def test_more_than_enough_takes_everything_in_order_and_generator_repeats():
    labels = torch.tensor([0, 1, 0, 1, 0])
    pos, neg = subsample_labels(labels, 100, 0.5, 0)
    assert pos.tolist() == [1, 3] and neg.tolist() == [0, 2, 4]
    many = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(1))
    a = subsample_labels(many, 64, 0.25, 0, generator=torch.Generator().manual_seed(5))
    b = subsample_labels(many, 64, 0.25, 0, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(a[0]) == 16 and len(a[1]) == 48 and len(set(a[0].tolist())) == 16
    with pytest.raises(ValueError, match="positive_fraction=1.5"):
        subsample_labels(many, 64, 1.5, 0)


def _draws(rng, rank, world_size, steps=3):
    """A permutation drawn from the step generator of each of ``steps`` steps."""
    return [torch.randperm(50, generator=rng.step_generator("cpu", rank, world_size)).tolist()
            for _ in range(steps)]


def test_sampling_rng_streams_per_rank_and_state_restores_them_all():
    # every rank starts from the same seed; their streams differ, and differ between steps
    rank0, rank1 = _draws(SamplingRNG(3), 0, 2), _draws(SamplingRNG(3), 1, 2)
    assert all(a != b for a, b in zip(rank0, rank1))
    assert rank0[0] != rank0[1]
    assert _draws(SamplingRNG(3), 0, 2) == rank0 and _draws(SamplingRNG(4), 0, 2) != rank0

    # the state after one step, taken from any rank, continues both ranks' streams
    saved = SamplingRNG(3)
    saved.step_generator("cpu", 0, 2)
    state = saved.state_dict()
    for rank, expected in ((0, rank0), (1, rank1)):
        resumed = SamplingRNG(99)
        resumed.load_state_dict(state)
        assert _draws(resumed, rank, 2, steps=2) == expected[1:]

    with pytest.raises(ValueError, match="shared_generator_state"):
        SamplingRNG(0).load_state_dict({"model": torch.zeros(3)})
    with pytest.raises(ValueError, match="rank 2"):
        SamplingRNG(0).step_generator("cpu", 2, 2)
