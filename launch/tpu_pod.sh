#!/usr/bin/env bash
# Runs the same dft_jax.train command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config=... --workdir=gs://bucket/run ...]
#
# Each worker must already hold this repository at $REPO_DIR (default ~/dft_jax) with its
# requirements installed (pip install -r requirements.txt, with jax[tpu] instead of the CPU jax).
# jax.distributed.initialize() discovers the pod's processes itself; the train step then sees
# every chip of the slice as one mesh. Use a gs:// workdir (or a shared filesystem) so all hosts
# write one checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
tpu_name=$1 zone=$2
shift 2
repo_dir=${REPO_DIR:-~/dft_jax}
printf -v flags '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="cd $repo_dir && DFT_JAX_DISTRIBUTED=1 python3 -m dft_jax.train $flags"
