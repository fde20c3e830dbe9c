"""docker/entrypoint.sh: scheduler environment -> torchrun arguments, signal translation, and two
"nodes" on this machine that train the demo config and evaluate (SLURM and Kubeflow variables).

Every run gets a clean environment (no scheduler variables leak in from the test session), is
bounded by a deadline and, on failure, reports the node's output.
"""
import json
import re
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
NODE_TIMEOUT_S = 240


def base_env(**variables):
    """PATH and the dataset location of this session plus ``variables``; nothing scheduler-like."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, "DETECTOR_PYTHON": sys.executable}
    for name in ("DETECTOR_DATASETS", "HOME", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update({k: str(v) for k, v in variables.items()})
    return env


def run_bash(snippet, *args):
    return subprocess.run(["bash", "-c", f"source {shlex.quote(ENTRYPOINT)}; {snippet}", "_", *args],
                          capture_output=True, text=True, timeout=30, env=base_env())


def dry_run(**variables):
    """The torchrun command line the entrypoint would run, as a list, or the failed process."""
    proc = subprocess.run([ENTRYPOINT, "--config-file", "cfg.yaml", "SOLVER.MAX_ITER", "3"],
                          capture_output=True, text=True, timeout=60,
                          env=base_env(DETECTOR_DRY_RUN=1, **variables))
    return (shlex.split(proc.stdout) if proc.returncode == 0 else None), proc


# --------------------------------------------------------------------------------------------
# node lists
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-02,07]", ["node01", "node02", "node07"]),
    ("a1,b[3-4]", ["a1", "b3", "b4"]),
    ("gpu-[1-2]x", ["gpu-1x", "gpu-2x"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[09-10],login", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10", "login"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ("single", ["single"]),
])
def test_expands_compressed_node_lists(nodelist, hosts):
    proc = run_bash('expand_nodelist_bash "$1"', nodelist)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == hosts


@pytest.mark.parametrize("nodelist", ["node[01-", "a,,b", "n[3-1]", "x]", "n[a-b]", "n[]", ""])
def test_rejects_malformed_node_lists(nodelist):
    assert run_bash('expand_nodelist_bash "$1"', nodelist).returncode != 0


def test_malformed_slurm_node_list_is_a_one_line_error():
    command, proc = dry_run(SLURM_JOB_ID=5, SLURM_NNODES=2, SLURM_NODEID=0,
                            SLURM_JOB_NODELIST="node[01-")
    assert command is None and proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "entrypoint.sh: error: SLURM_JOB_NODELIST='node[01-' is not a valid node list")


# --------------------------------------------------------------------------------------------
# environment -> torchrun arguments
# --------------------------------------------------------------------------------------------
def torchrun_options(command):
    """(options before the script, arguments after it)."""
    script = os.path.join(ROOT, "tools", "train_net.py")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    at = command.index(script)
    return command[3:at], command[at + 1:]


def test_slurm_variables_map_to_c10d_rendezvous_on_the_first_host():
    command, proc = dry_run(SLURM_JOB_ID=4242, SLURM_NNODES=3, SLURM_NODEID=2,
                            SLURM_JOB_NODELIST="node[01-02,07]", SLURM_GPUS_ON_NODE=4)
    assert command, proc.stderr
    options, script_args = torchrun_options(command)
    assert options == ["--nnodes=3", "--nproc-per-node=4", "--max-restarts=0",
                       "--shutdown-timeout=100", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=node01:29500", "--rdzv-id=4242", "--local-addr=node07"]
    assert script_args == ["--resume", "--config-file", "cfg.yaml", "SOLVER.MAX_ITER", "3"]


def test_detector_variables_override_the_scheduler():
    command, proc = dry_run(SLURM_JOB_ID=1, SLURM_NNODES=2, SLURM_NODEID=1,
                            SLURM_JOB_NODELIST="a1,b[3]", DETECTOR_MASTER_ADDR="127.0.0.1",
                            DETECTOR_MASTER_PORT=1234, DETECTOR_NPROC_PER_NODE=2,
                            DETECTOR_MAX_RESTARTS=3, DETECTOR_SHUTDOWN_TIMEOUT=50)
    assert command, proc.stderr
    options, _ = torchrun_options(command)
    assert "--rdzv-endpoint=127.0.0.1:1234" in options
    assert "--local-addr=b3" in options
    assert {"--nproc-per-node=2", "--max-restarts=3", "--shutdown-timeout=50"} <= set(options)


def test_kubeflow_prefers_pet_variables_over_world_size():
    # with nprocPerNode the operator's WORLD_SIZE counts processes; PET_NNODES counts pods
    command, proc = dry_run(PET_NNODES="1:4", PET_NPROC_PER_NODE=2, PET_RDZV_ID="job",
                            PET_RDZV_ENDPOINT="job-master-0:23456", PET_MAX_RESTARTS=2,
                            WORLD_SIZE=8, RANK=3, MASTER_ADDR="job-master-0", MASTER_PORT=23456,
                            POD_IP="10.1.2.3")
    assert command, proc.stderr
    options, script_args = torchrun_options(command)
    assert options == ["--nnodes=1:4", "--nproc-per-node=2", "--max-restarts=2",
                       "--shutdown-timeout=100", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=job-master-0:23456", "--rdzv-id=job",
                       "--local-addr=10.1.2.3"]
    assert script_args[0] == "--resume"


def test_kubeflow_without_pet_variables_takes_world_size_as_pods():
    command, proc = dry_run(WORLD_SIZE=2, RANK=1, MASTER_ADDR="job-master-0", MASTER_PORT=23456,
                            DETECTOR_NPROC_PER_NODE=1)
    assert command, proc.stderr
    options, _ = torchrun_options(command)
    assert "--nnodes=2" in options and "--rdzv-endpoint=job-master-0:23456" in options


def test_plain_docker_single_node_is_standalone_and_multi_node_needs_a_master():
    command, proc = dry_run(DETECTOR_NPROC_PER_NODE=1)
    assert command, proc.stderr
    options, _ = torchrun_options(command)
    assert "--standalone" in options and "--nnodes=1" in options
    command, proc = dry_run(DETECTOR_NNODES=2, DETECTOR_NPROC_PER_NODE=1)
    assert command is None and proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "entrypoint.sh: error: no rendezvous host for 2 nodes (plain): set DETECTOR_MASTER_ADDR")


@pytest.mark.parametrize("variables,message", [
    (dict(SLURM_JOB_ID=1, SLURM_NNODES=2, SLURM_NODEID=0, SLURM_JOB_NODELIST="n[1-3]"),
     "SLURM_NNODES=2 but SLURM_JOB_NODELIST='n[1-3]' has 3 host(s)"),
    (dict(SLURM_JOB_ID=1, SLURM_NNODES=2, SLURM_NODEID=2, SLURM_JOB_NODELIST="n[1-2]"),
     "SLURM_NODEID='2' is not an index into SLURM_JOB_NODELIST (2 hosts)"),
    (dict(DETECTOR_NNODES="two", DETECTOR_MASTER_ADDR="h"),
     "number of nodes 'two' (plain) is neither N nor MIN:MAX"),
    (dict(DETECTOR_NPROC_PER_NODE=0),
     "processes per node '0' (plain) is neither a positive number nor gpu, cpu or auto"),
    (dict(DETECTOR_NPROC_PER_NODE="all"),
     "processes per node 'all' (plain) is neither a positive number nor gpu, cpu or auto"),
])
def test_inconsistent_environment_is_a_one_line_error(variables, message):
    command, proc = dry_run(**variables)
    assert command is None and proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"entrypoint.sh: error: {message}"


# --------------------------------------------------------------------------------------------
# signals: SIGUSR1 reaches torchrun as SIGTERM; the exit status says which signal stopped the job
# --------------------------------------------------------------------------------------------
# stands in for ``python -m torch.distributed.run``: records the signal it gets and, like
# torchrun after a SignalException, exits 1
FAKE_TORCHRUN = """\
import os, signal, sys, time
record = os.environ["SIGNAL_RECORD"]
def stop(signum, frame):
    with open(record, "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(1)
for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP"):
    signal.signal(getattr(signal, name), stop)
open(record + ".ready", "w").close()
time.sleep(60)
"""


def default_signal_dispositions():
    """Start the entrypoint as a container's first process starts: no signal ignored. A shell
    cannot trap a signal ignored when it started, and a test run from a background job (nohup,
    ``cmd &``) inherits SIGINT and SIGQUIT ignored."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("sent,forwarded,status", [
    (signal.SIGUSR1, "SIGTERM", 138), (signal.SIGTERM, "SIGTERM", 143),
    (signal.SIGINT, "SIGINT", 130)])
