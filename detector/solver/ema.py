"""Exponential moving average (EMA) of model weights, as EfficientDet trains with (decay 0.9998).

Hooking it into a training loop::

    ema = ModelEMA(model, decay=cfg.SOLVER.EMA.DECAY)   # after the model is built/loaded
    ...                                                # each iteration, after optimizer.step():
    ema.update(model)
    ...                                                # evaluate / export the averaged weights:
    evaluate(ema.module)
    checkpoint["ema"] = ema.state_dict()               # resume: ema.load_state_dict(...)
"""
import copy
from typing import Dict

import torch
from torch import nn

from detector.utils import comm

__all__ = ["ModelEMA"]


class ModelEMA:
    """A copy of ``model`` whose floating-point parameters and buffers (BatchNorm statistics too)
    follow ``ema = d * ema + (1 - d) * current`` after every :meth:`update`; integer buffers
    (``num_batches_tracked``) are copied.

    Args:
        model: the trained model (a DDP/DataParallel wrapper is unwrapped).
        decay: d, per update (SOLVER.EMA.DECAY).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update n, as TensorFlow's
            ``ExponentialMovingAverage(num_updates=step)`` in the original EfficientDet, so short
            runs and early checkpoints are not dominated by the initial weights.

    ``module`` is the averaged model, in eval mode, without gradients; it lives on the device of
    ``model``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY={decay} must be in [0, 1)")
        self.module = copy.deepcopy(comm.unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        decay = self.current_decay()
        current = comm.unwrap_model(model).state_dict()
        averaged = self.module.state_dict()
        if current.keys() != averaged.keys():
            missing = sorted(set(averaged) ^ set(current))[:5]
            raise ValueError(f"ModelEMA.update: the model's state dict keys differ from the "
                             f"averaged copy's (e.g. {missing})")
        floats_ema, floats_cur = [], []
        for name, ema_value in averaged.items():
            value = current[name].detach()
            if ema_value.is_floating_point():
                floats_ema.append(ema_value)
                floats_cur.append(value.to(ema_value.dtype))
            else:
                ema_value.copy_(value)
        if floats_ema:
            torch._foreach_lerp_(floats_ema, floats_cur, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current weights (e.g. after loading
        MODEL.WEIGHTS into it), with the warm-up from the beginning."""
        self.module.load_state_dict(comm.unwrap_model(model).state_dict())
        self.num_updates = 0

    def state_dict(self) -> Dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates,
                "decay": self.decay}

    def load_state_dict(self, state_dict: Dict) -> None:
        """Restore :meth:`state_dict`; the decay stays the configured one."""
        if not isinstance(state_dict, dict) or "module" not in state_dict:
            raise ValueError("EMA state must be a dict with 'module' and 'num_updates'")
        self.module.load_state_dict(state_dict["module"])
        self.num_updates = int(state_dict.get("num_updates", 0))
