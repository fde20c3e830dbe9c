"""Conv + norm + activation, the one place where every norm option is applied to a conv.

Rules shared by backbones, necks and heads:
- the conv has a bias only when no norm layer follows it (the norm's beta plays that role);
- "SN" reparametrizes the conv weight with ``torch.nn.utils.parametrizations.spectral_norm``
  (after ``weight_init``, so the power iteration starts from the final weight) and adds no layer;
- a norm-activation layer (EvoNorm, built with ``activation=True`` when the block has an
  activation) replaces norm + activation, so the block's own activation is dropped; blocks without
  an activation get the normalization-only variant.
"""
from functools import partial
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .build import NormSpec
from .fused_conv import fused_conv_norm_act
from .winograd_conv import conv_forward

__all__ = ["ConvNormAct", "conv_norm_act", "ConvNormActLayers", "as_norm_spec"]

NormLike = Union[str, NormSpec]
_relu = partial(nn.ReLU, inplace=True)


def as_norm_spec(norm: NormLike, key: str = "norm") -> NormSpec:
    """``norm`` itself if it is a NormSpec, else the NormSpec of that name with default options
    (errors name ``key``)."""
    if isinstance(norm, NormSpec):
        return norm
    return NormSpec("" if norm is None else norm, key=key)


class ConvNormActLayers(NamedTuple):
    conv: nn.Conv2d
    norm: Optional[nn.Module]
    activation: Optional[nn.Module]


def _fuses_activation(norm_layer: Optional[nn.Module]) -> bool:
    return bool(getattr(norm_layer, "applies_activation", False))


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                  padding: Optional[int] = None, dilation: int = 1, groups: int = 1,
                  norm: NormLike = "", activation: Optional[Callable[[], nn.Module]] = _relu,
                  weight_init: Optional[Callable[[torch.Tensor], object]] = None,
                  build_norm: bool = True) -> ConvNormActLayers:
    """The conv, norm layer (or None) and activation module (or None) of one conv block.

    Args:
        padding: None = "same" for odd kernels (``dilation * (kernel_size - 1) // 2``).
        norm: a norm name or :class:`NormSpec`.
        activation: a module factory (default in-place ReLU; ``nn.SiLU``...) or None.
        weight_init: in-place initializer of the conv weight (e.g. ``nn.init.kaiming_normal_``);
            when given, the bias (if any) is zeroed. None keeps PyTorch's default init.
        build_norm: False when the caller holds the norm layers itself (e.g. one per pyramid
            level); the conv and activation are still chosen as if the norm followed.
    """
    spec = as_norm_spec(norm)
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    # a probe tells whether the option adds a layer and whether it includes the activation
    norm_layer = spec.layer(out_channels, activation=activation is not None)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=norm_layer is None)
    if weight_init is not None:
        weight_init(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    if spec.normalizes_conv_weight:
        conv = spectral_norm(conv)
    act = None
    if activation is not None and not _fuses_activation(norm_layer):
        act = activation()
    return ConvNormActLayers(conv, norm_layer if build_norm else None, act)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation built by :func:`conv_norm_act` (same arguments).

    Laid out like torchvision's ``Conv2dNormActivation``: index 0 is the conv, then the norm layer
    if the option adds one, then the activation if there is one, so state-dict keys are
    ``0.weight``, ``1.weight``, ... With ``build_norm=False`` the block holds no norm layer and
    ``forward(x, norm)`` applies one owned by the caller between conv and activation;
    :meth:`make_norm` builds such layers.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, norm: NormLike = "",
                 activation: Optional[Callable[[], nn.Module]] = _relu,
                 weight_init: Optional[Callable[[torch.Tensor], object]] = None,
                 build_norm: bool = True):
        spec = as_norm_spec(norm)
        layers = conv_norm_act(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, dilation=dilation, groups=groups, norm=spec,
                               activation=activation, weight_init=weight_init,
                               build_norm=build_norm)
        super().__init__(*[m for m in layers if m is not None])
        self.norm_spec = spec
        self.out_channels = out_channels
        self.external_norm = not build_norm
        self._norm_activation = activation is not None
        self._has_act = layers.activation is not None

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def norm(self) -> Optional[nn.Module]:
        """The norm layer held by this block, or None."""
        has_norm = len(self) - 1 - int(self._has_act)
        return self[1] if has_norm else None

    def make_norm(self) -> Optional[nn.Module]:
        """A new norm layer of this block's kind (same options and activation variant)."""
        return self.norm_spec.layer(self.out_channels, activation=self._norm_activation)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if not self.external_norm:
            if norm is not None:
                raise ValueError("ConvNormAct holds its own norm layer; do not pass one")
            norm = self.norm
        elif norm is None and self.norm_spec.adds_layer:
            raise ValueError(f"ConvNormAct was built without its '{self.norm_spec.name}' layer "
                             "(build_norm=False): pass the caller-owned norm to forward")
        fused = fused_conv_norm_act(x, self.conv, norm, self[-1] if self._has_act else None)
        if fused is not None:
            return fused
        x = conv_forward(self.conv, x)
        if norm is not None:
            x = norm(x)
        return self[-1](x) if self._has_act else x
