#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite: the C unit
# tests of csrc/core (plain and under address/undefined-behaviour
# sanitizers, run from tests/test_core_c.py) and the Python tests.
# Extra arguments go to pytest.  "No tests collected" is a failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$rc"
