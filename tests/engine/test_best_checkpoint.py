"""BestCheckpointer: model_best.pth follows the best evaluation result (max or min), ignores
NaN and missing metrics, leaves last_checkpoint alone and keeps its best across a resume."""
import itertools
import math
import os

import pytest
import torch
from torch import nn

from detector.checkpoint import DetectionCheckpointer
from detector.engine import DefaultTrainer, default_argument_parser, hooks, setup_cfg
from detector.engine.train_loop import SimpleTrainer
from log_capture import CollectLogs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
HOOKS_LOGGER = "detector.engine.hooks"


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": (self.linear(x) - y).pow(2).mean()}


def _run(out_dir, values, *, start_iter=0, max_iter=None, period=2, mode="max",
         metric="bbox/AP", results=None):
    """Train with an evaluation every ``period`` iterations returning ``values`` in turn as
    "bbox/AP". Returns the trainer, the hook, the weights seen by each evaluation and the log."""
    torch.manual_seed(0)
    model = Regression()
    x = torch.randn(8, 2)
    trainer = SimpleTrainer(model, itertools.repeat((x, x.sum(1, keepdim=True))),
                            torch.optim.SGD(model.parameters(), lr=0.05))
    checkpointer = DetectionCheckpointer(model, str(out_dir), trainer=trainer, save_to_disk=True)
    evaluated = {}
    pending = list(values)

    def evaluate():
        evaluated[min(trainer.iter, trainer.max_iter - 1)] = {
            k: v.clone() for k, v in model.state_dict().items()}
        if results is not None:
            return results
        return {"bbox": {"AP": pending.pop(0), "AP50": 90.0}}

    eval_hook = hooks.EvalHook(period, evaluate)
    best = hooks.BestCheckpointer(eval_hook, checkpointer, metric=metric, mode=mode)
    trainer.register_hooks([eval_hook, best])
    if max_iter is None:
        max_iter = start_iter + period * len(values)
    with CollectLogs(HOOKS_LOGGER) as logs:
        trainer.train(start_iter, max_iter)
    return trainer, best, evaluated, logs


def _saved(out_dir):
    return torch.load(os.path.join(out_dir, "model_best.pth"), weights_only=True)


def test_best_kept_on_strict_improvement_only(tmp_path):
    # evaluations after iterations 1, 3, 5 and 7 (the last one by the final evaluation)
    trainer, best, evaluated, logs = _run(tmp_path, [1.0, 3.0, 2.0, 3.0])
    assert sorted(evaluated) == [1, 3, 5, 7]
    assert (best.best_value, best.best_iteration) == (3.0, 3)
    saved = _saved(tmp_path)
    assert saved["best_metric"] == {"name": "bbox/AP", "mode": "max", "value": 3.0,
                                    "iteration": 3}
    assert saved["iteration"] == 3 and saved["trainer"]["iteration"] == 3
    # the weights are those evaluated at iteration 3, not the tie at 7 nor the final ones
    assert torch.equal(saved["model"]["linear.weight"], evaluated[3]["linear.weight"])
    assert not torch.equal(saved["model"]["linear.weight"], evaluated[7]["linear.weight"])
    assert "optimizer" in saved
    new_best = [ln for ln in logs.lines if ln.startswith("New best")]
    assert len(new_best) == 2
    assert "New best bbox/AP = 3.0000 at iteration 3 (previous best: 1.0000 at iteration 1)" \
        in new_best[1]
    assert "does not beat the best 3.0000 at iteration 3" in logs.text
    # --resume must keep going from the newest periodic checkpoint, not from the best one
    assert not (tmp_path / "last_checkpoint").exists()
    assert sorted(os.listdir(tmp_path)) == ["model_best.pth"], "no temporary file left"


def test_min_mode(tmp_path):
    _, best, evaluated, logs = _run(tmp_path, [5.0, 2.0, 4.0, 1.0], mode="min",
                                    metric="bbox/AP")
    assert (best.best_value, best.best_iteration) == (1.0, 7)
    saved = _saved(tmp_path)
    assert saved["best_metric"]["mode"] == "min" and saved["best_metric"]["value"] == 1.0
    assert torch.equal(saved["model"]["linear.weight"], evaluated[7]["linear.weight"])
    assert [ln.split(" at ")[0] for ln in logs.lines if ln.startswith("New best")] == [
        "New best bbox/AP = 5.0000", "New best bbox/AP = 2.0000", "New best bbox/AP = 1.0000"]


def test_bad_mode_is_one_line_error(tmp_path):
    eval_hook = hooks.EvalHook(1, dict)
    checkpointer = DetectionCheckpointer(Regression(), str(tmp_path), save_to_disk=True)
    with pytest.raises(ValueError, match=r"SOLVER.BEST_CHECKPOINT.MODE\), got 'highest'"):
        hooks.BestCheckpointer(eval_hook, checkpointer, mode="highest")


