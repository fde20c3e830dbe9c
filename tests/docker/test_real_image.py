"""The CPU image for real: docker/Dockerfile built from this tree, then two containers with host
networking run docker/entrypoint.sh as the two nodes of one job (c10d rendezvous on 127.0.0.1,
local addresses 127.0.0.1 and 127.0.0.2), train the demo config and evaluate; a container stopped
with SIGTERM leaves a checkpoint in the shared /output and the job resumes when both start again.

Needs the docker client, a reachable daemon and the base image python:3.11-slim already present:
nothing is pulled and no daemon is started here. The build installs the Python packages with pip;
if that finds no network the tests are skipped. Every container started is removed afterwards.
"""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

# shared with the entrypoint tests that run the same script without docker (tests/docker is on
# sys.path: the test folders are not packages)
from test_entrypoint import check_two_node_run, free_port, tiny_training_args

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "detector:test"
BASE_IMAGE = "python:3.11-slim"
CONFIG_IN_IMAGE = "configs/demo/retinanet_tiny_shapes.yaml"
RUN_DIR_IN_IMAGE = "/output/run"
BUILD_TIMEOUT_S = 1800
CONTAINER_TIMEOUT_S = 300
POLL_INTERVAL_S = 0.5
# pip's messages when it cannot reach the package index
NO_NETWORK_MARKERS = ("Temporary failure in name resolution", "Failed to establish a new connection",
                      "Network is unreachable", "Could not resolve host", "No matching distribution",
                      "Max retries exceeded")


def docker(*args, timeout=60, check=True):
    """Run ``docker ARGS``; returns the completed process (output as text, stderr merged)."""
    proc = subprocess.run(["docker", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:2])} failed ({proc.returncode}): "
                    f"{proc.stdout.strip()[-2000:]}")
    return proc


def last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="module")
def image():
    """Build docker/Dockerfile from this tree once per session (the layer cache makes a rebuild
    after a source change redo only the last pip step), or skip with the reason."""
    if shutil.which("docker") is None:
        pytest.skip("the docker client is not installed")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if info.returncode != 0:
        pytest.skip(f"the Docker daemon is not reachable: {last_line(info.stdout)}")
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.skip(f"the base image {BASE_IMAGE} is not present (no registry to pull it from)")
    start = time.monotonic()
    build = subprocess.run(
        ["docker", "build", "--network", "host", "-f", os.path.join(ROOT, "docker", "Dockerfile"),
         "-t", IMAGE, ROOT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=BUILD_TIMEOUT_S, env=dict(os.environ, DOCKER_BUILDKIT="0"))
    if build.returncode != 0:
        if any(marker in build.stdout for marker in NO_NETWORK_MARKERS):
            pytest.skip(f"building {IMAGE} needs PyPI, which is not reachable: "
                        f"{last_line(build.stdout)}")
        pytest.fail(f"docker build of docker/Dockerfile failed:\n{build.stdout[-4000:]}")
    print(f"\n{IMAGE} built in {time.monotonic() - start:.0f}s")
    return IMAGE


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """The folder mounted at the image's /datasets volume: the shapes splits generated once here
    into its cache/ (the json files name the images relative to their folder), so the nodes do
    not each generate them, and a restarted container reads the same ones."""
    from detector.data.datasets import ensure_shapes_dataset

    root = tmp_path_factory.mktemp("datasets")
    root.chmod(0o755)  # readable by the image's uid 10001 (pytest makes it private)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTOR_CACHE", str(root / "cache"))
        for split in ("train", "val"):
            ensure_shapes_dataset(split)
    return root


@pytest.fixture
def containers():
    """Names of the containers a test starts; all of them are removed at the end, running or not."""
    names = []
    yield names
    if names:
        docker("rm", "-f", *names, timeout=120, check=False)


def output_dir(tmp_path):
    """The host folder mounted at /output in both containers, as a shared filesystem on a
    cluster; the image runs as uid 10001, so anyone may write into it."""
    out = tmp_path / "output"
    out.mkdir()
    out.chmod(0o777)
    return out


def container_args(**overrides):
    """The demo config shrunk as in the entrypoint tests, with paths inside the image, then
    ``overrides`` (KEY=value, later values win)."""
    args = tiny_training_args(RUN_DIR_IN_IMAGE)
    args[args.index("--config-file") + 1] = CONFIG_IN_IMAGE
    for key, value in overrides.items():
        args += [key.replace("__", "."), str(value)]
    return args


def start_nodes(containers, image, out, datasets, args, name):
    """``docker run -d`` one container per node of a two-node job with the plain-docker variables
    of the entrypoint; returns the container names."""
    port = free_port()
    names = []
    for node in range(2):
        container = f"{name}-{os.getpid()}-node{node}"
        containers.append(container)
        docker("run", "-d", "--name", container, "--network", "host", "--shm-size", "512m",
               "-v", f"{out}:/output", "-v", f"{datasets}:/datasets:ro",
               "-e", "DETECTOR_CACHE=/datasets/cache", "-e", "OMP_NUM_THREADS=1",
               "-e", "DETECTOR_NNODES=2", "-e", "DETECTOR_NPROC_PER_NODE=1",
               "-e", "DETECTOR_MASTER_ADDR=127.0.0.1", "-e", f"DETECTOR_MASTER_PORT={port}",
               "-e", f"DETECTOR_RDZV_ID={container[:-len('-node0')]}",
               "-e", f"DETECTOR_LOCAL_ADDR=127.0.0.{node + 1}",
               "-e", "DETECTOR_SHUTDOWN_TIMEOUT=60", image, *args)
        names.append(container)
    return names


def exit_codes(names, deadline):
    """Poll until every container has exited; returns their exit codes. At the deadline, fails
    with the output of those still running."""
    codes = {}
    while True:
        for name in names:
            if name not in codes:
                state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name)
                status, code = state.stdout.split()
                if status == "exited":
                    codes[name] = int(code)
        if len(codes) == len(names):
            return [codes[name] for name in names]
        if time.monotonic() > deadline:
            running = [name for name in names if name not in codes]
            pytest.fail(f"containers {running} still running at the deadline:\n"
                        + "\n".join(logs(name)[-3000:] for name in running))
        time.sleep(POLL_INTERVAL_S)


