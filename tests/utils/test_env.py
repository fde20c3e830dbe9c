"""Seeding and environment description."""
import logging
import random

import numpy as np
import torch

from detector.utils.env import collect_env_info, seed_all_rng


class _Collect(logging.Handler):
    """Collects a logger's records directly (independent of propagation to the root logger)."""

    def __init__(self, name, level=logging.INFO):
        super().__init__(logging.DEBUG)
        self.lines, self._log, self._level = [], logging.getLogger(name), level

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self):
        return "\n".join(self.lines)

    def __enter__(self):
        self._old_level = self._log.level
        self._log.setLevel(self._level)
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._log.removeHandler(self)
        self._log.setLevel(self._old_level)


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_all_rng_is_reproducible():
    assert seed_all_rng(123) == 123
    first = _draw()
    seed_all_rng(123)
    assert _draw() == first
    seed_all_rng(124)
    assert _draw() != first


def test_negative_seed_is_generated_and_logged():
    with _Collect("detector.utils.env") as logs:
        seed = seed_all_rng(-1)
    assert 0 <= seed < 2 ** 31
    assert f"random seed {seed}" in logs.text
    draws = _draw()
    seed_all_rng(seed)  # the logged seed repeats the run
    assert _draw() == draws


def test_collect_env_info():
    info = collect_env_info()
    assert torch.__version__ in info and "torchvision" in info
    assert "CUDA available" in info and "torch threads" in info
    assert len(info.splitlines()) < 20
