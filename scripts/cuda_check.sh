#!/usr/bin/env bash
# The GPU checks of the CUDA path: ONE prepared script for a machine with an
# NVIDIA GPU and driver, a CUDA build of torch and an nvcc of torch's CUDA
# major version (run from the repository root, in the environment that has
# torch; each step has a time limit, so a hang cannot eat a lent machine):
#   bash scripts/cuda_check.sh [python] [results-folder]
#  1. versions and driver: nvidia-smi, nvcc, torch (CUDA, cuBLAS, GPU);
#  2. builds dualsparse._C_cuda in place (DUALSPARSE_CUDA=1, cubins for sm_80,
#     sm_90 and this GPU, PTX of the last), else uses the module built in place;
#  3. what the module sees: status (runtime, driver, archs), available(),
#     cuBLAS, the runtimes loaded in the process (must be one);
#  4. compute-sanitizer memcheck, then racecheck, over the case table on the
#     GPU, with the grouped cuBLAS path and the cublasGemmEx loop
#     (tests/cuda_emu.py --run-cases-gpu);
#  5. the CUDA tests (tests/test_cuda.py: case table vs the CPU engine and the
#     float64 reference, errors, threads and streams, HF models);
#  6. a short benchmark of both CUDA GEMM paths (bench_cuda.py: dualsparse and
#     dualsparse_gemm_loop, OLMoE shapes, T = 1, 16, 128, 512, bfloat16 and
#     float32, drops 0.25 and 0.5) whose JSON goes to the results folder
#     (default bench-results).
# Exit status 1 when a step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-python}"
out="${2:-bench-results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rc=0
step() { echo; echo "== $*"; }

step "1. versions and driver"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
cat /proc/driver/nvidia/version 2>/dev/null || echo "no /proc/driver/nvidia/version"
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
timeout 120 "$py" -c "
import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())
if torch.cuda.is_available():
    print('GPU', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
" || rc=1

step "2. build"
if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    archs="80 90"
    case " $archs " in *" $cap "*|"  ") ;; *) [ -n "$cap" ] && archs="$archs $cap" ;; esac
    echo "DUALSPARSE_CUDA_ARCHS=\"$archs\""
    if ! DUALSPARSE_CUDA=1 DUALSPARSE_CUDA_ARCHS="$archs" timeout 600 "$py" setup.py build_ext --inplace \
            >/tmp/dualsparse-cuda-build.log 2>&1; then
        tail -30 /tmp/dualsparse-cuda-build.log
        exit 1
    fi
else
    echo "# nvcc not found: using the modules already built in place"
fi

step "3. what the module sees"
timeout 120 "$py" - <<'PY' || exit 1
import torch
import dualsparse
from dualsparse import _C, cuda
m = cuda.module()
print("dualsparse", dualsparse.__file__)
print("build", _C.build_info()["cuda"])
print("module", m.status() if m else None, cuda.module_error())
print("available", cuda.available())
print("cuBLAS", m.blas_info() if m else None)
with open("/proc/self/maps") as f:
    print("CUDA runtimes loaded", sorted({ln.split()[-1] for ln in f if "libcudart" in ln}))
PY

step "4. compute-sanitizer over the case table"
if command -v compute-sanitizer >/dev/null 2>&1; then
    # memcheck: both GEMM paths; racecheck (shared memory: the plan's place
    # kernel) on the grouped path only, to stay within a lent machine's time
    for run in "memcheck grouped,loop" "racecheck grouped"; do
        set -- $run
        echo "-- $1 ($2)"
        timeout 300 compute-sanitizer --tool "$1" --error-exitcode 3 --print-limit 20 \
            "$py" tests/cuda_emu.py --run-cases-gpu "$2" 2>&1 | tail -25 || rc=1
    done
else
    echo "compute-sanitizer not found (it ships with the CUDA toolkit: \$CUDA_HOME/bin)"; rc=1
fi

step "5. the CUDA tests"
timeout 600 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py || rc=1

step "6. benchmark: grouped cuBLAS path and cublasGemmEx loop"
for dt in bfloat16 float32; do
    timeout 300 "$py" benchmarks/bench_cuda.py --shapes olmoe --tokens 1 16 128 512 --rates 0.25 0.5 --iters 10 \
        --no-hf --dtype "$dt" --out "$out" || rc=1
done
exit $rc