def test_missing_metric_warns_once_and_training_goes_on(tmp_path):
    results = {"segm": {"AP": 10.0, "AP50": 20.0}}
    trainer, best, evaluated, logs = _run(tmp_path, [0, 0, 0], results=results)
    assert len(evaluated) == 3 and trainer.iter == trainer.max_iter
    warnings = [ln for ln in logs.lines if "is not among the evaluation results" in ln]
    assert len(warnings) == 1
    assert "metric 'bbox/AP'" in warnings[0] and "available: segm/AP, segm/AP50" in warnings[0]
    assert best.best_value is None and not (tmp_path / "model_best.pth").exists()


def test_nan_never_becomes_the_best(tmp_path):
    _, best, evaluated, logs = _run(tmp_path, [math.nan, 2.0, math.nan, 1.0])
    assert (best.best_value, best.best_iteration) == (2.0, 3)
    saved = _saved(tmp_path)
    assert saved["best_metric"]["value"] == 2.0
    assert torch.equal(saved["model"]["linear.weight"], evaluated[3]["linear.weight"])
    assert sum("bbox/AP = nan at iteration" in ln for ln in logs.lines) == 2
    assert "previous best: none" in logs.text


def test_resume_keeps_the_best_and_a_fresh_run_does_not(tmp_path):
    _run(tmp_path, [3.0, 1.0])  # iterations 0..3, best 3.0 at iteration 1
    first = _saved(tmp_path)["model"]["linear.weight"]

    # resumed at iteration 4: the worse results do not replace the best of the first part
    _, best, _, logs = _run(tmp_path, [2.0, 2.5], start_iter=4)
    assert (best.best_value, best.best_iteration) == (3.0, 1)
    assert "Resuming with the best bbox/AP = 3.0000 of iteration 1" in logs.text
    assert torch.equal(_saved(tmp_path)["model"]["linear.weight"], first)

    # a better one does, and names the restored best as the previous one
    _, best, _, logs = _run(tmp_path, [4.0], start_iter=8)
    assert (best.best_value, best.best_iteration) == (4.0, 9)
    assert "previous best: 3.0000 at iteration 1" in logs.text

    # another metric's record is not compared with
    _, best, _, logs = _run(tmp_path, [0.5], start_iter=10, mode="min")
    assert "was chosen by bbox/AP (max), not bbox/AP (min)" in logs.text
    assert _saved(tmp_path)["best_metric"] == {"name": "bbox/AP", "mode": "min", "value": 0.5,
                                               "iteration": 11}

    # a run from iteration 0 starts over even with a better file in the folder
    _run(tmp_path, [9.0], mode="max")
    _, best, _, _ = _run(tmp_path, [0.25], mode="max")
    assert (best.best_value, best.best_iteration) == (0.25, 1)
    assert _saved(tmp_path)["best_metric"]["value"] == 0.25


def test_unreadable_best_file_on_resume_is_a_warning(tmp_path):
    (tmp_path / "model_best.pth").write_bytes(b"not a checkpoint")
    _, best, _, logs = _run(tmp_path, [1.5], start_iter=6)
    warning = [ln for ln in logs.lines if ln.startswith("Cannot read the best bbox/AP")]
    assert len(warning) == 1 and str(tmp_path / "model_best.pth") in warning[0]
    assert _saved(tmp_path)["best_metric"]["value"] == 1.5 == best.best_value


@pytest.mark.slow
def test_trainer_writes_model_best_from_coco_evaluation(tmp_path):
    out = tmp_path / "run"
    opts = [
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "TEST.EVAL_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out),
        "SEED", "3",
    ]
    cfg = setup_cfg(default_argument_parser().parse_args(["--config-file", CONFIG] + opts))
    trainer = DefaultTrainer(cfg)
    best = [h for h in trainer._hooks if isinstance(h, hooks.BestCheckpointer)]
    eval_index = [i for i, h in enumerate(trainer._hooks) if isinstance(h, hooks.EvalHook)]
    assert len(best) == 1 and trainer._hooks.index(best[0]) == eval_index[0] + 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    # evaluated after iterations 1 and 3; an untrained detector may score AP 0 both times
    assert best[0].best_iteration in (1, 3)
    saved = _saved(out)
    assert saved["best_metric"]["name"] == "bbox/AP"
    assert saved["best_metric"]["value"] == best[0].best_value >= 0.0
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"

    # an empty metric turns the hook off
    off = setup_cfg(default_argument_parser().parse_args(
        ["--config-file", CONFIG] + opts + ["SOLVER.BEST_CHECKPOINT.METRIC", ""]))
    assert not any(isinstance(h, hooks.BestCheckpointer) for h in DefaultTrainer(off)._hooks)
