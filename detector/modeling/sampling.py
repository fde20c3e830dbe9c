"""Balanced sampling of labelled candidates (anchors for the RPN, proposals for the RoI heads)."""
from typing import Optional, Tuple

import torch

__all__ = ["subsample_labels"]


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
