from .build import (
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    get_default_optimizer_params,
    is_norm_module,
)
from .ema import ModelEMA
from .lr_scheduler import LRMultiplier, WarmupParamScheduler

__all__ = [
    "build_gradient_clipper", "build_lr_scheduler", "build_optimizer",
    "get_default_optimizer_params", "is_norm_module", "LRMultiplier", "ModelEMA",
    "WarmupParamScheduler",
]
