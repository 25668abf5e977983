# Sourced by run_gpu.sh and run_gpu_scaling.sh after they set OUT (PYTHON, NO_WHEELS and
# NO_FLAG_PROBE are optional): sets PY, installs .whl/ into /tmp/site, exports the run's
# environment, adds XLA's autotune cache shared by the runs' processes (shorter compiles, same
# kernels) to XLA_FLAGS only if this XLA knows the flag (an unknown one aborts every JAX process),
# and starts $OUT/machine.txt with the Python / JAX / device line.
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
flags="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune_cache"
info="import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
if [ -z "${NO_FLAG_PROBE:-}" ] && XLA_FLAGS="${XLA_FLAGS:-} $flags" "$PY" -c "$info" > "$OUT/machine.txt" 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $flags"
else
  "$PY" -c "$info" > "$OUT/machine.txt" 2>&1
fi
