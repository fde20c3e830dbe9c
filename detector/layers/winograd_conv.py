"""3x3 convolutions (stride 1, zero padding 1) as Winograd F(2x2, 3x3) on the CPU.

A direct 3x3 convolution spends 36 multiply-adds per output pixel and channel pair; Winograd's
F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016). The work left is 16 matrix products over
channels, which ``torch.bmm`` runs, between transforms of the maps into and out of that domain
(``csrc/winograd_f2x3.cpp``; additions only, bound by memory). For the 256-channel 3x3 convs of
a RetinaNet head and FPN this takes about half of oneDNN's direct convolution time forward and
backward. (oneDNN has no fp32 Winograd for these CPUs any more, and PyTorch exposes no choice of
algorithm.) Results equal the direct convolution's up to float rounding: the transforms of
F(2x2, 3x3) have entries 0, +-1 and 1/2, so their error stays within a few ulps of the sums
(tests compare with ``F.conv2d`` in float64).

:func:`winograd_conv3x3` is used only where it pays: channels-last float32 maps on the CPU, 64 or
more input and output channels, 512 or more output tiles, outside autocast, tracing and export,
inside :func:`winograd_convolution` (``MODEL.WINOGRAD_CONV``). Convs reach it through
:func:`conv_forward` (blocks with a norm that is not folded, predictors) or the fused conv path
(:mod:`detector.layers.fused_conv`, which also fuses the ReLU); elsewhere they run as usual.
"""
import ctypes
from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from detector.utils.env import ThreadSwitch

from .cpu_kernels import load_kernel

__all__ = ["winograd_conv3x3", "winograd_convolution", "winograd_applies", "conv_forward"]

# below this many input or output channels the transforms cost more than the products save
MIN_CHANNELS = 64
# nor below this many 2x2 output tiles (over the batch): small maps run direct
MIN_TILES = 512
# the tiles are transformed and multiplied in blocks of about this size: below glibc's largest
# mmap threshold (32 MB), so that the buffers come from the heap instead of fresh pages whose
# faults would cost as much as the transforms
_BLOCK_BYTES = 4 << 20
_SWITCH = ThreadSwitch()
# weight tensor -> (its version, its transform U)
_WEIGHT_CACHE = WeakIdKeyDictionary()
# G of F(2x2, 3x3): the weight transform U = G w G^T
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_convolution(enabled: bool = True):
    """Within this context (and this thread), eligible 3x3 convs run through
    :func:`winograd_conv3x3` (see :func:`winograd_applies`)."""
    return _SWITCH.set(enabled)