def test_stop_signals_are_forwarded_and_reported_in_the_exit_status(tmp_path, sent, forwarded,
                                                                    status):
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c '{FAKE_TORCHRUN}'\n")
    fake.chmod(0o755)
    record = tmp_path / "signal.txt"
    proc = subprocess.Popen([ENTRYPOINT], stderr=subprocess.PIPE, text=True,
                            env=base_env(DETECTOR_PYTHON=fake, DETECTOR_NPROC_PER_NODE=1,
                                         SIGNAL_RECORD=record), start_new_session=True,
                            preexec_fn=default_signal_dispositions)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "signal.txt.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "fake torchrun did not start"
            time.sleep(0.05)
        proc.send_signal(sent)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert record.read_text() == forwarded
    assert proc.returncode == status, stderr
    assert stderr.strip().splitlines()[-1].endswith(f"exiting {status} so the job can be retried")


# --------------------------------------------------------------------------------------------
# two nodes on this machine: SLURM and Kubeflow variables, c10d rendezvous on 127.0.0.1
# --------------------------------------------------------------------------------------------
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_training_args(out_dir):
    """The demo config shrunk to 64 px and a few iterations, evaluated on shapes_val."""
    return [
        "--config-file", CONFIG,
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "('shapes_val',)",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "10", "DIST.TIMEOUT_MINUTES", "2", "LOG_PERIOD", "1",
        "OUTPUT_DIR", str(out_dir),
    ]


