"""Training-time 1x1 conv + BatchNorm + activation that writes into reused buffers (CPU).

On CPU, PyTorch takes every tensor straight from malloc, and glibc maps a block above its
mmap threshold (at most 32 MB) afresh on each allocation, so the first write to every page of
it is a page fault. For the largest maps of a network (EfficientNet-B0's first 96-channel
expansion at a quarter of a 512 image is 50 MB at batch 2) the faults cost more than the
arithmetic: the 1x1 conv's matrix product into a fresh map of that size takes about 6x as long
as into one already touched.
PyTorch has no caching allocator for CPU tensors that Python can switch on, so this function
keeps its own maps per call site (conv output, activation output, the input gradients) and
reuses them on the next step once autograd has released them. It also writes the activation
into the interior of a zeroed, padded map, so that the conv after it needs no padding copy.

The norm and the activation run in the C++ kernel of ``csrc/bn_act_channels_last.cpp``
(:mod:`detector.layers.cpu_kernels`): a pass for the statistics and one writing the activation
in the forward, two passes in the backward, which recomputes the norm's output instead of keeping
it. Where that kernel is not available (``DETECTOR_CPU_KERNELS=0``, no compiler), PyTorch's
batch-norm and activation ops run instead, keeping the norm's output map, with the backward in
place in it. Outputs, running statistics and gradients equal those of
``act(batch_norm(conv1x1(x)))`` up to float rounding (the conv and its gradients as matrix
products).
"""
import ctypes
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .cpu_kernels import load_kernel
from .norm import batch_norm_momentum_step

__all__ = ["ReusableBuffers", "pointwise_conv_norm_act", "pointwise_conv_norm_act_applies",
           "batch_norm_act", "POINTWISE_ACTIVATIONS"]

# activation module types and their names here
POINTWISE_ACTIVATIONS = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}
# from this many input channels on, the conv's backward runs as two matrix products (the input
# gradient into a pooled map); below it oneDNN's 1x1 backward was faster (EfficientNet shapes)
_MATMUL_BACKWARD_MIN_CHANNELS = 32


# a private torch function; without it no map can be shown unshared, and none is reused
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_use_count(t: torch.Tensor) -> int:
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


# what the count reads for a tensor that nothing else shares (the temporary storage object
# made to read it counts as one)
_UNSHARED_USE_COUNT = (None if _STORAGE_USE_COUNT is None
                       else _storage_use_count(torch.empty(1)))


class ReusableBuffers:
    """Maps kept between training steps, keyed by call site and role. A map is handed out again
    only when nothing but this pool holds its storage (autograd has freed the step that used
    it); otherwise a new one replaces it, so an older graph still alive is never overwritten.
    Copies and pickles of a module holding a pool start empty."""

    def __init__(self):
        self._maps: Dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: Tuple[int, ...], like: torch.Tensor,
            zeroed: bool = False) -> torch.Tensor:
        """A channels-last map of ``shape`` with ``like``'s dtype and device; ``zeroed`` maps are
        zero when made (callers that write only their interior keep the border zero)."""
        buffer = self._maps.get(key)
        if (buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != like.dtype
                or buffer.device != like.device or _UNSHARED_USE_COUNT is None
                or _storage_use_count(buffer) != _UNSHARED_USE_COUNT):
            self._maps.pop(key, None)
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device,
                                 memory_format=torch.channels_last)
            if zeroed:
                buffer.zero_()
            self._maps[key] = buffer
        # an alias: whoever keeps it (autograd's saved tensors too) then counts on the storage
        return buffer.detach()

    def clear(self) -> None:
        self._maps.clear()

    def __len__(self) -> int:
        return len(self._maps)

    def __deepcopy__(self, memo) -> "ReusableBuffers":
        return ReusableBuffers()

    def __getstate__(self) -> dict:
        return {"_maps": {}}


