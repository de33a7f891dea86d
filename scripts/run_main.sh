#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole pipeline.
# Usage: bash scripts/run_main.sh [DATASET_DIR] [--output-dir OUTPUT_DIR] [OPTIONS...]
#   DATASET_DIR         a COVIDx-CT-format folder (images + train.txt/val.txt/test.txt);
#                       omitted: the embedded phantom dataset is generated first.
#   --output-dir DIR    where everything is written (default: runs/main).
#   Every argument goes to python -m monai_condflow.pipeline; its --help lists the options and their defaults.
#   Relative paths (DATASET_DIR, --output-dir, the default runs/main) are read from the directory the script is
#   run in, as for any command; the README runs it from the repository root.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$root/.venv/bin/python" -m monai_condflow.pipeline "$@"
