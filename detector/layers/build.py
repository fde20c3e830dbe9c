"""Norm registry (functions are named after the config value that selects them).

NORM_REGISTRY maps a norm name to a callable
``(channels: int, spec: NormSpec, *, activation: bool) -> nn.Module | None``
returning a layer that normalizes (N, channels, H, W) feature maps, reading its options (GN groups,
BN momentum/eps, EvoNorm groups/eps...) from ``spec``, or None when the option adds no layer
after the conv ("SN" reparametrizes the conv weight instead, see
:func:`detector.layers.conv_norm_act`). ``activation`` says whether an activation follows the
norm: norm-activation layers (EvoNorm) then include it and set ``applies_activation = True`` so the
conv block drops its own; the other layers ignore it. Invalid options raise a one-line
ValueError naming the config key.
"""
from dataclasses import dataclass
from typing import Any, List, Optional

from fvcore.common.registry import Registry
from torch import nn

from . import norm as _norm

__all__ = ["NORM_REGISTRY", "NormSpec", "get_norm", "available_norms", "WEIGHT_NORMS"]

NORM_REGISTRY = Registry("NORM")

# options that normalize the conv weight instead of adding a layer after the conv
WEIGHT_NORMS = ("SN",)
_NO_NORM = ("", None, "none")


@NORM_REGISTRY.register()
def BN(channels, spec, *, activation=False):
    """nn.BatchNorm2d with MODEL.BN.MOMENTUM / MODEL.BN.EPS."""
    return nn.BatchNorm2d(channels, eps=spec.bn_eps, momentum=spec.bn_momentum)


@NORM_REGISTRY.register()
def FrozenBN(channels, spec, *, activation=False):
    """BatchNorm with fixed statistics and affine parameters (eps MODEL.BN.EPS)."""
    return _norm.FrozenBatchNorm2d(channels, eps=spec.bn_eps)


@NORM_REGISTRY.register()
def SyncBN(channels, spec, *, activation=False):
    """BatchNorm over the whole process group (see SyncBatchNorm2d)."""
    return _norm.SyncBatchNorm2d(channels, eps=spec.bn_eps, momentum=spec.bn_momentum)


@NORM_REGISTRY.register()
def GN(channels, spec, *, activation=False):
    """nn.GroupNorm with MODEL.GN.NUM_GROUPS groups and eps MODEL.GN.EPS."""
    if spec.gn_groups <= 0 or channels % spec.gn_groups != 0:
        raise ValueError(
            f"GN: MODEL.GN.NUM_GROUPS={spec.gn_groups} does not divide {channels} channels"
        )
    return nn.GroupNorm(spec.gn_groups, channels, eps=spec.gn_eps)


@NORM_REGISTRY.register()
def EvoNormS0(channels, spec, *, activation=False):
    """EvoNorm-S0 with MODEL.EVONORM.NUM_GROUPS / MODEL.EVONORM.EPS."""
    return _norm.EvoNormS0(channels, groups=spec.evonorm_groups, eps=spec.evonorm_eps,
                           activation=activation)


@NORM_REGISTRY.register()
def EvoNormB0(channels, spec, *, activation=False):
    """EvoNorm-B0 with running-variance momentum MODEL.BN.MOMENTUM and eps MODEL.EVONORM.EPS."""
    return _norm.EvoNormB0(channels, momentum=spec.bn_momentum, eps=spec.evonorm_eps,
                           activation=activation)


@NORM_REGISTRY.register()
def SN(channels, spec, *, activation=False):
    """Spectral-normalized convs: no layer after the conv (see conv_norm_act)."""
    return None


def available_norms() -> List[str]:
    """Every valid norm name, "" (no norm) included."""
    return sorted(name for name, _ in NORM_REGISTRY) + ['""']


@dataclass(frozen=True)
class NormSpec:
    """A norm choice with every option a norm layer may need; ``layer(channels)`` builds one.

    Parts take one NormSpec (``norm=``) instead of a name and loose options; it is built once
    per part by :meth:`from_config`. A new norm option is a field here, a line in
    :meth:`from_config` and its config key, and nothing else. ``key`` is the config key the
    choice came from, used in error messages. Constructing a NormSpec with an unknown ``name``
    raises a one-line ValueError listing the valid names.
    """

    name: str = ""
    gn_groups: int = 32
    gn_eps: float = 1e-5
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    evonorm_groups: int = 32
    evonorm_eps: float = 1e-5
    key: str = "norm"

    @classmethod
    def from_config(cls, cfg, name: Optional[str], key: str) -> "NormSpec":
        """The norm ``name`` (the value of config key ``key``) with the shared norm options of
        ``MODEL.BN``, ``MODEL.GN`` and ``MODEL.EVONORM``."""
        return cls("" if name is None else name, gn_groups=cfg.MODEL.GN.NUM_GROUPS,
                   gn_eps=cfg.MODEL.GN.EPS,
                   bn_momentum=cfg.MODEL.BN.MOMENTUM, bn_eps=cfg.MODEL.BN.EPS,
                   evonorm_groups=cfg.MODEL.EVONORM.NUM_GROUPS,
                   evonorm_eps=cfg.MODEL.EVONORM.EPS, key=key)

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
            return NORM_REGISTRY.get(self.name)(channels, self, activation=activation)
        except ValueError as e:
            raise ValueError(f"{self.key}='{self.name}': {e}") from None

    def __call__(self, channels: int, *, activation: bool = False) -> Optional[nn.Module]:
        """Same as :meth:`layer`, so a spec serves as a ``channels -> norm layer`` factory."""
        return self.layer(channels, activation=activation)


def get_norm(name: str, channels: int, *, activation: bool = False,
             **options: Any) -> Optional[nn.Module]:
    """A norm layer for ``channels`` channels, or None when ``name`` adds no layer ("" or "SN");
    ``options`` are :class:`NormSpec` fields. An unknown name raises a one-line ValueError
    listing the valid names."""
    return NormSpec(name, **options).layer(channels, activation=activation)
