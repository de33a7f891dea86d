#!/usr/bin/env bash
# The one prepared GPU check of docs/performance.md (issue 18): set-up, speed / memory / error figures of every
# precision and CUDA-graph mode, the synthetic-set writer, and one short end-to-end bundle run.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUT_DIR]      # OUT_DIR default: $OUT/gpu_check when OUT is set (the
#                                                        # device machine's folder that comes back), else runs/gpu_check
#
# Set-up, from the repository's own files only (the GPU machine may have no network):
#   - Python: .venv/bin/python when the repository has one, else python3 (a GPU image's PyTorch);
#   - the packages of setup.cfg that this Python lacks are installed from the wheels in .whl/ when that folder
#     exists (benchmarks/gpu_wheels.sh downloads them on a machine with a network, pinned by constraints.txt; the
#     device call carries .whl), else from the package index with constraints.txt;
#   - the package itself is used from the checkout (PYTHONPATH), nothing is built.
# --cpu: the same sections, small, on the CPU (what tests/benchmarks/test_gpu_check.py runs).
# Time: on a GPU the whole script ends within GPU_CHECK_TOTAL_S (default 470 s, under the issue's 8 minutes; on the
# CPU only when set): the set-up's seconds count, the bundle run keeps E2E_TIMEOUT (default 170 s; 0: no bundle
# run) of it, and gpu_check.py gets the rest, less GPU_CHECK_GRACE_S (default 30), GPU_CHECK_KILL_S (default 15)
# and 10 s, as --budget-s: a measurement starts only if its estimated time fits, and the script is stopped (SIGTERM)
# GPU_CHECK_GRACE_S after its budget (a measurement that overran its estimate); the stopped run gets
# GPU_CHECK_KILL_S to remove its write folder (tens of thousands of files) before a SIGKILL. What it measured is kept
# (gpu_check.json is rewritten after every measurement; --summarize prints its tables, within the 10 s), and the
# bundle run gets what is left of the total.
# The measurements run in priority order (the targets' modes first, then the bundle's trainer, then the compiled and
# graphed ones, then the comparisons), so a budget that runs out drops the least needed ones (reported as skipped).
# GPU_CHECK_ARGS passes options, e.g. for a second, shorter call:
#   E2E_TIMEOUT=0 GPU_CHECK_TOTAL_S=240 GPU_CHECK_ARGS="--sections train --modes fp32,tf32" bash benchmarks/gpu_check.sh
set -uo pipefail
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
cd "$(dirname "$0")/.."
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
OUT_DIR=${1:-${OUT:-runs}/gpu_check}
for var in GPU_CHECK_TOTAL_S GPU_CHECK_GRACE_S GPU_CHECK_KILL_S E2E_TIMEOUT; do  # whole seconds (KILL_S 0 would
  # never send the SIGKILL, and the stopped run ignores a second SIGTERM)
  value=${!var:-} least=0
  [ "$var" = GPU_CHECK_KILL_S ] && least=1
  if [ -n "$value" ] && ! [[ "$value" =~ ^[0-9]+$ && "$value" -ge "$least" ]]; then
    echo "gpu_check.sh: $var must be a whole number of seconds >= $least, got '$value'" >&2
    exit 2
  fi
done
mkdir -p "$OUT_DIR"
# no figures or logs of an earlier run pass for this one's
rm -f "$OUT_DIR/gpu_check.json" "$OUT_DIR/gpu_check.md" "$OUT_DIR/e2e.log" "$OUT_DIR/e2e_report.md"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# compilation caches in /tmp (a GPU image's HOME may not be writable)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/condflow_inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/condflow_triton}

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
    # no retries: a machine without a network fails here in seconds, not after pip's minutes of retrying
    $PY -m pip install -q --retries 0 --timeout 10 -c constraints.txt $missing || exit 1
  fi
