import pytest


def use_cpu_kernel(monkeypatch, kernel: str, enabled: bool) -> None:
    """Turns the C++ CPU kernels on or off for a test; skips it, with the reason, when on and
    ``kernel`` cannot be built here (tests/layers/test_cpu_kernels.py checks that it builds
    wherever a compiler is)."""
    from detector.layers import load_kernel

    monkeypatch.setenv("DETECTOR_CPU_KERNELS", "1" if enabled else "0")
    if enabled and load_kernel(kernel) is None:
        pytest.skip(f"the C++ kernel '{kernel}' cannot be built here")
