"""A run killed with SIGKILL after a checkpoint and resumed trains exactly as an uninterrupted
one: the same losses in every later iteration and the same final weights (and EMA weights), bit
for bit, with 1 or 2 processes, 0 or 2 data-loader workers, aspect-ratio grouping, multi-scale
training and random flips.

Each run is ``tests/engine/recorded_run.py`` in its own process group (the kill takes the
ranks and the workers down together, as the loss of a machine would)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "engine", "recorded_run.py")
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
RUN_TIMEOUT_S = 300
MAX_ITER = 30
CHECKPOINT_AFTER = 9  # SOLVER.CHECKPOINT_PERIOD 10 writes model_0000009.pth
KILL_AFTER = 13


def run_opts(out_dir, workers, max_iter=MAX_ITER):
    """The demo config shrunk, with multi-scale training, flips and aspect-ratio grouping."""
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8",
        "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.RANDOM_FLIP", "horizontal", "DATALOADER.ASPECT_RATIO_GROUPING", "True",
        "DATALOADER.NUM_WORKERS", str(workers),
        "DATASETS.TRAIN", "('mixed_landscape', 'mixed_portrait')", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.BASE_LR", "0.02",
        "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_PERIOD", "10",
        "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9",
        "DIST.TIMEOUT_MINUTES", "2", "SEED", "7", "LOG_PERIOD", "100", "OUTPUT_DIR", str(out_dir),
    ]


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_recorded(out_dir, losses, data_root, *, processes, workers, extra=(), opts=None,
                 launcher=None):
    """Run recorded_run.py in a new process group; returns (exit status, output tail). The
    whole group is killed if it outlives RUN_TIMEOUT_S."""
    command = (launcher or [sys.executable, SCRIPT]) + [
        "--losses", str(losses), "--data-root", str(data_root), *extra,
        "--config-file", CONFIG]
    if launcher is None:
        command += ["--num-gpus", str(processes)]
    command += opts if opts is not None else run_opts(out_dir, workers)
    proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"run timed out after {RUN_TIMEOUT_S} s:\n{output[-3000:]}")
    return proc.returncode, output[-6000:]


def read_losses(path):
    """{iteration: losses} of a losses file; a resumed run's lines replace the killed run's."""
    with open(path) as f:
        return {line["iter"]: line["losses"] for line in map(json.loads, f)}


def final_weights(out_dir):
    """The model's and the EMA's weights in model_final.pth, in one dict."""
    checkpoint = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu",
                            weights_only=True)
    weights = dict(checkpoint["model"])
    weights.update({f"ema.{k}": v for k, v in checkpoint["ema"]["module"].items()})
    return weights


def largest_difference(losses_a, losses_b, weights_a, weights_b, iterations):
    diffs = [abs(losses_a[i][k] - losses_b[i][k]) for i in iterations for k in losses_a[i]]
    diffs += [float((weights_a[k].double() - weights_b[k].double()).abs().max())
              for k in weights_a if weights_a[k].numel()]
    return max(diffs)


CASES = [
    pytest.param(1, 0, id="1proc-0workers"),
    pytest.param(1, 2, id="1proc-2workers", marks=pytest.mark.slow),
    pytest.param(2, 0, id="2proc-0workers", marks=pytest.mark.slow),
    pytest.param(2, 2, id="2proc-2workers", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("processes,workers", CASES)
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, processes, workers):
    data_root = tmp_path / "data"
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    kw = dict(processes=processes, workers=workers)

    status, output = run_recorded(whole, tmp_path / "whole.jsonl", data_root, **kw)
    assert status == 0, output
    status, output = run_recorded(interrupted, tmp_path / "killed.jsonl", data_root,
                                  extra=["--kill-after-iter", str(KILL_AFTER)], **kw)
    assert status == -signal.SIGKILL, output
    with open(interrupted / "last_checkpoint") as f:
        assert f.read().strip() == f"model_{CHECKPOINT_AFTER:07d}.pth"
    killed = read_losses(tmp_path / "killed.jsonl")
    assert max(killed) == KILL_AFTER and not (interrupted / "model_final.pth").exists()

    status, output = run_recorded(interrupted, tmp_path / "resumed.jsonl", data_root,
                                  extra=["--resume"], **kw)
    assert status == 0, output
    assert f"Resuming at iteration {CHECKPOINT_AFTER + 1}" in output
    assert "data-stream position" not in output  # the checkpoint had it

    expected, resumed = read_losses(tmp_path / "whole.jsonl"), read_losses(
        tmp_path / "resumed.jsonl")
    following = list(range(CHECKPOINT_AFTER + 1, MAX_ITER))
    assert sorted(resumed) == following and len(following) == 20
    weights_a, weights_b = final_weights(whole), final_weights(interrupted)
    largest = largest_difference(expected, resumed, weights_a, weights_b, following)
    print(f"\n{processes} process(es), {workers} worker(s): largest difference of the 20 "
          f"resumed iterations' losses and the final weights = {largest!r}")
    for i in following:
        assert resumed[i] == expected[i], f"iteration {i}: {resumed[i]} != {expected[i]}"
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    # the killed run also agreed up to its kill: a resume does not hide an earlier divergence
    for i in range(KILL_AFTER + 1):
        assert killed[i] == expected[i]
