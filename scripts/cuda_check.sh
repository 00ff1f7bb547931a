#!/usr/bin/env bash
# The GPU checks of the CUDA path, for a machine with a GPU and a CUDA build
# of torch (run from the repository root, in the environment that has torch):
#   bash scripts/cuda_check.sh [python]
# 1. builds dualsparse._C_cuda in place (fails without nvcc), 2. says what the
# module sees (runtime, driver, devices, cuBLAS), 3. runs the CUDA tests
# (tests/test_cuda.py: case table vs CPU and reference, errors, HF models),
# 4. a short benchmark (bench_cuda.py --tokens 1 128 4096).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python}"
DUALSPARSE_CUDA=1 "$py" setup.py build_ext --inplace --force >/tmp/dualsparse-cuda-build.log 2>&1 \
    || { tail -30 /tmp/dualsparse-cuda-build.log; exit 1; }
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" - <<'PY'
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
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" benchmarks/bench_cuda.py --tokens 1 128 4096 --iters 10
