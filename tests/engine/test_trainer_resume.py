"""Train, kill the process after a checkpoint, then --resume: iteration, LR and optimizer continue."""
import json
import os
import signal
import subprocess
import sys

import torch

from detector.engine import DefaultTrainer
from detector.engine import default_argument_parser, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")


def _opts(out_dir):
    return [
        "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "10", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_MAX_TO_KEEP", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1",
        "OUTPUT_DIR", str(out_dir),
    ]


def _train_cmd(out_dir, resume=False):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG]
    if resume:
        cmd.append("--resume")
    return cmd + _opts(out_dir)


def test_kill_then_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "model_0000019.pth" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert (out / "model_0000019.pth").exists(), "".join(seen[-30:])
    assert not (out / "model_final.pth").exists()
    saved = torch.load(out / "model_0000019.pth", weights_only=True)
    assert saved["iteration"] == 19

    # in-process: resuming restores iteration, LR schedule position and optimizer state
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "--resume"] + _opts(out))
    cfg = setup_cfg(args)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=True)
    last = (out / "last_checkpoint").read_text().strip()
    resumed_from = torch.load(out / last, weights_only=True)
    assert trainer.start_iter == resumed_from["iteration"] + 1 >= 20
    assert trainer.scheduler.last_epoch == resumed_from["scheduler"]["last_epoch"]
    opt_state = trainer.optimizer.state_dict()["state"]
    saved_state = resumed_from["optimizer"]["state"]
    assert opt_state.keys() == saved_state.keys() and len(opt_state) > 0
    for k in saved_state:
        assert torch.equal(opt_state[k]["momentum_buffer"], saved_state[k]["momentum_buffer"])
    for group, saved_group in zip(trainer.optimizer.param_groups,
                                  resumed_from["optimizer"]["param_groups"]):
        assert group["lr"] == saved_group["lr"]

    # the real CLI resume finishes the remaining iterations only
    done = subprocess.run(_train_cmd(out, resume=True), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "model_final.pth").exists()
    iters = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    after_kill = [i for i in iters if i >= trainer.start_iter]
    assert after_kill and after_kill[-1] == 39
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 39