fi
$PY -c "import monai, ignite, torch; print('set-up: torch', torch.__version__, 'monai', monai.__version__, 'ignite', ignite.__version__, 'cuda', torch.cuda.is_available())"
[ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

status=0
if [ "$CPU" = 1 ]; then
  CHECK_ARGS=(--cpu)
  TOTAL=${GPU_CHECK_TOTAL_S:-}  # no time bound on the CPU unless asked for (what the suite tests)
  E2E_TIMEOUT=${E2E_TIMEOUT:-600}
  E2E_ARGS=(--num-images 240 --num-labels 10 --set max_epochs=1 --set batch_size=16
            --stage-set classifier.semi_min_steps=20 --stage-set flow.adversarial_steps=2 --stage-set evaluation.n_synthetic_sets=1 --stage-set evaluation.n_bootstrap=20
            --stage-set evaluation.augmentation=false)
else
  CHECK_ARGS=()
  TOTAL=${GPU_CHECK_TOTAL_S:-470}
  E2E_TIMEOUT=${E2E_TIMEOUT:-170}
  E2E_ARGS=(--num-images 240 --set max_epochs=1 --stage-set flow.adversarial_steps=20 --stage-set flow.cuda_graphs=true
            --stage-set generation.cuda_graphs=true)
fi

if [ -z "$TOTAL" ]; then
  $PY benchmarks/gpu_check.py ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"} --out "$OUT_DIR" ${GPU_CHECK_ARGS:-} || status=1
else
  GRACE=${GPU_CHECK_GRACE_S:-30}
  KILL=${GPU_CHECK_KILL_S:-15}
  budget=$(( TOTAL - $(elapsed) - E2E_TIMEOUT - GRACE - KILL - 10 ))
  echo "time: set-up took $(elapsed) s; measurements get ${budget} s, the bundle run ${E2E_TIMEOUT} s, of ${TOTAL} s"
  if [ "$budget" -gt 0 ]; then
    timeout -k "$KILL" $(( budget + GRACE )) $PY benchmarks/gpu_check.py ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"} \
      --out "$OUT_DIR" --budget-s "$budget" ${GPU_CHECK_ARGS:-}
    rc=$?
    if [ "$rc" != 0 ]; then  # stopped at its time limit (124, 137, or 143 from its own SIGTERM handler) or crashed
      [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 143 ] && echo "gpu_check.py stopped at its time limit"
      echo "gpu_check.py exited with $rc; what it measured:"
      if [ -f "$OUT_DIR/gpu_check.json" ]; then
        $PY benchmarks/gpu_check.py --summarize "$OUT_DIR/gpu_check.json" | tee "$OUT_DIR/gpu_check.md"
      else
        echo "nothing: no measurement ended"
      fi
      status=1
    fi
  else
    echo "no time left for the measurements: GPU_CHECK_TOTAL_S=${TOTAL} less the set-up, E2E_TIMEOUT=${E2E_TIMEOUT}," \
      "GPU_CHECK_GRACE_S=${GRACE}, GPU_CHECK_KILL_S=${KILL} and 10 s"
    status=1
  fi
  left=$(( TOTAL - $(elapsed) ))
  if [ "$E2E_TIMEOUT" != 0 ] && [ "$left" -lt "$E2E_TIMEOUT" ]; then
    if [ "$left" -lt 30 ]; then
      echo "e2e: not run (${left} s of GPU_CHECK_TOTAL_S left)"
      echo "gpu_check.sh: $(elapsed) s in all"
      exit 1
    else
      E2E_TIMEOUT=$left
    fi
  fi
fi

if [ "$E2E_TIMEOUT" = 0 ]; then
  echo "e2e: not run (E2E_TIMEOUT=0)"
  echo "gpu_check.sh: $(elapsed) s in all"
  exit $status
fi

# one short end-to-end bundle run: classifier -> flow -> generate -> evaluate on the generated phantom
E2E_DIR=$(mktemp -d /tmp/condflow_e2e_XXXX)
start=$(date +%s)
timeout -k 5 "$E2E_TIMEOUT" $PY -m monai_condflow.pipeline --output-dir "$E2E_DIR" --no-progress "${E2E_ARGS[@]}" \
  > "$OUT_DIR/e2e.log" 2>&1
e2e=$?
echo "e2e: exit $e2e after $(( $(date +%s) - start )) s (timeout ${E2E_TIMEOUT} s); log $OUT_DIR/e2e.log"
grep -E "stage .* (done|finished)|TRTR|TSTR|FID|Traceback|Error" "$OUT_DIR/e2e.log" | tail -15
[ -f "$E2E_DIR/report.md" ] && cp "$E2E_DIR/report.md" "$OUT_DIR/e2e_report.md"
rm -rf "$E2E_DIR"
[ "$e2e" = 0 ] || status=1
echo "gpu_check.sh: $(elapsed) s in all"
exit $status
