"""tools/benchmark.py on CUDA."""
import pytest

from gpu_training_checks import check_benchmark

pytestmark = pytest.mark.cuda


def test_benchmark_runs_on_cuda(tmp_path):
    """Would catch: the benchmark's CUDA path failing (inputs or a model left on the CPU, the
    peak-memory processes on CUDA) or reporting no figures."""
    rows = check_benchmark("cuda", tmp_path)
    assert rows["peak_MB_train"] > 0
