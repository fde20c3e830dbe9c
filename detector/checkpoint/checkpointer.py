"""Safe, atomic checkpoints built on fvcore's Checkpointer.

- Saving writes to a temporary file in the target folder, fsyncs it and renames it over the
  final name, so a crash never leaves a truncated checkpoint or ``last_checkpoint`` behind.
  The file gets the mode any new file of the process gets (0666 minus the umask, as
  metrics.json and config.yaml), not the 0600 of a temporary file. Only the main process writes.
- Resuming takes the newest checkpoint in the folder that loads: a truncated or corrupt file is
  skipped with a warning naming it (see ``DetectionCheckpointer.resume_or_load``).
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

# <prefix>_<iteration, 7 digits>.pth, the names PeriodicCheckpointer writes
_PERIODIC_NAME = r"^{prefix}_(\d{{7}})\.pth$"


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


def _current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, which briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write, mode: str) -> None:
    """``write(f)`` into a temporary file next to ``path`` (its folder is created if needed),
    fsync, give it the mode of a regular new file, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                    suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; open() would have created 0666 & ~umask
        os.chmod(tmp_path, 0o666 & ~_current_umask())
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
        # the file the last resume_or_load() resumed from (None: it did not resume)
        self.resumed_from: Optional[str] = None

    # ----------------------------------------------------------------------------- saving
    def save(self, name: str, *, tag_last: bool = True, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically and, with ``tag_last``, tag it in
        ``last_checkpoint`` (the file ``--resume`` continues from); extra keyword arguments (e.g.
        ``iteration``) are stored as top-level entries."""
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
        if tag_last:
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
        return self._restore(self._load_file(path), path, checkpointables)

    def _restore(self, checkpoint: Dict[str, Any], path: str,
                 checkpointables: Optional[List[str]]) -> Dict[str, Any]:
        """Load an already read checkpoint into the model and checkpointables (see load)."""
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

    def candidate_checkpoints(self, file_prefix: str = "model") -> List[str]:
        """Checkpoints in ``save_dir`` to resume from, newest first: the file named in
        ``last_checkpoint`` (the last one written), then ``<prefix>_<iteration>.pth`` by
        iteration, highest first, then ``<prefix>_final.pth``. Only existing files are listed."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        pattern = re.compile(_PERIODIC_NAME.format(prefix=re.escape(file_prefix)))
        periodic = []
        for fname in os.listdir(self.save_dir):
            match = pattern.match(fname)
            if match:
                periodic.append((int(match.group(1)), fname))
        names = [fname for _, fname in sorted(periodic, reverse=True)]
        names.append(f"{file_prefix}_final.pth")
        hint = self.get_checkpoint_file()
        if hint:
            names.insert(0, os.path.basename(hint))
            if not os.path.isfile(os.path.join(self.save_dir, names[0])):
                self.logger.warning("%s names %s, which does not exist",
                                    os.path.join(self.save_dir, "last_checkpoint"), names[0])
        ordered = []
        for fname in names:
            path = os.path.join(self.save_dir, fname)
            if path not in ordered and os.path.isfile(path):
                ordered.append(path)
        return ordered

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume``: load the newest checkpoint of ``save_dir`` that can be read (model and
        all checkpointables; see ``candidate_checkpoints``). A truncated, corrupt or unreadable
        file is skipped with a warning naming it. Without ``resume``, or when no checkpoint in
        ``save_dir`` can be read (a warning then says so), only the model is loaded from ``path``
        ("" keeps the initialization). ``resumed_from`` is set to the file resumed from, or None.

        Returns:
            the entries of the checkpoint not restored into an object (e.g. ``iteration``).
        """
        self.resumed_from = None
        if resume:
            skipped = []
            for candidate in self.candidate_checkpoints():
                try:
                    checkpoint = self._load_file(candidate)
                except (CheckpointError, OSError) as err:  # the message names the file
                    self.logger.warning("Skipping a checkpoint that cannot be read: %s", err)
                    skipped.append(os.path.basename(candidate))
                    continue
                if skipped:
                    self.logger.warning("Resuming from %s instead of the newer %s, which cannot "
                                        "be read", candidate, ", ".join(skipped))
                self.logger.info("Resuming from checkpoint %s", candidate)
                self.restored = []
                self.resumed_from = candidate
                return self._restore(checkpoint, candidate, None)
            if skipped:
                self.logger.warning(
                    "No checkpoint in %s can be read (skipped %s); starting from %s",
                    self.save_dir, ", ".join(skipped),
                    f"MODEL.WEIGHTS {path}" if path else "scratch (no MODEL.WEIGHTS)")
        return self.load(path, checkpointables=[])

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
        self._last_saved = None  # (iteration, path) of the newest file written

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
        if (iteration + 1) % self.period == 0:
            self._save_numbered(iteration, **kwargs)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self._save(f"{self.file_prefix}_final", iteration, **kwargs)

    def save_now(self, iteration: int, **kwargs: Any) -> str:
        """Save ``<prefix>_<iteration>.pth`` outside the period (e.g. when training stops early),
        unless ``step`` already saved this iteration; it is pruned like a periodic file.
        Returns the path of the file holding this iteration."""
        iteration = int(iteration)
        if self._last_saved is not None and self._last_saved[0] == iteration:
            return self._last_saved[1]
        return self._save_numbered(iteration, **kwargs)

    def _save(self, name: str, iteration: int, **kwargs: Any) -> str:
        self.checkpointer.save(name, iteration=iteration, **kwargs)
        path = os.path.join(self.checkpointer.save_dir, name + ".pth")
        self._last_saved = (iteration, path)
        return path

    def _save_numbered(self, iteration: int, **kwargs: Any) -> str:
        if self.max_to_keep is not None and not self._scanned:
            self.recent_checkpoints = self._existing_older(iteration)
            self._scanned = True
        path = self._save(f"{self.file_prefix}_{iteration:07d}", iteration, **kwargs)
        if self.max_to_keep is not None and self.checkpointer.save_to_disk:
            if path not in self.recent_checkpoints:
                self.recent_checkpoints.append(path)
            while len(self.recent_checkpoints) > self.max_to_keep:
                old = self.recent_checkpoints.pop(0)
                if os.path.isfile(old):
                    os.remove(old)
                    logger.info("Deleted old checkpoint %s", old)
        return path
