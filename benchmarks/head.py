"""The LM head alone: the checkpointed head (lm_head.token_stats + objectives.objective_loss,
autodiff) against the fused one (step_lib.objective_loss_fused), value and gradient w.r.t. the
hidden states and the head weight, one objective at a time.

  python benchmarks/head.py --config.model.lm_head_impl=fused --config.objective.name=dft
  python benchmarks/head.py --config=configs/benchmark.py:smoke --config.bench.compare=True \
      --config.model.lm_head_impl=fused                       # tiny shapes on a CPU
  python benchmarks/train_step.py --plan=head --out=DIR       # every objective, both heads,
                                                              # one process each (plans.py)

Inputs: hidden states [batch, seq_len, D] drawn N(0, 1) in the compute dtype (what the final norm
gives), W [D, V] N(0, 0.02^2) in `w_dtype` (the step passes model.head_weight(), in the compute
dtype), the packed rows of train_step.py (targets, loss_mask, segment_ids), old_logp / ref_logp
near the model's where the objective needs them. D and V come from the model preset. Timing as in
train_step.py: AOT compile, bench.warmup runs, the median of bench.steps runs. matmul_tflops_per_s counts
the head's three matmuls (6 tokens D V: forward, d hidden, d W) over the step time.

Also recorded: dot_generals (matmuls of the lowered fwd+bwd, each scan body once: 4 a chunk
checkpointed, 3 fused), sorts (of the compiled fwd+bwd: a top_k XLA could not give its TopK
kernel), XLA's temp bytes, the allocator's peak; with bench.compare the largest
difference of the fused gradients from the checkpointed ones (relative to the largest entry); for
objectives with a top-k gate (EAFT), top_k_s: one chunk's top-k through lax.top_k on the chunk's
3-D [B, steps, V] logits (what token_stats did before top_k_values), on [B * steps, V], and
through lm_head.top_k_values's two stages (block maxima, then the best blocks' entries), with
their values checked equal.
"""
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import train_step as bench  # pylint: disable=wrong-import-position


def head_loss(head, chunk, cfg):
  """fn(hidden, w, batch, extra) -> (loss, metrics) for the head named `head` (fused or
  checkpointed), chunks of `chunk` tokens."""
  import functools
  from dft_jax import lm_head, objectives
  from dft_jax import step as step_lib
  if head == "fused":
    return lambda hidden, w, batch, extra: step_lib.objective_loss_fused(
        hidden, w, batch, cfg, extra_BxT=extra, chunk_size=chunk)
  stats = functools.partial(lm_head.token_stats, chunk_size=chunk, stats=cfg.stats)
  return lambda hidden, w, batch, extra: objectives.objective_loss(
      {**stats(hidden, w, batch["targets"]), **extra}, batch, cfg)


def inputs(config, cfg):
  """(hidden, w, batch, extra) on the default device."""
  import jax
  import jax.numpy as jnp
  from dft_jax.models import PRESETS
  c = PRESETS[bench.preset(config)]
  rows_, seq_len = config.train.global_batch_size, config.train.seq_len
  rng = np.random.default_rng(0)
  rows = bench.packed_rows(rng, rows_, seq_len, c.vocab_size, config.bench.doc_len)
  batch = {k: jnp.asarray(rows[k]) for k in ("targets", "loss_mask", "segment_ids")}
  key_h, key_w = jax.random.split(jax.random.PRNGKey(0))
  hidden = jax.random.normal(key_h, (rows_, seq_len, c.hidden_size),
                             jnp.dtype(config.model.compute_dtype))
  w = 0.02 * jax.random.normal(key_w, (c.hidden_size, c.vocab_size), jnp.float32)
  logp = -5.0 + rng.normal(size=batch["targets"].shape).astype(np.float32)
  extra = {k: jnp.asarray(logp + rng.normal(scale=0.3, size=logp.shape).astype(np.float32))
           for k in cfg.needs & {"old_logp", "ref_logp"}}
  if "token_key" in cfg.needs:  # OTR's draws: the step's keys of step 0
    from dft_jax import step as step_lib
    extra["token_key"] = step_lib.token_keys(0, 0, logp.shape)
  return hidden, w.astype(config.bench.w_dtype), batch, extra


def median_time(fn, args, warmup, steps):
  import jax
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def top_k_times(config, hidden, w, k):
  """One chunk's top-k, each way: {way: (median seconds, sorts in the compiled HLO)}, and
  whether all ways give the same values."""
  import jax
  import jax.numpy as jnp
  from dft_jax import lm_head
  rows, seq_len = hidden.shape[:2]
  positions = max(1, min(seq_len, config.model.lm_head_chunk // rows))
  logits = jnp.einsum("btd,dv->btv", hidden[:, :positions], w.astype(hidden.dtype),
                      preferred_element_type=hidden.dtype)
  ways = {"lax.top_k [B, steps, V]": lambda x: jax.lax.top_k(x, k)[0],
          "lax.top_k [B * steps, V]": lambda x: jax.lax.top_k(x.reshape(-1, x.shape[-1]), k)[0],
          "top_k_values blocks": lambda x: lm_head.top_k_values(x, k)}
  out, values = {}, []
  for way, fn in ways.items():
    compiled = jax.jit(fn).lower(logits).compile()
    out[way] = (median_time(compiled, (logits,), 2, config.bench.steps)[0],
                compiled.as_text().count(" sort("))
    values.append(np.asarray(compiled(logits), np.float32).reshape(-1, k))
  return out, all(np.array_equal(values[0], other) for other in values[1:])


def measure(config):
  """The variant's record fields (module doc)."""
  import jax
  from dft_jax import objectives
  cfg = objectives.validate(config.objective)
  chunk = config.model.lm_head_chunk
  hidden, w, batch, extra = inputs(config, cfg)
  grad_fn = lambda head: jax.jit(jax.value_and_grad(
      lambda h, w_: head(h, w_, batch, extra)[0], argnums=(0, 1)))
  fn = grad_fn(head_loss(config.model.lm_head_impl, chunk, cfg))
  t0 = time.perf_counter()
  lowered = fn.lower(hidden, w)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  step_time, times = median_time(compiled, (hidden, w), config.bench.warmup, config.bench.steps)
  loss, grads = compiled(hidden, w)
  tokens = hidden.shape[0] * hidden.shape[1]
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
  if config.bench.compare:
    ref = grad_fn(head_loss("checkpointed", chunk, cfg))(hidden, w)[1]
    record["grad_max_rel_diff_vs_checkpointed"] = {
        name: float(np.abs(np.asarray(g, np.float32) - np.asarray(r, np.float32)).max()
                    / np.abs(np.asarray(r, np.float32)).max())
        for name, g, r in zip(("hidden", "w"), grads, ref)}
  topk = [s.name for s in cfg.stats if s.name.startswith("topk_entropy:")]
  if topk:
    k = int(topk[0].split(":")[1])
    record["top_k_s"], record["top_k_equal"] = top_k_times(config, hidden, w, k)
  stats = jax.devices()[0].memory_stats() or {}
  record.update(peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  return record


def run_variant(config):
  """One head variant in this process -> its record (status ok / oom / error)."""
  return bench.run_recorded(dict(bench.new_record(config), framework="head"),
                            lambda: measure(config))


if __name__ == "__main__":
  bench.variant_main(run_variant)
