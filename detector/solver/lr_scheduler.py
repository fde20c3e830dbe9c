"""Learning-rate schedules as fvcore ``ParamScheduler`` multipliers driven per iteration.

A schedule is a function ``multiplier(where)`` of the training progress ``where = iter / max_iter``
in [0, 1]; ``LRMultiplier`` sets ``lr = base_lr * multiplier(iter / max_iter)`` for every
parameter group after each ``step()`` (one step per iteration).
"""
import logging
from typing import List, Sequence

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

__all__ = [
    "LRMultiplier", "WarmupParamScheduler", "with_warmup", "multistep_multiplier",
    "cosine_multiplier",
]

logger = logging.getLogger(__name__)

WARMUP_METHODS = ("linear", "constant")


class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a warmup over the first ``warmup_length`` fraction of training.

    The main schedule is not rescaled: after the warmup it continues exactly where it would
    have been. "linear" ramps from ``warmup_factor * scheduler(0)`` to ``scheduler(warmup_length)``;
    "constant" holds ``warmup_factor * scheduler(0)``.
    """

    def __init__(self, scheduler: ParamScheduler, warmup_factor: float, warmup_length: float,
                 warmup_method: str = "linear"):
        if not 0.0 < warmup_length < 1.0:
            raise ValueError(f"warmup_length must be in (0, 1), got {warmup_length}")
        start = warmup_factor * scheduler(0.0)
        if warmup_method == "linear":
            warmup = LinearParamScheduler(start, scheduler(warmup_length))
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(start)
        else:
            raise ValueError(
                f"Unknown SOLVER.WARMUP_METHOD '{warmup_method}'; valid: {', '.join(WARMUP_METHODS)}"
            )
        super().__init__(
            [warmup, scheduler],
            lengths=[warmup_length, 1.0 - warmup_length],
            interval_scaling=["rescaled", "fixed"],
        )


def with_warmup(scheduler: ParamScheduler, *, warmup_factor: float, warmup_iters: int,
                warmup_method: str, max_iter: int) -> ParamScheduler:
    """``scheduler`` with a warmup of ``warmup_iters`` iterations (none if 0).

    A warmup as long as the whole run is cut at ``max_iter`` (with a warning) keeping its slope,
    i.e. the multiplier at iteration t is still ``f + (1 - f) * t / warmup_iters`` for linear.
    """
    if warmup_method not in WARMUP_METHODS:
        raise ValueError(
            f"Unknown SOLVER.WARMUP_METHOD '{warmup_method}'; valid: {', '.join(WARMUP_METHODS)}"
        )
    if warmup_iters < 0:
        raise ValueError(f"SOLVER.WARMUP_ITERS must be >= 0, got {warmup_iters}")
    if warmup_iters == 0:
        return scheduler
    if warmup_iters < max_iter:
        return WarmupParamScheduler(scheduler, warmup_factor, warmup_iters / max_iter,
                                    warmup_method)
    logger.warning(
        "SOLVER.WARMUP_ITERS=%d >= SOLVER.MAX_ITER=%d: the whole run is warmup",
        warmup_iters, max_iter,
    )
    start = warmup_factor * scheduler(0.0)
    if warmup_method == "constant":
        return LinearParamScheduler(start, start)  # constant, but valid at where == 1
    target = scheduler(1.0)
    return LinearParamScheduler(start, start + (target - start) * max_iter / warmup_iters)


def multistep_multiplier(steps: Sequence[int], gamma: float, max_iter: int) -> ParamScheduler:
    """Multiplier 1 until ``steps[0]``, then ``gamma``, ``gamma**2``... at each step (the LR
    used at iteration ``steps[k]`` is already decayed). Steps at or beyond ``max_iter`` never
    happen; they are dropped with a warning."""
    steps = [int(s) for s in steps]
    if sorted(set(steps)) != steps:
        raise ValueError(f"SOLVER.STEPS must be strictly increasing, got {steps}")
    if steps and steps[0] <= 0:
        raise ValueError(f"SOLVER.STEPS must be positive iterations, got {steps}")
    kept = [s for s in steps if s < max_iter]
    if len(kept) < len(steps):
        logger.warning(
            "SOLVER.STEPS %s has steps >= SOLVER.MAX_ITER=%d; they are ignored",
            [s for s in steps if s >= max_iter], max_iter,
        )
    return MultiStepParamScheduler(
        values=[gamma ** k for k in range(len(kept) + 1)],
        milestones=kept,
        num_updates=max_iter,
    )


def cosine_multiplier(end_factor: float) -> ParamScheduler:
    """Half-cosine from 1 at the start to ``end_factor`` at ``max_iter``."""
    return CosineParamScheduler(1.0, end_factor)


class LRMultiplier(torch.optim.lr_scheduler._LRScheduler):
    """``lr = base_lr * multiplier(last_epoch / max_iter)`` for every parameter group, where
    ``last_epoch`` counts iterations (call ``step()`` once per iteration).

    ``state_dict()`` holds only numbers and lists (loadable with ``weights_only=True``); the
    multiplier itself is rebuilt from the config, not pickled.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler,
                 max_iter: int, last_iter: int = -1):
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be an fvcore ParamScheduler, got {type(multiplier)}")
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_iter)

    def _factor(self) -> float:
        # iterations past max_iter (e.g. a run extended after resuming) keep the final value
        where = min(max(self.last_epoch, 0) / self._max_iter, 1.0)
        return float(self._multiplier(where))

    def get_lr(self) -> List[float]:
        factor = self._factor()
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {
            "base_lrs": [float(lr) for lr in self.base_lrs],
            "last_epoch": int(self.last_epoch),
            "_step_count": int(self._step_count),
            "_last_lr": [float(lr) for lr in getattr(self, "_last_lr", self.base_lrs)],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        unknown = set(state_dict) - {"base_lrs", "last_epoch", "_step_count", "_last_lr"}
        if unknown:
            raise KeyError(f"LRMultiplier state_dict has unexpected keys {sorted(unknown)}")
        if len(state_dict["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"LRMultiplier state has {len(state_dict['base_lrs'])} parameter groups, the "
                f"optimizer has {len(self.base_lrs)}"
            )
        self.__dict__.update(state_dict)