@pytest.fixture(scope="module")
def shapes_data():
    """Generate the shapes splits once here, not concurrently in every node."""
    from detector.data.datasets import ensure_shapes_dataset

    ensure_shapes_dataset("train")
    ensure_shapes_dataset("val")


def start_nodes(tmp_path, node_envs, args, name="node"):
    """Start the entrypoint with ``args`` once per environment, its output in
    ``<name><node>.log``; returns [(process, log file)]."""
    procs = []
    for node, variables in enumerate(node_envs):
        log = open(tmp_path / f"{name}{node}.log", "w")
        procs.append((subprocess.Popen([ENTRYPOINT] + args, cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, env=base_env(**variables),
                                       start_new_session=True), log))
    return procs


def wait_nodes(procs, deadline):
    for proc, _ in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))


def stop_nodes(procs):
    """Kill the entrypoints still running (only those started here, with their children) and
    close the logs; returns [(returncode, output)] per node."""
    results = []
    for proc, log in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        results.append((proc.returncode, open(log.name).read()))
    return results


def run_two_nodes(tmp_path, node_envs):
    """Train with the entrypoint once per environment; returns the output folder and
    [(returncode, output)] per node."""
    out = tmp_path / "run"
    procs = start_nodes(tmp_path, node_envs, tiny_training_args(out))
    try:
        wait_nodes(procs, time.monotonic() + NODE_TIMEOUT_S)
    finally:
        results = stop_nodes(procs)
    return out, results


def check_two_node_run(out, results):
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node}:\n{output[-4000:]}"
    assert (out / "model_final.pth").exists()
    log = (out / "log.txt").read_text()
    assert "Rank 0 of world size 2" in log
    assert "Evaluation results for shapes_val" in log
    assert "Rank 1 of world size 2" in (out / "log.txt.rank1").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1, 2]
    assert any("bbox/AP" in m for m in metrics)


