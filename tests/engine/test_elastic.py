"""Elastic restarts under torchrun: a worker that dies makes torchrun restart the job, which
continues from the newest checkpoint (every run passes --resume, as docker/entrypoint.sh does)
and finishes; when a node is lost for good, the job goes on with fewer processes, the linear
scaling rule adapting the schedule and the data stream continuing from its global position.

The workers are ``tests/engine/recorded_run.py`` (it records every iteration's losses and the
data-stream position, and kills a process after a given iteration)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from recorded_run import make_mixed_shapes
from test_exact_resume import CONFIG, ROOT, SCRIPT, child_env, run_opts

pytestmark = pytest.mark.slow

TIMEOUT_S = 420
CHECKPOINT_AFTER = 9
KILL_AFTER = 13


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, port, run_id, *, is_host=True):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
            f"--nproc-per-node={nproc}", "--max-restarts=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(is_host)},last_call_timeout=2", "--monitor-interval=0.2",
            SCRIPT]


def start(command, log_path):
    env = child_env()
    # as docker/entrypoint.sh does: a fresh store for every rendezvous round (see
    # detector.engine.launch)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def kill_leftovers(marker):
    """SIGKILL every process whose command line mentions ``marker``: torchrun starts each
    worker in its own session, so killing an agent's process group leaves them running."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def wait_all(procs, deadline, marker):
    """Exit statuses of ``procs``; at ``deadline`` everything still running is killed."""
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kill_leftovers(marker)
    return [proc.returncode for proc in procs]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def worker_args(tmp_path, losses, *extra):
    return ["--losses", str(losses), "--data-root", str(tmp_path / "data"), *extra, "--resume",
            "--config-file", CONFIG]


def test_a_killed_worker_restarts_the_job_from_the_newest_checkpoint(tmp_path):
    make_mixed_shapes(str(tmp_path / "data"))
    out, losses, log = tmp_path / "out", tmp_path / "losses.jsonl", tmp_path / "torchrun.log"
    command = torchrun(2, free_port(), "elastic-kill") + worker_args(
        tmp_path, losses, "--kill-after-iter", str(KILL_AFTER),
        "--kill-once-marker", str(tmp_path / "killed")) + run_opts(out, workers=0)
    started = time.monotonic()
    (status,) = wait_all([start(command, log)], time.monotonic() + TIMEOUT_S, str(tmp_path))
    text = log.read_text()
    assert status == 0, text[-4000:]
    assert (tmp_path / "killed").exists() and (out / "model_final.pth").exists()
    assert "torchrun restart 1 of at most 1" in text, text[-4000:]
    assert f"Resuming at iteration {CHECKPOINT_AFTER + 1}" in text
    iterations = [line["iter"] for line in read_lines(losses)]
    assert iterations[-1] == 29 and set(iterations) == set(range(30))
    lost = len(iterations) - 30  # iterations trained twice
    print(f"\nkilled one of 2 workers after iteration {KILL_AFTER} (checkpoint after "
          f"{CHECKPOINT_AFTER}): {lost} iteration(s) lost, job finished in "
          f"{time.monotonic() - started:.0f} s")
    assert 0 < lost <= KILL_AFTER - CHECKPOINT_AFTER


def test_a_lost_node_restarts_the_job_on_fewer_processes(tmp_path):
    """Two single-process nodes; one is killed for good after iteration 13. The other restarts
    alone: world size 1, the config (written for 2) scaled by the linear rule, the checkpoint's
    10 iterations x 4 images continuing as iteration 20 of 60 at 2 images per iteration."""
    make_mixed_shapes(str(tmp_path / "data"))
    out, losses = tmp_path / "out", tmp_path / "losses.jsonl"
    port = free_port()
    opts = run_opts(out, workers=0) + ["SOLVER.REFERENCE_WORLD_SIZE", "2"]
    survivor = start(torchrun(1, port, "elastic-shrink", is_host=True)
                     + worker_args(tmp_path, losses) + opts, tmp_path / "node_a.log")
    lost_node = start(torchrun(1, port, "elastic-shrink", is_host=False)
                      + worker_args(tmp_path, losses, "--kill-after-iter", str(KILL_AFTER),
                                    "--kill-once-marker", str(tmp_path / "killed"), "--kill-node")
                      + opts, tmp_path / "node_b.log")
    started = time.monotonic()
    statuses = wait_all([survivor, lost_node], time.monotonic() + TIMEOUT_S, str(tmp_path))
    text = (tmp_path / "node_a.log").read_text()
    assert statuses == [0, -signal.SIGKILL], text[-4000:]
    assert "torchrun restart 1 of at most 1 (TORCHELASTIC_RESTART_COUNT), world size now 1" in text
    assert "Scaled SOLVER from REFERENCE_WORLD_SIZE 2 to world size 1" in text
    assert ("The checkpoint was trained with 4 images per iteration, this run has 2: iteration "
            f"{CHECKPOINT_AFTER + 1} (40 images) continues as iteration 20 of 60") in text
    assert (out / "model_final.pth").exists()
    lines = read_lines(losses)
    before = [line for line in lines if line["world_size"] == 2]
    after = [line for line in lines if line["world_size"] == 1]
    assert [line["iter"] for line in after] == list(range(20, 60))
    assert before[-1]["iter"] >= CHECKPOINT_AFTER
    at_checkpoint = next(line for line in before if line["iter"] == CHECKPOINT_AFTER)
    # the stream goes on from the checkpoint's position: the first batch after the restart
    # takes at most one batch of new samples per group beyond it
    assert 0 <= after[0]["position"] - at_checkpoint["position"] <= 2 * 2
    lost = len([line for line in before if line["iter"] > CHECKPOINT_AFTER])
    print(f"\nlost one of 2 nodes after iteration {KILL_AFTER}: {lost} iteration(s) of 4 images "
          f"lost, continued on 1 process from iteration 20 of 60, finished in "
          f"{time.monotonic() - started:.0f} s")
    assert lost <= KILL_AFTER - CHECKPOINT_AFTER
