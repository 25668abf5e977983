#!/usr/bin/env bash
# The GPU benchmark sweep on one machine with a GPU (benchmarks/README.md):
#   bash benchmarks/run_gpu.sh            # results under $OUT, table printed last
# Env: BUDGET_S (the plan's wall-time budget, default 420 s: variants that would not fit are
# skipped, lowest priority first), PLAN (a plan of benchmarks/plans.py, default gpu; smoke: the
# CPU dry run), TINY=1 (the plan at tiny shapes: its whole path on a CPU), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dft_jax_bench}
# Room for the largest-batch variant (peaks are the allocator's, whatever this fraction).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
. benchmarks/gpu_env.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} >> "$OUT/machine.txt"
cat "$OUT/machine.txt"
"$PY" benchmarks/train_step.py --plan="${PLAN:-gpu}" ${TINY:+--tiny} --out="$OUT" \
  --budget_s="${BUDGET_S:-420}" \
  2>&1 | tee "$OUT/sweep.txt"
