"""tools/gpu_check.sh and the GPU checks of tests/cuda, on this CPU-only machine: the script
reports the missing GPU and lists every cuda test as skipped, every test in tests/cuda is marked
cuda, and the checks' bodies pass when the device they check is the CPU (gloo for SyncBN)."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_TESTS = os.path.join(ROOT, "tests", "cuda")
sys.path.insert(0, CUDA_TESTS)
import gpu_inference_checks as inference  # noqa: E402
import gpu_training_checks as training  # noqa: E402

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
TIMEOUT_S = 180


def _run(cmd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S,
                          **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with a GPU the script runs the whole GPU check (minutes)")
def test_script_without_a_gpu_lists_every_cuda_test_as_skipped(tmp_path):
    # from another folder: the script finds the repository itself
    done = _run(["bash", SCRIPT], cwd=str(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("gpu_check: torch ") for line in lines), out
    assert ("gpu_check: no CUDA GPU (torch.cuda.is_available() is False): every cuda test is "
            "skipped, the benchmark on CUDA is not run") in lines, out
    result = [line for line in lines if re.match(r"=+ .* in [\d.]+s", line)]
    assert len(result) == 1, out
    skipped = re.search(r"(\d+) skipped", result[0])
    assert skipped and int(skipped.group(1)) > 0, result[0]
    # nothing ran, failed or was left out by -m cuda
    assert not re.search(r"passed|failed|error|deselected", result[0]), result[0]
    # every skip is for the missing GPU(s)
    skips = re.findall(r"^SKIPPED \[(\d+)\] tests/cuda/\S+: (.*)$", done.stdout, flags=re.M)
    assert sum(int(n) for n, _ in skips) == int(skipped.group(1)), out
    assert {reason for _, reason in skips} <= {
        "needs a CUDA GPU (torch.cuda.is_available() is False)",
        "needs 2 CUDA GPUs (torch.cuda.device_count() < 2)"}, skips
    assert lines[-1].startswith(f"gpu_check: summary: no CUDA GPU here, cuda tests: "
                                f"{skipped.group(1)} skipped in "), lines[-1]
    assert lines[-1].endswith("; benchmark not run"), lines[-1]


def test_every_test_in_tests_cuda_is_marked_cuda():
    """A test there without the marker would run on the CPU in the default suite and be left out
    of `pytest -m cuda` (deselected)."""
    done = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                 CUDA_TESTS], cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "deselected" not in summary, f"a test in tests/cuda lacks @pytest.mark.cuda: {summary}"
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) >= 10 and re.match(rf"{len(ids)} tests? collected in ", summary), summary
    files = {i.split("::")[0] for i in ids}
    assert files == {f"tests/cuda/{name}" for name in os.listdir(CUDA_TESTS)
                     if name.startswith("test_") and name.endswith(".py")}


# ------------------------------------------------------------------------------------------
# The bodies of the GPU checks with the CPU as the device checked
# ------------------------------------------------------------------------------------------
def test_amp_training_body_on_cpu(tmp_path):
    """bfloat16 autocast without a scaler on the CPU; the same trainer path, loss and resume
    checks as the float16 + GradScaler case on CUDA."""
    losses = training.check_amp_training("cpu", tmp_path)
    assert losses[-1] < losses[0]


def test_op_bodies_on_cpu():
    for aligned in (True, False):
        for sampling_ratio in (0, 2):
            inference.check_roi_align("cpu", aligned=aligned, sampling_ratio=sampling_ratio)
    inference.check_roi_pooler("cpu")
    inference.check_nms("cpu")
    for num_boxes in inference.BATCHED_NMS_SIZES:
        inference.check_batched_nms("cpu", num_boxes)


@pytest.mark.parametrize("name", sorted(inference.TINY_MODELS))
def test_eval_forward_body_on_cpu(name):
    assert inference.check_eval_forward(name, "cpu") > 10


@pytest.mark.slow
def test_sync_batchnorm_body_over_gloo(tmp_path):
    """Two CPU processes through the same launcher call: the gloo path of SyncBatchNorm2d."""
    training.check_sync_batchnorm(tmp_path, expected_backend="gloo")


@pytest.mark.slow
def test_benchmark_body_on_cpu(tmp_path):
    rows = training.check_benchmark("cpu", tmp_path)
    assert "peak_MB_train" in rows
