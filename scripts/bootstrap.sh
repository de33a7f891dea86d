#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install monai_condflow
# with its pinned, CPU-only dependency set. Idempotent: re-running is a no-op unless
# setup.cfg, pyproject.toml or constraints.txt changed.
#
# Override the pins (for example to get a CUDA build of torch) with
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
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[bootstrap] installing monai_condflow[$extras] with constraints $constraints"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$root[$extras]"
echo "$want" > "$stamp"
echo "[bootstrap] done"
