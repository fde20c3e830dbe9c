"""Small helpers shared by backbones, necks and heads."""
from functools import partial
from typing import Callable, Optional

from torch import nn

from detector.layers import NORM_REGISTRY, available_norms, get_norm

__all__ = ["norm_factory", "permute_to_N_HWA_K"]


def norm_factory(
    name: str, *, gn_groups: int = 32, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
    key: str = "norm",
) -> Optional[Callable[[int], nn.Module]]:
    """A ``channels -> norm layer`` callable for ``name`` (see detector.layers.get_norm), or None
    when ``name`` means "no norm". Validates the name now so a bad ``key`` fails at build time."""
    if name in ("", None, "none"):
        return None
    if name not in NORM_REGISTRY:
        valid = ", ".join(available_norms())
        raise ValueError(f"{key}: unknown norm '{name}'; valid names: {valid}")
    return partial(get_norm, name, gn_groups=gn_groups, bn_momentum=bn_momentum, bn_eps=bn_eps)


def permute_to_N_HWA_K(tensor, num_values: int):
    """(N, A*K, H, W) head output -> (N, H*W*A, K), the order anchors are generated in."""
    n, _, h, w = tensor.shape
    tensor = tensor.reshape(n, -1, num_values, h, w).permute(0, 3, 4, 1, 2)
    return tensor.reshape(n, -1, num_values)
