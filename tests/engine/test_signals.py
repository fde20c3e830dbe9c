"""Stopping a training run with a signal: it finishes the iteration, saves a checkpoint, exits with
128 + signal number and one last line; --resume continues at the next iteration.

Runs tools/train_net.py (2 processes under --num-gpus by default; 1 process and torchrun in the
slow set) on the built-in shapes dataset with a tiny model and signals it between two periodic
checkpoints (every 5 iterations). The single-process mechanism is also covered in-process in
test_hooks.py.
"""
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from detector.engine import DefaultTrainer, default_argument_parser, launch, setup_cfg
from log_capture import CollectLogs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
DEADLINE_S = 240
SIGNAL_AFTER_ITER = 6  # between the checkpoints of iterations 4 and 9


def tiny_opts(out_dir, *extra):
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "5",
        "SOLVER.CHECKPOINT_MAX_TO_KEEP", "0", "DATASETS.TEST", "()", "DIST.TIMEOUT_MINUTES", "1",
        "LOG_PERIOD", "1", "SEED", "1", "OUTPUT_DIR", str(out_dir),
    ] + [str(x) for x in extra]


class SignalledRun:
    """Starts a command, reads its output in a thread and, as soon as the metrics line of
    iteration SIGNAL_AFTER_ITER appears, sends ``signum`` to the process (or to its children)."""

    def __init__(self, cmd, signum, cache_dir, to_children=False):
        self.signum, self.to_children = signum, to_children
        self.lines, self.signalled_at_iter, self.signal_time = [], None, None
        self._seen = queue.Queue()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
                   DETECTOR_CACHE=str(cache_dir))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"iter: (\d+)/", line)
            if self.signal_time is None and match and int(match.group(1)) >= SIGNAL_AFTER_ITER:
                self.signalled_at_iter = int(match.group(1))
                self._send()
                self.signal_time = time.monotonic()
        self._seen.put(None)

    def _send(self):
        if not self.to_children:
            self.proc.send_signal(self.signum)
            return
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            for pid in f.read().split():
                os.kill(int(pid), self.signum)

    def wait(self):
        """Exit status; the test fails (and the process is killed) after DEADLINE_S."""
        try:
            self._seen.get(timeout=DEADLINE_S)
            return self.proc.wait(timeout=DEADLINE_S)
        except (queue.Empty, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
            pytest.fail("the run did not end:\n" + "".join(self.lines[-30:]))
        finally:
            self.exit_latency = (time.monotonic() - self.signal_time
                                 if self.signal_time is not None else None)

    @property
    def text(self):
        return "".join(self.lines)


def train_net(out_dir, *extra, num_gpus=1):
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG,
            "--num-gpus", str(num_gpus)] + tiny_opts(out_dir, *extra)


def stopped_iteration(log_text, signame):
    match = re.search(rf"{signame} received: stopping after iteration (\d+)", log_text)
    assert match, log_text[-3000:]
    return int(match.group(1))


def check_stopped_run(run, out, signame, status):
    """Common checks: exit status, one last line naming the checkpoint, no traceback, the
    checkpoint of the iteration the loop stopped after, and no iteration after it."""
    assert run.signalled_at_iter is not None, run.text[-3000:]
    assert run.proc.returncode == status, run.text[-3000:]
    assert "Traceback" not in run.text, run.text[-3000:]
    stop_iter = stopped_iteration(run.text, signame)
    # the iteration running when the signal came (the one printed or the next) is the last;
    # the next one as well only if this test's reader lagged a whole iteration behind
    assert run.signalled_at_iter <= stop_iter <= run.signalled_at_iter + 2, run.text[-3000:]
    checkpoint = out / f"model_{stop_iter:07d}.pth"
    last_line = run.lines[-1].rstrip("\n")
    assert re.search(rf"Stopped by {signame} after iteration {stop_iter}, saved "
                     rf"{re.escape(str(checkpoint))} \(continue with --resume\); exiting with "
                     rf"status {status}$", last_line), run.text[-3000:]
    assert torch.load(checkpoint, weights_only=True)["iteration"] == stop_iter
    assert (out / "last_checkpoint").read_text() == checkpoint.name
    assert not (out / "model_final.pth").exists()
    metrics = (out / "metrics.json").read_text().splitlines()
    assert max(json.loads(line)["iteration"] for line in metrics) == stop_iter
    return stop_iter


def session_cache(tmp_path_factory):
    """The generated-dataset cache of this test session (see conftest.py)."""
    return tmp_path_factory.getbasetemp() / "detector_cache"


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """Two processes (--num-gpus 2) stopped by SIGTERM to the launcher after the checkpoint of
    iteration 4."""
    out = tmp_path_factory.mktemp("sigterm") / "run"
    run = SignalledRun(train_net(out, num_gpus=2), signal.SIGTERM,
                       session_cache(tmp_path_factory))
    run.wait()
    return run, out


def _resumed_trainer(out_dir, *extra):
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "--resume"] + tiny_opts(out_dir, *extra))
    trainer = DefaultTrainer(setup_cfg(args))
    trainer.resume_or_load(resume=True)
    return trainer


def check_rank1_stopped_with_rank0(out, name, stop_iter, status):
    rank1_log = (out / "log.txt.rank1").read_text()
    assert f"{name} received: stopping after iteration {stop_iter}\n" in rank1_log
    assert f"Stopped by {name} after iteration {stop_iter}; exiting with status {status}" \
        in rank1_log


