"""Normalization layers selected by name (see NORM_REGISTRY in detector/layers/build.py)."""
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "convert_frozen_batchnorm"]


class FrozenBatchNorm2d(_TVFrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters: y = (x - mean) / sqrt(var + eps) * w + b."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every BatchNorm2d/SyncBatchNorm replaced by a FrozenBatchNorm2d
    holding the same statistics and affine parameters."""
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
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
