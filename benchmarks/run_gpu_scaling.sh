#!/usr/bin/env bash
# Issue #9's multi-GPU run, in one device call on nvidia-h200-x2 / -x4 / -x8 (benchmarks/README.md):
#   bash benchmarks/run_gpu_scaling.sh    # carry [".whl"]; results under $OUT, table printed last
# Env: BUDGET_S (scaling.py's wall-time budget, default 480 s: cases that would not fit are
# skipped, lowest priority first), NS (GPU counts, e.g. "1,2,4": default every count the machine
# has), PYTHON (python3), NO_WHEELS=1 (skip installing .whl/), SMOKE=1 (the CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dft_jax_scaling}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast (NVLS) stays off on the lent multi-GPU machines (KINDS.md); scaling.json
# records the value the cases ran with.
export NCCL_NVLS_ENABLE=0
# NCCL's buffers live outside XLA's pool: leave it more room than run_gpu.sh's 0.95.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# Autotuning shared by the cases' processes (kept only if this XLA knows the flag).
flags="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune_cache"
info="import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
if [ -z "${SMOKE:-}" ] && XLA_FLAGS="${XLA_FLAGS:-} $flags" "$PY" -c "$info" > "$OUT/machine.txt" 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $flags"
else
  "$PY" -c "$info" > "$OUT/machine.txt" 2>&1
fi
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  nvidia-smi topo -m 2>&1 || true
  echo "XLA_FLAGS=${XLA_FLAGS:-} NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
} >> "$OUT/machine.txt"
cat "$OUT/machine.txt"
"$PY" benchmarks/scaling.py ${SMOKE:+--smoke} --out="$OUT" --budget_s="${BUDGET_S:-480}" \
  --ns="${NS:-}" 2>&1 | tee "$OUT/scaling.txt"
