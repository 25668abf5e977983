"""Sampling throughput: dft_jax.sampling.generate against transformers' generate, same shapes.

  python benchmarks/sampling.py --config.model.param_dtype=bfloat16 --config.eval.batch_size=256
  python benchmarks/sampling.py --config.bench.framework=generate --config.bench.static_cache=True \\
      --config.model.param_dtype=bfloat16 --config.eval.batch_size=256     # the transformers peer
  python benchmarks/sampling.py --config=configs/benchmark.py:smoke        # tiny, on a CPU

The fields are configs/benchmark.py's (the main job's names, as for train_step.py):
eval.batch_size rows of bench.prompt_len random prompt tokens, eval.max_new_tokens new tokens a
row at eval.temperature (eval.top_p), no stop token (every row makes all its tokens), random
weights of the model preset in model.param_dtype, computing in model.compute_dtype.
bench.framework: sampler (ours; any other value too) or generate (transformers' Qwen2ForCausalLM.generate, SDPA,
do_sample, top_k off; bench.static_cache: its static KV cache, which generate compiles with
torch.compile's CUDA graphs). A run is one whole generate call (prefill + decode, ended by
reading the tokens back); bench.warmup runs (ours: the first compiles; the peer's: 16 new tokens
on the same cache, which compiles it), then the median of bench.steps runs:

  tokens_per_s     batch x new tokens / run time
  prefill_s        ours: the prompts' prefill alone (timed apart); decode_s = run - prefill
  bound_s          the decode's HBM-bandwidth bound: every step reads the weights once (the
                   parameters in the compute dtype; an untied input embedding reads only its
                   rows) and the cache's filled slots once, sum over steps i of
                   W + L B (P + i + 1) 2 K H bytes, at bench.hbm_bytes_per_s (None: the device's
                   nominal, dft_jax.throughput.HBM_BYTES_PER_S; H200 4.8e12)
  bandwidth_fraction  bound_s / decode_s
  problems_500x16_s   500 problems x 16 samples at this batch: ceil(8000 / B) runs
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
from dft_jax import throughput  # pylint: disable=wrong-import-position

PROBLEMS, SAMPLES = 500, 16  # the DFT paper's evaluation protocol: 16 samples a problem
PEER_WARMUP_TOKENS = 16


def prompts(config, vocab):
  """eval.batch_size rows of bench.prompt_len random token ids (numpy, fixed seed)."""
  rng = np.random.default_rng(0)
  return rng.integers(0, vocab, (config.eval.batch_size, config.bench.prompt_len), np.int32)


def cache_bytes_per_token(cfg, dtype_bytes):
  """Bytes one token adds to the KV cache: every layer's key and value, kv heads x head dim."""
  return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def weight_bytes(cfg, num_params, dtype_bytes):
  """Bytes of the weights a decode step reads: every parameter in the compute dtype, but an
  untied input embedding (only the rows of the batch's tokens are read)."""
  unread = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  return (num_params - unread) * dtype_bytes