def _kernel() -> Optional[ctypes.CDLL]:
    lib = load_kernel("winograd_f2x3")
    if lib is not None and lib.detector_winograd_input_transform.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        signatures = {
            "detector_winograd_input_transform": [ptr, i64, i64, i64, i64, i64, i64, ptr],
            "detector_winograd_output_transform": [ptr, ptr, ctypes.c_int, i64, i64, i64, i64,
                                                   i64, i64, ptr],
            "detector_winograd_grad_output_transform": [ptr, ptr, i64, i64, i64, i64, i64, i64,
                                                        ptr, ptr],
            "detector_winograd_grad_input_transform": [ptr, i64, i64, i64, i64, i64, i64, ptr],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
    return lib


def winograd_applies(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether ``conv(x)`` may run as :func:`winograd_conv3x3` here."""
    if not _SWITCH.is_on():
        return False
    if not (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not parametrize.is_parametrized(conv)):
        return False
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4
            or conv.weight.dtype != torch.float32
            or min(conv.in_channels, conv.out_channels) < MIN_CHANNELS
            or x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2) < MIN_TILES
            or not x.is_contiguous(memory_format=torch.channels_last)
            or torch.is_autocast_enabled("cpu") or torch.jit.is_scripting()
            or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return False
    return _kernel() is not None


def _weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> U: (16, C, K), U[4a + b] = (G w G^T)[a, b]; cached per weight tensor and
    version: a head's convs are shared by every pyramid level, and inference reuses them."""
    hit = _WEIGHT_CACHE.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    g = torch.tensor(_G, dtype=weight.dtype)
    k, c = weight.shape[:2]
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach(), g).reshape(16, c, k)
    _WEIGHT_CACHE[weight] = (weight._version, u)
    return u


def _weight_grad(grad_u: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """The adjoint of :func:`_weight_transform`: dU (16, C, K) -> dw (K, C, 3, 3)."""
    g = torch.tensor(_G, dtype=grad_u.dtype)
    return torch.einsum("ai,abck,bj->kcij", g, grad_u.reshape(4, 4, c, k), g)


def _row_blocks(n: int, h: int, w: int, channels: int):
    """Blocks [begin, end) of tile rows (over all images) whose buffers take about
    ``_BLOCK_BYTES``."""
    rows, tiles_per_row = n * ((h + 1) // 2), (w + 1) // 2
    step = max(1, _BLOCK_BYTES // (16 * tiles_per_row * channels * 4))
    return [(begin, min(begin + step, rows)) for begin in range(0, rows, step)], tiles_per_row


def _input_transform(lib, x: torch.Tensor, begin: int, end: int, tiles_per_row: int):
    n, c, h, w = x.shape
    v = torch.empty(16, (end - begin) * tiles_per_row, c)
    lib.detector_winograd_input_transform(x.data_ptr(), n, h, w, c, begin, end, v.data_ptr())
    return v


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        lib = _kernel()
        n, c, h, w = x.shape
        k = weight.shape[0]
        u = _weight_transform(weight)
        bias_ptr = None if bias is None else bias.contiguous().data_ptr()
        y = torch.empty((n, k, h, w), memory_format=torch.channels_last)
        blocks, tiles_per_row = _row_blocks(n, h, w, max(c, k))
        for begin, end in blocks:
            m = torch.bmm(_input_transform(lib, x, begin, end, tiles_per_row), u)
            lib.detector_winograd_output_transform(m.data_ptr(), bias_ptr, int(relu), n, h, w,
                                                   k, begin, end, y.data_ptr())
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.weight_shape = weight.shape
        # U, not the weight: the backward needs only U (the head's U is cached anyway)
        ctx.save_for_backward(x, u, y if relu else None)
        return y

    @staticmethod
    @once_differentiable  # the kernels are not differentiated (create_graph=True is refused)
    def backward(ctx, grad_y):
        lib = _kernel()
        x, u, y = ctx.saved_tensors
        n, c, h, w = x.shape
        k = ctx.weight_shape[0]
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = grad_u = None
        if need_x:
            grad_x = torch.empty((n, c, h, w), memory_format=torch.channels_last).zero_()
        if need_w:
            grad_u = torch.zeros(16, c, k)
        bias_rows = torch.empty(n * ((h + 1) // 2), k)
        u_t = u.transpose(1, 2)
        blocks, tiles_per_row = _row_blocks(n, h, w, max(c, k))
        for begin, end in blocks:
            grad_m = torch.empty(16, (end - begin) * tiles_per_row, k)
            lib.detector_winograd_grad_output_transform(
                grad_y.data_ptr(), None if y is None else y.data_ptr(), n, h, w, k, begin, end,
                grad_m.data_ptr(), bias_rows.data_ptr())
            if need_x:
                grad_v = torch.bmm(grad_m, u_t)
                lib.detector_winograd_grad_input_transform(grad_v.data_ptr(), n, h, w, c, begin,
                                                           end, grad_x.data_ptr())
                del grad_v
            if need_w:
                v = _input_transform(lib, x, begin, end, tiles_per_row)
                grad_u.baddbmm_(v.transpose(1, 2), grad_m)
        if need_w:
            grad_w = _weight_grad(grad_u, k, c)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_rows.sum(0)
        return grad_x, grad_w, grad_b, None


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (then ReLU if ``relu``) for a channels-last
    float32 CPU ``x`` and a (K, C, 3, 3) ``weight``, with gradients, through Winograd F(2x2, 3x3).
    Callers check :func:`winograd_applies` first."""
    if x.dim() != 4 or weight.shape[2:] != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"winograd_conv3x3 needs an (N, C, H, W) input and a (K, C, 3, 3) weight, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        raise ValueError("winograd_conv3x3 runs on float32 CPU tensors, got "
                         f"{[(t.dtype, t.device.type) for t in tensors]}")
    x = x.contiguous(memory_format=torch.channels_last)
    # the weight as it is (a channels-last model keeps channels-last weights): its transform is
    # cached per weight tensor, which a copy here would defeat
    return _WinogradConv3x3.apply(x, weight, bias, relu)


def conv_forward(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, as :func:`winograd_conv3x3` where :func:`winograd_applies` (and no hook
    waits for the conv's own call)."""
    if not (conv._forward_hooks or conv._forward_pre_hooks) and winograd_applies(x, conv):
        return winograd_conv3x3(x, conv.weight, conv.bias)
    return conv(x)
