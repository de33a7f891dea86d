#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install monai_condflow
# (editable) with its pinned dependency set. Idempotent: re-running is a no-op unless
# setup.cfg, setup.py, pyproject.toml or constraints.txt changed.
#
# constraints.txt pins plain torch==2.13.0: on Linux, PyPI serves the CUDA build. For the CPU build:
#   PIP_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
#       bash scripts/bootstrap.sh
# Override the pins (for example another CUDA build of torch) with
#   CONDFLOW_CONSTRAINTS=/path/to/your-constraints.txt bash scripts/bootstrap.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CONDFLOW_VENV:-$root/.venv}"
constraints="${CONDFLOW_CONSTRAINTS:-$root/constraints.txt}"
extras="${CONDFLOW_EXTRAS:-dicom,test,bench,privacy}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.monai_condflow_stamp"
want="$(cat "$root/setup.cfg" "$root/setup.py" "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[bootstrap] installing monai_condflow[$extras] with constraints $constraints"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$root[$extras]"
echo "$want" > "$stamp"
echo "[bootstrap] done"
