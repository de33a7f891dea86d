#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, then run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export CONDFLOW_PROGRESS="${CONDFLOW_PROGRESS:-0}"  # no progress lines in test / CI logs (monai_condflow/progress.py)
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
