#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on its built-in
# default.  Extra arguments go to `python -m dualsparse demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -m dualsparse demo "$@"
