"""DetectionCheckpointer: round trip, atomic saves, keep-last-N, refusing unsafe or corrupt files."""
import logging
import os

import pytest
import torch
from torch import nn

from detector.checkpoint.checkpointer import (
    CheckpointError,
    DetectionCheckpointer,
    PeriodicCheckpointer,
)
from detector.config import get_cfg
from detector.solver import build_lr_scheduler


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class Counter:
    """A custom checkpointable."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log_records():
    """Records of the checkpointer's logger, independent of propagation settings."""
    handler = _Records()
    log = logging.getLogger("detector.checkpoint.checkpointer")
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(old_level)


def _training_state(seed):
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 50, (20,), 5
    scheduler = build_lr_scheduler(cfg, optimizer)
    return model, optimizer, scheduler


def _train_a_bit(model, optimizer, scheduler, steps=3):
    for _ in range(steps):
        loss = model(torch.randn(2, 3, 8, 8)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_round_trip_model_optimizer_scheduler_iteration(tmp_path):
    model, optimizer, scheduler = _training_state(0)
    _train_a_bit(model, optimizer, scheduler)
    counter = Counter()
    counter.count = 5
    ckpt = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler,
                                 counter=counter, save_to_disk=True)
    ckpt.save("model_0000007", iteration=7)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000007.pth"
    raw = torch.load(tmp_path / "model_0000007.pth", weights_only=True)
    assert set(raw) == {"model", "optimizer", "scheduler", "counter", "iteration"}

    model2, optimizer2, scheduler2 = _training_state(1)
    counter2 = Counter()
    ckpt2 = DetectionCheckpointer(model2, str(tmp_path), optimizer=optimizer2,
                                  scheduler=scheduler2, counter=counter2)
    assert ckpt2.has_checkpoint()
    extra = ckpt2.resume_or_load("", resume=True)
    assert extra == {"iteration": 7}
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    assert scheduler2.last_epoch == scheduler.last_epoch == 3
    assert counter2.count == 5
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert state.keys() == state2.keys() and len(state) == 6
    for k in state:
        assert torch.equal(state[k]["momentum_buffer"], state2[k]["momentum_buffer"])
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    # resume=False: only the model weights of the given file, nothing else
    model3, optimizer3, scheduler3 = _training_state(2)
    ckpt3 = DetectionCheckpointer(model3, str(tmp_path), optimizer=optimizer3,
                                  scheduler=scheduler3)
    ckpt3.resume_or_load(str(tmp_path / "model_0000007.pth"), resume=False)
    assert torch.equal(model3.fc.weight, model.fc.weight)
    assert scheduler3.last_epoch == 0 and not optimizer3.state_dict()["state"]


def test_trainer_checkpointable_provides_optimizer(tmp_path):
    model, optimizer, _ = _training_state(0)

    class Trainer(Counter):
        pass

    trainer = Trainer()
    trainer.optimizer = optimizer
    ckpt = DetectionCheckpointer(model, str(tmp_path), trainer=trainer, save_to_disk=True)
    ckpt.save("x")
    raw = torch.load(tmp_path / "x.pth", weights_only=True)
    assert "optimizer" in raw and raw["trainer"] == {"count": 0}


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("model_final", iteration=1)
    old_weight = model.fc.weight.detach().clone()
    before = sorted(os.listdir(tmp_path))

    with torch.no_grad():
        model.fc.weight.add_(1.0)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes of a zip")  # some bytes reach the disk ...
        raise OSError("No space left on device")  # ... then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_final", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(os.listdir(tmp_path)) == before, "no temporary file may be left behind"
    raw = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert raw["iteration"] == 1 and torch.equal(raw["model"]["fc.weight"], old_weight)
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_only_main_process_writes_by_default(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path))  # rank 0 when not distributed
    assert ckpt.save_to_disk
    ckpt_other = DetectionCheckpointer(model, str(tmp_path / "r1"), save_to_disk=False)
    ckpt_other.save("model")
    assert not (tmp_path / "r1").exists()