def _activation_forward(name: str, z: torch.Tensor, out: torch.Tensor) -> None:
    if name == "silu":
        torch.ops.aten.silu.out(z, out=out)
    elif name == "relu":
        torch.clamp_min(z, 0.0, out=out)
    else:
        out.copy_(z)


def _activation_backward_(name: str, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gradient at the activation's input, written into ``z`` (its input, not needed after)."""
    if name == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=z)
    elif name == "relu":
        torch.ops.aten.threshold_backward.grad_input(grad, z, 0.0, grad_input=z)
    else:
        z.copy_(grad)
    return z


def _matmul_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          buffers: ReusableBuffers, key: str, need_x: bool, need_weight: bool):
    """Input and weight gradients of a bias-free 1x1 conv of channels-last ``x``, as matrix
    products on the (N*H*W, C) views, the input gradient written into a pooled map."""
    out_channels, in_channels = weight.shape[:2]
    grad_out_2d = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)
    x_2d = x.permute(0, 2, 3, 1).reshape(-1, in_channels)
    grad_x = grad_weight = None
    if need_x:
        grad_x = buffers.get(key + ".grad_input", tuple(x.shape), x)
        torch.mm(grad_out_2d, weight.reshape(out_channels, in_channels),
                 out=grad_x.permute(0, 2, 3, 1).view(-1, in_channels))
    if need_weight:
        grad_weight = (grad_out_2d.t() @ x_2d).view_as(weight)
    return grad_x, grad_weight


_ACTIVATION_CODES = {"identity": 0, "relu": 1, "silu": 2}  # as in the kernel's enum
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _fused_kernel() -> Optional[ctypes.CDLL]:
    """The C++ BN + activation kernel (detector/layers/csrc), or None: PyTorch's ops then."""
    lib = load_kernel("bn_act_channels_last")
    if lib is not None and lib.detector_bn_act_forward.argtypes is None:
        lib.detector_bn_act_forward.argtypes = [
            _P, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_int,
            _P, _I, _I, _P, _P]
        lib.detector_bn_act_forward.restype = ctypes.c_int
        lib.detector_bn_act_backward.argtypes = [
            _P, _I, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_int, _P, _P, _P]
        lib.detector_bn_act_backward.restype = None
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _kernel_layout(t: torch.Tensor) -> bool:
    """Channels innermost and pixels of a row adjacent, as the kernel indexes maps."""
    return t.dtype == torch.float32 and t.stride(1) == 1 and t.stride(3) == t.shape[1]


def _norm_statistics_ok(*tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in tensors)


