"""C++ CPU kernels of ``detector/layers/csrc``, compiled on first use and loaded with ctypes.

Each source is compiled once per source text, compiler, torch build and CPU (``-march=native``)
into a cache directory, then loaded as a plain shared library: its ``extern "C"`` functions take
data pointers and sizes. The kernels include only ATen's thread pool header, so a compile takes
a few seconds. (``torch.utils.cpp_extension.load`` would build a pybind11 module against all of
``torch/extension.h`` with ninja, about a minute per compile, for functions that need no Python
objects.) Callers keep a PyTorch path for when a kernel is not available.

Environment:

* ``DETECTOR_CPU_KERNELS=0``: never compile or load them; every caller takes its PyTorch path.
* ``DETECTOR_CACHE``: the libraries go to its ``kernels`` folder (default
  ``~/.cache/detector/kernels``).
* ``CXX``: the C++ compiler (default ``c++``).

A kernel that cannot be compiled or loaded logs one warning that names the reason, and is not
used for the rest of the process.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Dict, Optional

import torch

from detector.utils.env import get_cache_dir

__all__ = ["load_kernel", "kernels_enabled", "kernel_cache_dir"]

logger = logging.getLogger(__name__)

_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# -fno-trapping-math lets gcc vectorize float-to-int conversions; neither flag changes results.
# -fopenmp: at::parallel_for is OpenMP in PyTorch's builds, and serial without it; the library
# then uses the libgomp that torch has loaded (same soname).
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
          "-std=c++17", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 600
_loaded: Dict[str, Optional[ctypes.CDLL]] = {}
_lock = threading.Lock()


def kernels_enabled() -> bool:
    """False when ``DETECTOR_CPU_KERNELS`` is 0 (or false/off/no)."""
    return os.environ.get("DETECTOR_CPU_KERNELS", "1").strip().lower() not in (
        "0", "false", "off", "no")


def kernel_cache_dir() -> str:
    return os.path.join(get_cache_dir(), "kernels")


def _torch_dirs():
    root = os.path.dirname(os.path.abspath(torch.__file__))
    return [os.path.join(root, "include")], [os.path.join(root, "lib")]


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU that shares the cache (a cluster home)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler_version(cxx: str) -> str:
    result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                            check=False)
    return result.stdout


def _compile_command(cxx: str, source: str, output: str):
    include_dirs, library_dirs = _torch_dirs()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{d}" for d in include_dirs], source, "-o", output,
            *[f"-L{d}" for d in library_dirs], "-ltorch_cpu", "-lc10",
            *[f"-Wl,-rpath,{d}" for d in library_dirs]]


def _library_path(name: str, cxx: str) -> str:
    with open(os.path.join(_SOURCE_DIR, name + ".cpp"), "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(_FLAGS).encode(), _compiler_version(cxx).encode(),
        torch.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    return os.path.join(kernel_cache_dir(), f"{name}-{key}.so")


def _compile(name: str, cxx: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # compile beside the target and rename: concurrent processes (torchrun ranks) and a full
    # disk never leave a partial library under the final name
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(path))
    os.close(fd)
    logger.info(f"Compiling the CPU kernel '{name}' into {path} (once per machine)")
    try:
        command = _compile_command(cxx, os.path.join(_SOURCE_DIR, name + ".cpp"), tmp)
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=_COMPILE_TIMEOUT_S, check=False)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((lines or result.stderr.splitlines() or ["no output"])[0])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(name: str) -> ctypes.CDLL:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler '{cxx}' (set CXX)")
    path = _library_path(name, cxx)
    if not os.path.exists(path):
        _compile(name, cxx, path)
    try:
        return ctypes.CDLL(path)
    except OSError:
        # a library cut off or corrupted in the cache: build it once more
        os.remove(path)
        _compile(name, cxx, path)
        return ctypes.CDLL(path)


def load_kernel(name: str) -> Optional[ctypes.CDLL]:
    """The compiled library of ``csrc/<name>.cpp``, or None when kernels are disabled or it
    cannot be built or loaded here (logged once)."""
    if not kernels_enabled():
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _load(name)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                logger.warning(f"CPU kernel '{name}' unavailable, using PyTorch ops instead: {e}")
                _loaded[name] = None
        return _loaded[name]