def test_launcher_forwards_sigterm_and_ranks_stop_together(sigterm_run):
    """The launcher relays the signal, both ranks stop after the same iteration, rank 0 saves,
    and the launcher exits with the workers' status."""
    run, out = sigterm_run
    stop_iter = check_stopped_run(run, out, "SIGTERM", 143)
    assert (out / "model_0000004.pth").exists() and stop_iter < 9
    check_rank1_stopped_with_rank0(out, "SIGTERM", stop_iter, 143)
    print(f"SIGTERM, 2 processes: exit {run.exit_latency:.1f}s after the signal")


def test_resume_continues_at_the_next_iteration(sigterm_run, tmp_path):
    run, out = sigterm_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    stop_iter = stopped_iteration(run.text, "SIGTERM")
    saved = torch.load(resumed / f"model_{stop_iter:07d}.pth", weights_only=True)
    metrics = resumed / "metrics.json"
    logged_before = len(metrics.read_text().splitlines())
    trainer = _resumed_trainer(resumed, "SOLVER.MAX_ITER", stop_iter + 3)
    assert trainer.start_iter == stop_iter + 1
    assert trainer.scheduler.last_epoch == saved["scheduler"]["last_epoch"] == stop_iter + 1
    trainer.train()
    iters = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert iters[logged_before:] == [stop_iter + 1, stop_iter + 2]


def test_resume_skips_a_truncated_newest_checkpoint(sigterm_run, tmp_path):
    run, out = sigterm_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    stop_iter = stopped_iteration(run.text, "SIGTERM")
    newest = resumed / f"model_{stop_iter:07d}.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with CollectLogs("detector.checkpoint") as logs:
        trainer = _resumed_trainer(resumed)
    assert trainer.start_iter == 5, logs.text
    assert f"Skipping a checkpoint that cannot be read: Cannot read checkpoint {newest}" \
           in logs.text
    assert f"Resuming from {resumed / 'model_0000004.pth'} instead of the newer {newest.name}" \
           in logs.text


def test_checkpoint_mode_matches_other_outputs(sigterm_run):
    _, out = sigterm_run
    expected = os.stat(out / "metrics.json").st_mode & 0o777
    assert os.stat(out / "config.yaml").st_mode & 0o777 == expected
    for name in ("model_0000004.pth", "last_checkpoint"):
        assert os.stat(out / name).st_mode & 0o777 == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus, signum", [(1, signal.SIGTERM), (1, signal.SIGINT),
                                              (2, signal.SIGINT), (2, signal.SIGUSR1)])
def test_signal_stops_the_run(tmp_path, tmp_path_factory, num_gpus, signum):
    """One process, and the launcher with other signals. SIGINT (Ctrl-C) too ends in one line
    without a traceback."""
    out = tmp_path / "run"
    run = SignalledRun(train_net(out, num_gpus=num_gpus), signum, session_cache(tmp_path_factory))
    run.wait()
    name = signal.Signals(signum).name
    stop_iter = check_stopped_run(run, out, name, 128 + signum)
    if num_gpus == 2:
        check_rank1_stopped_with_rank0(out, name, stop_iter, 128 + signum)
    print(f"{name}, {num_gpus} process(es): exit {run.exit_latency:.1f}s after the signal")


def _interrupted_main():
    raise KeyboardInterrupt


def test_ctrl_c_outside_the_training_loop_is_one_line(capfd):
    """A Ctrl-C before the loop's handlers are installed (e.g. while the model is built): one
    line and status 130 instead of a KeyboardInterrupt traceback."""
    with pytest.raises(SystemExit) as info:
        launch(_interrupted_main, 1, report_errors=True)
    assert info.value.code == 130
    err = capfd.readouterr().err
    assert err == "Interrupted by SIGINT; exiting with status 130\n"


@pytest.mark.slow
def test_torchrun_forwards_sigterm(tmp_path, tmp_path_factory):
    """torchrun relays SIGTERM to its workers: they save and exit with 143; torchrun itself
    then fails with its own SignalException."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG] + tiny_opts(out)
    run = SignalledRun(cmd, signal.SIGTERM, session_cache(tmp_path_factory))
    run.wait()
    assert run.proc.returncode != 0
    stop_iter = stopped_iteration(run.text, "SIGTERM")
    assert torch.load(out / f"model_{stop_iter:07d}.pth", weights_only=True)["iteration"] \
        == stop_iter
    assert f"Stopped by SIGTERM after iteration {stop_iter}; exiting with status 143" \
        in (out / "log.txt.rank1").read_text()


@pytest.mark.slow
def test_sigusr1_to_torchrun_workers(tmp_path, tmp_path_factory):
    """SIGUSR1 sent to the workers (torchrun does not relay it by default): they save and exit
    with 138, which torchrun reports as a failure."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG] + tiny_opts(out)
    run = SignalledRun(cmd, signal.SIGUSR1, session_cache(tmp_path_factory), to_children=True)
    run.wait()
    assert run.proc.returncode != 0
    assert "exitcode  : 138" in run.text, run.text[-3000:]
    stop_iter = stopped_iteration(run.text, "SIGUSR1")
    assert (out / f"model_{stop_iter:07d}.pth").exists()
