#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole pipeline.
# Usage: bash scripts/run_main.sh [DATASET_DIR] [OUTPUT_DIR]
#   DATASET_DIR  a COVIDx-CT-format folder (images + train.txt/val.txt/test.txt);
#                omitted: the embedded phantom dataset is generated first.
#   OUTPUT_DIR   where everything is written (default: runs/main).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m monai_condflow.pipeline "$@"
