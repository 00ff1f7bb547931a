#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite: the C unit
# tests of csrc/core (plain and under address/undefined-behaviour
# sanitizers, run from tests/test_core_c.py) and the Python tests with the
# newest supported transformers; then the Hugging Face, built-in model,
# expert-parallel and sweep tests again in .venv-tf4 with the oldest
# supported transformers (4.57, per-expert layouts; DUALSPARSE_SKIP_TF4=1
# skips that run; its virtualenv is installed while the first run goes; it
# sets DUALSPARSE_TEST_RERUN=tf4, and the expert-parallel checks that do not
# depend on transformers are left to the first run).
# On an AVX-512 CPU the bfloat16 Hugging Face tests also run with torch's
# AVX2 kernels (DUALSPARSE_SKIP_AVX2_TORCH=1 skips that).
# Tests run in DUALSPARSE_TEST_WORKERS pytest-xdist processes (default: the
# CPU count, at most 4; 1 runs them in this process), one test file per
# process at a time.  Extra arguments go to pytest (after ours: `-n 0` there
# also turns the workers off).  "No tests collected" is a failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh

run_pytest() {  # python, args...
    local py="$1"
    shift
    set +e
    "$py" -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "scripts/test.sh: pytest collected no tests ($*); treating that as a failure" >&2
        return 1
    fi
    return "$rc"
}

workers="${DUALSPARSE_TEST_WORKERS:-}"
if [ -z "$workers" ]; then
    workers="$(nproc 2>/dev/null || echo 1)"
    [ "$workers" -le 4 ] || workers=4
fi
xdist_args() {  # python: the pytest-xdist options, when it is installed and wanted
    if [ "$workers" -gt 1 ] && "$1" -c "import xdist" 2>/dev/null; then
        echo "-n $workers --dist loadfile --no-loadscope-reorder"
    fi
}

tf4=0
[ "${DUALSPARSE_SKIP_TF4:-0}" = "1" ] || tf4=1
if [ "$tf4" = 1 ]; then
    # installed in the background while the first run goes (mostly unpacking wheels)
    python="${PYTHON:-python3}"
    tf4_log="$(mktemp -t dualsparse-tf4-install.XXXXXX)"
    (
        [ -x .venv-tf4/bin/python ] || "$python" -m venv .venv-tf4
        .venv-tf4/bin/python -m pip install --quiet -c constraints/tf457.txt \
            torch transformers numpy safetensors tqdm tokenizers matplotlib pytest "pytest-xdist>=3.6"
    ) >"$tf4_log" 2>&1 &
    tf4_pid=$!
fi

status=0
# shellcheck disable=SC2046  # word splitting of the xdist options is wanted
run_pytest .venv/bin/python $(xdist_args .venv/bin/python) tests "$@" || status=$?

# torch's AVX2 kernels round bfloat16 differently from its AVX-512 ones, and
# routing ties in bfloat16 models show up under one and not the other: on an
# AVX-512 CPU the bfloat16 Hugging Face tests run once more with torch held
# to AVX2 (about 15 s), so that what passes here also passes on AVX2 machines.
if grep -qw avx512f /proc/cpuinfo 2>/dev/null && [ "${DUALSPARSE_SKIP_AVX2_TORCH:-0}" != "1" ]; then
    echo "== bfloat16 Hugging Face tests with torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)"
    # shellcheck disable=SC2046
    ATEN_CPU_CAPABILITY=avx2 run_pytest .venv/bin/python -p no:cacheprovider $(xdist_args .venv/bin/python) \
        tests/test_hf.py tests/test_torch_backend.py -k "bf16 or bfloat16" "$@" \
        || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
fi

if [ "$tf4" = 1 ]; then
    echo "== Hugging Face tests with transformers 4.57 (.venv-tf4)"
    if ! wait "$tf4_pid"; then
        cat "$tf4_log" >&2
        echo "scripts/test.sh: installing .venv-tf4 failed (log above)" >&2
        exit 1
    fi
    rm -f "$tf4_log"
    # the extension is built in place by the editable install in .venv (same Python)
    # shellcheck disable=SC2046
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" DUALSPARSE_TEST_RERUN=tf4 run_pytest .venv-tf4/bin/python -p no:cacheprovider \
        $(xdist_args .venv-tf4/bin/python) \
        tests/test_hf.py tests/test_builtin.py tests/test_ep.py tests/test_sweep.py tests/test_tune.py tests/test_saved.py \
        tests/test_textbatches.py "$@" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
fi
exit "$status"
