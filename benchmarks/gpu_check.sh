#!/usr/bin/env bash
# The one prepared GPU check of docs/performance.md (issue 18): set-up, speed / memory / error figures of every
# precision and CUDA-graph mode, the synthetic-set writer, and one short end-to-end bundle run.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUT_DIR]      # OUT_DIR default: runs/gpu_check
#
# Set-up, from the repository's own files only (the GPU machine may have no network):
#   - Python: .venv/bin/python when the repository has one, else python3 (a GPU image's PyTorch);
#   - the packages of setup.cfg that this Python lacks are installed from the wheels in .whl/ when that folder
#     exists (download them on a machine with a network, pinned by constraints.txt:
#     pip download --no-deps -d .whl monai==... pytorch-ignite==... nibabel==... fire==... termcolor==... opacus==...
#     pydicom==...),
#     else from the package index with constraints.txt;
#   - the package itself is used from the checkout (PYTHONPATH), nothing is built.
# --cpu: the same sections, small, on the CPU (what tests/benchmarks/test_gpu_check.py runs).
# Budget: gpu_check.py starts no measurement after 270 s (--budget-s; the rest is reported as skipped; one already
# running is not cut) and E2E_TIMEOUT caps the bundle run (default 200 s on a GPU): about 8 minutes, under 10 while
# no single measurement takes more than ~2 minutes (a cold compilation: not yet timed on a GPU). GPU_CHECK_ARGS passes options,
# e.g. GPU_CHECK_ARGS="--modes bf16+graphs,bf16+compile+graphs --sections train,profile" for the new modes only.
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
OUT_DIR=${1:-runs/gpu_check}
mkdir -p "$OUT_DIR"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing=$($PY - <<'EOF'
import importlib.util
need = {"monai": "monai", "ignite": "pytorch-ignite", "nibabel": "nibabel", "fire": "fire", "yaml": "pyyaml",
        "PIL": "pillow", "scipy": "scipy", "matplotlib": "matplotlib", "tensorboard": "tensorboard", "opacus": "opacus", "pydicom": "pydicom"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "set-up: installing $missing"
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/condflow_site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/condflow_site"
  else
    $PY -m pip install -q -c constraints.txt $missing || exit 1
  fi
fi
$PY -c "import monai, ignite, torch; print('set-up: torch', torch.__version__, 'monai', monai.__version__, 'ignite', ignite.__version__, 'cuda', torch.cuda.is_available())"
[ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

status=0
if [ "$CPU" = 1 ]; then
  $PY benchmarks/gpu_check.py --cpu --out "$OUT_DIR" || status=1
  E2E_ARGS=(--num-images 240 --num-labels 10 --set max_epochs=1 --set batch_size=16
            --stage-set flow.adversarial_steps=2 --stage-set evaluation.n_synthetic_sets=1 --stage-set evaluation.n_bootstrap=20
            --stage-set evaluation.augmentation=false)
  E2E_TIMEOUT=${E2E_TIMEOUT:-600}
else
  $PY benchmarks/gpu_check.py --out "$OUT_DIR" ${GPU_CHECK_ARGS:-} || status=1
  E2E_ARGS=(--num-images 300 --set max_epochs=2 --stage-set flow.adversarial_steps=20 --stage-set flow.cuda_graphs=true
            --stage-set generation.cuda_graphs=true)
  E2E_TIMEOUT=${E2E_TIMEOUT:-200}
fi

# one short end-to-end bundle run: classifier -> flow -> generate -> evaluate on the generated phantom
E2E_DIR=$(mktemp -d /tmp/condflow_e2e_XXXX)
start=$(date +%s)
timeout "$E2E_TIMEOUT" $PY -m monai_condflow.pipeline --output-dir "$E2E_DIR" --no-progress "${E2E_ARGS[@]}" \
  > "$OUT_DIR/e2e.log" 2>&1
e2e=$?
echo "e2e: exit $e2e after $(( $(date +%s) - start )) s (timeout ${E2E_TIMEOUT} s); log $OUT_DIR/e2e.log"
grep -E "stage .* (done|finished)|TRTR|TSTR|FID|Traceback|Error" "$OUT_DIR/e2e.log" | tail -15
[ -f "$E2E_DIR/report.md" ] && cp "$E2E_DIR/report.md" "$OUT_DIR/e2e_report.md"
rm -rf "$E2E_DIR"
[ "$e2e" = 0 ] || status=1
exit $status
