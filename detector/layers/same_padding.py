"""Padding modes of EfficientDet: TensorFlow "same" or PyTorch-style "symmetric".

"same" pads so that ``out = ceil(in / stride)``, putting the odd pixel at the bottom/right (the
original TF models need it); "symmetric" pads ``(k - 1) // 2`` on both sides as PyTorch does. For
stride-1 convs with odd kernels both are the same static padding; they differ for strided convs
(the EfficientNet backbone, handled by timm) and for the stride-2 max-pools of the BiFPN.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PADDING_MODES", "check_padding_mode", "same_padding_amounts", "MaxPool2dPadded",
           "conv2d_padded"]

PADDING_MODES = ("same", "symmetric")


def check_padding_mode(mode: str, key: str = "padding_mode") -> str:
    """``mode`` if it is one of PADDING_MODES, else a one-line error naming ``key``."""
    if mode not in PADDING_MODES:
        raise ValueError(f"{key}='{mode}' is not one of {PADDING_MODES}")
    return mode


def same_padding_amounts(size: int, kernel_size: int, stride: int) -> Tuple[int, int]:
    """(before, after) padding of TF "same" for one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def _ceil_mode_matches(size: int, kernel_size: int, stride: int, before: int) -> bool:
    """Whether ``max_pool2d(padding=before, ceil_mode=True)`` yields the ``ceil(size / stride)``
    windows of "same" padding (PyTorch's output-size rule, including its last-window check)."""
    if before > kernel_size // 2 or size + 2 * before < kernel_size:
        return False
    out = -(-(size + 2 * before - kernel_size) // stride) + 1
    if (out - 1) * stride >= size + before:
        out -= 1
    return out == -(-size // stride)


class MaxPool2dPadded(nn.Module):
    """Max-pool with "same" or "symmetric" padding.

    "same" avoids padding copies: when the extra pixel goes to the bottom/right, ``ceil_mode`` gives
    the same windows as padding with -inf (the common case of even sizes with kernel 3, stride 2);
    other cases pad explicitly.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding_mode: str = "same"):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.padding_mode = check_padding_mode(padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        if self.padding_mode == "symmetric":
            return F.max_pool2d(x, k, s, padding=(k - 1) // 2)
        pad_h = same_padding_amounts(int(x.shape[-2]), k, s)
        pad_w = same_padding_amounts(int(x.shape[-1]), k, s)
        if (_ceil_mode_matches(int(x.shape[-2]), k, s, pad_h[0])
                and _ceil_mode_matches(int(x.shape[-1]), k, s, pad_w[0])):
            # same windows as -inf padding: the bottom/right overhang is clipped by ceil_mode
            return F.max_pool2d(x, k, s, padding=(pad_h[0], pad_w[0]), ceil_mode=True)
        x = F.pad(x, (pad_w[0], pad_w[1], pad_h[0], pad_h[1]), value=float("-inf"))
        return F.max_pool2d(x, k, s)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding_mode}"


def conv2d_padded(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                  groups: int = 1, bias: bool = True, padding_mode: str = "same") -> nn.Module:
    """A conv with "same" or "symmetric" padding (timm's ``create_conv2d``: static padding when
    the two agree, a dynamically padded ``Conv2dSame`` otherwise)."""
    from timm.layers import create_conv2d

    check_padding_mode(padding_mode)
    return create_conv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups,
                         bias=bias, padding="same" if padding_mode == "same" else "")