def _periodic_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pth"))


def test_periodic_keeps_last_n_and_final(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    periodic = PeriodicCheckpointer(ckpt, period=2, max_iter=10, max_to_keep=2)
    for it in range(10):
        periodic.step(it)
    assert _periodic_files(tmp_path) == ["model_0000007.pth", "model_0000009.pth",
                                         "model_final.pth"]
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 9

    keep_all = tmp_path / "all"
    ckpt = DetectionCheckpointer(model, str(keep_all), save_to_disk=True)
    periodic = PeriodicCheckpointer(ckpt, period=3, max_iter=7, max_to_keep=0)
    for it in range(7):
        periodic.step(it)
    assert _periodic_files(keep_all) == ["model_0000002.pth", "model_0000005.pth",
                                         "model_final.pth"]


def test_periodic_prunes_files_of_resumed_run_only(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    for it in (1, 3, 5):  # an earlier run, then a resume at iteration 6
        ckpt.save(f"model_{it:07d}", iteration=it)
    ckpt.save("model_0000099", iteration=99)  # a later checkpoint of some other run
    periodic = PeriodicCheckpointer(ckpt, period=2, max_to_keep=2)
    for it in range(6, 10):
        periodic.step(it)
    assert _periodic_files(tmp_path) == ["model_0000007.pth", "model_0000009.pth",
                                         "model_0000099.pth"]


def _side_effect_file(path):
    with open(path, "w") as f:
        f.write("code from a checkpoint ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect_file, (self.marker,))


class _ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
def test_untrusted_pickle_is_refused_not_executed(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": payload(str(marker))}, evil)
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path / "out"))
    with pytest.raises(CheckpointError) as err:
        ckpt.load(str(evil))
    msg = str(err.value)
    assert "\n" not in msg and str(evil) in msg and "Refusing" in msg
    assert not marker.exists(), "unpickling must not have run the payload"


def test_corrupt_and_missing_files_are_one_line_errors(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("good")
    data = (tmp_path / "good.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        ckpt.load(str(truncated))
    assert "\n" not in str(err.value) and str(truncated) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ckpt.load(str(tmp_path / "nope.pth"))
    text = tmp_path / "text.pth"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="text.pth: not a torch checkpoint"):
        ckpt.load(str(text))
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "notes": "x"}, odd)
    with pytest.raises(CheckpointError, match="no model weights"):
        ckpt.load(str(odd))


def test_plain_and_ddp_state_dicts(tmp_path, log_records):
    source, _, _ = _training_state(3)
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    ddp = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, ddp)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 4}, nested)
    for path in (plain, ddp, nested):
        target, _, _ = _training_state(4)
        extra = DetectionCheckpointer(target, str(tmp_path / "o")).load(str(path))
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), (path.name, k)
        if path is nested:
            assert extra == {"epoch": 4}
    assert any("module." in m for m in log_records)


