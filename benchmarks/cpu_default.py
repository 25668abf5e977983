"""Tokens/s of the embedded default on this machine's CPU.

  JAX_PLATFORMS=cpu python benchmarks/cpu_default.py [--steps=8] [--out=benchmarks/results/cpu_default.json]
  JAX_PLATFORMS=cpu python benchmarks/cpu_default.py --config.train.seq_len=512   # a changed default

configs/default.py (with the --config.<field>=<value> overrides given, passed on as they are) run
by `python -m dft_jax.train` itself (DFT on the embedded
SmolLM2-135M-Instruct, built-in arithmetic set, packed rows, float32) with evaluation off; the
step times are those of its metrics.jsonl (compilation is apart, before step 1), and the peak host
memory is the run's maximum resident set. Run it alone: another process on the same cores changes
the number.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import train_step as bench  # pylint: disable=wrong-import-position
from dft_jax import cli, config_files  # pylint: disable=wrong-import-position
from dft_jax.errors import cli_entry  # pylint: disable=wrong-import-position


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return None


def measure(config, overrides, steps):
  """Runs `python -m dft_jax.train` (the main job itself with `overrides`, evaluation off) for
  1 + `steps` steps in a fresh workdir and reads its metrics.jsonl: step times after the first,
  peak host memory."""
  t = config.train
  num_steps = steps + 1
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "dft_jax.train", f"--workdir={workdir}",
           *bench.override_flags(dict(overrides)), f"--config.train.num_steps={num_steps}",
           "--config.eval.before=False", "--config.eval.after=False",
           "--config.log.progress=False", f"--config.checkpoint.every_steps={num_steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - t0
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  times = [r["step_seconds"] for r in rows]
  median = statistics.median(times[1:])
  return dict(
      config="configs/default.py", command=" ".join(cmd[1:]), model=config.model.name,
      objective=config.objective.name, global_batch_size=t.global_batch_size, seq_len=t.seq_len,
      steps=steps, wall_s=wall_s, first_step_s=times[0], step_time_s=median,
      step_times_s=[round(x, 4) for x in times[1:]],
      tokens_per_s=t.global_batch_size * t.seq_len / median,
      real_tokens_per_s=float(np.mean([r["tokens"] for r in rows[1:]])) / median,
      loss_tokens_per_s=float(np.mean([r["loss_tokens"] for r in rows[1:]])) / median,
      losses=[r["loss"] for r in rows],
      peak_rss_bytes=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
      cpu=cpu_name(), cpu_count=os.cpu_count(),
      load_average_after=os.getloadavg(),  # ~1 per core busy with this run alone
      versions=bench.versions("jax", "jaxlib", "flax", "optax", "numpy"),
      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def main(argv=None):
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv

  def define_more():
    cli.define("integer", "steps", 8, "timed steps after the first")
    cli.define("string", "out", os.path.join(ROOT, "benchmarks", "results", "cpu_default.json"),
               "the JSON record")
  config = bench.config_from_flags(argv, define_more, default=config_files.DEFAULT)
  steps = flags.FLAGS.steps
  record = measure(config, bench.overridden(config), steps)
  with open(flags.FLAGS.out, "w") as f:
    json.dump(record, f, indent=1)
  print(f"{record['tokens_per_s']:.1f} tokens/s ({record['real_tokens_per_s']:.1f} non-padding, "
        f"{record['loss_tokens_per_s']:.1f} loss tokens), {record['step_time_s']:.2f} s/step "
        f"median of {steps}, on {record['cpu_count']} x {record['cpu']}")


if __name__ == "__main__":
  cli_entry(main)()
