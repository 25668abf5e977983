"""The LM head alone: the checkpointed head (lm_head.token_stats + objectives.objective_loss,
autodiff) against the fused one (step_lib.objective_loss_fused), value and gradient w.r.t. the
hidden states and the head weight, one objective at a time.

  python benchmarks/head.py --lm_head=fused --objective=dft     # one variant, in this process
  python benchmarks/head.py --smoke --lm_head=fused --compare   # tiny shapes on a CPU
  python benchmarks/train_step.py --sweep=head --out=DIR        # every objective, both heads,
                                                                # one process each (PLANS["head"])

Inputs: hidden states [batch, seq_len, D] drawn N(0, 1) in the compute dtype (what the final norm
gives), W [D, V] N(0, 0.02^2) in `w_dtype` (the step passes model.head_weight(), in the compute
dtype), the packed rows of train_step.py (targets, loss_mask, segment_ids), old_logp / ref_logp
near the model's where the objective needs them. D and V come from the model preset. Timing as in
train_step.py: AOT compile, `warmup` runs, the median of `steps` runs. matmul_tflops_per_s counts
the head's three matmuls (6 tokens D V: forward, d hidden, d W) over the step time.

Also recorded: dot_generals (matmuls of the lowered fwd+bwd, each scan body once: 4 a chunk
checkpointed, 3 fused), sorts (of the compiled fwd+bwd: a top_k XLA could not give its TopK
kernel), XLA's temp bytes, the allocator's peak; with compare=True the largest
difference of the fused gradients from the checkpointed ones (relative to the largest entry); for
objectives with a top-k gate (EAFT), top_k_s: one chunk's top-k through lax.top_k on the chunk's
3-D [B, steps, V] logits (what token_stats did before top_k_values), on [B * steps, V], and
through lm_head.top_k_values's two stages (block maxima, then the best blocks' entries), with
their values checked equal.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import train_step as bench  # pylint: disable=wrong-import-position

HEADS = ("checkpointed", "fused")
SMOKE = dict(model="tiny-qwen2", seq_len=128, batch=2, lm_head_chunk=64, doc_len=(16, 64),
             compute_dtype="float32", w_dtype="float32", steps=3, warmup=1)


def head_loss(v, cfg):
  """fn(hidden, w, batch, extra) -> (loss, metrics) for the variant's head."""
  import functools
  from dft_jax import lm_head, objectives
  from dft_jax import step as step_lib
  chunk = v["lm_head_chunk"]
  if v["lm_head"] == "fused":
    return lambda hidden, w, batch, extra: step_lib.objective_loss_fused(
        hidden, w, batch, cfg, extra_BxT=extra, chunk_size=chunk)
  stats = functools.partial(lm_head.token_stats, chunk_size=chunk, stats=cfg.stats)
  return lambda hidden, w, batch, extra: objectives.objective_loss(
      {**stats(hidden, w, batch["targets"]), **extra}, batch, cfg)


def inputs(v, cfg):
  """(hidden, w, batch, extra) on the default device."""
  import jax
  import jax.numpy as jnp
  from dft_jax import objectives
  from dft_jax.models import PRESETS
  c = PRESETS[v["model"]]
  rng = np.random.default_rng(0)
  rows = bench.packed_rows(rng, v["batch"], v["seq_len"], c.vocab_size, v["doc_len"])
  batch = {k: jnp.asarray(rows[k]) for k in ("targets", "loss_mask", "segment_ids")}
  key_h, key_w = jax.random.split(jax.random.PRNGKey(0))
  hidden = jax.random.normal(key_h, (v["batch"], v["seq_len"], c.hidden_size),
                             jnp.dtype(v["compute_dtype"]))
  w = 0.02 * jax.random.normal(key_w, (c.hidden_size, c.vocab_size), jnp.float32)
  logp = -5.0 + rng.normal(size=batch["targets"].shape).astype(np.float32)
  extra = {k: jnp.asarray(logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32))
           for k in cfg.needs}
  return hidden, w.astype(v["w_dtype"]), batch, extra


