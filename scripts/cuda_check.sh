#!/usr/bin/env bash
# The GPU checks of the CUDA path, for a machine with a GPU and a CUDA build
# of torch (run from the repository root, in the environment that has torch):
#   bash scripts/cuda_check.sh [python] [results-folder]
# 1. builds dualsparse._C_cuda in place where nvcc is found (else uses the
#    module already built in place), 2. says what the module sees (runtime,
#    driver, devices, cuBLAS), 3. runs the CUDA tests (tests/test_cuda.py: case
#    table vs the CPU engine and the float64 reference, errors, HF models),
# 4. a short benchmark (bench_cuda.py --tokens 1 128 4096) whose JSON goes to
#    the results folder (default bench-results).
# Each step has a time limit, so a hang cannot eat a lent machine's time.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-python}"
out="${2:-bench-results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rc=0
if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
    DUALSPARSE_CUDA=1 timeout 600 "$py" setup.py build_ext --inplace >/tmp/dualsparse-cuda-build.log 2>&1 \
        || { tail -30 /tmp/dualsparse-cuda-build.log; exit 1; }
else
    echo "# nvcc not found: using the modules already built in place"
fi
timeout 120 "$py" - <<'PY' || exit 1
import torch
import dualsparse
from dualsparse import cuda
m = cuda.module()
print("dualsparse", dualsparse.__file__)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
print("module", m.status() if m else None)
print("available", cuda.available())
print("cuBLAS", m.blas_info() if m else None)
PY
timeout 900 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py || rc=1
timeout 900 "$py" benchmarks/bench_cuda.py --tokens 1 128 4096 --iters 10 --out "$out" || rc=1
exit $rc
