"""Depthwise-separable convs, activations by name and the TensorFlow-style initialisations of the
original EfficientDet (used by the BiFPN and the EfficientDet head, and open to any part)."""
import math
from typing import Optional

import torch
from torch import nn

from .build import NormSpec
from .same_padding import conv2d_padded

__all__ = ["ACTIVATIONS", "make_activation", "check_layer_norm", "SeparableConv2d",
           "glorot_uniform_", "variance_scaling_"]

ACTIVATIONS = ("swish", "relu", "")


def make_activation(name: str, key: str = "activation", inplace: bool = True
                    ) -> Optional[nn.Module]:
    """``nn.SiLU`` for "swish" (= SiLU), ``nn.ReLU`` for "relu", None for ""."""
    if name == "swish":
        return nn.SiLU(inplace=inplace)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


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
