import ctypes
import logging
import os
import shutil

import pytest

from detector.layers import cpu_kernels, kernel_cache_dir, kernels_enabled, load_kernel

KERNEL = "bn_act_channels_last"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library loaded yet in this process, and an empty cache."""
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path))
    monkeypatch.setenv("DETECTOR_CPU_KERNELS", "1")
    return tmp_path


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="no C++ compiler here (CXX or c++)")
def test_kernel_builds_where_a_compiler_is(fresh):
    library = load_kernel(KERNEL)
    assert isinstance(library, ctypes.CDLL)
    assert hasattr(library, "detector_bn_act_forward")
    assert kernel_cache_dir() == str(fresh / "kernels")
    built = os.listdir(kernel_cache_dir())
    assert len(built) == 1 and built[0].startswith(KERNEL + "-") and built[0].endswith(".so")
    assert load_kernel(KERNEL) is library


# every kernel: a source that fails to compile would otherwise only skip its tests
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="no C++ compiler here (CXX or c++)")
@pytest.mark.parametrize("name", sorted(f[:-len(".cpp")] for f in os.listdir(
    os.path.join(os.path.dirname(cpu_kernels.__file__), "csrc")) if f.endswith(".cpp")))
def test_every_kernel_source_builds(name, monkeypatch):
    # the usual cache: the tests of each kernel use the same library
    monkeypatch.setenv("DETECTOR_CPU_KERNELS", "1")
    assert isinstance(load_kernel(name), ctypes.CDLL)


def test_environment_turns_kernels_off(fresh, monkeypatch):
    for value in ("0", "false", "OFF"):
        monkeypatch.setenv("DETECTOR_CPU_KERNELS", value)
        assert not kernels_enabled()
        assert load_kernel(KERNEL) is None
    assert not os.path.exists(kernel_cache_dir())


def test_missing_compiler_falls_back_with_one_warning(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="detector.layers.cpu_kernels"):
        assert load_kernel(KERNEL) is None
        assert load_kernel(KERNEL) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert KERNEL in warnings[0] and "no C++ compiler 'no-such-compiler-here'" in warnings[0]


def test_failing_compiler_falls_back(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")  # exits 1 without output
    with caplog.at_level(logging.WARNING, logger="detector.layers.cpu_kernels"):
        assert load_kernel(KERNEL) is None
    assert "using PyTorch ops instead" in caplog.text
    # nothing half-written is left under a library's name
    assert not [f for f in os.listdir(kernel_cache_dir()) if f.endswith(".so")]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="no C++ compiler here (CXX or c++)")
def test_cut_off_cached_library_is_rebuilt(fresh):
    path = cpu_kernels._library_path(KERNEL, os.environ.get("CXX", "c++"))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:  # the start of a library, as a full disk would leave it
        f.write(b"\x7fELF" + bytes(96))
    library = load_kernel(KERNEL)
    assert library is not None and hasattr(library, "detector_bn_act_backward")
    assert os.path.getsize(path) > 100
