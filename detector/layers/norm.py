"""Normalization layers selected by name (see NORM_REGISTRY in detector/layers/build.py).

- :class:`FrozenBatchNorm2d`: BatchNorm with fixed statistics and affine parameters.
- :class:`SyncBatchNorm2d`: BatchNorm whose training statistics cover the whole process group:
  torch's ``nn.SyncBatchNorm`` kernel for CUDA tensors on an NCCL group, a naive all-reduce
  elsewhere (CPU / gloo), plain BatchNorm when there is nothing to synchronize.
- :class:`EvoNormS0`, :class:`EvoNormB0`: the normalization-activation layers of Liu et al. 2020,
  "Evolving Normalization-Activation Layers".
"""
import itertools
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules._functions import SyncBatchNorm as _fused_sync_batch_norm
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

__all__ = [
    "FrozenBatchNorm2d", "SyncBatchNorm2d", "batch_norm_momentum_step", "EvoNormS0", "EvoNormB0",
    "convert_frozen_batchnorm", "convert_sync_batchnorm", "has_batch_statistics", "replace_modules",
]


class FrozenBatchNorm2d(_TVFrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters: y = (x - mean) / sqrt(var + eps) * w + b."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)


def batch_norm_momentum_step(norm: nn.Module) -> float:
    """Counts a training step of a BatchNorm layer with running statistics and returns the
    running-statistics factor, as ``nn.BatchNorm2d.forward`` does (a cumulative average when
    its momentum is None)."""
    norm.num_batches_tracked.add_(1)
    return 1.0 / norm.num_batches_tracked.item() if norm.momentum is None else norm.momentum


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with statistics over the whole process group in training.

    - CUDA input on an NCCL group: the fused kernel behind ``nn.SyncBatchNorm``.
    - Any other initialized group (CPU tensors, gloo): per-channel sums, sums of squares and
      element counts are all-reduced with the differentiable
      ``torch.distributed.nn.functional.all_reduce``, so gradients equal those of BatchNorm over
      the concatenated batch, and unequal per-process batch sizes are weighted correctly. The
      running variance gets the global unbiased variance.
    - No process group, world size 1, or eval mode (with running statistics): plain BatchNorm.

    Same parameters and buffers as ``nn.BatchNorm2d``, so checkpoints move freely between them.
    It subclasses ``nn.BatchNorm2d``, not ``nn.SyncBatchNorm``, because DistributedDataParallel
    refuses ``nn.SyncBatchNorm`` instances in CPU modules.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects (N, C, H, W) input, got shape "
                             f"{tuple(input.shape)}")

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or not dist.is_available() or not dist.is_initialized():
            return super().forward(input)
        group = self._group()
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return super().forward(input)
        if self.training and input.is_cuda and dist.get_backend(group) == "nccl":
            return self._fused_sync_forward(input, group, world_size)
        return self._naive_sync_forward(input)

    def _fused_sync_forward(self, x: torch.Tensor, group, world_size: int) -> torch.Tensor:
        factor = batch_norm_momentum_step(self) if self.track_running_stats else 0.0
        return _fused_sync_batch_norm.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, factor,
            group, world_size)

    def _naive_sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x32 = x.float()
        local = torch.cat([
            x32.sum(dim=(0, 2, 3)),
            (x32 * x32).sum(dim=(0, 2, 3)),
            x32.new_full((1,), float(x.numel() // max(channels, 1))),
        ])
        with warnings.catch_warnings():
            # deprecated in favour of functional collectives, which have no autograd all_reduce
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r".*all_reduce is deprecated")
            total = differentiable_all_reduce(local, group=self._group())
        sums, sums_sq, count = total[:channels], total[channels:2 * channels], total[-1]
        num_values = int(count.item())
        if num_values <= 1:
            raise ValueError(f"SyncBatchNorm2d: expected more than 1 value per channel across the "
                             f"process group in training, got {num_values}")
        mean = sums / count
        var = (sums_sq / count - mean * mean).clamp(min=0)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * num_values / (num_values - 1))
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        y = x32 * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        factor = batch_norm_momentum_step(self)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype),
                                               alpha=factor)


def _divide_by_group_std(numerator: torch.Tensor, x: torch.Tensor, groups: int,
                         eps: float) -> torch.Tensor:
    """``numerator`` / sqrt(variance of ``x`` + eps), the variance taken over each sample's
    channel groups and H, W (without materializing the broadcast std)."""
    n, c, h, w = x.shape
    var = x.reshape(n, groups, -1).var(dim=2, unbiased=False, keepdim=True)
    return (numerator.reshape(n, groups, -1) / (var + eps).sqrt()).reshape(n, c, h, w)


