"""Hook call order, evaluation schedule, LR/timer/checkpoint hooks, the metric writers and
stopping on a signal."""
import itertools
import json
import logging
import os
import signal

import pytest
import torch
from torch import nn

from detector.checkpoint.checkpointer import DetectionCheckpointer
from detector.config import get_cfg
from detector.engine import hooks
from detector.engine.train_loop import HookBase, SimpleTrainer, TrainingInterrupted
from detector.solver import build_lr_scheduler
from detector.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from log_capture import CollectLogs


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss_cls": (self.linear(x) - y).pow(2).mean(),
                "loss_box_reg": self.linear.weight.abs().sum()}


def _trainer(lr=0.01):
    torch.manual_seed(0)
    model = Regression()
    x = torch.randn(8, 2)
    data = itertools.repeat((x, x.sum(1, keepdim=True)))
    return SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=lr))


class Recorder(HookBase):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def before_train(self):
        self.calls.append((self.name, "before_train", self.trainer.iter))

    def before_step(self):
        self.calls.append((self.name, "before_step", self.trainer.iter))

    def after_step(self):
        self.calls.append((self.name, "after_step", self.trainer.iter))

    def after_train(self):
        self.calls.append((self.name, "after_train", self.trainer.iter))


def test_hooks_called_in_order():
    calls = []
    trainer = _trainer()
    trainer.register_hooks([Recorder("a", calls), Recorder("b", calls)])
    trainer.train(5, 7)
    expected = [("a", "before_train", 5), ("b", "before_train", 5)]
    for it in (5, 6):
        expected += [("a", "before_step", it), ("b", "before_step", it),
                     ("a", "after_step", it), ("b", "after_step", it)]
    expected += [("a", "after_train", 7), ("b", "after_train", 7)]
    assert calls == expected


def test_callback_hook_receives_trainer():
    seen = []
    trainer = _trainer()
    trainer.register_hooks([hooks.CallbackHook(after_step=lambda t: seen.append(t.iter))])
    trainer.train(0, 3)
    assert seen == [0, 1, 2]


def _eval_run(max_iter, period, eval_after_train=True, fail_at=None):
    calls = []

    def evaluate():
        calls.append(trainer.iter)
        return {"bbox": {"AP": float(len(calls)), "AP50": 50.0}, "segm": {}}

    trainer = _trainer()
    hook_list = [hooks.EvalHook(period, evaluate, eval_after_train=eval_after_train)]
    if fail_at is not None:
        def fail(t):
            if t.iter == fail_at:
                raise RuntimeError("boom")
        hook_list.insert(0, hooks.CallbackHook(before_step=fail))
    trainer.register_hooks(hook_list)
    if fail_at is None:
        trainer.train(0, max_iter)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train(0, max_iter)
    return calls, trainer.storage


def test_eval_hook_periodic_and_final():
    calls, storage = _eval_run(10, 3)
    assert calls == [2, 5, 8, 10]  # after iterations 2, 5, 8 and once after training
    ap = storage.history("bbox/AP").values()
    assert ap == [(1.0, 2), (2.0, 5), (3.0, 8), (4.0, 10)]
    assert storage.latest()["bbox/AP50"] == (50.0, 10)

    calls, _ = _eval_run(9, 3)
    assert calls == [2, 5, 9], "the last iteration is evaluated once, not twice"
    calls, _ = _eval_run(9, 3, eval_after_train=False)
    assert calls == [2, 5, 8]
    calls, _ = _eval_run(4, 0)
    assert calls == [4]


def test_eval_hook_skips_final_eval_after_failure():
    calls, _ = _eval_run(10, 3, fail_at=7)
    assert calls == [2, 5]


def test_eval_hook_rejects_non_numeric_results():
    trainer = _trainer()
    trainer.register_hooks([hooks.EvalHook(1, lambda: {"bbox": {"AP": "high"}})])
    with pytest.raises(TypeError, match="'bbox/AP' at iteration 0"):
        trainer.train(0, 2)


