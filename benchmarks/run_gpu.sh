#!/usr/bin/env bash
# The benchmark issue's GPU run, in one device call (benchmarks/README.md):
#   bash benchmarks/run_gpu.sh            # carry [".whl"]; results under $OUT, table printed last
# Env: BUDGET_S (the sweep's wall-time budget, default 420 s: variants that would not fit are
# skipped, lowest priority first), PLAN (default gpu; smoke: the CPU dry run), PYTHON (python3),
# NO_WHEELS=1 (skip installing .whl/, e.g. for a local dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dft_jax_bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Room for the largest-batch variant (peaks are the allocator's, whatever this fraction).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# Autotuning results shared by the variants' processes: shorter compiles, same kernels. Kept
# only if this XLA knows the flag (an unknown one aborts every JAX process).
flags="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune_cache"
info="import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
if XLA_FLAGS="${XLA_FLAGS:-} $flags" "$PY" -c "$info" > "$OUT/machine.txt" 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $flags"
else
  "$PY" -c "$info" > "$OUT/machine.txt" 2>&1
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} >> "$OUT/machine.txt"
cat "$OUT/machine.txt"
"$PY" benchmarks/train_step.py --sweep="${PLAN:-gpu}" --out="$OUT" --budget_s="${BUDGET_S:-420}" \
  2>&1 | tee "$OUT/sweep.txt"
