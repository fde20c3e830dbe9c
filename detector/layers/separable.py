"""Depthwise-separable convs, activations by name and the TensorFlow-style initialisations of the
original EfficientDet (used by the BiFPN and the EfficientDet head, and open to any part)."""
import math
from typing import Optional

import torch
from torch import nn

from .build import NormSpec
from .fused_conv import foldable, fused_conv_norm_act, fusion_enabled
from .same_padding import conv2d_padded

__all__ = ["ACTIVATIONS", "make_activation", "check_layer_norm", "SeparableConv2d",
           "SeparableConvNormAct", "glorot_uniform_", "variance_scaling_"]

ACTIVATIONS = ("swish", "relu", "")


def make_activation(name: str, key: str = "activation", inplace: bool = True
                    ) -> Optional[nn.Module]:
    """``nn.SiLU`` for "swish" (= SiLU), ``nn.ReLU`` for "relu", None for "". ``inplace``
    applies to ReLU only: SiLU's gradient needs its input, so in training autograd copies the
    input of an in-place SiLU first, an extra pass over the feature map."""
    if name == "swish":
        return nn.SiLU(inplace=False)
    if name == "relu":
        return nn.ReLU(inplace=inplace)
    if name in ("", "none"):
        return None
    raise ValueError(f"{key}='{name}' is not one of {ACTIVATIONS}")


def check_layer_norm(spec: NormSpec) -> NormSpec:
    """``spec`` unless it reparametrizes conv weights (spectral norm): separable convs never apply
    those, and silently training without the norm would be wrong."""
    if spec.normalizes_conv_weight:
        raise ValueError(f"{spec.key}='{spec.name}' normalizes conv weights, which separable "
                         "convs do not support; use a norm layer (BN, GN, EvoNormS0...)")
    return spec


class SeparableConv2d(nn.Module):
    """Depthwise ``kernel_size`` conv (no bias) followed by a pointwise 1x1 conv. Parameter names
    (``conv_dw``, ``conv_pw``) are effdet's."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 bias: bool = True, padding_mode: str = "same"):
        super().__init__()
        self.conv_dw = conv2d_padded(in_channels, in_channels, kernel_size, groups=in_channels,
                                     bias=False, padding_mode=padding_mode)
        self.conv_pw = conv2d_padded(in_channels, out_channels, 1, bias=bias,
                                     padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None,
                activation: Optional[nn.Module] = None) -> torch.Tensor:
        """``activation(norm(conv_pw(conv_dw(x))))``; ``norm`` and ``activation`` (optional)
        belong to the caller. Folded into two convs where :mod:`.fused_conv` applies."""
        if fusion_enabled() and foldable(norm, activation):
            y = fused_conv_norm_act(x, self.conv_dw)
            y = None if y is None else fused_conv_norm_act(y, self.conv_pw, norm, activation)
            if y is not None:
                return y
        x = self.conv_pw(self.conv_dw(x))
        if norm is not None:
            x = norm(x)
        return activation(x) if activation is not None else x


class SeparableConvNormAct(nn.Module):
    """:class:`SeparableConv2d` -> norm -> activation, with the rules of
    :func:`detector.layers.conv_norm_act`: the pointwise conv has a bias only without a norm
    layer, and a norm-activation layer (EvoNorm) replaces norm + activation. Weight norms (SN)
    are refused (see :func:`check_layer_norm`).

    Args:
        norm: a :class:`NormSpec`. activation: a module factory (``nn.ReLU``...) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm: NormSpec, activation=nn.ReLU, padding_mode: str = "same"):
        super().__init__()
        check_layer_norm(norm)
        self.norm = norm.layer(out_channels, activation=activation is not None)
        self.conv = SeparableConv2d(in_channels, out_channels, kernel_size=kernel_size,
                                    bias=self.norm is None, padding_mode=padding_mode)
        fused = bool(getattr(self.norm, "applies_activation", False))
        self.act = activation() if activation is not None and not fused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.norm, self.act)


def _fans(weight: torch.Tensor, groups: int = 1):
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive // groups
    return fan_in, fan_out


@torch.no_grad()
def glorot_uniform_(weight: torch.Tensor, groups: int = 1) -> None:
    """TF's glorot_uniform (fan average), the init of the original BiFPN convs."""
    fan_in, fan_out = _fans(weight, groups)
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    weight.uniform_(-limit, limit)


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor) -> None:
    """TF's variance_scaling (fan in, normal), the init of the original head convs."""
    fan_in, _ = _fans(weight)
    weight.normal_(0.0, math.sqrt(1.0 / max(1.0, fan_in)))
