"""The iteration loop with hooks, and trainers doing one optimization step per iteration.

``TrainerBase.train(start_iter, max_iter)`` runs, inside an ``EventStorage``::

    before_train() ; for iter in [start_iter, max_iter): before_step(); run_step(); after_step()
    after_train()   # also after an exception

``self.iter`` is the iteration being run; after a complete run it equals ``max_iter`` (hooks use
this to tell success from failure).

Stopping early: ``request_stop(signum)`` (called by the ``StopOnSignal`` hook's signal handler,
which does nothing else) makes the loop end after the current iteration, hooks included. With
several processes the request is combined over ranks after every iteration (an all-reduce MAX
of one integer), so every rank ends after the same iteration even if only one got the signal.
``after_train`` then runs as after a failure (``iter`` < ``max_iter``: no final evaluation),
the ``PeriodicCheckpointer`` hook writes ``model_<iter>.pth`` on rank 0, the ranks wait for each
other, one line is logged and :class:`TrainingInterrupted` is raised: a ``SystemExit`` with
status 128 + the signal number (130 SIGINT, 138 SIGUSR1, 143 SIGTERM), as a shell reports a
process killed by that signal. The checkpoint holds the iteration the loop stopped after;
``--resume`` continues at the next one.
"""
import logging
import math
import signal
import time
import weakref
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from detector.utils import comm, seeding
from detector.utils.events import EventStorage, get_event_storage

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer", "TrainingInterrupted",
           "signal_exit_status"]

logger = logging.getLogger(__name__)


def signal_exit_status(signum: int) -> int:
    """128 + ``signum``: the status with which training stopped by that signal exits."""
    return 128 + int(signum)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(SystemExit):
    """Training stopped early on request (a signal), after saving its state. A ``SystemExit``
    so that, uncaught, the process exits quietly with ``code`` = 128 + signal number; generic
    ``except Exception`` handlers do not swallow it.

    Attributes:
        signum: the signal that asked for the stop.
        iteration: the last iteration completed (None: stopped outside the training loop).
    """

    def __init__(self, signum: int, iteration: Optional[int] = None):
        super().__init__(signal_exit_status(signum))
        self.signum = int(signum)
        self.iteration = iteration

    @property
    def signal_name(self) -> str:
        return _signal_name(self.signum)