def bound_seconds(weights, per_token, batch, prompt_len, new_tokens, bytes_per_s):
  """sum over the decode steps i < new_tokens of (weights + batch (prompt_len + i + 1)
  per_token) / bytes_per_s: reading the weights and the filled cache once a step."""
  slots = batch * (new_tokens * (prompt_len + 1) + new_tokens * (new_tokens - 1) // 2)
  return (new_tokens * weights + slots * per_token) / bytes_per_s


def timed(run, warmup, steps):
  """(median seconds of `steps` calls of run() after `warmup` calls, all the timed seconds)."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def rates(config, run_s, times):
  """The fields of any sampling record: tokens/s and the 500 x 16 estimate."""
  batch, new = config.eval.batch_size, config.eval.max_new_tokens
  return dict(run_s=run_s, run_times_s=[round(t, 4) for t in times],
              tokens_per_s=batch * new / run_s,
              problems_500x16_s=-(-PROBLEMS * SAMPLES // batch) * run_s)


def run_sampler(config):
  """Our sampler: the record fields (module doc)."""
  import jax
  from flax import nnx
  from dft_jax import sampling
  from dft_jax import step as step_lib
  t0 = time.perf_counter()
  model = bench.load_model(bench.step_config(config))
  jax.block_until_ready(nnx.state(model))
  init_s = time.perf_counter() - t0
  cfg, e = model.config, config.eval
  rows = prompts(config, cfg.vocab_size).tolist()
  run = lambda: sampling.generate(model, rows, max_new_tokens=e.max_new_tokens,
                                  temperature=e.temperature, top_p=e.top_p, seed=e.seed)
  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  run_s, times = timed(run, config.bench.warmup - 1, config.bench.steps)
  prefill_s = timed(lambda: prefill(model, rows), 1, config.bench.steps)[0]
  dtype_bytes = np.dtype(model.compute_dtype).itemsize
  num_params = step_lib.count_params(nnx.state(model))
  device = jax.devices()[0]
  bandwidth = config.bench.hbm_bytes_per_s or throughput.hbm_bytes_per_s(device)
  record = dict(num_params=num_params, init_s=init_s, first_run_s=first_s,
                prefill_s=prefill_s, decode_s=run_s - prefill_s, hbm_bytes_per_s=bandwidth,
                weight_bytes=weight_bytes(cfg, num_params, dtype_bytes),
                cache_bytes_per_token=cache_bytes_per_token(cfg, dtype_bytes),
                **rates(config, run_s, times), **bench.device_info(),
                versions=bench.versions("jax", "jaxlib", "flax", "numpy"))
  if bandwidth:
    record["bound_s"] = bound_seconds(record["weight_bytes"], record["cache_bytes_per_token"],
                                      e.batch_size, config.bench.prompt_len, e.max_new_tokens,
                                      bandwidth)
    record["bandwidth_fraction"] = record["bound_s"] / record["decode_s"]
  return record


def prefill(model, rows):
  """The sampler's prefill of `rows` alone (its cache and first logits, read back)."""
  import jax
  from flax import nnx
  from dft_jax import sampling
  graphdef, state = nnx.split(model)
  tokens = np.asarray(rows, np.int32)
  jax.block_until_ready(sampling.prefill(graphdef, state, tokens, np.zeros(len(rows), np.int32),
                                         tokens.shape[1]))


def run_generate(config):
  """transformers' generate at the same shapes: the record fields (module doc)."""
  import torch
  from benchmarks import torch_peer
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  t0 = time.perf_counter()
  model = torch_peer.build_model(bench.preset(config), device, config.model.param_dtype)
  model.eval()
  init_s = time.perf_counter() - t0
  e = config.eval
  tokens = torch.as_tensor(prompts(config, model.config.vocab_size), device=device)
  cache = None
  if config.bench.static_cache:
    from transformers import StaticCache
    slots = tokens.shape[1] + e.max_new_tokens
    try:  # transformers 5 shapes the cache at its first update
      cache = StaticCache(config=model.config, max_cache_len=slots)
    except TypeError:  # earlier releases take its shape up front
      cache = StaticCache(config=model.config, max_batch_size=tokens.shape[0], max_cache_len=slots,
                          device=device, dtype=getattr(torch, config.model.param_dtype))

  def run(new_tokens=e.max_new_tokens):
    if cache is not None:
      cache.reset()
    out = model.generate(  # under torch.no_grad
        tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=e.temperature > 0, temperature=e.temperature or None,
        top_p=e.top_p, top_k=0, past_key_values=cache, use_cache=True, pad_token_id=0,
        eos_token_id=None).cpu()
    assert out.shape[1] == tokens.shape[1] + new_tokens, out.shape

  t0 = time.perf_counter()
  for _ in range(config.bench.warmup):
    run(min(PEER_WARMUP_TOKENS, e.max_new_tokens))
  warmup_s = time.perf_counter() - t0
  run_s, times = timed(run, 0, config.bench.steps)
  return dict(init_s=init_s, warmup_s=warmup_s, device=torch.cuda.get_device_name() if cuda
              else "cpu", platform="gpu" if cuda else "cpu", **rates(config, run_s, times),
              versions=bench.versions("torch", "transformers", "numpy"))


def run_variant(config):
  """One sampling variant in this process -> its record."""
  e, b = config.eval, config.bench
  record = dict(bench.new_record(config), batch=e.batch_size, prompt_len=b.prompt_len,
                new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                static_cache=b.static_cache if b.framework == "generate" else None)
  peer = b.framework == "generate"
  record["framework"] = "generate" if peer else "sampler"
  measure = run_generate if peer else run_sampler
  return bench.run_recorded(record, lambda: measure(config), skipped=(ModuleNotFoundError,))


if __name__ == "__main__":
  bench.variant_main(run_variant)
