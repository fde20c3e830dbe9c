"""Warmup + multistep / cosine learning rates against hand-computed values, and resumable state."""
import logging
import math

import pytest
import torch
from torch import nn

from detector.config import get_cfg
from detector.solver import build_lr_scheduler
from log_capture import CollectLogs

BASE_LR = 0.1


def _cfg(name="WarmupMultiStepLR", **solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = BASE_LR
    cfg.SOLVER.LR_SCHEDULER_NAME = name
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.STEPS = (30, 60)
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.WARMUP_METHOD = "linear"
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _optimizer(bias_lr=None):
    model = nn.Linear(2, 2)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": bias_lr or BASE_LR}]
    return torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9)


def _lrs(cfg, n_iters, optimizer=None):
    """LR of group 0 used at iterations 0..n_iters (scheduler stepped after each iteration)."""
    optimizer = optimizer or _optimizer()
    sched = build_lr_scheduler(cfg, optimizer)
    out = []
    for _ in range(n_iters + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return out


def test_warmup_multistep_values():
    lrs = _lrs(_cfg(), 100)
    expect = {
        0: 0.1 * 0.001,
        5: 0.1 * (0.001 + 0.999 * 5 / 10),
        9: 0.1 * (0.001 + 0.999 * 9 / 10),
        10: 0.1, 29: 0.1,
        30: 0.01, 59: 0.01,
        60: 0.001, 99: 0.001, 100: 0.001,
    }
    for it, lr in expect.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-6), f"iteration {it}"


def test_warmup_cosine_values():
    lrs = _lrs(_cfg("WarmupCosineLR", COSINE_END_FACTOR=0.1), 100)

    def cosine(where):  # multiplier from 1 to 0.1
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * where))

    at_warmup_end = cosine(10 / 100)
    expect = {
        0: 0.1 * 0.001,
        5: 0.1 * (0.001 + (at_warmup_end - 0.001) * 0.5),
        10: 0.1 * at_warmup_end,
        50: 0.1 * 0.55,
        75: 0.1 * cosine(0.75),
        100: 0.1 * 0.1,
    }
    for it, lr in expect.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-6), f"iteration {it}"
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine must decay monotonically"


def test_constant_warmup_and_bias_lr_group():
    optimizer = _optimizer(bias_lr=0.2)
    sched = build_lr_scheduler(_cfg(WARMUP_METHOD="constant"), optimizer)
    for it in range(12):
        lr_w, lr_b = (g["lr"] for g in optimizer.param_groups)
        expected = 0.001 if it < 10 else 1.0
        assert lr_w == pytest.approx(0.1 * expected) and lr_b == pytest.approx(0.2 * expected)
        optimizer.step()
        sched.step()


def test_no_warmup_and_warmup_longer_than_run():
    lrs = _lrs(_cfg(WARMUP_ITERS=0), 31)
    assert lrs[0] == pytest.approx(0.1) and lrs[31] == pytest.approx(0.01)
    with CollectLogs("detector.solver.lr_scheduler", logging.WARNING) as logs:
        cfg = _cfg(MAX_ITER=4, STEPS=(), WARMUP_ITERS=10)
        lrs = _lrs(cfg, 4)
    assert "WARMUP_ITERS=10" in logs.text
    # the ramp keeps its slope: cut at MAX_ITER, not squeezed into it
    assert lrs[2] == pytest.approx(0.1 * (0.001 + 0.999 * 2 / 10))


def test_steps_beyond_max_iter_warn():
    with CollectLogs("detector.solver.lr_scheduler", logging.WARNING) as logs:
        lrs = _lrs(_cfg(STEPS=(30, 200)), 100)
    assert "200" in logs.text and "MAX_ITER" in logs.text
    assert lrs[99] == pytest.approx(0.01)


@pytest.mark.parametrize("key,value,match", [
    ("LR_SCHEDULER_NAME", "WarmupPolyLR", "LR_SCHEDULER_NAME 'WarmupPolyLR'"),
    ("WARMUP_METHOD", "exp", "WARMUP_METHOD 'exp'"),
    ("STEPS", (60, 30), "strictly increasing"),
    ("MAX_ITER", 0, "SOLVER.MAX_ITER must be a positive"),
])
def test_bad_config_is_one_line_error(key, value, match):
    cfg = _cfg(**{key: value})
    with pytest.raises(ValueError, match=match) as err:
        build_lr_scheduler(cfg, _optimizer())
    assert "\n" not in str(err.value)


def test_state_dict_weights_only_and_resume(tmp_path):
    cfg = _cfg("WarmupCosineLR")
    opt_a = _optimizer()
    sched_a = build_lr_scheduler(cfg, opt_a)
    for _ in range(37):
        opt_a.step()
        sched_a.step()
    path = tmp_path / "sched.pth"
    torch.save({"scheduler": sched_a.state_dict(), "optimizer": opt_a.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["scheduler"]["last_epoch"] == 37

    opt_b = _optimizer()
    sched_b = build_lr_scheduler(cfg, opt_b)
    opt_b.load_state_dict(loaded["optimizer"])
    sched_b.load_state_dict(loaded["scheduler"])
    assert sched_b.last_epoch == 37
    for _ in range(20):
        assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])
        for opt, sched in ((opt_a, sched_a), (opt_b, sched_b)):
            opt.step()
            sched.step()
