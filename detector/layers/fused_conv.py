"""Conv + fixed norm + activation (+ residual add) as one convolution.

A FrozenBatchNorm (or a BatchNorm in eval mode, using its running statistics) is an affine map
per channel, so it can be folded into the conv before it: ``w' = w * s``, ``b' = b * s + t``.

- Nothing to differentiate (inference; frozen stages on the image in training), on CPU:
  oneDNN's fused convolution (``torch.ops.mkldnn._convolution_pointwise``, the kernel
  TorchInductor emits for CPU convolutions) applies bias, activation and residual add in the
  same pass over the output. Eager PyTorch runs each as a separate pass over the feature map and
  sends small batch-1 convolutions (P6/P7 heads) to a slower im2col path; a ResNet-FPN RetinaNet
  spends about a fifth of its CPU inference time there.
- Gradients needed (trainable convs before a FrozenBatchNorm): the fold is done with autograd
  ops on the weights, so the feature map skips the norm's passes forward and backward and the
  gradients are those of the unfused block up to float rounding.

The fold applies only inside :func:`conv_norm_fusion` (the meta-architecture enables it from
``MODEL.FUSE_CONV_NORM``), never while tracing or exporting, for a plain zero-padded
``nn.Conv2d`` (no spectral norm) and a fixed norm; anything else (GroupNorm, EvoNorm, BatchNorm
in training mode) runs the eager block. Under CPU bf16 autocast the fused conv runs in bf16
with bf16 weights, as autocast would run it.

Folded weights are cached per conv (outside it and its state dict) together with the identity and
version counters of every tensor they were computed from, so an optimizer step or a
``load_state_dict`` invalidates them. Outputs equal the unfused ones up to float rounding.
"""
import weakref
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

from detector.utils.env import ThreadSwitch

from .depthwise_conv import DepthwiseConv2d
from .winograd_conv import winograd_applies, winograd_conv3x3

__all__ = ["conv_norm_fusion", "fusion_enabled", "fused_conv_norm_act", "fold_norm_into_conv",
           "foldable", "activation_name", "register_frozen_norm"]

_FUSION = ThreadSwitch()
# conv -> {(tag, id(norm)): (source versions, (weight, bias))}, tag a dtype (prepacked oneDNN
# weights) or "float32" (plain folded weights); outside the module, so that copying or pickling a
# model never meets the prepacked (opaque) oneDNN weights
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# oneDNN post-op names of the activations the fused kernel applies itself
_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "swish"}
# norm classes that are always a fixed per-channel affine map (see register_frozen_norm)
_FROZEN_NORMS = [_TVFrozenBatchNorm2d]


def register_frozen_norm(norm_class: type) -> type:
    """Let the fold treat ``norm_class`` like a FrozenBatchNorm: a norm that always computes
    ``(x - running_mean) * rsqrt(running_var + eps) * weight + bias`` from attributes of those
    names (e.g. timm's ``FrozenBatchNormAct2d``, registered by the EfficientNet backbone)."""
    if norm_class not in _FROZEN_NORMS:
        _FROZEN_NORMS.append(norm_class)
    return norm_class


def conv_norm_fusion(enabled: bool = True):
    """Within this context (and this thread), blocks built from conv + fixed norm + activation
    run through :func:`fused_conv_norm_act` when it applies."""
    return _FUSION.set(enabled)


def _mkldnn_fused_conv_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


_AVAILABLE = _mkldnn_fused_conv_available()


