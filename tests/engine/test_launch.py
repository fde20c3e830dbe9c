"""The launcher: argument checks, one-line errors, and a failing rank ending the whole run.

Multi-process runs are bounded by DIST.TIMEOUT_MINUTES and by a watchdog that kills the spawned
processes; torchrun runs by a subprocess timeout.
"""
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from detector.data.build import per_process_batch_size
from detector.engine import DefaultTrainer, default_argument_parser, default_setup
from detector.engine import launch, setup_cfg
from detector.engine.hooks import CallbackHook
from detector.engine.launch import LaunchError, check_launch_arguments
from detector.utils import comm
from detector.utils.logger import setup_logger
from tool_loader import load_tool

import process_watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
WATCHDOG_S = 180
FAIL_AT_ITER = 3


def tiny_opts(out_dir, *extra):
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", "20", "DATASETS.TEST", "()", "DIST.TIMEOUT_MINUTES", "1",
        "LOG_PERIOD", "100", "SEED", "1", "OUTPUT_DIR", str(out_dir),
    ] + [str(x) for x in extra]


def parse_args(out_dir, *extra):
    return default_argument_parser().parse_args(
        ["--config-file", CONFIG] + tiny_opts(out_dir, *extra))


def watchdog(seconds=WATCHDOG_S):
    """:func:`process_watchdog.watchdog` with this module's bound."""
    return process_watchdog.watchdog(seconds)


@pytest.fixture
def shapes_train():
    from detector.data.datasets import ensure_shapes_dataset

    ensure_shapes_dataset("train")


