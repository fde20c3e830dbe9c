"""Random seeds, the cache folder, per-thread switches and a short description of the software
environment."""
import contextlib
import logging
import os
import platform
import random
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

__all__ = ["seed_all_rng", "collect_env_info", "get_cache_dir", "ThreadSwitch"]

logger = logging.getLogger(__name__)


class ThreadSwitch:
    """An on/off setting of the calling thread (off until set), set for a block of code with
    ``with switch.set(enabled): ...``; the previous value returns after the block."""

    def __init__(self):
        self._local = threading.local()

    def is_on(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def set(self, enabled: bool = True):
        previous = self.is_on()
        self._local.on = bool(enabled)
        try:
            yield
        finally:
            self._local.on = previous


def get_cache_dir() -> str:
    """Where generated datasets and compiled CPU kernels go: $DETECTOR_CACHE, or
    ~/.cache/detector."""
    return os.path.expanduser(os.environ.get("DETECTOR_CACHE") or "~/.cache/detector")


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seed python's ``random``, numpy and torch (all devices) with ``seed`` and return it.

    ``None`` or a negative seed picks one from the time, the pid and os.urandom and logs it,
    so a run can be repeated with SEED set to the logged value.
    """
    if seed is None or seed < 0:
        seed = (
            os.getpid() + int(time.time() * 1000) + int.from_bytes(os.urandom(2), "big")
        ) % (2 ** 31)
        logger.info("Using a generated random seed %d", seed)
    else:
        logger.info("Using seed %d", seed)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # inherited by worker subprocesses
    return seed


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def collect_env_info() -> str:
    """A few lines: platform, python, detector, torch (+ CUDA devices), torchvision, fvcore,
    numpy and thread counts."""
    import detector

    rows = [
        ("sys.platform", sys.platform + " " + platform.machine()),
        ("Python", sys.version.replace("\n", " ")),
        ("detector", f"{detector.__version__} @ {os.path.dirname(detector.__file__)}"),
        ("PyTorch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torchvision", _version("torchvision")),
        ("fvcore", _version("fvcore")),
        ("numpy", np.__version__),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows.append(("CUDA (torch build)", str(torch.version.cuda)))
        for idx in range(torch.cuda.device_count()):
            rows.append((f"GPU {idx}", torch.cuda.get_device_name(idx)))
    rows.append(("CPU cores (os)", str(os.cpu_count())))
    rows.append(("torch threads", str(torch.get_num_threads())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
