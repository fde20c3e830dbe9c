import os

import pytest
import torch

from cpu_kernel_switch import use_cpu_kernel

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

NO_CUDA_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated datasets go to a per-session temp folder, never to the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "detector_cache"
    monkeypatch.setenv("DETECTOR_CACHE", str(cache))


@pytest.fixture
def datasets_root():
    """$DETECTOR_DATASETS, or skip the calling test with the reason."""
    root = os.environ.get("DETECTOR_DATASETS")
    if not root or not os.path.isdir(root):
        pytest.skip("DETECTOR_DATASETS is not set to an existing folder (see datasets/README.md)")
    return root


@pytest.fixture(params=["fused", "pytorch"])
def bn_act_kernel(request, monkeypatch):
    """Runs a test with the C++ BN + activation kernel ("fused") and with PyTorch's ops."""
    use_cpu_kernel(monkeypatch, "bn_act_channels_last", request.param == "fused")
    return request.param
