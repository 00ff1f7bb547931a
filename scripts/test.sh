#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite: the C unit
# tests of csrc/core (plain and under address/undefined-behaviour
# sanitizers, run from tests/test_core_c.py) and the Python tests with the
# newest supported transformers; then the Hugging Face, built-in model,
# expert-parallel and sweep tests again in .venv-tf4 with the oldest
# supported transformers (4.57, per-expert layouts; DUALSPARSE_SKIP_TF4=1
# skips that run).  Extra arguments go to pytest.
# "No tests collected" is a failure.
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

status=0
run_pytest .venv/bin/python tests "$@" || status=$?

if [ "${DUALSPARSE_SKIP_TF4:-0}" != "1" ]; then
    echo "== Hugging Face tests with transformers 4.57 (.venv-tf4)"
    python="${PYTHON:-python3}"
    [ -x .venv-tf4/bin/python ] || "$python" -m venv .venv-tf4
    .venv-tf4/bin/python -m pip install --quiet -c constraints/tf457.txt \
        torch transformers numpy safetensors tqdm tokenizers matplotlib pytest
    # the extension is built in place by the editable install in .venv (same Python)
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" run_pytest .venv-tf4/bin/python -p no:cacheprovider \
        tests/test_hf.py tests/test_builtin.py tests/test_ep.py tests/test_sweep.py tests/test_tune.py tests/test_saved.py \
        tests/test_textbatches.py "$@" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
fi
exit "$status"
