"""Norm registry (functions are named after the config value that selects them).

NORM_REGISTRY maps a norm name to a callable
``(channels: int, *, gn_groups: int, bn_momentum: float, bn_eps: float) -> nn.Module``
returning a layer that normalizes (N, channels, H, W) feature maps.
"""
from fvcore.common.registry import Registry
from torch import nn

from .norm import FrozenBatchNorm2d

__all__ = ["NORM_REGISTRY", "get_norm", "available_norms"]

NORM_REGISTRY = Registry("NORM")


@NORM_REGISTRY.register()
def BN(channels, *, gn_groups=32, bn_momentum=0.1, bn_eps=1e-5):
    return nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)


@NORM_REGISTRY.register()
def FrozenBN(channels, *, gn_groups=32, bn_momentum=0.1, bn_eps=1e-5):
    return FrozenBatchNorm2d(channels, eps=bn_eps)


@NORM_REGISTRY.register()
def GN(channels, *, gn_groups=32, bn_momentum=0.1, bn_eps=1e-5):
    if channels % gn_groups != 0:
        raise ValueError(
            f"GN: MODEL.GN.NUM_GROUPS={gn_groups} does not divide {channels} channels"
        )
    return nn.GroupNorm(gn_groups, channels)


def available_norms():
    return sorted(name for name, _ in NORM_REGISTRY) + ['""']


def get_norm(name: str, channels: int, *, gn_groups: int = 32, bn_momentum: float = 0.1,
             bn_eps: float = 1e-5):
    """A norm layer for ``channels`` channels, or None when ``name`` is "" (no norm)."""
    if name in ("", None, "none"):
        return None
    if name not in NORM_REGISTRY:
        raise KeyError(f"Unknown norm '{name}'; valid names: {', '.join(available_norms())}")
    return NORM_REGISTRY.get(name)(
        channels, gn_groups=gn_groups, bn_momentum=bn_momentum, bn_eps=bn_eps
    )
