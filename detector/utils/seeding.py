"""Where the randomness of a training run comes from.

Every random choice of training is a pure function of the run's seed and a position that the
checkpoint records, so that a run resumed from a checkpoint draws exactly what the uninterrupted
run would have drawn, with any number of data-loader workers:

=========================  ======================================  ============================
what                       drawn from                              restored on resume from
=========================  ======================================  ============================
order of the images        one permutation per pass over the       the data stream's position
                           data: ``derive_seed(seed, SAMPLER,      (global sample index) in the
                           pass)``                                 checkpoint
augmentation of a sample   ``sample_rng(seed, position)``: the     the position
(resize, flip, crop,       sample's global index in the stream,
AutoAugment, ...)          whichever rank or worker maps it
replacement of an image    ``derive_seed(seed, REPLACEMENT,        the position
that fails to load         position, attempt)``
batch-level augmentation   ``batch_rng(seed, position)`` of the    the position
(Stitch)                   batch's first sample
RPN / RoI sampling         the model's ``SamplingRNG``             its state, in the checkpoint
torch's global generator   ``step_seed(seed, iteration, rank)``,   the iteration
(dropout, drop path)       re-seeded before every step's forward
=========================  ======================================  ============================

The seed itself is in the checkpoint (a run started with SEED < 0 draws one and keeps it).
Keys are mixed by numpy's ``SeedSequence``, so nearby keys give unrelated streams.
"""
from typing import Iterable

import numpy as np

__all__ = ["derive_seed", "sample_rng", "batch_rng", "step_seed",
           "SAMPLER", "AUGMENTATION", "REPLACEMENT", "BATCH_AUGMENTATION", "TRAINING_STEP"]

# stream identifiers: the first key after the seed, so that two uses never share a stream
SAMPLER = 1
AUGMENTATION = 2
REPLACEMENT = 3
BATCH_AUGMENTATION = 4
TRAINING_STEP = 5


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed determined by ``seed`` and the non-negative integer ``keys``."""
    entropy: Iterable[int] = (int(seed) & 0xFFFFFFFFFFFFFFFF,) + tuple(int(k) for k in keys)
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFFFFFFFFFFFFFF


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the augmentation of the sample at global stream ``position``."""
    return np.random.default_rng(derive_seed(seed, AUGMENTATION, position))


def batch_rng(seed: int, first_position: int) -> np.random.Generator:
    """The generator of a batch-level augmentation of the batch starting at ``first_position``."""
    return np.random.default_rng(derive_seed(seed, BATCH_AUGMENTATION, first_position))


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of torch's global generator for training step ``iteration`` on ``rank``."""
    return derive_seed(seed, TRAINING_STEP, iteration, rank)
