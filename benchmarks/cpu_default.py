"""Tokens/s of the embedded default on this machine's CPU (benchmark issue #8).

  JAX_PLATFORMS=cpu python benchmarks/cpu_default.py [--steps=8] [--out=benchmarks/results/cpu_default.json]

configs/default.py as `python -m dft_jax.train` runs it (DFT on the embedded SmolLM2-135M-Instruct,
built-in arithmetic set, packed rows, float32), through dft_jax.train.setup: the real step on real
batches. Evaluation and checkpoints are left out; the first step (compilation) is timed apart.
Run it alone: another process on the same cores changes the number.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import train_step as bench  # pylint: disable=wrong-import-position


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return None


def measure(steps):
  """Times `steps` train steps after one compile step; returns the record."""
  import jax
  from dft_jax import train
  from dft_jax.data.testing import default_config
  config = default_config()
  config.eval.update(before=False, after=False)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    run = train.setup(config, workdir)
    setup_s = time.perf_counter() - t0
    times, data_times, real_tokens, loss_tokens, losses = [], [], [], [], []
    for _ in range(steps + 1):
      t0 = time.perf_counter()
      batch = train.global_batch(next(run.data_iter), run.mesh)
      data_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      run.state, metrics = run.train_step(run.state, batch, None)
      jax.block_until_ready((run.state, metrics))
      times.append(time.perf_counter() - t0)
      real_tokens.append(float(metrics["tokens"]))
      loss_tokens.append(float(metrics["loss_tokens"]))
      losses.append(float(metrics["loss"]))
  t = config.train
  median = statistics.median(times[1:])
  record = dict(
      config="configs/default.py", model=config.model.name, objective=config.objective.name,
      global_batch_size=t.global_batch_size, seq_len=t.seq_len, steps=steps,
      num_params=run.num_params, setup_s=setup_s, first_step_s=times[0],
      step_time_s=median, step_times_s=[round(x, 4) for x in times[1:]],
      data_time_s=statistics.median(data_times[1:]),
      tokens_per_s=t.global_batch_size * t.seq_len / median,
      real_tokens_per_s=float(np.mean(real_tokens[1:])) / median,
      loss_tokens_per_s=float(np.mean(loss_tokens[1:])) / median,
      losses=losses, cpu=cpu_name(), cpu_count=os.cpu_count(),
      load_average_after=os.getloadavg(),  # ~1 per core busy with this run alone
      versions=bench.versions("jax", "jaxlib", "flax", "optax", "numpy"),
      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=8, help="timed steps after the first")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_default.json"))
  args = p.parse_args(argv)
  record = measure(args.steps)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=1)
  print(f"{record['tokens_per_s']:.1f} tokens/s ({record['real_tokens_per_s']:.1f} non-padding, "
        f"{record['loss_tokens_per_s']:.1f} loss tokens), {record['step_time_s']:.2f} s/step "
        f"median of {args.steps}, on {record['cpu_count']} x {record['cpu']}")


if __name__ == "__main__":
  main()
