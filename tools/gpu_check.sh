#!/usr/bin/env bash
# Checks a GPU machine in one call (a few minutes): every test marked `cuda` (AMP fp16 training
# with a GradScaler, SyncBN over NCCL when 2 GPUs exist, CUDA RoIAlign / NMS and the detectors
# against the CPU, the benchmark on CUDA), then the benchmark against torchvision's RetinaNet and
# effdet's EfficientDet-D0 on CUDA at 512 px. Ends with a one-line summary; exits non-zero if
# anything failed. Without a GPU the cuda tests are listed as skipped and the benchmark is not run.
#
#   tools/gpu_check.sh [pytest options, e.g. -x or -k nms]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python
fi

# runs pytest with the given arguments, keeping its result line (e.g. "14 passed, 1 skipped in
# 95.2s") in $pytest_result
pytest_result=""
run_pytest() {
    local log status=0
    log=$(mktemp)
    "$PYTHON" -m pytest "$@" 2>&1 | tee "$log" || status=$?
    pytest_result=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    rm -f "$log"
    return "$status"
}

# exit status 0: a CUDA GPU is usable; 3: none; anything else: torch itself is broken
probe_status=0
"$PYTHON" - <<'EOF' || probe_status=$?
import sys

import torch

build = torch.version.cuda or "none (a CPU-only build)"
if not torch.cuda.is_available():
    print(f"gpu_check: torch {torch.__version__}, built with CUDA {build}")
    sys.exit(3)
count = torch.cuda.device_count()
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {count} GPU(s)")
for index in range(count):
    props = torch.cuda.get_device_properties(index)
    print(f"gpu_check:   cuda:{index} {torch.cuda.get_device_name(index)}, "
          f"{props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}")
if count < 2:
    print("gpu_check: one GPU: the SyncBN test over NCCL (2 GPUs) is skipped")
EOF

if [[ $probe_status -eq 3 ]]; then
    echo "gpu_check: no CUDA GPU (torch.cuda.is_available() is False): every cuda test is" \
         "skipped, the benchmark on CUDA is not run"
    tests_status=0
    run_pytest -m cuda tests/cuda -rs "$@" || tests_status=$?
    if [[ $tests_status -ne 0 ]]; then
        echo "gpu_check: FAILED: pytest -m cuda tests/cuda exited with $tests_status without a" \
             "GPU (${pytest_result:-no result line})"
        exit "$tests_status"
    fi
    echo "gpu_check: summary: no CUDA GPU here, cuda tests: $pytest_result; benchmark not run"
    exit 0
elif [[ $probe_status -ne 0 ]]; then
    echo "gpu_check: FAILED: '$PYTHON' could not import torch or query CUDA (exit $probe_status)"
    exit "$probe_status"
fi

start=$SECONDS
failures=""
add_failure() { failures+="${failures:+; }$1"; }
# -m on the command line replaces the `-m "not slow"` of setup.cfg's addopts: slow cuda tests run too
tests_status=0
run_pytest -m cuda -rs "$@" || tests_status=$?
[[ $tests_status -eq 0 ]] || add_failure "cuda tests (exit $tests_status: ${pytest_result:-no result})"

bench_status=0
"$PYTHON" tools/benchmark.py --device cuda --model retinanet efficientdet --size 512 \
    --no-memory || bench_status=$?
[[ $bench_status -eq 0 ]] || add_failure "benchmark on CUDA (exit $bench_status)"

elapsed=$((SECONDS - start))
if [[ -n $failures ]]; then
    echo "gpu_check: FAILED after ${elapsed} s: $failures"
    exit 1
fi
echo "gpu_check: summary: passed in ${elapsed} s: cuda tests ($pytest_result), benchmark on CUDA"
