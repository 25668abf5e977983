#!/usr/bin/env bash
# The multi-GPU scaling run on one host with 2-8 GPUs (benchmarks/README.md):
#   bash benchmarks/run_gpu_scaling.sh    # results under $OUT, table printed last
# Env: BUDGET_S (scaling.py's wall-time budget, default 480 s: cases that would not fit are
# skipped, lowest priority first), NS (GPU counts, e.g. "1,2,4": default every count the machine
# has), PYTHON (python3), SMOKE=1 (the CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dft_jax_scaling}
# NVLink multicast (NVLS) off: NCCL's plain ring/tree all-reduce; scaling.json records the value.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# NCCL's buffers live outside XLA's pool: leave it more room than run_gpu.sh's 0.95.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
[ -n "${SMOKE:-}" ] && NO_FLAG_PROBE=1
. benchmarks/gpu_env.sh
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  nvidia-smi topo -m 2>&1 || true
  echo "XLA_FLAGS=${XLA_FLAGS:-} NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
} >> "$OUT/machine.txt"
cat "$OUT/machine.txt"
"$PY" benchmarks/scaling.py ${SMOKE:+--smoke} --out="$OUT" --budget_s="${BUDGET_S:-480}" \
  --ns="${NS:-}" 2>&1 | tee "$OUT/scaling.txt"