def _compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the fused conv computes in for input ``x``, or None if it cannot run."""
    if torch.is_autocast_enabled("cpu"):
        # CPU autocast with fp16 has no oneDNN fused kernel here; leave it to eager autocast
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None


def _tracing() -> bool:
    # tracing (fvcore's flop count, ONNX) and torch.export must record the standard ops
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def fusion_enabled() -> bool:
    """Whether :func:`conv_norm_fusion` is on here (blocks then try the fused path first)."""
    return _FUSION.is_on() and not _tracing()


def foldable(norm: Optional[nn.Module], activation: Optional[nn.Module] = None) -> bool:
    """Whether a block ending in ``norm`` and ``activation`` can take the folded path (a fixed
    norm or none, an activation the fused kernel applies)."""
    return _norm_affine(norm) is not None and activation_name(activation) is not None


def activation_name(activation: Optional[nn.Module]) -> Optional[str]:
    """The fused kernel's name of ``activation`` ("none" for None/Identity), or None when it
    cannot be fused."""
    if activation is None or isinstance(activation, nn.Identity):
        return "none"
    return _ACTIVATIONS.get(type(activation))


def _norm_affine(norm: Optional[nn.Module]) -> Optional[Tuple[Optional[torch.Tensor], ...]]:
    """(weight, bias, running_mean, running_var, eps) of a norm that is a fixed per-channel affine
    map now; (None,) * 5 for no norm; None if the norm cannot be folded."""
    if norm is None or isinstance(norm, nn.Identity):
        return (None,) * 5
    if isinstance(norm, tuple(_FROZEN_NORMS)):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    return None


def fold_norm_into_conv(conv: nn.Conv2d, norm: Optional[nn.Module]
                        ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) of one conv computing ``norm(conv(x))``, in autograd ops (gradients reach
    the conv and any trainable affine parameters of the norm); None when ``norm`` is not a fixed
    affine map (GroupNorm, EvoNorm, BatchNorm in training mode)."""
    affine = _norm_affine(norm)
    if affine is None:
        return None
    norm_weight, norm_bias, mean, var, eps = affine
    weight, bias = conv.weight, conv.bias
    if mean is None:
        return weight, bias
    scale = torch.rsqrt(var + eps)
    if norm_weight is not None:
        scale = scale * norm_weight
    shift = -mean * scale
    if norm_bias is not None:
        shift = shift + norm_bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def _sources(conv: nn.Conv2d, norm: Optional[nn.Module]):
    tensors = [conv.weight, conv.bias]
    if norm is not None:
        tensors += [getattr(norm, n, None) for n in ("weight", "bias", "running_mean",
                                                     "running_var")]
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def _cached_weights(conv: nn.Conv2d, norm: Optional[nn.Module], dtype: torch.dtype,
                    input_size):
    """The folded (weight, bias) of ``conv`` + ``norm`` in ``dtype``, the weight prepacked in
    oneDNN's blocked layout (chosen for ``input_size``; other sizes give identical results), from
    the conv's cache when none of their tensors changed; None when the norm cannot be folded."""
    def prepacked(weight, bias):
        # prepacked once instead of reordered by every call (10-30% of a conv's time at batch 1)
        weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to(dtype).contiguous().to_mkldnn(), list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, list(input_size))
        return weight, None if bias is None else bias.to(dtype)

    return _cached_fold(conv, norm, dtype, prepacked)


def _cached_folded(conv: nn.Conv2d, norm: Optional[nn.Module]):
    """The folded float32 (weight, bias) of ``conv`` + ``norm``, cached like
    :func:`_cached_weights` (the same tensors on every call until one of theirs changes, so that
    :func:`winograd_conv3x3` reuses its transform of them); None when the norm cannot be folded."""
    def as_float(weight, bias):
        return weight.float(), None if bias is None else bias.float()

    return _cached_fold(conv, norm, "float32", as_float)


def _cached_fold(conv: nn.Conv2d, norm: Optional[nn.Module], tag, prepare):
    """``prepare(weight, bias)`` of the folded ``conv`` + ``norm``, from the conv's cache entry
    ``tag`` while none of their tensors changed; None when the norm cannot be folded."""
    # one entry per (tag, norm): a conv shared across pyramid levels has one norm per level
    cache = _CACHE.setdefault(conv, {})
    key = _sources(conv, norm)
    hit = cache.get((tag, id(norm)))
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        folded = fold_norm_into_conv(conv, norm)
    if folded is None:
        return None
    value = prepare(*folded)
    cache[(tag, id(norm))] = (key, value)
    return value


