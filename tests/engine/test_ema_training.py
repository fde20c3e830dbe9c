"""SOLVER.EMA in the trainer: updated every step, saved and resumed, evaluated, loaded by
--eval-only."""
import os

import torch

from detector.engine import DefaultTrainer, hooks
from detector.engine import default_argument_parser, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
DECAY = 0.6


def _cfg(out_dir, *extra, max_iter=6):
    opts = [
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "3",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", str(DECAY),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir),
        "SEED", "3", *extra,
    ]
    return setup_cfg(default_argument_parser().parse_args(["--config-file", CONFIG] + opts))


def _float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_follows_the_formula_and_resumes(tmp_path):
    out = tmp_path / "run"
    trainer = DefaultTrainer(_cfg(out))
    trainer.resume_or_load(resume=False)
    seen = [_float_state(trainer.model)]
    trainer.register_hooks([hooks.CallbackHook(
        after_step=lambda t: seen.append(_float_state(t.model)))])
    trainer.train()

    # ema_n = d_n * ema_{n-1} + (1 - d_n) * w_n with d_n = min(DECAY, (1 + n) / (10 + n))
    expected = seen[0]
    for n, weights in enumerate(seen[1:]):
        d = min(DECAY, (1.0 + n) / (10.0 + n))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    averaged = _float_state(trainer.ema.module)
    assert trainer.ema.num_updates == 6
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k in expected if not torch.allclose(averaged[k], seen[-1][k])]
    assert moved, "the average must differ from the last weights"

    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["ema"]["num_updates"] == 6
    torch.testing.assert_close(final["ema"]["module"]["head.cls_score.bias"],
                               averaged["head.cls_score.bias"])

    # --resume restores the average and its update count
    resumed = DefaultTrainer(_cfg(out, max_iter=8))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6 and resumed.ema.num_updates == 6
    for key, value in _float_state(resumed.ema.module).items():
        torch.testing.assert_close(value, averaged[key], rtol=0, atol=0, msg=key)
    resumed.train()
    assert resumed.ema.num_updates == 8


def test_weights_load_restarts_the_average_and_eval_only_uses_it(tmp_path):
    out = tmp_path / "run"
    trainer = DefaultTrainer(_cfg(out, max_iter=3))
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = str(out / "model_final.pth")
    saved = torch.load(final, weights_only=True)

    # MODEL.WEIGHTS (not a resume): the average starts from the loaded weights
    fine_tune = DefaultTrainer(_cfg(tmp_path / "ft", "MODEL.WEIGHTS", final))
    fine_tune.resume_or_load(resume=False)
    assert fine_tune.start_iter == 0 and fine_tune.ema.num_updates == 0
    torch.testing.assert_close(fine_tune.ema.module.state_dict()["head.cls_score.bias"],
                               saved["model"]["head.cls_score.bias"], rtol=0, atol=0)

    # --eval-only loads the averaged weights when EMA is on, the raw ones when it is off
    for enabled, source in (("True", saved["ema"]["module"]), ("False", saved["model"])):
        cfg = _cfg(tmp_path / "eval", "MODEL.WEIGHTS", final, "SOLVER.EMA.ENABLED", enabled)
        model = DefaultTrainer.build_model(cfg)
        DefaultTrainer.load_for_evaluation(cfg, model)
        for key in ("head.cls_score.bias", "backbone.stages.0.0.weight"):
            torch.testing.assert_close(model.state_dict()[key], source[key], rtol=0, atol=0)
    assert not torch.equal(saved["ema"]["module"]["head.cls_score.bias"],
                           saved["model"]["head.cls_score.bias"])


def test_eval_only_resume_skips_a_truncated_newest_checkpoint(tmp_path):
    from detector.checkpoint import DetectionCheckpointer

    from log_capture import CollectLogs

    cfg = _cfg(tmp_path / "run", "SOLVER.EMA.ENABLED", "False")
    torch.manual_seed(1)
    older = DefaultTrainer.build_model(cfg)
    DetectionCheckpointer(older, cfg.OUTPUT_DIR).save("model_0000002", iteration=2)
    torch.manual_seed(2)
    newer = DefaultTrainer.build_model(cfg)
    checkpointer = DetectionCheckpointer(newer, cfg.OUTPUT_DIR)
    checkpointer.save("model_0000005", iteration=5)
    newest = os.path.join(cfg.OUTPUT_DIR, "model_0000005.pth")
    with open(newest, "r+b") as f:  # cut in half, as a full disk would
        f.truncate(os.path.getsize(newest) // 2)

    torch.manual_seed(3)
    model = DefaultTrainer.build_model(cfg)
    with CollectLogs("detector") as logs:
        DefaultTrainer.load_for_evaluation(cfg, model, resume=True)
    assert "model_0000005.pth" in logs.text and "model_0000002.pth" in logs.text
    for key, value in older.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