def train_with_failure(args, mode, pid_dir):
    """A main function for launch(): the standard trainer, plus a test-only hook with which rank 1
    dies at iteration FAIL_AT_ITER: ``mode`` "exit" = os._exit(1) (like a crash or an OOM kill),
    "raise" = a Python exception. Every rank records its pid in ``pid_dir``."""
    with open(os.path.join(pid_dir, f"rank{comm.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    trainer = DefaultTrainer(cfg)

    def fail(t):
        if comm.get_rank() == 1 and t.iter == FAIL_AT_ITER:
            if mode == "exit":
                os._exit(1)
            raise RuntimeError(f"injected failure at iteration {t.iter}")

    trainer.register_hooks([CallbackHook(after_step=fail)])
    trainer.train()


def build_trainer(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    DefaultTrainer(cfg)


def _assert_gone(pid_dir):
    pids = [int(open(os.path.join(pid_dir, n)).read()) for n in sorted(os.listdir(pid_dir))]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --------------------------------------------------------------------------------------------
# arguments and bad input, before any process starts
# --------------------------------------------------------------------------------------------
def test_check_launch_arguments(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    check_launch_arguments(2, num_machines=2, machine_rank=1, dist_url="tcp://h:1")
    with pytest.raises(ValueError, match="DIST.TIMEOUT_MINUTES must be positive"):
        check_launch_arguments(2, timeout_minutes=0)
    with pytest.raises(ValueError, match=r"--machine-rank 2 must be in \[0, 2\)"):
        check_launch_arguments(1, num_machines=2, machine_rank=2, dist_url="tcp://h:1")
    with pytest.raises(ValueError, match="--dist-url auto only works on one machine"):
        check_launch_arguments(1, num_machines=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_launch_arguments(1)  # torchrun decides
    with pytest.raises(ValueError, match="contradicts torchrun's WORLD_SIZE=4"):
        check_launch_arguments(2)


def test_per_process_batch_size():
    assert per_process_batch_size(16, 4) == 4
    with pytest.raises(ValueError, match=r"^SOLVER.IMS_PER_BATCH=6 is not divisible by the "
                                         r"world size 4 \("):
        per_process_batch_size(6, 4)


@pytest.mark.parametrize("torchrun_world", [None, 3])
def test_cli_rejects_indivisible_batch_in_one_line(monkeypatch, torchrun_world):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--config-file", CONFIG, "SOLVER.IMS_PER_BATCH", "4"]
    if torchrun_world:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(torchrun_world))
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        argv = ["--num-gpus", "2"] + argv[:-1] + ["3"]
    with pytest.raises(SystemExit) as info:
        load_tool("train_net").cli(argv)
    message = str(info.value)
    assert "\n" not in message
    expected = (f"IMS_PER_BATCH=4 is not divisible by the world size {torchrun_world}"
                if torchrun_world else "IMS_PER_BATCH=3 is not divisible by the world size 2")
    assert message.startswith("train_net.py: error: SOLVER." + expected), message


@pytest.mark.parametrize("logged_by_trainer", [False, True])
def test_error_traceback_is_printed_once(capfd, logged_by_trainer):
    """The tools' single-process path: one traceback (the trainer's log of it, or ours), then a
    one-line LaunchError."""
    setup_logger(None, distributed_rank=0, name="detector", color=False)

    def main():
        try:
            raise FloatingPointError("Loss became infinite or NaN at iteration=7!")
        except FloatingPointError:
            if logged_by_trainer:  # what TrainerBase.train does before re-raising
                logging.getLogger("detector.engine.train_loop").exception("Exception during "
                                                                          "training:")
            raise

    with pytest.raises(LaunchError, match=r"^failed with FloatingPointError: Loss became "
                                          r"infinite or NaN at iteration=7!$"):
        launch(main, 1, report_errors=True)
    text = "".join(capfd.readouterr())
    assert text.count("Traceback (most recent call last)") == 1, text
    assert text.count("FloatingPointError: Loss became infinite") == 1, text
    with pytest.raises(FloatingPointError):  # without report_errors: unchanged
        launch(main, 1)


# --------------------------------------------------------------------------------------------
# failures inside the processes
# --------------------------------------------------------------------------------------------
def test_rank_killed_mid_run_ends_the_run(tmp_path, shapes_train):
    """Rank 1 vanishes at iteration 3 (no exception, like a crash): launch raises a one-line
    LaunchError quickly, far below the 1 minute collective timeout, and rank 0 is gone."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    start = time.monotonic()
    with watchdog(), pytest.raises(LaunchError) as info:
        launch(train_with_failure, 2, timeout_minutes=1,
               args=(parse_args(tmp_path / "out"), "exit", str(pid_dir)))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("rank 1 of 2 (pid ") and "exited with code 1" in message, message
    assert info.value.rank == 1
    assert elapsed < 50, f"took {elapsed:.0f}s: the survivors waited for the timeout"
    _assert_gone(str(pid_dir))
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_exception_on_one_rank_is_reported_once(tmp_path, capfd, shapes_train):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    with watchdog(), pytest.raises(LaunchError) as info:
        launch(train_with_failure, 2, timeout_minutes=1,
               args=(parse_args(tmp_path / "out"), "raise", str(pid_dir)))
    message = str(info.value)
    assert "\n" not in message
    # the root cause comes first even if rank 0 then fails too (its peer is gone)
    assert message.startswith(f"rank 1 of 2 failed with RuntimeError: injected failure at "
                              f"iteration {FAIL_AT_ITER}"), message
    output = capfd.readouterr()
    text = output.out + output.err
    assert text.count(f"RuntimeError: injected failure at iteration {FAIL_AT_ITER}") == 1, text
    assert "[rank 1] Traceback (most recent call last)" in output.err
    _assert_gone(str(pid_dir))


@pytest.mark.slow
def test_indivisible_batch_inside_workers_is_reported_once(tmp_path, capfd):
    """Without the CLI's pre-check, every rank's DefaultTrainer raises; the user sees one
    traceback and one line naming the ranks."""
    with watchdog(), pytest.raises(LaunchError) as info:
        launch(build_trainer, 2, timeout_minutes=1,
               args=(parse_args(tmp_path, "SOLVER.IMS_PER_BATCH", "3"),))
    message = str(info.value)
    assert "\n" not in message
    assert "failed with ValueError: SOLVER.IMS_PER_BATCH=3 is not divisible by the world " \
           "size 2" in message
    text = "".join(capfd.readouterr())
    assert text.count("Traceback (most recent call last)") == 1, text


@pytest.mark.slow
def test_torchrun_stops_the_run_when_a_rank_dies(tmp_path, shapes_train):
    """Under torchrun, rank 1 os._exit(1)s at iteration 3: torchrun stops rank 0 and fails."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # torchrun runs this file as a script: the shared test helpers (tests/) must be importable
    tests_dir = os.path.join(ROOT, "tests")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--max-restarts=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
         os.path.abspath(__file__), json.dumps({"out": str(tmp_path / "out"),
                                                "pid_dir": str(pid_dir)})],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=WATCHDOG_S)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "rank      : 1" in output and "exitcode  : 1" in output, output[-3000:]
    assert elapsed < 60 + 30, f"took {elapsed:.0f}s"
    _assert_gone(str(pid_dir))


if __name__ == "__main__":  # run by torchrun in the test above
    options = json.loads(sys.argv[1])
    launch(train_with_failure, args=(parse_args(options["out"]), "exit", options["pid_dir"]),
           timeout_minutes=1)