def _runs_winograd(x: torch.Tensor, conv: nn.Module, act: str,
                   residual: Optional[torch.Tensor]) -> bool:
    # winograd_conv3x3 applies a ReLU itself, but no residual add
    return residual is None and act in ("none", "relu") and winograd_applies(x, conv)


def _fusable_conv(conv: nn.Module, padded_input: bool) -> bool:
    if padded_input:
        # a conv whose own forward pads (TF "same"): the caller padded, so only its zero padding
        # attribute may remain
        plain = isinstance(conv, nn.Conv2d) and tuple(conv.padding) == (0, 0)
    else:
        plain = type(conv) in (nn.Conv2d, DepthwiseConv2d) and not isinstance(conv.padding, str)
    return plain and conv.padding_mode == "zeros" and not parametrize.is_parametrized(conv)


def _folded_with_autograd(x: torch.Tensor, conv: nn.Conv2d, norm: Optional[nn.Module],
                          activation: Optional[nn.Module], residual: Optional[torch.Tensor]):
    """Training through a fixed norm: the norm folded into the conv weight with autograd ops, so
    gradients reach the conv (and the norm's affine parameters, if they train) unchanged, while
    the feature map skips the norm's passes forward and backward."""
    folded = fold_norm_into_conv(conv, norm)
    if folded is None:
        return None
    weight, bias = folded
    act = activation_name(activation)
    if _runs_winograd(x, conv, act, residual):
        return winograd_conv3x3(x, weight, bias, relu=act == "relu")
    # the conv's own forward with the folded weight (DepthwiseConv2d keeps its gradient path)
    y = conv._conv_forward(x, weight, bias)
    if residual is not None:
        y = y + residual
    return y if activation is None else activation(y)


def fused_conv_norm_act(x: torch.Tensor, conv: nn.Module, norm: Optional[nn.Module] = None,
                        activation: Optional[nn.Module] = None,
                        residual: Optional[torch.Tensor] = None, *,
                        padded_input: bool = False) -> Optional[torch.Tensor]:
    """``activation(norm(conv(x)) + residual)`` with the norm folded into the conv, or None when
    that does not apply (see the module docstring); the caller then runs its eager code.
    ``residual`` (optional) is added before the activation. ``padded_input``: ``x`` is already
    padded as ``conv``'s own forward would pad it (a TF "same" conv subclass with zero
    ``padding``), so the conv runs on ``x`` as is.

    Without gradients to compute (inference, or a frozen block on an input that needs none) on
    CPU: one fused oneDNN convolution. With gradients: the folded conv in autograd ops."""
    if not (_FUSION.is_on() and _fusable_conv(conv, padded_input)) or _tracing():
        return None
    act = activation_name(activation)
    if act is None:
        return None
    if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in conv.parameters())
            or (norm is not None and any(p.requires_grad for p in norm.parameters()))
            or (residual is not None and residual.requires_grad)):
        return _folded_with_autograd(x, conv, norm, activation, residual)
    if _runs_winograd(x, conv, act, residual):
        folded = _cached_folded(conv, norm)
        if folded is not None:
            with torch.no_grad():
                return winograd_conv3x3(x, *folded, relu=act == "relu")
    dtype = _compute_dtype(x)
    if not (_AVAILABLE and x.device.type == "cpu" and dtype is not None):
        return None
    weights = _cached_weights(conv, norm, dtype, x.shape)
    if weights is None:
        return None
    weight, bias = weights
    x = x.to(dtype)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    with torch.no_grad():
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, act, [], "")
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.to(dtype), weight, bias, *args, "add", 1.0,
                None if act == "none" else act, [], "")
    # oneDNN answers in channels-last; keep the input's memory format, as an eager conv does:
    # the model chooses the format (a frozen stem in training must not switch the trainable
    # stages after it to channels-last behind its back)
    return y.contiguous() if x.is_contiguous() and not y.is_contiguous() else y
