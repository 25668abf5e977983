# Sourced by run_gpu.sh and run_gpu_scaling.sh after they set OUT (PYTHON and NO_FLAG_PROBE are
# optional): sets PY, exports the run's environment, adds XLA's autotune cache shared by the runs'
# processes (shorter compiles, same kernels) to XLA_FLAGS only if this XLA knows the flag (an
# unknown one aborts every JAX process), and starts $OUT/machine.txt with the Python / JAX /
# device line.
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
flags="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune_cache"
info="import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
if [ -z "${NO_FLAG_PROBE:-}" ] && XLA_FLAGS="${XLA_FLAGS:-} $flags" "$PY" -c "$info" > "$OUT/machine.txt" 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $flags"
else
  "$PY" -c "$info" > "$OUT/machine.txt" 2>&1
fi