def test_lr_scheduler_hook_records_lr_of_largest_group():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 1))
    groups = [{"params": [model[1].bias], "lr": 1.0},
              {"params": [p for n, p in model.named_parameters() if n != "1.bias"]}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 6, (3,), 0
    scheduler = build_lr_scheduler(cfg, optimizer)
    x = torch.randn(4, 10)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, b):
            return {"loss": self.net(b).pow(2).mean()}

    trainer = SimpleTrainer(Wrapper(), itertools.repeat(x), optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    trainer.train(0, 6)
    lrs = [v for v, _ in trainer.storage.history("lr").values()]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert scheduler.last_epoch == 6


def test_iteration_timer_records_time_and_summary():
    trainer = _trainer()
    trainer.register_hooks([hooks.IterationTimer(warmup_iter=2)])
    with CollectLogs("detector.engine.hooks") as logs:
        trainer.train(0, 6)
    times = trainer.storage.history("time").values()
    assert [it for _, it in times] == list(range(6)) and all(t > 0 for t, _ in times)
    assert "Overall training speed: 4 iterations" in logs.text
    assert "Total training time" in logs.text


def test_periodic_checkpointer_hook_saves_periodic_and_final(tmp_path):
    trainer = _trainer()
    ckpt = DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer,
                                 save_to_disk=True)
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, 4, max_to_keep=1)])
    trainer.train(0, 10)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth"))
    assert files == ["model_0000007.pth", "model_final.pth"]
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 9 and final["trainer"]["iteration"] == 9
    assert torch.equal(final["model"]["linear.weight"], trainer.model.linear.weight)
    assert "optimizer" in final


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_periodic_writer_json_tensorboard_and_printer(tmp_path):
    trainer = _trainer()
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.BASE_LR = 7, 2, 0.01
    scheduler = build_lr_scheduler(cfg, trainer.optimizer)
    writers = [CommonMetricPrinter(max_iter=7), JSONWriter(str(tmp_path / "metrics.json")),
               TensorboardXWriter(str(tmp_path))]
    trainer.register_hooks([
        hooks.IterationTimer(), hooks.LRScheduler(trainer.optimizer, scheduler),
        hooks.EvalHook(0, lambda: {"bbox": {"AP": 12.5}}),
        hooks.PeriodicWriter(writers, period=3),
    ])
    capture = _Capture()
    log = logging.getLogger("detector.utils.events")
    log.addHandler(capture)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        trainer.train(0, 7)
    finally:
        log.removeHandler(capture)
        log.setLevel(old_level)

    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines] == [2, 5, 6, 7]
    for d in lines[:3]:
        assert {"loss_cls", "loss_box_reg", "total_loss", "lr", "time", "data_time"} <= set(d)
    assert lines[-1] == {"iteration": 7, "bbox/AP": 12.5}
    assert [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]

    printed = [r.getMessage() for r in capture.records]
    assert len(printed) == 3  # iterations 2, 5, 6; nothing after training
    for text in ("eta: ", "iter: 5/7", "total_loss: ", "loss_cls: ", "lr: ", "time: ",
                 "data_time: ", "max_"):
        assert text in printed[1], text
    assert "\x1b[" not in printed[1], "plain message for files; colour only on the terminal"
    assert "\x1b[" in capture.records[1].colored_message


def _signal_at(iteration, signum):
    """A hook sending ``signum`` to this process during the given iteration."""
    def send(t):
        if t.iter == iteration:
            os.kill(os.getpid(), signum)
    return hooks.CallbackHook(after_step=send)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT, signal.SIGTERM])
def test_stop_on_signal_saves_and_raises(tmp_path, signum):
    """A signal during iteration 6 (between the checkpoints of iterations 4 and 9): the loop
    finishes iteration 6, the hooks' after_train run without the final evaluation, the state
    of iteration 6 is saved and train() raises a SystemExit with 128 + the signal number.
    SIGINT gives no KeyboardInterrupt. The previous handlers are back afterwards."""
    previous = signal.getsignal(signum)
    trainer = _trainer()
    ckpt = DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer,
                                 save_to_disk=True)
    evals, seen = [], []
    trainer.register_hooks([
        hooks.PeriodicCheckpointer(ckpt, 5, max_to_keep=1),
        hooks.EvalHook(0, lambda: evals.append(trainer.iter)),
        _signal_at(6, signum),
        hooks.CallbackHook(after_step=lambda t: seen.append(t.iter)),
        hooks.StopOnSignal(["SIGINT", "TERM", int(signal.SIGUSR1)]),
    ])
    with CollectLogs("detector.engine") as logs, pytest.raises(TrainingInterrupted) as info:
        trainer.train(0, 20)
    assert info.value.code == 128 + signum and info.value.iteration == 6
    assert seen == list(range(7)) and evals == []
    assert signal.getsignal(signum) == previous
    saved = torch.load(tmp_path / "model_0000006.pth", weights_only=True)
    assert saved["iteration"] == 6 and saved["trainer"]["iteration"] == 6
    assert torch.equal(saved["model"]["linear.weight"], trainer.model.linear.weight)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000006.pth"]
    name = signal.Signals(signum).name
    assert logs.lines[-1] == (f"Stopped by {name} after iteration 6, saved "
                              f"{tmp_path / 'model_0000006.pth'} (continue with --resume); "
                              f"exiting with status {128 + signum}")


def test_stop_on_the_checkpoint_iteration_writes_it_once(tmp_path):
    trainer = _trainer()
    ckpt = DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer,
                                 save_to_disk=True)
    saves = []
    original_save = ckpt.save
    ckpt.save = lambda name, **kw: (saves.append(name), original_save(name, **kw))
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, 5), _signal_at(4, signal.SIGUSR1),
                            hooks.StopOnSignal(["SIGUSR1"])])
    with pytest.raises(TrainingInterrupted):
        trainer.train(0, 20)
    assert saves == ["model_0000004"]
    assert trainer.stop_checkpoint == str(tmp_path / "model_0000004.pth")


def test_stop_on_signal_without_signals_leaves_handlers_alone():
    previous = signal.getsignal(signal.SIGUSR1)
    seen = []
    trainer = _trainer()
    trainer.register_hooks([hooks.StopOnSignal([]), hooks.CallbackHook(
        before_step=lambda t: seen.append(signal.getsignal(signal.SIGUSR1)))])
    trainer.train(0, 2)
    assert seen == [previous, previous]


def test_parse_signals_names_the_key():
    assert hooks.parse_signals(["SIGTERM", "int", 10, "SIGTERM"]) == [
        signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    with pytest.raises(ValueError, match=r"^SOLVER.CHECKPOINT_ON_SIGNALS: unknown signal "
                                         r"'SIGTREM'; expected"):
        hooks.parse_signals(["SIGTREM"], key="SOLVER.CHECKPOINT_ON_SIGNALS")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        hooks.parse_signals(["SIGKILL"])
