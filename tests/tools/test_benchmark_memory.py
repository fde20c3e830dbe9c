"""tools/benchmark.py's new columns: a config timed alone, and the peak memory of one case
measured in a fresh process. No timing is asserted."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchmark_common  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
TINY = ["MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
        "MODEL.GN.NUM_GROUPS", "4"]
MB = 2**20


@pytest.fixture(scope="module")
def benchmark():
    # imported by the tests that need it only: the measuring process imports this module
    import benchmark as module

    return module


def allocation_case(megabytes):
    """A case holding ``megabytes`` of float32 for a moment (run in the measuring process)."""
    def run():
        torch.ones(megabytes * MB // 4).sum()
    return run


def test_peak_memory_sees_what_the_case_allocates(monkeypatch):
    # the measuring process imports this module: this folder goes on its path
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", here)
    module = os.path.splitext(os.path.basename(__file__))[0]
    small = benchmark_common.peak_memory_mb(module, "allocation_case", {"megabytes": 8})
    large = benchmark_common.peak_memory_mb(module, "allocation_case", {"megabytes": 400})
    # the runtime alone takes hundreds of MB; the difference is the 392 MB more allocated (a
    # measurement that kept this pytest process's peak, as ru_maxrss after fork does, would
    # give the same figure twice)
    assert small > 50
    assert large - small == pytest.approx(392, rel=0.05)


@pytest.mark.slow
def test_failed_case_is_one_line():
    with pytest.raises(RuntimeError, match=r"^memory case benchmark.config_memory_case\(.*\) "
                                           r"failed \(exit 1\): .*no_such.yaml") as info:
        benchmark_common.peak_memory_mb("benchmark", "config_memory_case", dict(
            config_file="no_such.yaml", opts=[], mode="inference", size=64, batch=1))
    assert "\n" not in str(info.value)


def test_config_alone(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--config-file", TINY_CONFIG, "--size", "64", "--iters", "1",
                              "--warmup", "0", "--threads", "1", "--json", str(out),
                              "--no-memory", *TINY])
    rows = results[TINY_CONFIG]
    assert rows["inference_ms_per_img"] > 0 and rows["train_img_per_s"] > 0
    step_ms = 1000 * 2 / rows["train_img_per_s"]  # default train batch 2, one timed step
    assert 0 < rows["train_forward_ms"] + rows["train_backward_ms"] < step_ms
    model = benchmark.config_model(TINY_CONFIG, TINY)[1]
    macs = benchmark_common.inference_macs(model, 64, 64)
    assert rows["inference_GFLOP_per_s"] == pytest.approx(
        2 * macs / (rows["inference_ms_per_img"] / 1000) / 1e9)
    text = capsys.readouterr().out
    assert "RetinaNet" in text and "inference_ms_per_img" in text
    assert json.loads(out.read_text())[TINY_CONFIG]["train_forward_ms"] == pytest.approx(
        rows["train_forward_ms"])


def test_overrides_need_a_config(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--size", "128", "SOLVER.BASE_LR", "0.1"])
    assert "need --config-file" in capsys.readouterr().err


@pytest.mark.slow
def test_config_alone_with_memory(benchmark):
    results = benchmark.main(["--config-file", TINY_CONFIG, "--size", "64", "--iters", "1",
                              "--warmup", "0", "--threads", "1", *TINY])
    rows = results[TINY_CONFIG]
    assert 50 < rows["peak_MB_inference"] <= rows["peak_MB_train"] * 1.05


@pytest.mark.slow
def test_pair_memory_columns(benchmark):
    results = benchmark.main(["--model", "retinanet", "--size", "128", "--iters", "1",
                              "--warmup", "0", "--threads", "1", "--train-batch", "1"])
    rows = results["RetinaNet R-50-FPN"]["rows"]
    for mode in ("inference", "train"):
        ref, ours, ratio = rows[f"peak_MB_{mode}"]
        assert ref > 100 and ours > 100 and ratio == pytest.approx(ref / ours)
    # training holds gradients and the graph: more than inference, on both sides
    assert rows["peak_MB_train"][0] > rows["peak_MB_inference"][0]
    assert rows["peak_MB_train"][1] > rows["peak_MB_inference"][1]