class _PointwiseConvNormAct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, conv_weight, norm_weight, norm_bias, running_mean, running_var,
                momentum, eps, activation, padding, buffers, key):
        n, in_channels, h, w = x.shape
        out_channels = norm_weight.shape[0]
        top, bottom, left, right = padding
        conv_out = x
        if conv_weight is not None:
            conv_out = buffers.get(key + ".conv", (n, out_channels, h, w), x)
            torch.mm(x.permute(0, 2, 3, 1).reshape(-1, in_channels),
                     conv_weight.reshape(out_channels, in_channels).t(),
                     out=conv_out.permute(0, 2, 3, 1).view(-1, out_channels))
        save_mean = x.new_empty(out_channels)
        save_invstd = x.new_empty(out_channels)
        ctx.eps, ctx.activation, ctx.padding = eps, activation, padding
        ctx.buffers, ctx.key = buffers, key
        unpadded_identity = activation == "identity" and not any(padding)
        kernel = _fused_kernel()
        ctx.fused = (kernel is not None and n * h * w > 1 and conv_out.dtype == torch.float32
                     and conv_out.is_contiguous(memory_format=torch.channels_last)
                     and _norm_statistics_ok(norm_weight, norm_bias, running_mean, running_var))
        if ctx.fused:
            # one pass for the statistics, one writing act(norm(.)) into the output map; the
            # backward recomputes the norm's output from its input
            out = buffers.get(key + (".norm" if unpadded_identity else ".act"),
                              (n, out_channels, h + top + bottom, w + left + right), x,
                              zeroed=any(padding))
            interior = out[:, :, top:top + h, left:left + w]
            kernel.detector_bn_act_forward(
                conv_out.data_ptr(), n, h, w, out_channels, norm_weight.data_ptr(),
                norm_bias.data_ptr(), _ptr(running_mean), _ptr(running_var), momentum, eps,
                _ACTIVATION_CODES[activation], interior.data_ptr(), interior.stride(0),
                interior.stride(2), save_mean.data_ptr(), save_invstd.data_ptr())
            ctx.save_for_backward(x, conv_weight, norm_weight, conv_out, norm_bias, save_mean,
                                  save_invstd)
            return out
        norm_out = buffers.get(key + ".norm", (n, out_channels, h, w), x)
        torch.ops.aten.native_batch_norm.out(
            conv_out, norm_weight, norm_bias, running_mean, running_var, True, momentum, eps,
            out=norm_out, save_mean=save_mean, save_invstd=save_invstd)
        if unpadded_identity:
            # the norm's map is the output; its backward needs neither it nor a copy of it
            ctx.save_for_backward(x, conv_weight, norm_weight, conv_out, None, save_mean,
                                  save_invstd)
            return norm_out
        padded = buffers.get(key + ".act", (n, out_channels, h + top + bottom, w + left + right),
                             x, zeroed=any(padding))
        _activation_forward(activation, norm_out, padded[:, :, top:top + h, left:left + w])
        ctx.save_for_backward(x, conv_weight, norm_weight, conv_out, norm_out, save_mean,
                              save_invstd)
        return padded

    @staticmethod
    def _norm_act_backward_fused(ctx, grad, conv_out, norm_weight, norm_bias, save_mean,
                                 save_invstd, need_grad_input):
        if not _kernel_layout(grad):
            grad = grad.contiguous(memory_format=torch.channels_last).float()
        n, channels, h, w = conv_out.shape
        grad_conv_out = (ctx.buffers.get(ctx.key + ".grad", tuple(conv_out.shape), conv_out)
                         if need_grad_input else None)
        grad_norm_weight = norm_weight.new_empty(channels)
        grad_norm_bias = norm_weight.new_empty(channels)
        _fused_kernel().detector_bn_act_backward(
            grad.data_ptr(), grad.stride(0), grad.stride(2), conv_out.data_ptr(), n, h, w,
            channels, norm_weight.data_ptr(), norm_bias.data_ptr(), save_mean.data_ptr(),
            save_invstd.data_ptr(), _ACTIVATION_CODES[ctx.activation], _ptr(grad_conv_out),
            grad_norm_weight.data_ptr(), grad_norm_bias.data_ptr())
        return grad_conv_out, grad_norm_weight, grad_norm_bias

    @staticmethod
    def backward(ctx, grad_padded):
        # the kernel's backward needs the norm's bias, PyTorch's the norm's output (or nothing)
        x, conv_weight, norm_weight, conv_out, bias_or_norm_out, save_mean, save_invstd = (
            ctx.saved_tensors)
        top, _, left, _ = ctx.padding
        h, w = conv_out.shape[-2:]
        grad = grad_padded[:, :, top:top + h, left:left + w]
        need_x, need_conv_weight, need_norm_weight, need_norm_bias = ctx.needs_input_grad[:4]
        if ctx.fused:
            grad_conv_out, grad_norm_weight, grad_norm_bias = (
                _PointwiseConvNormAct._norm_act_backward_fused(
                    ctx, grad, conv_out, norm_weight, bias_or_norm_out, save_mean, save_invstd,
                    need_x or need_conv_weight))
        else:
            grad_norm_out = (grad if bias_or_norm_out is None
                             else _activation_backward_(ctx.activation, grad, bias_or_norm_out))
            grad_conv_out, grad_norm_weight, grad_norm_bias = (
                torch.ops.aten.native_batch_norm_backward(
                    grad_norm_out, conv_out, norm_weight, None, None, save_mean, save_invstd,
                    True, ctx.eps, [need_x or need_conv_weight, need_norm_weight,
                                    need_norm_bias]))
        grad_x = grad_conv_weight = None
        if conv_weight is None:
            grad_x = grad_conv_out
        elif x.shape[1] >= _MATMUL_BACKWARD_MIN_CHANNELS:
            grad_x, grad_conv_weight = _matmul_conv_backward(
                grad_conv_out, x, conv_weight, ctx.buffers, ctx.key, need_x, need_conv_weight)
        elif need_x or need_conv_weight:
            grad_x, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
                grad_conv_out, x, conv_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_x, need_conv_weight, False])
        return (grad_x, grad_conv_weight, grad_norm_weight if need_norm_weight else None,
                grad_norm_bias if need_norm_bias else None) + (None,) * 8


