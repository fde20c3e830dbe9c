"""Seeding and environment description."""
import random
import threading

import numpy as np
import torch

from detector.utils.env import ThreadSwitch, collect_env_info, seed_all_rng
from log_capture import CollectLogs


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
    with CollectLogs("detector.utils.env") as logs:
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


def test_thread_switch_is_per_thread_and_restored():
    switch = ThreadSwitch()
    seen = []
    assert not switch.is_on()
    with switch.set():
        assert switch.is_on()
        other = threading.Thread(target=lambda: seen.append(switch.is_on()))
        other.start()
        other.join()
        with switch.set(False):
            assert not switch.is_on()
        assert switch.is_on()
    assert not switch.is_on() and seen == [False]
    try:
        with switch.set(True):
            raise KeyError("x")
    except KeyError:
        pass
    assert not switch.is_on()  # restored after an exception too
