"""SimpleTrainer / AMPTrainer on a tiny regression problem."""
import itertools
import signal

import pytest
import torch
from torch import nn

from detector.config import get_cfg
from detector.engine.hooks import CallbackHook
from detector.engine.train_loop import (
    AMPTrainer,
    SimpleTrainer,
    TrainerBase,
    TrainingInterrupted,
)
from detector.solver import build_gradient_clipper


class Regression(nn.Module):
    """y = x @ w; in training mode returns a dict of losses, like a detector."""

    def __init__(self, nan_at_call=None):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.calls = 0
        self.nan_at_call = nan_at_call
        self.last_pred_dtype = None

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        pred = self.linear(x)
        self.last_pred_dtype = pred.dtype
        loss = (pred.float() - y).pow(2).mean()
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss_mse": loss, "loss_zero": 0.0 * loss}


def _batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x @ w + 0.7))
    return out


def _loss(model, batches):
    with torch.no_grad():
        return sum(model(b)["loss_mse"].item() for b in batches) / len(batches)


def _storage_capture():
    captured = {}
    hook = CallbackHook(after_train=lambda t: captured.setdefault("storage", t.storage))
    return hook, captured


def test_simple_trainer_reduces_loss():
    torch.manual_seed(0)
    model = Regression()
    batches = _batches()
    trainer = SimpleTrainer(model, itertools.cycle(batches),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    hook, captured = _storage_capture()
    trainer.register_hooks([hook])
    before = _loss(model, batches)
    trainer.train(0, 80)
    after = _loss(model, batches)
    assert after < before / 20
    assert trainer.iter == 80
    storage = captured["storage"]
    hist = storage.histories()
    assert {"total_loss", "loss_mse", "loss_zero", "data_time"} <= set(hist)
    assert len(hist["total_loss"].values()) == 80
    assert hist["total_loss"].latest() == pytest.approx(hist["loss_mse"].latest())
    assert trainer.state_dict() == {"iteration": 80}


def test_non_finite_loss_raises_and_leaves_weights_untouched():
    model = Regression(nan_at_call=8)  # the 8th step is iteration 7
    trainer = SimpleTrainer(model, itertools.cycle(_batches()),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    snapshots = {}
    finished = []
    trainer.register_hooks([CallbackHook(
        after_step=lambda t: snapshots.__setitem__(t.iter, model.linear.weight.detach().clone()),
        after_train=lambda t: finished.append(t.iter),
    )])
    with pytest.raises(FloatingPointError) as err:
        trainer.train(0, 20)
    msg = str(err.value)
    assert "\n" not in msg and "iteration=7" in msg
    assert "'loss_mse': nan" in msg and "loss_zero" in msg
    assert finished == [7], "after_train must run after a failure"
    assert torch.equal(model.linear.weight, snapshots[6])


def test_exhausted_loader_names_the_iteration():
    model = Regression()
    trainer = SimpleTrainer(model, _batches(3), torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(RuntimeError, match="ran out of data at iteration 3"):
        trainer.train(0, 5)


def test_gradient_clipping_bounds_the_update():
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1e-3
    model = Regression()
    trainer = SimpleTrainer(model, itertools.cycle(_batches()),
                            torch.optim.SGD(model.parameters(), lr=1.0),
                            grad_clipper=build_gradient_clipper(cfg))
    before = [p.detach().clone() for p in model.parameters()]
    hook, captured = _storage_capture()
    trainer.register_hooks([hook])
    trainer.train(0, 1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < step.norm() <= 1e-3 * (1 + 1e-4)
    assert captured["storage"].history("grad_norm").latest() > 1e-3  # norm before clipping


def test_amp_trainer_cpu_bfloat16():
    torch.manual_seed(0)
    model = Regression()
    batches = _batches()
    trainer = AMPTrainer(model, itertools.cycle(batches),
                         torch.optim.SGD(model.parameters(), lr=0.05))
    assert trainer.device_type == "cpu" and trainer.grad_scaler is None
    before = _loss(model, batches)
    trainer.train(0, 40)
    assert model.last_pred_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _loss(model, batches) < before / 5
    assert "grad_scaler" not in trainer.state_dict()


def test_trainer_state_dict_round_trip():
    model = Regression()
    trainer = SimpleTrainer(model, itertools.cycle(_batches()),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    trainer.train(0, 3)
    other = SimpleTrainer(Regression(), [], torch.optim.SGD(model.parameters(), lr=0.05))
    other.load_state_dict(trainer.state_dict())
    assert other.iter == 3


def test_trainer_base_rejects_non_hooks_and_skips_none():
    base = TrainerBase()
    base.register_hooks([None])
    assert base._hooks == []
    with pytest.raises(TypeError, match="HookBase"):
        base.register_hooks([object()])


def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from detector.checkpoint.checkpointer import DetectionCheckpointer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(0)
    model = DistributedDataParallel(Regression(nan_at_call=4 if rank == 1 else None))
    trainer = SimpleTrainer(model, itertools.cycle(_batches(seed=rank)),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    DetectionCheckpointer(model, out_dir).save(f"written_by_rank{rank}")
    try:
        trainer.train(0, 10)
        outcome = "finished"
    except FloatingPointError as err:
        outcome = str(err)
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_ddp_non_finite_loss_on_one_rank_stops_all_ranks(tmp_path):
    """Rank 1 alone produces NaN at iteration 3: both ranks raise (nobody hangs in a collective);
    only rank 0 writes checkpoints, without the DDP "module." prefix."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    for _ in range(120):  # 60 s at most
        if ctx.join(timeout=0.5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("distributed training did not finish: a rank hangs")
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "iteration=3" in msg and "nan" in msg, (rank, msg)
    assert (tmp_path / "written_by_rank0.pth").exists()
    assert not (tmp_path / "written_by_rank1.pth").exists()
    saved = torch.load(tmp_path / "written_by_rank0.pth", weights_only=True)
    assert set(saved["model"]) == {"linear.weight", "linear.bias"}


def test_request_stop_ends_after_the_current_iteration():
    """request_stop() during iteration 2: iteration 2 completes, no other starts, after_train
    runs (iter < max_iter, as after a failure) and train() raises TrainingInterrupted."""
    model = Regression()
    trainer = SimpleTrainer(model, itertools.cycle(_batches()),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    steps, ends = [], []

    def after_step(t):
        steps.append(t.iter)
        if t.iter == 2:
            t.request_stop(signal.SIGUSR1)
            t.request_stop(signal.SIGTERM)  # the first request is kept

    trainer.register_hooks([CallbackHook(after_step=after_step,
                                         after_train=lambda t: ends.append(t.iter))])
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train(0, 10)
    assert steps == [0, 1, 2] and ends == [2]
    assert isinstance(info.value, SystemExit) and not isinstance(info.value, Exception)
    assert info.value.code == 138 and info.value.signum == signal.SIGUSR1
    assert trainer.stop_signal == signal.SIGUSR1 and trainer.stop_checkpoint is None
    # a new run does not inherit the old request
    trainer.train(3, 5)
    assert steps == [0, 1, 2, 3, 4] and trainer.stop_signal is None


def test_grad_scaler_state_is_saved_and_restored():
    """The scaler's scale and growth tracker travel with the trainer's state (what a resume of
    a CUDA fp16 run needs); torch's scaler for the CPU stands in for the CUDA one here."""
    model = Regression()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    trainer = AMPTrainer(model, itertools.cycle(_batches()),
                         torch.optim.SGD(model.parameters(), lr=0.05), grad_scaler=scaler)
    trainer.train(0, 5)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == scaler.get_scale() != 1024.0
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    other = AMPTrainer(Regression(), [], torch.optim.SGD(model.parameters(), lr=0.05),
                       grad_scaler=fresh)
    other.load_state_dict(state)
    assert fresh.get_scale() == scaler.get_scale()
    assert fresh.state_dict() == scaler.state_dict()


def test_step_seed_makes_global_draws_a_function_of_the_iteration():
    """With a seed, what the model draws from torch's global generator at iteration i does
    not depend on what ran before (a resumed run draws the same)."""
    class Dropping(Regression):
        def forward(self, batch):
            self.draws.append(torch.rand(3))
            return super().forward(batch)

    def draws(start, stop):
        model = Dropping()
        model.draws = []
        trainer = SimpleTrainer(model, itertools.cycle(_batches()),
                                torch.optim.SGD(model.parameters(), lr=0.05), seed=11)
        torch.manual_seed(start)  # whatever state the global generator had
        trainer.train(start, stop)
        return model.draws

    whole, resumed = draws(0, 6), draws(3, 6)
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], resumed))
    assert not torch.equal(whole[3], whole[4])
