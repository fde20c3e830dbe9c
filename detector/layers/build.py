"""Norm registry (functions are named after the config value that selects them).

NORM_REGISTRY maps a norm name to a callable
``(channels: int, *, activation: bool, gn_groups: int, bn_momentum: float, bn_eps: float,
evonorm_groups: int, evonorm_eps: float) -> nn.Module | None``
returning a layer that normalizes (N, channels, H, W) feature maps, or None when the option adds
no layer after the conv ("SN" reparametrizes the conv weight instead, see
:func:`detector.layers.conv_norm_act`). ``activation`` says whether an activation follows the
norm: norm-activation layers (EvoNorm) then include it and set ``applies_activation = True`` so the
conv block drops its own; the other layers ignore it. Invalid options raise a one-line
ValueError naming the config key.
"""
from dataclasses import dataclass
from typing import List, Optional

from fvcore.common.registry import Registry
from torch import nn

from . import norm as _norm

__all__ = ["NORM_REGISTRY", "NormSpec", "get_norm", "available_norms", "WEIGHT_NORMS"]

NORM_REGISTRY = Registry("NORM")

# options that normalize the conv weight instead of adding a layer after the conv
WEIGHT_NORMS = ("SN",)
_NO_NORM = ("", None, "none")


@NORM_REGISTRY.register()
def BN(channels, *, bn_momentum=0.1, bn_eps=1e-5, **_):
    """nn.BatchNorm2d with MODEL.BN.MOMENTUM / MODEL.BN.EPS."""
    return nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)


@NORM_REGISTRY.register()
def FrozenBN(channels, *, bn_eps=1e-5, **_):
    """BatchNorm with fixed statistics and affine parameters (eps MODEL.BN.EPS)."""
    return _norm.FrozenBatchNorm2d(channels, eps=bn_eps)


@NORM_REGISTRY.register()
def SyncBN(channels, *, bn_momentum=0.1, bn_eps=1e-5, **_):
    """BatchNorm over the whole process group (see SyncBatchNorm2d)."""
    return _norm.SyncBatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)


@NORM_REGISTRY.register()
def GN(channels, *, gn_groups=32, **_):
    """nn.GroupNorm with MODEL.GN.NUM_GROUPS groups."""
    if gn_groups <= 0 or channels % gn_groups != 0:
        raise ValueError(
            f"GN: MODEL.GN.NUM_GROUPS={gn_groups} does not divide {channels} channels"
        )
    return nn.GroupNorm(gn_groups, channels)


@NORM_REGISTRY.register()
def EvoNormS0(channels, *, activation=False, evonorm_groups=32, evonorm_eps=1e-5, **_):
    """EvoNorm-S0 with MODEL.EVONORM.NUM_GROUPS / MODEL.EVONORM.EPS."""
    return _norm.EvoNormS0(channels, groups=evonorm_groups, eps=evonorm_eps, activation=activation)


@NORM_REGISTRY.register()
def EvoNormB0(channels, *, activation=False, bn_momentum=0.1, evonorm_eps=1e-5, **_):
    """EvoNorm-B0 with running-variance momentum MODEL.BN.MOMENTUM and eps MODEL.EVONORM.EPS."""
    return _norm.EvoNormB0(channels, momentum=bn_momentum, eps=evonorm_eps, activation=activation)


@NORM_REGISTRY.register()
def SN(channels, **_):
    """Spectral-normalized convs: no layer after the conv (see conv_norm_act)."""
    return None


def available_norms() -> List[str]:
    """Every valid norm name, "" (no norm) included."""
    return sorted(name for name, _ in NORM_REGISTRY) + ['""']


@dataclass(frozen=True)
class NormSpec:
    """A norm choice with every option a norm layer may need; ``layer(channels)`` builds one.

    ``key`` is the config key the choice came from, used in error messages. Constructing a
    NormSpec with an unknown ``name`` raises a one-line ValueError listing the valid names.
    """

    name: str = ""
    gn_groups: int = 32
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    evonorm_groups: int = 32
    evonorm_eps: float = 1e-5
    key: str = "norm"

    def __post_init__(self):
        if self.name not in _NO_NORM and self.name not in NORM_REGISTRY:
            raise ValueError(f"{self.key}: unknown norm '{self.name}'; valid names: "
                             f"{', '.join(available_norms())}")

    @property
    def is_none(self) -> bool:
        return self.name in _NO_NORM

    @property
    def normalizes_conv_weight(self) -> bool:
        """True when the option acts on the conv weight (SN) rather than adding a layer."""
        return self.name in WEIGHT_NORMS

    @property
    def adds_layer(self) -> bool:
        """True when the option puts a norm layer after the conv."""
        return not (self.is_none or self.normalizes_conv_weight)

    def layer(self, channels: int, *, activation: bool = False) -> Optional[nn.Module]:
        """A norm layer for ``channels`` channels, or None when the option adds no layer."""
        if self.is_none:
            return None
        try:
            return NORM_REGISTRY.get(self.name)(
                channels, activation=activation, gn_groups=self.gn_groups,
                bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                evonorm_groups=self.evonorm_groups, evonorm_eps=self.evonorm_eps)
        except ValueError as e:
            raise ValueError(f"{self.key}='{self.name}': {e}") from None

    def __call__(self, channels: int, *, activation: bool = False) -> Optional[nn.Module]:
        """Same as :meth:`layer`, so a spec serves as a ``channels -> norm layer`` factory."""
        return self.layer(channels, activation=activation)


def get_norm(name: str, channels: int, *, activation: bool = False, gn_groups: int = 32,
             bn_momentum: float = 0.1, bn_eps: float = 1e-5, evonorm_groups: int = 32,
             evonorm_eps: float = 1e-5) -> Optional[nn.Module]:
    """A norm layer for ``channels`` channels, or None when ``name`` adds no layer ("" or "SN").
    An unknown name raises a one-line ValueError listing the valid names."""
    spec = NormSpec(name, gn_groups=gn_groups, bn_momentum=bn_momentum, bn_eps=bn_eps,
                    evonorm_groups=evonorm_groups, evonorm_eps=evonorm_eps)
    return spec.layer(channels, activation=activation)