def logs(name):
    return docker("logs", name, timeout=60).stdout


def test_two_containers_train_as_two_nodes_and_evaluate(image, datasets_dir, containers,
                                                        tmp_path):
    start = time.monotonic()
    out = output_dir(tmp_path)
    names = start_nodes(containers, image, out, datasets_dir, container_args(), "detector-test-a")
    codes = exit_codes(names, time.monotonic() + CONTAINER_TIMEOUT_S)
    results = [(code, logs(name)) for code, name in zip(codes, names)]
    # both exit 0, world size 2 on both ranks, 3 iterations, bbox AP in the log and metrics
    check_two_node_run(out / "run", results)
    assert "--local-addr=127.0.0.2" in results[1][1]
    assert re.search(r"Evaluation results for shapes_val: bbox: AP=\d",
                     (out / "run" / "log.txt").read_text())
    detections = json.loads(
        (out / "run" / "inference" / "shapes_val" / "coco_instances_results.json").read_text())
    assert detections and {"image_id", "bbox", "score", "category_id"} <= set(detections[0])
    print(f"\ntwo containers trained and evaluated in {time.monotonic() - start:.0f}s")


def test_sigterm_to_one_container_checkpoints_and_the_restarted_job_resumes(
        image, datasets_dir, containers, tmp_path):
    start = time.monotonic()
    out = output_dir(tmp_path)
    run = out / "run"
    max_iter = 200
    # the same command both times: restarting the containers is what a retrying scheduler does
    args = container_args(SOLVER__MAX_ITER=max_iter, SOLVER__CHECKPOINT_PERIOD=20, LOG_PERIOD=10)
    names = start_nodes(containers, image, out, datasets_dir, args, "detector-test-b")
    deadline = time.monotonic() + CONTAINER_TIMEOUT_S
    while not (run / "last_checkpoint").exists():
        states = [docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
                  for name in names]
        if "exited" in states or time.monotonic() > deadline:
            pytest.fail(f"no periodic checkpoint before the stop (states {states}):\n"
                        + "\n".join(logs(name)[-3000:] for name in names))
        time.sleep(POLL_INTERVAL_S)
    docker("kill", "-s", "TERM", names[1])
    codes = exit_codes(names, time.monotonic() + CONTAINER_TIMEOUT_S)
    stopped_log = logs(names[1])
    assert codes[1] == 143, f"exit codes {codes}:\n{stopped_log[-4000:]}"
    assert last_line(stopped_log).endswith("exiting 143 so the job can be retried")
    # the other node saved and stopped with it, and says so with the same retryable status
    peer_log = logs(names[0])
    assert codes[0] == 143, f"exit codes {codes}:\n{peer_log[-4000:]}"
    assert "stopped on a signal to another node" in last_line(peer_log)

    log = (run / "log.txt").read_text()
    stopped = re.search(r"Stopped by SIGTERM after iteration (\d+), saved (\S+)", log)
    assert stopped, log[-3000:]
    stopped_iter = int(stopped.group(1))
    checkpoint = os.path.basename(stopped.group(2))
    assert 0 < stopped_iter < max_iter - 1 and (run / checkpoint).is_file()
    assert (run / "last_checkpoint").read_text().strip() == checkpoint
    assert not (run / "model_final.pth").exists()
    print(f"\nstopped after iteration {stopped_iter} (node exit codes {codes}) "
          f"at {time.monotonic() - start:.0f}s")

    docker("start", *names)
    codes = exit_codes(names, time.monotonic() + CONTAINER_TIMEOUT_S)
    results = [(code, logs(name)) for code, name in zip(codes, names)]
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node} after the restart:\n{output[-4000:]}"
    resumed = re.findall(r"Resuming at iteration (\d+)", (run / "log.txt").read_text())
    assert resumed == [str(stopped_iter + 1)]
    metrics = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    trained = [m["iteration"] for m in metrics if "total_loss" in m]
    assert trained[-1] == max_iter - 1
    assert all(a < b for a, b in zip(trained, trained[1:])), trained
    assert (run / "model_final.pth").is_file()
    assert any("bbox/AP" in m for m in metrics)
    print(f"resumed at iteration {stopped_iter + 1} and finished; "
          f"case took {time.monotonic() - start:.0f}s")
