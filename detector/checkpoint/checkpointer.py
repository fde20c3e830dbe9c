"""Safe, atomic checkpoints built on fvcore's Checkpointer.

- Saving writes to a temporary file in the target folder, fsyncs it and renames it over the
  final name, so a crash never leaves a truncated checkpoint or ``last_checkpoint`` behind.
  Only the main process writes.
- Loading uses ``torch.load(weights_only=True)``: files holding arbitrary Python objects are
  refused (never executed); corrupt files give a one-line error naming the file.
- A checkpoint may be ``{"model": state_dict, ...}`` (ours), a bare state_dict, or
  ``{"state_dict": ...}``; a DDP "module." prefix is stripped.
"""
import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch
from fvcore.common.checkpoint import Checkpointer
from fvcore.common.checkpoint import PeriodicCheckpointer as _FvPeriodicCheckpointer
from torch import nn

from detector.utils import comm

__all__ = ["DetectionCheckpointer", "PeriodicCheckpointer", "CheckpointError",
           "load_checkpoint_file", "atomic_torch_save"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot or must not be loaded; the message names the file."""


def _first_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[0].split()) if str(text).strip() else ""


def _unsafe_detail(err: Exception) -> str:
    """The informative line of torch's long weights_only refusal message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln.rstrip(".")
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln and i + 1 < len(lines):
            return lines[i + 1].rstrip(".")
    return "it is not a plain tensor/number checkpoint"


def load_checkpoint_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors naming ``path``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file holds objects other than tensors/numbers/containers
            (refused without running any of its code), or is corrupt/truncated.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 are a bare pickle (protocol >= 2)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(f"Cannot read checkpoint {path}: not a torch checkpoint (neither a "
                              f"zip archive nor a pickle; starts with {magic!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        import pickle

        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise CheckpointError(
                f"Refusing to load checkpoint {path}: {_unsafe_detail(err)}; only checkpoints "
                "of tensors, numbers and containers are accepted (weights_only=True)"
            ) from None
        raise CheckpointError(
            f"Cannot read checkpoint {path} (corrupt or truncated?): "
            f"{type(err).__name__}: {_first_line(str(err).split('. ')[0])}"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _atomic_write(path: str, write, mode: str) -> None:
    """``write(f)`` into a temporary file next to ``path`` (its folder is created if needed),
    fsync, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                    suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save that leaves either the old file or the complete new one, never a torn one."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def _atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (best effort; not possible on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DetectionCheckpointer(Checkpointer):
    """Saves and loads ``{"model", "optimizer", "scheduler", <checkpointables>..., **extra}``.

    Args:
        model: the model; a DDP/DataParallel wrapper is unwrapped, so keys never carry "module.".
        save_dir: folder of the checkpoints and of the ``last_checkpoint`` tag.
        save_to_disk: default: only on the main process.
        optimizer, scheduler, **checkpointables: objects with state_dict()/load_state_dict().
            If no ``optimizer`` is given but a ``trainer`` checkpointable has an ``optimizer``
            attribute, that optimizer is saved under "optimizer".
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *,
                 save_to_disk: Optional[bool] = None, optimizer=None, scheduler=None,
                 **checkpointables: Any):
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        trainer_optimizer = getattr(checkpointables.get("trainer"), "optimizer", None)
        if optimizer is None and isinstance(trainer_optimizer, torch.optim.Optimizer):
            optimizer = trainer_optimizer
        ordered = {}
        if optimizer is not None:
            ordered["optimizer"] = optimizer
        if scheduler is not None:
            ordered["scheduler"] = scheduler
        ordered.update(checkpointables)
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **ordered)
        self.logger = logger
        # names of the checkpointables the last load() restored
        self.restored: List[str] = []

    # ----------------------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically and tag it in ``last_checkpoint``; extra
        keyword arguments (e.g. ``iteration``) are stored as top-level entries."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"Checkpoint name must be a plain file name, got '{name}'")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)
        # logged after the rename: a reader seeing this line finds a complete file
        self.logger.info("Saved checkpoint to %s", save_file)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    # ---------------------------------------------------------------------------- loading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load the model (and the named checkpointables, default all present) from ``path``;
        returns the remaining entries (e.g. ``{"iteration": 19}``). An empty path loads nothing."""
        self.restored = []
        if not path:
            self.logger.info("No checkpoint given: the model keeps its initialization")
            return {}
        if not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise FileNotFoundError(f"Checkpoint not found: {path}")
            path = local
        self.logger.info("Loading checkpoint from %s", path)
        checkpoint = self._load_file(path)
        incompatible = self._load_model(checkpoint)
        self._log_incompatible_keys(incompatible)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.logger.info("Loading %s state from %s", key, path)
                try:
                    self.checkpointables[key].load_state_dict(checkpoint.pop(key))
                except (KeyError, ValueError, RuntimeError) as err:
                    raise CheckpointError(
                        f"Checkpoint {path}: cannot restore '{key}': {_first_line(err)}"
                    ) from None
                self.restored.append(key)
        return checkpoint

    def _load_file(self, filename: str) -> Dict[str, Any]:
        loaded = load_checkpoint_file(filename)
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
            return dict(loaded)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            rest = {k: v for k, v in loaded.items() if k != "state_dict"}
            return {"model": loaded["state_dict"], **rest}
        if _is_state_dict(loaded):
            return {"model": loaded}
        keys = sorted(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointError(
            f"Checkpoint {filename} has no model weights: expected a state_dict or a dict with "
            f"'model'; found {keys}"
        )

    def _load_model(self, checkpoint: Dict[str, Any]):
        state_dict = checkpoint["model"]
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"Checkpoint model entry '{bad[0]}' is not a tensor")
        # fvcore strips "module." only when every key has it; log when that happens
        if state_dict and all(k.startswith("module.") for k in state_dict):
            self.logger.info("Stripping the DDP 'module.' prefix from checkpoint keys")
        return super()._load_model(checkpoint)


_PERIODIC_NAME = r"^{prefix}_(\d{{7}})\.pth$"


class PeriodicCheckpointer(_FvPeriodicCheckpointer):
    """Saves ``<prefix>_<iteration:07d>.pth`` every ``period`` iterations and
    ``<prefix>_final.pth`` at ``max_iter - 1``; keeps the newest ``max_to_keep`` periodic files
    (None or 0: keep all). Periodic files already in the folder from earlier (resumed) runs
    count as older ones; files of later iterations, left by another run, are never touched."""

    def __init__(self, checkpointer: Checkpointer, period: int, max_iter: Optional[int] = None,
                 max_to_keep: Optional[int] = None, file_prefix: str = "model"):
        if int(period) <= 0:
            raise ValueError(f"Checkpoint period must be positive, got {period}")
        if max_to_keep is not None and max_to_keep < 0:
            raise ValueError(f"max_to_keep must be >= 0 (0 keeps all), got {max_to_keep}")
        super().__init__(checkpointer, period, max_iter=max_iter,
                         max_to_keep=max_to_keep or None, file_prefix=file_prefix)
        self._pattern = re.compile(_PERIODIC_NAME.format(prefix=re.escape(file_prefix)))
        self._scanned = False

    def _existing_older(self, iteration: int) -> List[str]:
        """Periodic checkpoints on disk from iterations before ``iteration``, oldest first."""
        save_dir = self.checkpointer.save_dir
        if not save_dir or not os.path.isdir(save_dir):
            return []
        found = []
        for fname in os.listdir(save_dir):
            m = self._pattern.match(fname)
            if m and int(m.group(1)) < iteration:
                found.append((int(m.group(1)), os.path.join(save_dir, fname)))
        return [p for _, p in sorted(found)]

    def step(self, iteration: int, **kwargs: Any) -> None:
        """Save if ``iteration`` (0-based, the one just finished) is due; prune old files."""
        iteration = int(iteration)
        extra = {"iteration": iteration, **kwargs}
        if (iteration + 1) % self.period == 0:
            if self.max_to_keep is not None and not self._scanned:
                self.recent_checkpoints = self._existing_older(iteration)
                self._scanned = True
            name = f"{self.file_prefix}_{iteration:07d}"
            self.checkpointer.save(name, **extra)
            if self.max_to_keep is not None and self.checkpointer.save_to_disk:
                path = os.path.join(self.checkpointer.save_dir, name + ".pth")
                if path not in self.recent_checkpoints:
                    self.recent_checkpoints.append(path)
                while len(self.recent_checkpoints) > self.max_to_keep:
                    old = self.recent_checkpoints.pop(0)
                    if os.path.isfile(old):
                        os.remove(old)
                        logger.info("Deleted old checkpoint %s", old)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", **extra)
