"""Balanced sampling of labelled candidates (anchors for the RPN, proposals for the RoI heads),
and the per-process random source it draws from in training."""
from typing import Dict, Optional, Tuple

import torch

__all__ = ["subsample_labels", "SamplingRNG"]


def _random_subset(idxs: torch.Tensor, count: int,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    if idxs.numel() <= count:
        return idxs
    # randperm on the generator's device; the generator is the only source of randomness, so a
    # run restored with the generator's state draws the same samples
    device = generator.device if generator is not None else idxs.device
    perm = torch.randperm(idxs.numel(), generator=generator, device=device)[:count]
    return idxs[perm.to(idxs.device)]


def subsample_labels(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                     bg_label: int, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of at most ``num_samples`` candidates, of which at most
    ``positive_fraction * num_samples`` foreground; negatives fill the rest.

    Args:
        labels: (R,) int labels: -1 ignored, ``bg_label`` background, anything else foreground.
        generator: the random source (None: torch's global generator, as torchvision samples).
    Returns:
        (positive indices, negative indices), each in random order when subsampled.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction={positive_fraction} must be in [0, 1]")
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    return (_random_subset(positive, num_pos, generator),
            _random_subset(negative, num_neg, generator))


class SamplingRNG:
    """The random source of the training-time sampling of a model run by W processes.

    One generator, seeded alike in every process and advanced alike (one draw of W seeds per
    training step), is the whole state: the process of rank r seeds its step's sampling
    generator, on the model's device, with the r-th seed. So the processes sample independently,
    yet the state to checkpoint is the same on every rank and the main process's copy restores
    them all: a run resumed with the same number of processes draws the same samples as an
    uninterrupted one. Every process must call :meth:`step_generator` once per training step.

    Args:
        seed: seed of the shared generator (e.g. cfg.SEED).
    """

    def __init__(self, seed: int):
        self._shared = torch.Generator().manual_seed(int(seed))
        self._per_device: Dict[torch.device, torch.Generator] = {}

    def step_generator(self, device: torch.device, rank: int, world_size: int
                       ) -> torch.Generator:
        """The generator of this process's sampling in the next training step."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
        seeds = torch.randint(0, 2 ** 63 - 1, (world_size,), generator=self._shared)
        device = torch.device(device)
        generator = self._per_device.get(device)
        if generator is None:
            generator = self._per_device[device] = torch.Generator(device=device)
        return generator.manual_seed(int(seeds[rank]))

    def state_dict(self) -> dict:
        return {"shared_generator_state": self._shared.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("shared_generator_state") if isinstance(state_dict, dict) else None
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise ValueError("expected {'shared_generator_state': uint8 tensor}, got "
                             f"{type(state).__name__}")
        self._shared.set_state(state)
