"""Optimizer, LR scheduler and gradient clipping from the SOLVER config section.

- ``build_optimizer(cfg, model) -> torch.optim.Optimizer``: SGD (momentum, Nesterov) or AdamW
  over the parameter groups of ``get_default_optimizer_params`` (norm parameters get
  WEIGHT_DECAY_NORM, other biases WEIGHT_DECAY_BIAS and BASE_LR * BIAS_LR_FACTOR).
- ``build_lr_scheduler(cfg, optimizer) -> LRMultiplier``: "WarmupMultiStepLR" or
  "WarmupCosineLR", stepped once per iteration.
- ``build_gradient_clipper(cfg) -> Callable[[Iterable[Parameter]], Optional[Tensor]] | None``:
  clips gradients in place ("norm" returns the total norm before clipping), None when
  SOLVER.CLIP_GRADIENTS.ENABLED is False.
"""
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import torch
from torch import nn

from .lr_scheduler import LRMultiplier, cosine_multiplier, multistep_multiplier, with_warmup

__all__ = [
    "build_optimizer", "build_lr_scheduler", "build_gradient_clipper",
    "get_default_optimizer_params", "is_norm_module", "OPTIMIZERS", "LR_SCHEDULERS",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("SGD", "AdamW")
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")
CLIP_TYPES = ("norm", "value")

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def is_norm_module(module: nn.Module) -> bool:
    """BatchNorm*/SyncBatchNorm/GroupNorm/LayerNorm/InstanceNorm, or any class with "Norm" in its
    name (FrozenBatchNorm2d, EvoNorm, RMSNorm...)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def get_default_optimizer_params(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_bias: float,
    bias_lr_factor: float = 1.0,
) -> List[Dict[str, Any]]:
    """Parameter groups ``[{"params": [...], "lr": .., "weight_decay": ..}, ...]``.

    Every trainable parameter appears once (shared parameters are de-duplicated, the first
    module owning one decides its group); ``requires_grad=False`` parameters are left out.
    Groups with equal hyper-parameters are merged, in order of first appearance.
    """
    seen: Set[nn.Parameter] = set()
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for module in model.modules():
        norm = is_norm_module(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            if norm:
                hyper = (base_lr, weight_decay_norm)
            elif name == "bias":
                hyper = (base_lr * bias_lr_factor, weight_decay_bias)
            else:
                hyper = (base_lr, weight_decay)
            groups.setdefault(hyper, []).append(param)
    return [
        {"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()
    ]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER ("SGD" or "AdamW") over the default parameter groups of ``model``."""
    solver = cfg.SOLVER
    name = solver.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown SOLVER.OPTIMIZER '{name}'; valid: {', '.join(OPTIMIZERS)}")
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
    )
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if name == "SGD":
        optimizer = torch.optim.SGD(
            params, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=solver.BASE_LR)
    num = sum(p.numel() for g in params for p in g["params"])
    logger.info("%s over %d parameter group(s), %d trainable values", name, len(params), num)
    return optimizer


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """SOLVER.LR_SCHEDULER_NAME with its warmup, as an ``LRMultiplier`` over MAX_ITER iterations."""
    solver = cfg.SOLVER
    name = solver.LR_SCHEDULER_NAME
    max_iter = int(solver.MAX_ITER)
    if max_iter <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be a positive number of iterations, got {max_iter}")
    if name == "WarmupMultiStepLR":
        multiplier = multistep_multiplier(solver.STEPS, solver.GAMMA, max_iter)
    elif name == "WarmupCosineLR":
        multiplier = cosine_multiplier(solver.COSINE_END_FACTOR)
    else:
        raise ValueError(
            f"Unknown SOLVER.LR_SCHEDULER_NAME '{name}'; valid: {', '.join(LR_SCHEDULERS)}"
        )
    multiplier = with_warmup(
        multiplier,
        warmup_factor=solver.WARMUP_FACTOR,
        warmup_iters=int(solver.WARMUP_ITERS),
        warmup_method=solver.WARMUP_METHOD,
        max_iter=max_iter,
    )
    return LRMultiplier(optimizer, multiplier, max_iter=max_iter)


def build_gradient_clipper(cfg) -> Optional[Callable[[Iterable[nn.Parameter]], Optional[torch.Tensor]]]:
    """A function clipping the gradients of the parameters it is given, per
    SOLVER.CLIP_GRADIENTS; None when clipping is disabled."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    clip_type, clip_value = clip.CLIP_TYPE, float(clip.CLIP_VALUE)
    if clip_type not in CLIP_TYPES:
        raise ValueError(
            f"Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE '{clip_type}'; valid: {', '.join(CLIP_TYPES)}"
        )
    if clip_value <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip_value}")
    if clip_type == "norm":
        norm_type = float(clip.NORM_TYPE)

        def clip_grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
            return torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)

        return clip_grad_norm

    def clip_grad_value(params: Iterable[nn.Parameter]) -> None:
        torch.nn.utils.clip_grad_value_(params, clip_value)

    return clip_grad_value