class HookBase:
    """Called by the trainer around training and each iteration. ``self.trainer`` is a weak
    proxy of the trainer, set by ``TrainerBase.register_hooks``."""

    trainer: "TrainerBase" = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        """Resumable state of the hook (plain numbers/lists); empty by default."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class TrainerBase:
    """Runs the loop and the hooks; subclasses implement ``run_step``."""

    def __init__(self) -> None:
        self._hooks: List[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: Optional[EventStorage] = None
        # signal number of a pending stop request (0: none); set from signal handlers
        self._stop_request: int = 0
        # the signal the ranks agreed to stop on, once the loop has stopped early
        self.stop_signal: Optional[int] = None
        # file holding the state at the early stop, set by the hook that saved it
        self.stop_checkpoint: Optional[str] = None

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Append hooks (None entries are skipped); they run in registration order."""
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"Hooks must be HookBase instances, got {type(h).__name__}")
            # a weak proxy avoids a trainer <-> hook reference cycle
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        Raises:
            TrainingInterrupted: ``request_stop`` was called; the loop ended after the current
                iteration and ``after_train`` ran (see the module docstring).
        """
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = int(start_iter)
        self.max_iter = int(max_iter)
        self.stop_signal = self.stop_checkpoint = None
        self._stop_request = 0
        with EventStorage(start_iter) as self.storage:
            failed = True
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    agreed = self._agreed_stop_request()
                    if agreed:
                        self.stop_signal = agreed
                        logger.info("%s received: stopping after iteration %d",
                                    _signal_name(agreed), self.iter)
                        break
                else:
                    # marks a complete run for after_train (the loop leaves iter at max_iter - 1)
                    self.iter = self.max_iter
                failed = False
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                if failed:
                    try:  # a hook error must not hide the training error being raised
                        self.after_train()
                    except Exception:  # noqa: BLE001
                        logger.exception("after_train also failed")
                else:
                    self.after_train()
        if self.stop_signal is not None:
            self._exit_after_stop()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask ``train`` to stop after the current iteration. Only records the request, so it
        may be called from a signal handler; the first request's signal is kept."""
        if not self._stop_request:
            self._stop_request = int(signum)

    def _agreed_stop_request(self) -> int:
        """The stop request combined over ranks (the largest signal number, 0 = go on). Every
        rank calls this after every iteration, so all of them stop after the same one."""
        if comm.get_world_size() == 1:
            return self._stop_request
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([self._stop_request], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _exit_after_stop(self) -> None:
        # rank 0 may still be writing the checkpoint: no rank exits (and has its launcher stop
        # the others) before it is complete
        comm.synchronize()
        saved = (f", saved {self.stop_checkpoint} (continue with --resume)"
                 if self.stop_checkpoint else "")
        logger.info("Stopped by %s after iteration %d%s; exiting with status %d",
                    _signal_name(self.stop_signal), self.iter, saved,
                    signal_exit_status(self.stop_signal))
        raise TrainingInterrupted(self.stop_signal, self.iter)

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        # every hook gets its after_train even if an earlier one fails
        errors = []
        for h in self._hooks:
            try:
                h.after_train()
            except Exception as err:  # noqa: BLE001 - re-raised below
                logger.exception("Hook %s failed in after_train", type(h).__name__)
                errors.append(err)
        if errors:
            raise errors[0]

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.before_step()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        ret = {"iteration": self.iter}
        hooks_state = {}
        for h in self._hooks:
            sd = h.state_dict()
            if sd:
                hooks_state[type(h).__qualname__] = sd
        if hooks_state:
            ret["hooks"] = hooks_state
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        self.iter = int(state_dict["iteration"])
        for key, value in state_dict.get("hooks", {}).items():
            for h in self._hooks:
                if type(h).__qualname__ == key:
                    h.load_state_dict(value)
                    break
            else:
                logger.warning("No hook '%s' to restore its saved state into", key)


class SimpleTrainer(TrainerBase):
    """One step: next batch from ``data_loader`` -> ``model(batch)`` (a dict of scalar losses)
    -> finiteness check -> backward -> optional gradient clipping -> ``optimizer.step()``.

    Args:
        model: in training mode, returns ``dict[str, Tensor]`` of losses (or a single Tensor).
        data_loader: an iterable; it is iterated once (must be infinite for long runs).
        optimizer: a torch optimizer.
        grad_clipper: ``callable(params)``, e.g. from ``build_gradient_clipper``; if it returns
            a tensor (the total norm) it is logged as "grad_norm".
        seed: with a seed, torch's global generator is re-seeded before every step's forward
            from (seed, iteration, rank); the seed is part of the state.
    """

    def __init__(self, model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                 *, grad_clipper: Optional[Callable] = None, seed: Optional[int] = None):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj = None
        self.optimizer = optimizer
        self.grad_clipper = grad_clipper
        self.seed = None if seed is None else int(seed)

    def _seed_step(self) -> None:
        """Re-seed torch's global generator (dropout, drop path) from (seed, iteration, rank),
        so that a resumed run draws what the uninterrupted one did (see utils.seeding)."""
        if self.seed is not None:
            torch.manual_seed(seeding.step_seed(self.seed, self.iter, comm.get_rank()))

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:  # created lazily: workers start on first use
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def _next_batch(self):
        start = time.perf_counter()
        try:
            data = next(self._data_loader_iter)
        except StopIteration:
            raise RuntimeError(
                f"The training data loader ran out of data at iteration {self.iter}; it must be "
                "infinite (or at least max_iter - start_iter batches long)"
            ) from None
        return data, time.perf_counter() - start

    @staticmethod
    def _sum_losses(loss_dict):
        if isinstance(loss_dict, torch.Tensor):
            return loss_dict, {"total_loss": loss_dict}
        if not isinstance(loss_dict, dict) or not loss_dict:
            raise TypeError(
                f"The model must return a non-empty dict of losses in training mode, got "
                f"{type(loss_dict).__name__}"
            )
        return sum(v.float() for v in loss_dict.values()), loss_dict

    def _check_and_reduce(self, loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Losses averaged over ranks (for logging). Raises FloatingPointError on every rank if
        any rank's loss is not finite, before any weight is touched."""
        detached = {k: v.detach().float() for k, v in loss_dict.items()}
        reduced = comm.reduce_dict(detached, average=True)
        values = {k: float(v) for k, v in reduced.items()}
        if not all(math.isfinite(v) for v in values.values()):
            local = {k: float(v) for k, v in detached.items()}
            world = comm.get_world_size()
            across = f"; mean over {world} ranks = {values}" if world > 1 else ""
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={self.iter}! loss_dict = {local}{across}"
            )
        return values

    def _write_metrics(self, loss_values: Dict[str, float], data_time: float,
                       grad_norm: Optional[torch.Tensor] = None) -> None:
        storage = get_event_storage()
        storage.put_scalar("data_time", data_time)
        if len(loss_values) > 1 or "total_loss" not in loss_values:
            storage.put_scalar("total_loss", sum(loss_values.values()))
        storage.put_scalars(**loss_values)
        if isinstance(grad_norm, torch.Tensor):
            storage.put_scalar("grad_norm", grad_norm.item())

    def _params_to_clip(self):
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def run_step(self) -> None:
        if not self.model.training:
            raise RuntimeError("SimpleTrainer.run_step: the model is in eval mode")
        data, data_time = self._next_batch()
        self._seed_step()
        loss_dict = self.model(data)
        losses, loss_dict = self._sum_losses(loss_dict)
        loss_values = self._check_and_reduce(loss_dict)
        self.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        grad_norm = self.grad_clipper(self._params_to_clip()) if self.grad_clipper else None
        self.optimizer.step()
        self._write_metrics(loss_values, data_time, grad_norm)

    def state_dict(self) -> dict:
        # the optimizer is saved by the checkpointer under its own key
        ret = super().state_dict()
        if self.seed is not None:
            ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.seed is not None and "seed" in state_dict:
            self.seed = int(state_dict["seed"])


class AMPTrainer(SimpleTrainer):
    """SimpleTrainer under ``torch.autocast``: float16 with a GradScaler on CUDA, bfloat16
    without a scaler elsewhere (CPU). The device type is taken from the model's parameters."""

    def __init__(self, model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                 *, grad_clipper: Optional[Callable] = None, grad_scaler=None,
                 seed: Optional[int] = None):
        super().__init__(model, data_loader, optimizer, grad_clipper=grad_clipper, seed=seed)
        self.device_type = comm.model_device(model).type
        if self.device_type == "cuda":
            self.amp_dtype = torch.float16
            self.grad_scaler = grad_scaler or torch.amp.GradScaler("cuda")
        else:
            self.amp_dtype = torch.bfloat16
            self.grad_scaler = grad_scaler
        logger.info("AMP training: autocast(%s, %s)%s", self.device_type, self.amp_dtype,
                    " with GradScaler" if self.grad_scaler is not None else "")

    def run_step(self) -> None:
        if not self.model.training:
            raise RuntimeError("AMPTrainer.run_step: the model is in eval mode")
        data, data_time = self._next_batch()
        self._seed_step()
        with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype):
            loss_dict = self.model(data)
        losses, loss_dict = self._sum_losses(loss_dict)
        loss_values = self._check_and_reduce(loss_dict)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        grad_norm = None
        if scaler is not None:
            scaler.scale(losses).backward()
            if self.grad_clipper:
                scaler.unscale_(self.optimizer)  # clip the true gradients
                grad_norm = self.grad_clipper(self._params_to_clip())
            scaler.step(self.optimizer)
            scaler.update()
        else:
            losses.backward()
            if self.grad_clipper:
                grad_norm = self.grad_clipper(self._params_to_clip())
            self.optimizer.step()
        self._write_metrics(loss_values, data_time, grad_norm)

    def state_dict(self) -> dict:
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