def median_time(fn, args, warmup, steps):
  import jax
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def top_k_times(v, hidden, w, k, steps):
  """One chunk's top-k, each way: {way: (median seconds, sorts in the compiled HLO)}, and
  whether all ways give the same values."""
  import jax
  import jax.numpy as jnp
  from dft_jax import lm_head
  positions = max(1, min(v["seq_len"], v["lm_head_chunk"] // v["batch"]))
  logits = jnp.einsum("btd,dv->btv", hidden[:, :positions], w.astype(hidden.dtype),
                      preferred_element_type=hidden.dtype)
  ways = {"lax.top_k [B, steps, V]": lambda x: jax.lax.top_k(x, k)[0],
          "lax.top_k [B * steps, V]": lambda x: jax.lax.top_k(x.reshape(-1, x.shape[-1]), k)[0],
          "top_k_values blocks": lambda x: lm_head.top_k_values(x, k)}
  out, values = {}, []
  for way, fn in ways.items():
    compiled = jax.jit(fn).lower(logits).compile()
    out[way] = (median_time(compiled, (logits,), 2, steps)[0],
                compiled.as_text().count(" sort("))
    values.append(np.asarray(compiled(logits), np.float32).reshape(-1, k))
  return out, all(np.array_equal(values[0], other) for other in values[1:])


def measure(v):
  """The variant's record fields (module doc)."""
  import jax
  from dft_jax import objectives
  cfg = objectives.validate(objectives.config_block(v["objective"]))
  hidden, w, batch, extra = inputs(v, cfg)
  grad_fn = lambda head: jax.jit(jax.value_and_grad(
      lambda h, w_: head(h, w_, batch, extra)[0], argnums=(0, 1)))
  fn = grad_fn(head_loss(v, cfg))
  t0 = time.perf_counter()
  lowered = fn.lower(hidden, w)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  step_time, times = median_time(compiled, (hidden, w), v["warmup"], v["steps"])
  loss, grads = compiled(hidden, w)
  tokens = v["batch"] * v["seq_len"]
  d, vocab = w.shape
  record = dict(step_time_s=step_time, step_times_s=[round(t, 6) for t in times],
                step_time_spread=(max(times) - min(times)) / step_time, tokens_per_step=tokens,
                tokens_per_s=tokens / step_time, mfu=None, hidden_size=d, vocab_size=vocab,
                matmul_tflops_per_s=6 * tokens * d * vocab / step_time / 1e12,
                dot_generals=lowered.as_text().count("stablehlo.dot_general"),
                sorts=compiled.as_text().count(" sort("),
                memory_analysis=bench.memory_stats(compiled), compile_s=compile_s,
                losses=[float(loss)], **bench.device_info(),
                versions=bench.versions("jax", "jaxlib", "numpy"))
  if not all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads):
    raise FloatingPointError("non-finite gradient")
  if v["compare"]:
    ref = grad_fn(head_loss(dict(v, lm_head="checkpointed"), cfg))(hidden, w)[1]
    record["grad_max_rel_diff_vs_checkpointed"] = {
        name: float(np.abs(np.asarray(g, np.float32) - np.asarray(r, np.float32)).max()
                    / np.abs(np.asarray(r, np.float32)).max())
        for name, g, r in zip(("hidden", "w"), grads, ref)}
  topk = [s.name for s in cfg.stats if s.name.startswith("topk_entropy:")]
  if topk:
    k = int(topk[0].split(":")[1])
    record["top_k_s"], record["top_k_equal"] = top_k_times(v, hidden, w, k, v["steps"])
  stats = jax.devices()[0].memory_stats() or {}
  record.update(peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  return record


def run_variant(v):
  """One head variant in this process -> its record (status ok / oom / error)."""
  v = {**bench.DEFAULTS, **v, "framework": "head"}
  record = {k: v[k] for k in bench.DEFAULTS
            if k not in ("est_s", "group", "probe_batches", "liger")}
  record.update(name=v.get("name") or f"head/{v['objective']}/{v['lm_head']}", group=v["group"],
                status="ok")
  return bench.run_recorded(record, lambda: measure(v))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", help="one variant as JSON (what the sweep passes to a subprocess)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, float32 (CPU)")
  for key in ("model", "objective", "lm_head", "compute_dtype", "w_dtype"):
    p.add_argument(f"--{key}", default=bench.DEFAULTS[key])
  for key in ("batch", "seq_len", "lm_head_chunk", "steps", "warmup"):
    p.add_argument(f"--{key}", type=int, default=bench.DEFAULTS[key])
  p.add_argument("--compare", action="store_true", help="also the checkpointed head's gradients")
  args = p.parse_args(argv)
  if args.variant:
    v = json.loads(args.variant)
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
  else:
    v = {k: getattr(args, k) for k in ("model", "objective", "lm_head", "compute_dtype",
                                       "w_dtype", "batch", "seq_len", "lm_head_chunk", "steps",
                                       "warmup", "compare")}
    v = dict(v, **SMOKE) if args.smoke else v
  print("RESULT " + json.dumps(run_variant(v)), flush=True)


if __name__ == "__main__":
  main()