def test_two_slurm_nodes_train_and_evaluate(tmp_path, shapes_data):
    # a compressed node list whose hosts are loopback addresses: the first is the rendezvous host
    common = dict(SLURM_JOB_ID=free_port(), SLURM_NNODES=2, SLURM_JOB_NODELIST="127.0.0.[1-2]",
                  SLURM_NTASKS_PER_NODE=1, DETECTOR_MASTER_PORT=free_port(),
                  DETECTOR_NPROC_PER_NODE=1)
    out, results = run_two_nodes(tmp_path, [dict(common, SLURM_NODEID=0, SLURMD_NODENAME="127.0.0.1"),
                                             dict(common, SLURM_NODEID=1, SLURMD_NODENAME="127.0.0.2")])
    check_two_node_run(out, results)
    assert "--local-addr=127.0.0.2" in results[1][1]


# slow: the Kubeflow mapping itself is checked by the dry runs above
@pytest.mark.slow
def test_two_kubeflow_nodes_train_and_evaluate(tmp_path, shapes_data):
    port = free_port()
    # what the operator sets for a master and a worker with nprocPerNode 1; POD_IP from the
    # downward API gives each "pod" its own address
    common = dict(PET_NNODES=2, PET_NPROC_PER_NODE=1, PET_MASTER_ADDR="127.0.0.1",
                  PET_MASTER_PORT=port, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=2)
    out, results = run_two_nodes(tmp_path, [
        dict(common, PET_NODE_RANK=0, RANK=0, POD_IP="127.0.0.1"),
        dict(common, PET_NODE_RANK=1, RANK=1, POD_IP="127.0.0.2")])
    check_two_node_run(out, results)
    assert "kubeflow node" in results[0][1]


def test_sigusr1_checkpoints_both_nodes_and_a_relaunch_resumes(tmp_path, shapes_data):
    """SLURM's warning signal, relayed by srun to the entrypoint of every node: the workers save,
    every entrypoint exits 138, and the requeued job (the same command) continues after the saved
    iteration."""
    out = tmp_path / "run"
    common = dict(SLURM_JOB_ID=free_port(), SLURM_NNODES=2, SLURM_JOB_NODELIST="127.0.0.[1-2]",
                  DETECTOR_MASTER_PORT=free_port(), DETECTOR_NPROC_PER_NODE=1,
                  DETECTOR_SHUTDOWN_TIMEOUT=60)
    node_envs = [dict(common, SLURM_NODEID=0), dict(common, SLURM_NODEID=1)]
    args = tiny_training_args(out) + ["SOLVER.MAX_ITER", "1000", "DATASETS.TEST", "()"]
    procs = start_nodes(tmp_path, node_envs, args)
    try:
        deadline = time.monotonic() + NODE_TIMEOUT_S
        metrics = out / "metrics.json"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), \
                "training did not start"
            time.sleep(0.2)
        for proc, _ in procs:
            os.kill(proc.pid, signal.SIGUSR1)
        wait_nodes(procs, deadline)
    finally:
        results = stop_nodes(procs)
    for node, (code, output) in enumerate(results):
        assert code == 138, f"node {node}:\n{output[-4000:]}"
        assert output.rstrip().splitlines()[-1].endswith("exiting 138 so the job can be retried")
    stopped = re.search(r"Stopped by SIGTERM after iteration (\d+), saved (\S+)",
                        (out / "log.txt").read_text())
    assert stopped, (out / "log.txt").read_text()[-3000:]
    saved_iteration = int(stopped.group(1))
    assert saved_iteration < 999 and os.path.exists(stopped.group(2).rstrip(","))

    resumed_args = tiny_training_args(out) + [
        "SOLVER.MAX_ITER", str(saved_iteration + 3), "DATASETS.TEST", "()"]
    procs = start_nodes(tmp_path, node_envs, resumed_args, name="resumed")
    try:
        wait_nodes(procs, time.monotonic() + NODE_TIMEOUT_S)
    finally:
        results = stop_nodes(procs)
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node}:\n{output[-4000:]}"
    iterations = [json.loads(line).get("iteration") for line in metrics.read_text().splitlines()]
    assert iterations[-2:] == [saved_iteration + 1, saved_iteration + 2]
