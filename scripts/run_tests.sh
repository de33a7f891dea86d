#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, then run the whole test suite.
# The suite runs on CONDFLOW_TEST_WORKERS pytest-xdist processes (default 2, the CI machine's cores; 1 runs it in one
# process), each test file on one worker (module fixtures are built once), each worker on OMP_NUM_THREADS torch
# threads (default 1: two workers with one thread each keep two cores busy; a single process gets 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
workers="${CONDFLOW_TEST_WORKERS:-2}"
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
    echo "scripts/run_tests.sh: CONDFLOW_TEST_WORKERS must be a whole number >= 1, got '$workers'" >&2
    exit 2
fi
if [ "$workers" = 1 ]; then
    parallel=()
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
else
    parallel=(-n "$workers" --dist loadfile)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export CONDFLOW_PROGRESS="${CONDFLOW_PROGRESS:-0}"  # no progress lines in test / CI logs (monai_condflow/progress.py)
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 ${parallel[@]+"${parallel[@]}"} "$@"