def pointwise_conv_norm_act_applies(x: torch.Tensor, conv: Optional[nn.Module], norm: nn.Module,
                                    activation: nn.Module) -> bool:
    """Whether :func:`pointwise_conv_norm_act` reproduces ``activation(norm(conv(x)))`` here: a
    bias-free 1x1 stride-1 conv (or none) and a training-mode BatchNorm2d-like layer with affine
    parameters, in fp32 channels-last on the CPU with gradients on, outside autocast, tracing
    and compilation."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and (conv is None or (
                type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1
                and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding == (0, 0) and conv.dilation == (1, 1)))
            and norm.training and getattr(norm, "weight", None) is not None
            and getattr(norm, "bias", None) is not None
            and type(activation) in POINTWISE_ACTIVATIONS)


def pointwise_conv_norm_act(x: torch.Tensor, conv_weight: Optional[torch.Tensor],
                            norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                            running_mean: Optional[torch.Tensor],
                            running_var: Optional[torch.Tensor], momentum: float, eps: float,
                            activation: str, buffers: ReusableBuffers, key: str,
                            padding: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """``activation(batch_norm(conv2d(x, conv_weight), training=True))`` for a channels-last
    ``x`` and a (C_out, C_in, 1, 1) weight (``None``: no conv), zero-padded by ``padding`` =
    (top, bottom, left, right), with its maps taken from ``buffers`` under ``key`` (one key per
    call site). Running statistics (when given) are updated with ``momentum`` as
    ``F.batch_norm`` does. ``activation`` is one of ``POINTWISE_ACTIVATIONS``' names. Check the
    case with :func:`pointwise_conv_norm_act_applies`."""
    if activation not in POINTWISE_ACTIVATIONS.values():
        raise ValueError(f"activation '{activation}' is not one of "
                         f"{sorted(POINTWISE_ACTIVATIONS.values())}")
    return _PointwiseConvNormAct.apply(x, conv_weight, norm_weight, norm_bias, running_mean,
                                       running_var, momentum, eps, activation, tuple(padding),
                                       buffers, key)


def batch_norm_act(x: torch.Tensor, norm: nn.Module, activation: nn.Module, *,
                   buffers: ReusableBuffers, key: str, conv: Optional[nn.Module] = None,
                   padding: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """``activation(norm(conv(x)))`` through :func:`pointwise_conv_norm_act`, for a
    training-mode BatchNorm2d-like ``norm`` with running statistics (the caller checks the type
    and :func:`pointwise_conv_norm_act_applies`); counts the step as ``nn.BatchNorm2d`` does."""
    momentum = batch_norm_momentum_step(norm)
    return pointwise_conv_norm_act(x, None if conv is None else conv.weight, norm.weight,
                                   norm.bias, norm.running_mean, norm.running_var, momentum,
                                   norm.eps, POINTWISE_ACTIVATIONS[type(activation)], buffers,
                                   key, padding)
