#!/usr/bin/env bash
# BYOL step throughput on one GPU: ResNet-50 (ImageNet stem), 224 px, float32 and bfloat16.
#
# Made for a machine with a CUDA jax (0.11.2 was the target) and no TensorFlow and no network:
# the Python packages it lacks travel as small pure-Python wheels. Prepare them here, once:
#     pip download --no-deps -d .whl dm-haiku==0.0.17 jmp==0.0.4 ml_collections==1.1.0
# (.whl/ is git-ignored; pass it along with the working tree, e.g. a device run's `carry`).
# Then, from the repository root on the GPU machine:
#     bash experiments/gpu_benchmark.sh
# Environment: OUT (folder for results; default /tmp/byol_gpu_benchmark), PYTHON (default
# python3), WHEELS (default .whl), BUDGET_S (default 420) and RUN_TIMEOUT_S (default 180): each
# run is killed after RUN_TIMEOUT_S and starts only if it can end within BUDGET_S of the start,
# so the script ends within about BUDGET_S + 20 s (7.5 min by default), BENCH_ARGS (the model and
# timing flags of every run; a CPU smoke test of this script:
#   BENCH_ARGS='--encoder=tiny --image_size=16 --hidden_size=64 --steps=2' bash experiments/gpu_benchmark.sh).
# Writes $OUT/gpu_benchmark.jsonl (one benchmark_step.py JSON record per run, or an error
# record) and $OUT/gpu_benchmark.log; prints a summary table at the end.
# Target (issue #7): >= 2,500 images/s for bfloat16 at batch 256. When the machine's python has a
# CUDA PyTorch, the PyTorch yardstick (experiments/torch_byol_step_r50.py --device cuda, bf16
# autocast and float32, NCHW and channels_last) runs between the JAX runs on the same shapes,
# and the summary prints JAX / best PyTorch (TORCH_ARGS overrides its model and timing flags).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/byol_gpu_benchmark}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET_S=${BUDGET_S:-420}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-180}
BENCH_ARGS=${BENCH_ARGS:---encoder=resnet50 --image_size=224 --steps=20 --warmup_steps=2 --max_seconds=60}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_benchmark.jsonl"
LOG="$OUT_DIR/gpu_benchmark.log"
: > "$RESULTS"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
echo "== $(date -Is) $(hostname) budget ${BUDGET_S}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# 1. Packages: install the carried wheels into a private folder only when imports fail.
if ! "$PY" -c 'import haiku, optax, chex, ml_collections' 2>/dev/null; then
  LIB=/tmp/byol_gpu_pylib
  echo "== installing wheels from $WHEELS into $LIB"
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$LIB" \
      dm-haiku jmp ml-collections || echo "pip install failed"
  export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || { echo "== imports failed: stopping"; exit 1; }
import sys
import jax, jaxlib, haiku, optax, chex, ml_collections
print('python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__,
      '| haiku', haiku.__version__, '| optax', optax.__version__, '| chex', chex.__version__)
print('devices', jax.devices())
assert 'tensorflow' not in sys.modules
EOF

# 2. Runs, most important first; a run starts only while the budget lasts. "jax|flags" runs
# benchmark_step.py with BENCH_ARGS; "torch|flags" runs the PyTorch yardstick on the same GPU at
# the same shapes (experiments/torch_byol_step_r50.py: ResNet-50, 224 px, 4096-wide heads), if
# this Python has a CUDA torch: the side-by-side comparison.
TORCH_ARGS=${TORCH_ARGS:---arch r50 --size 224 --steps 20 --max_seconds 60 --device cuda}
RUNS=(
  "jax|--compute_dtype=bfloat16 --batch_size=256"
  "torch|--bf16 --channels_last --batch 256"
  "torch|--bf16 --batch 256"
  "jax|--compute_dtype=float32 --batch_size=256"
  "torch|--channels_last --batch 256"
  "jax|--compute_dtype=bfloat16 --batch_size=512"
)
HAS_TORCH=0
"$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && HAS_TORCH=1
for run in "${RUNS[@]}"; do
  impl=${run%%|*}
  flags=${run#*|}
  if [[ $impl == torch && $HAS_TORCH == 0 ]]; then
    continue
  fi
  elapsed=$(( $(date +%s) - START ))
  if (( elapsed + RUN_TIMEOUT_S > BUDGET_S )); then
    echo "== skipped (budget): $impl $flags"
    echo "{\"skipped\": \"$impl $flags\", \"reason\": \"budget\"}" >> "$RESULTS"
    continue
  fi
  if [[ $impl == jax ]]; then
    cmd="experiments/benchmark_step.py $BENCH_ARGS $flags"
  else
    cmd="experiments/torch_byol_step_r50.py $TORCH_ARGS $flags"
  fi
  echo "== $(date +%T) $cmd"
  line=$(timeout "$RUN_TIMEOUT_S" "$PY" $cmd | tail -1)
  rc=$?
  if [[ "$line" == \{* ]]; then
    echo "$line" >> "$RESULTS"
    echo "$line"
  else
    echo "{\"failed\": \"$impl $flags\", \"rc\": $rc}" >> "$RESULTS"
    echo "== failed (rc $rc): $impl $flags"
  fi
done

# 3. Summary.
"$PY" - "$RESULTS" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'impl':6} {'dtype':9} {'layout':6} {'batch':>5} {'images/s':>10} {'step ms':>8} "
      f"{'first s':>8} {'GPU peak GB':>11}")
best = {}  # (dtype, batch) -> best PyTorch images/s over the two memory formats
for r in records:
  if 'images_per_s' not in r:
    print(r)
    continue
  if r.get('impl') == 'torch':
    dtype, batch = ('bfloat16' if r['bf16'] else 'float32'), r['batch']
    layout, peak, impl = ('NHWC' if r['channels_last'] else 'NCHW'), float('nan'), 'torch'
    best[dtype, batch] = max(best.get((dtype, batch), 0), r['images_per_s'])
  else:
    dtype, batch, layout, impl = r['compute_dtype'], r['batch_size'], 'NHWC', 'jax'
    peak = r.get('device_peak_bytes', 0) / 1e9
  print(f"{impl:6} {dtype:9} {layout:6} {batch:5d} {r['images_per_s']:10.1f} "
        f"{1e3 * r['median_step_s']:8.1f} {r['first_step_s']:8.1f} {peak:11.1f}")
for r in records:
  if 'images_per_s' in r and r.get('impl') != 'torch':
    key = (r['compute_dtype'], r['batch_size'])
    if key in best:
      print(f"   JAX / best PyTorch ({key[0]}, batch {key[1]}): {r['images_per_s'] / best[key]:.2f}x")
    if key == ('bfloat16', 256):
      print(f"   target >= 2500 images/s (bf16, batch 256): "
            f"{'met' if r['images_per_s'] >= 2500 else 'NOT met'}")
EOF
echo "== done in $(( $(date +%s) - START ))s; results in $RESULTS"