def test_missing_and_unexpected_keys_are_logged(tmp_path, log_records):
    source, _, _ = _training_state(0)
    sd = source.state_dict()
    sd.pop("fc.bias")
    sd["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    target, _, _ = _training_state(1)
    DetectionCheckpointer(target, str(tmp_path)).load(str(path))
    text = "\n".join(log_records)
    assert "not found in the checkpoint" in text and "fc.bias" in text
    assert "not used by the model" in text and "extra_head" in text
    assert torch.equal(target.fc.weight, source.fc.weight)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_candidates_newest_first_with_last_checkpoint_first(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    assert ckpt.candidate_checkpoints() == []
    for name in ("model_final", "model_0000009", "model_0000019", "model_0000004", "other"):
        ckpt.save(name)
    (tmp_path / "model_12.pth").write_bytes(b"not a periodic name")
    ckpt.tag_last_checkpoint("model_0000009.pth")
    names = [os.path.basename(p) for p in ckpt.candidate_checkpoints()]
    assert names == ["model_0000009.pth", "model_0000019.pth", "model_0000004.pth",
                     "model_final.pth"]
    ckpt.tag_last_checkpoint("gone.pth")
    assert os.path.basename(ckpt.candidate_checkpoints()[0]) == "model_0000019.pth"


def test_resume_takes_the_newest_readable_checkpoint(tmp_path, log_records):
    model, optimizer, scheduler = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler,
                                 save_to_disk=True)
    for it in (4, 9, 14):
        _train_a_bit(model, optimizer, scheduler, steps=1)
        ckpt.save(f"model_{it:07d}", iteration=it)
    weights_at_9 = torch.load(tmp_path / "model_0000009.pth", weights_only=True)["model"]
    _truncate(tmp_path / "model_0000014.pth")

    fresh, fresh_opt, fresh_sched = _training_state(1)
    loader = DetectionCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt,
                                   scheduler=fresh_sched)
    rest = loader.resume_or_load("", resume=True)
    assert rest["iteration"] == 9
    assert loader.resumed_from == str(tmp_path / "model_0000009.pth")
    assert set(loader.restored) == {"optimizer", "scheduler"}
    assert torch.equal(fresh.fc.weight, weights_at_9["fc.weight"])
    text = "\n".join(log_records)
    assert f"Cannot read checkpoint {tmp_path / 'model_0000014.pth'}" in text
    assert (f"Resuming from {tmp_path / 'model_0000009.pth'} instead of the newer "
            f"model_0000014.pth, which cannot be read") in text


def test_resume_without_readable_checkpoint_loads_the_weights(tmp_path, log_records):
    model, _, _ = _training_state(0)
    DetectionCheckpointer(model, str(tmp_path / "init"), save_to_disk=True).save("weights")
    run = tmp_path / "run"
    ckpt = DetectionCheckpointer(model, str(run), save_to_disk=True)
    ckpt.save("model_0000004", iteration=4)
    _truncate(run / "model_0000004.pth")

    fresh, _, _ = _training_state(1)
    loader = DetectionCheckpointer(fresh, str(run))
    rest = loader.resume_or_load(str(tmp_path / "init" / "weights.pth"), resume=True)
    assert loader.resumed_from is None and "iteration" not in rest
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    assert any(m.startswith(f"No checkpoint in {run} can be read (skipped model_0000004.pth); "
                            "starting from MODEL.WEIGHTS") for m in log_records), log_records
    # without resume the folder's checkpoints are not looked at
    assert DetectionCheckpointer(fresh, str(run)).resume_or_load("", resume=False) == {}


def test_saved_files_get_the_mode_of_other_outputs(tmp_path):
    model, _, _ = _training_state(0)
    old_umask = os.umask(0o027)
    try:
        ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
        ckpt.save("model_0000004")
        with open(tmp_path / "metrics.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old_umask)
    expected = os.stat(tmp_path / "metrics.json").st_mode & 0o777
    assert expected == 0o640
    assert os.stat(tmp_path / "model_0000004.pth").st_mode & 0o777 == expected
    assert os.stat(tmp_path / "last_checkpoint").st_mode & 0o777 == expected


def test_save_now_counts_as_periodic_and_is_not_repeated(tmp_path):
    model, _, _ = _training_state(0)
    ckpt = DetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    periodic = PeriodicCheckpointer(ckpt, period=5, max_iter=100, max_to_keep=2)
    for it in range(10):
        periodic.step(it)
    assert periodic.save_now(9) == str(tmp_path / "model_0000009.pth")  # already written
    for it in range(10, 13):
        periodic.step(it)
    assert periodic.save_now(12) == str(tmp_path / "model_0000012.pth")
    assert _periodic_files(tmp_path) == ["model_0000009.pth", "model_0000012.pth"]
    assert torch.load(tmp_path / "model_0000012.pth", weights_only=True)["iteration"] == 12
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000012.pth"
