"""Depthwise convolution whose CPU weight gradient is assembled from 3x3 pieces.

oneDNN (PyTorch's CPU convolution) has a fast weight-gradient kernel for 3x3 depthwise convs
only: for 5x5 it is 5-15x slower than for 3x3 on the same map, and more than the forward and the
input gradient together; EfficientNet's 5x5 blocks spend most of their backward there.
A k x k kernel's weight gradient is, tap by tap, a sum over the image of the output gradient
times the input shifted by the tap's offset, so it splits into 3x3 blocks of taps: each block is
the 3x3 weight gradient of an input cropped at the block's offset (or, strided, of the whole
input against an output gradient shifted by the block's offset). The forward and the input
gradient stay PyTorch's. Results equal the direct gradient up to float summation order.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .norm import replace_modules

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "depthwise_weight_grad",
           "split_depthwise_weight_gradients"]


def _block_offsets(kernel_size: int) -> List[int]:
    """Offsets of 3-tap blocks that cover ``kernel_size`` taps (overlapping at most by one)."""
    offsets = list(range(0, kernel_size - 2, 2))
    if offsets[-1] != kernel_size - 3:
        offsets.append(kernel_size - 3)
    return offsets


def depthwise_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, kernel_size: Tuple[int, int],
                          stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """Gradient of a depthwise (groups = channels, dilation 1) conv's (C, 1, kh, kw) weight, with
    ``x`` its (N, C, H, W) input before padding, from 3x3 weight gradients."""
    channels = x.shape[1]
    kh, kw = kernel_size
    (sh, sw), (ph, pw) = stride, padding
    memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous() else torch.contiguous_format)
    x_padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    out_h, out_w = grad_output.shape[-2:]
    offsets_h, offsets_w = _block_offsets(kh), _block_offsets(kw)
    block_weight = x.new_empty((channels, 1, 3, 3)).contiguous(memory_format=memory_format)
    grad_weight = x.new_empty((channels, 1, kh, kw))
    # strided, with blocks one or more output steps apart: shifting the output gradient (a
    # quarter of the input at stride 2) costs less than cropping the input for every block
    shift_gradient = ((sh, sw) != (1, 1) and all(top % sh == 0 for top in offsets_h)
                      and all(left % sw == 0 for left in offsets_w))
    if shift_gradient:
        full_h = (x_padded.shape[-2] - 3) // sh + 1
        full_w = (x_padded.shape[-1] - 3) // sw + 1
        x_padded = x_padded.contiguous(memory_format=memory_format)
    rows, cols = (out_h - 1) * sh + 3, (out_w - 1) * sw + 3
    for top in offsets_h:
        for left in offsets_w:
            if shift_gradient:
                block_grad = torch.empty(
                    (grad_output.shape[0], channels, full_h, full_w), dtype=grad_output.dtype,
                    device=grad_output.device, memory_format=memory_format).zero_()
                block_grad[:, :, top // sh:top // sh + out_h,
                           left // sw:left // sw + out_w] = grad_output
                block_input = x_padded
            else:
                block_grad = grad_output
                block_input = x_padded[:, :, top:top + rows, left:left + cols].contiguous(
                    memory_format=memory_format)
            grad_block = torch.ops.aten.convolution_backward(
                block_grad, block_input, block_weight, None, [sh, sw], [0, 0], [1, 1], False,
                [0, 0], channels, [False, True, False])[1]
            grad_weight[:, :, top:top + 3, left:left + 3] = grad_block
    return grad_weight


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False,
                [0, 0], x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(grad_output, x, tuple(weight.shape[-2:]),
                                                ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def _split_gradient_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and max(weight.shape[-2:]) > 3 and min(weight.shape[-2:]) >= 3
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (0, 0)
                     ) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=channels)`` for a (C, 1, kh, kw)
    ``weight``; on CPU with kernels above 3x3 its weight gradient comes from 3x3 blocks."""
    if not _split_gradient_applies(x, weight):
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
    if torch.is_autocast_enabled("cpu"):
        # what autocast would do to the conv, done here so the function sees one dtype
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return _DepthwiseConv2d.apply(x, weight, bias, tuple(stride), tuple(padding))
    return _DepthwiseConv2d.apply(x, weight, bias, tuple(stride), tuple(padding))


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (groups = in = out channels, dilation 1, static zero padding)
    run by :func:`depthwise_conv2d`."""

    def __init__(self, channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 bias: bool = False):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding,
                         groups=channels, bias=bias)

    @staticmethod
    def convertible(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain depthwise conv that :meth:`from_conv` can take over."""
        return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
                and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """The same conv sharing ``conv``'s parameters (state-dict keys unchanged)."""
        if not cls.convertible(conv):
            raise ValueError(f"DepthwiseConv2d.from_conv: {conv} is not an nn.Conv2d with groups "
                             "= channels, dilation 1 and numeric zero padding")
        new = cls(conv.in_channels, 1)
        new.kernel_size, new.stride, new.padding = conv.kernel_size, conv.stride, conv.padding
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        # nn.Conv2d.forward and the fold (detector.layers.fused_conv) run the conv through here
        return depthwise_conv2d(x, weight, bias, self.stride, self.padding)


def _split_gradient_conv(module: nn.Module) -> nn.Module:
    if DepthwiseConv2d.convertible(module) and max(module.kernel_size) > 3:
        return DepthwiseConv2d.from_conv(module)
    return module


def split_depthwise_weight_gradients(module: nn.Module) -> nn.Module:
    """``module`` with each depthwise ``nn.Conv2d`` above 3x3 replaced by a
    :class:`DepthwiseConv2d` sharing its parameters."""
    return replace_modules(module, _split_gradient_conv)
