#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup.sh) and runs the sweep on the
# built-in models (accuracy, drop rates and speed of every method; table,
# CSV, JSON and plots in a new dualsparse-sweep-<time>/ folder).  Extra
# arguments go to `python -m dualsparse sweep` (e.g. --quick, --model DIR,
# --data FILES, --out DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -m dualsparse sweep "$@"