class _EvoNorm(nn.Module):
    """Shared parameters: gamma (``weight``), beta (``bias``) and, with ``activation``, ``v``."""

    def __init__(self, num_features: int, eps: float, activation: bool):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        # an EvoNorm with activation replaces norm + ReLU: blocks skip their own activation
        self.applies_activation = bool(activation)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if activation:
            self.v = nn.Parameter(torch.ones(num_features))
        else:
            self.register_parameter("v", None)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects (N, "
                             f"{self.num_features}, H, W) input, got shape {tuple(x.shape)}")

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class EvoNormS0(_EvoNorm):
    """EvoNorm-S0 (per sample): ``y = x * sigmoid(v * x) / group_std(x) * gamma + beta``.

    ``group_std`` is sqrt(biased variance + eps) over ``groups`` channel groups and H, W of each
    sample, as in GroupNorm. With ``activation=False`` (after convs that have no activation) the
    layer is the normalization alone: ``y = x / group_std(x) * gamma + beta``.
    """

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5,
                 activation: bool = True):
        if groups <= 0 or num_features % groups != 0:
            raise ValueError(f"EvoNormS0: MODEL.EVONORM.NUM_GROUPS={groups} does not divide "
                             f"{num_features} channels")
        super().__init__(num_features, eps, activation)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        x32 = x.float()
        numerator = x32 * torch.sigmoid(self.v.view(1, -1, 1, 1) * x32) if self.v is not None \
            else x32
        normalized = _divide_by_group_std(numerator, x32, self.groups, self.eps)
        return self._affine(normalized).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, "
                f"activation={self.applies_activation}")


class EvoNormB0(_EvoNorm):
    """EvoNorm-B0 (batch statistics):
    ``y = x / max(sqrt(batch_var + eps), v * x + instance_std(x)) * gamma + beta``.

    ``batch_var`` is the biased per-channel variance over (N, H, W) in training and the running
    variance in eval mode (or when ``frozen``); the running variance is updated with the unbiased
    batch variance and ``momentum`` in PyTorch's convention (new = (1 - m) * old + m * batch).
    ``instance_std`` is sqrt(variance over H, W + eps) per sample and channel. With
    ``activation=False`` the layer is ``y = x / sqrt(batch_var + eps) * gamma + beta``.
    In distributed training the batch variance is each process's own.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 activation: bool = True):
        super().__init__(num_features, eps, activation)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EvoNormB0: MODEL.BN.MOMENTUM={momentum} must be in [0, 1]")
        self.momentum = momentum
        # set by convert_frozen_batchnorm for frozen stages: normalize with the running variance
        self.frozen = False
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        x32 = x.float()
        if self.training and not self.frozen:
            var = x32.var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() // self.num_features
            if n <= 1:
                raise ValueError("EvoNormB0: expected more than 1 value per channel in training, "
                                 f"got input of shape {tuple(x.shape)}")
            with torch.no_grad():
                self.running_var.mul_(1 - self.momentum).add_(
                    var.detach() * (n / (n - 1)), alpha=self.momentum)
        else:
            var = self.running_var.float()
        denominator = (var + self.eps).sqrt().view(1, -1, 1, 1)
        if self.v is not None:
            instance_std = (x32.var(dim=(2, 3), unbiased=False, keepdim=True) + self.eps).sqrt()
            denominator = torch.maximum(denominator, self.v.view(1, -1, 1, 1) * x32 + instance_std)
        return self._affine(x32 / denominator).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, momentum={self.momentum}, eps={self.eps}, "
                f"activation={self.applies_activation}, frozen={self.frozen}")


def has_batch_statistics(layer: nn.Module) -> bool:
    """True for layers whose statistics come from (or were estimated over) a batch: BatchNorm,
    SyncBatchNorm, FrozenBatchNorm and EvoNormB0. GroupNorm and EvoNormS0 normalize each sample
    alone."""
    return isinstance(layer, (_BatchNorm, _TVFrozenBatchNorm2d, EvoNormB0))


def replace_modules(module: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``convert(module)`` if it returns a new module, else ``module`` with the same rule applied
    to each child, recursively (the one module-swapping walk behind the converters here and
    timm's BatchNormAct freezing in the EfficientNet backbone)."""
    new = convert(module)
    if new is not module:
        return new
    for name, child in module.named_children():
        new_child = replace_modules(child, convert)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _frozen_copy(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    if isinstance(module, EvoNormB0):
        module.frozen = True
    return module


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every BatchNorm2d/SyncBatchNorm/SyncBatchNorm2d replaced by a
    FrozenBatchNorm2d holding the same statistics and affine parameters; EvoNormB0 layers switch
    (in place) to normalizing with their running variance."""
    return replace_modules(module, _frozen_copy)


def _sync_copy(module: nn.Module, process_group) -> nn.Module:
    if not isinstance(module, nn.BatchNorm2d) or isinstance(module, SyncBatchNorm2d):
        return module
    sync = SyncBatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum,
                           affine=module.affine, track_running_stats=module.track_running_stats,
                           process_group=process_group)
    reference = next(itertools.chain(module.parameters(), module.buffers()), None)
    if reference is not None:
        sync.to(device=reference.device)
    with torch.no_grad():
        if module.affine:
            sync.weight.copy_(module.weight)
            sync.bias.copy_(module.bias)
            sync.weight.requires_grad_(module.weight.requires_grad)
            sync.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            sync.running_mean.copy_(module.running_mean)
            sync.running_var.copy_(module.running_var)
            sync.num_batches_tracked.copy_(module.num_batches_tracked)
    sync.train(module.training)
    return sync


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Return ``module`` with every ``nn.BatchNorm2d`` replaced by a :class:`SyncBatchNorm2d`
    with the same options, parameters (and their ``requires_grad``), buffers and train/eval
    mode."""
    return replace_modules(module, lambda m: _sync_copy(m, process_group))
