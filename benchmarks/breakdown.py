"""Where a train step's time goes: the trunk, the LM head + objective (checkpointed and fused,
lm_head.token_stats and step_lib.objective_loss_fused), and the optimizer, each timed alone
(forward + backward where there is one) against the whole step.

  python benchmarks/breakdown.py [--model=qwen2.5-1.5b] [--remat=dots_attention_saveable] [--out=F]
  python benchmarks/breakdown.py --smoke          # tiny shapes on a CPU

Each part is jitted on its own, warmed up, and timed as the median of --steps runs; the sum of the
parts against the whole step shows what fusion across parts saves or costs.
"""
import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import train_step as bench
from dft_jax import lm_head, objectives
from dft_jax import step as step_lib


def median_time(fn, *args, steps):
  """Median wall time of fn(*args) over `steps` runs after two warm-up runs."""
  times = []
  for i in range(steps + 2):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def parts(config, graphdef, state, tx, batch):
  """{name: (jitted fn, args)} for the trunk, the head + objective, the optimizer."""
  setting, chunk = objectives.validate(config.objective), config.model.lm_head_chunk
  model = nnx.merge(graphdef, state.params)
  hidden = jax.jit(lambda p: nnx.merge(graphdef, p).hidden_states(
      batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"]))(
          state.params)
  cotangent = jax.random.normal(jax.random.PRNGKey(0), hidden.shape, hidden.dtype)

  def trunk(params):
    h = nnx.merge(graphdef, params).hidden_states(
        batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    return jnp.vdot(h.astype(jnp.float32), cotangent.astype(jnp.float32))

  def head(statistics, hidden, w):
    stats = lm_head.token_stats(hidden, w, batch["targets"], chunk_size=chunk, stats=statistics)
    return objectives.objective_loss(stats, batch, setting)[0]

  def fused_head(hidden, w):
    return step_lib.objective_loss_fused(hidden, w, batch, setting, chunk_size=chunk)[0]

  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), state.params)

  def optimizer(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  head_grad = lambda stats: jax.jit(jax.grad(functools.partial(head, stats), argnums=(0, 1)))
  return {
      "trunk fwd+bwd": (jax.jit(jax.grad(trunk)), (state.params,)),
      f"head+objective fwd+bwd, stats {'+'.join(s.name for s in setting.stats)}": (
          head_grad(setting.stats), (hidden, model.head_weight())),
      "head+objective fwd+bwd, logp only": (head_grad((lm_head.LOGP,)),
                                            (hidden, model.head_weight())),
      "head+objective fwd+bwd, fused head": (jax.jit(jax.grad(fused_head, argnums=(0, 1))),
                                             (hidden, model.head_weight())),
      "optimizer (clip + AdamW)": (jax.jit(optimizer), (state.params, state.opt_state)),
  }


def run(v, steps):
  config = bench.bench_config(v)
  mesh = bench.single_device_mesh()
  model = bench.load_model(config)
  model_cfg = model.config
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  del model
  rng = np.random.default_rng(0)
  rows = config.train.global_batch_size
  batch = step_lib.global_batch(
      bench.packed_rows(rng, rows, v["seq_len"], model_cfg.vocab_size, v["doc_len"]), mesh)
  timings = {name: median_time(fn, *args, steps=steps)
             for name, (fn, args) in parts(config, graphdef, state, tx, batch).items()}
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  step_fn = lambda s: step(s, batch, frozen)[0]
  times = []
  for i in range(steps + 2):
    t0 = time.perf_counter()
    state = jax.block_until_ready(step_fn(state))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  timings["whole train step"] = statistics.median(times)
  return dict(model=v["model"], remat=v["remat"], objective=v["objective"], batch=rows,
              seq_len=v["seq_len"], lm_head_chunk=v["lm_head_chunk"],
              seconds={k: round(t, 5) for k, t in timings.items()}, **bench.device_info(),
              versions=bench.versions("jax", "jaxlib", "flax", "optax"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="qwen2.5-1.5b")
  p.add_argument("--remat", default="dots_attention_saveable")
  p.add_argument("--objective", default="dft")
  p.add_argument("--lm_head_chunk", type=int, default=4096)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--smoke", action="store_true", help="tiny model and shapes, float32 (CPU)")
  p.add_argument("--out", default=None, help="append the JSON record to this file")
  args = p.parse_args()
  v = dict(bench.DEFAULTS, model=args.model, remat=args.remat, objective=args.objective,
           lm_head_chunk=args.lm_head_chunk)
  if args.smoke:
    v.update(model="tiny-qwen2", seq_len=128, batch=2, lm_head_chunk=64, doc_len=(16, 64),
             compute_dtype="float32", remat="nothing_saveable")
  record = run(v, 2 if args.smoke else args.steps)
  width = max(map(len, record["seconds"]))
  for name, t in record["seconds"].items():
    print(f"{name:{width}s} {1e3 * t:9.1f} ms")
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
