#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh installs on a GPU machine without a network (issue 18), downloaded here
# into .whl/ (ignored by git: copy it with the checkout, e.g. name it in a device call's `carry`). The GPU image
# (docs/performance.md, "GPU check") holds IMAGE_HAS below; PACKAGES are the project's other requirements (setup.cfg,
# with the privacy extra and pydicom of the dicom extra), at the versions constraints.txt pins; their own needs are
# in IMAGE_HAS (each wheel's Requires-Dist is printed below; tests/benchmarks/test_gpu_wheels.py checks both lists
# against setup.cfg and constraints.txt).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]    # default 3.12, the GPU image's Python
#
# Then, on the GPU machine, with .whl/ beside the checkout's files: bash benchmarks/gpu_check.sh (under 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
# what the GPU image holds (the lent machines' 'cuda' image: Python 3.12, torch 2.11 + cu130), and what it lacks
IMAGE_HAS=(torch numpy scipy pillow matplotlib pyyaml tensorboard packaging typing-extensions opt-einsum)
PACKAGES=(monai pytorch-ignite nibabel fire termcolor opacus pydicom)
PIP=python3
[ -x .venv/bin/python ] && PIP=.venv/bin/python
rm -rf .whl.tmp && mkdir -p .whl.tmp
for name in "${PACKAGES[@]}"; do
  pin=$(grep -iE "^${name//-/[-_]}==" constraints.txt || true)
  if [ -z "$pin" ]; then echo "gpu_wheels: $name has no pin in constraints.txt" >&2; exit 1; fi
  $PIP -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl.tmp "$pin"
done
# one version of each (two stop the whole install there), then swap the folder in whole
rm -rf .whl && mv .whl.tmp .whl
ls .whl
du -sh .whl | awk '{print "gpu_wheels: " $1 " in .whl/ (a device call carries at most 64 MiB)"}'
for w in .whl/*.whl; do
  python3 - "$w" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
             if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(f"{sys.argv[1].split('/')[-1]}: needs {', '.join(needs) or 'nothing'}")
PY
done
