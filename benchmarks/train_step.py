"""Train-step throughput, MFU and peak memory of dft_jax's full step (benchmark issue #8).

  python benchmarks/train_step.py --sweep=gpu --out=DIR     # the GPU plan: every variant, JAX and
                                                            # PyTorch peers, each in a fresh process
  python benchmarks/train_step.py --model=qwen2.5-1.5b --objective=dft --batch=4 \
      --remat=nothing_saveable --lm_head_chunk=4096        # one variant, in this process
  python benchmarks/train_step.py --memory --model=qwen2.5-1.5b   # compile only (no execution):
                                                            # XLA's buffer sizes, CPU is fine
  python benchmarks/train_step.py --sweep=smoke --out=DIR   # tiny shapes on CPU (tests)

The step is dft_jax.step.make_train_step itself (forward, fused LM head, objective, backward,
clip + AdamW, donated state) run by the train job's loop (dft_jax.loop.train_loop) on a
random-init preset, fed random packed rows built on the host: several documents per row
(segment_ids 1..n, positions restarting), loss on ~75% of each document. Timing: compile (AOT),
`warmup` steps, then `steps` timed steps; a step's time is the interval between reading its
metrics and the previous step's (the loop dispatches the next step first, as in training); the
median is the step time. tokens/s = B*T / median (padding included: rows are full).
MFU = tokens/s * (6 N + 12 L d T) / 989e12, N = all parameters including the (tied) embedding,
T = seq_len (dft_jax.throughput). Peak memory is the device allocator's peak_bytes_in_use, which
only grows within a process: hence one process per variant.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from dft_jax import throughput  # noqa: E402  (no jax at import)

PEER_SCRIPT = os.path.join(ROOT, "benchmarks", "torch_peer.py")
HEAD_SCRIPT = os.path.join(ROOT, "benchmarks", "head.py")
GIB = 2 ** 30

# One variant = one dict; unset fields take these values. "best" (remat) and "max" (batch) are
# resolved by the sweep from the records before it (see `resolve`).
DEFAULTS = dict(
    framework="jax",            # jax | torch | head (the LM head alone: benchmarks/head.py)
    model="qwen2.5-1.5b",       # a dft_jax.models.PRESETS name
    objective="dft",            # sft | dft | psft (any objectives.OBJECTIVES name)
    batch=4,                    # rows per optimizer update
    seq_len=4096,
    minibatches=1,              # PSFT's K: the global batch is batch * minibatches rows
    microbatches=1,             # gradient accumulation slices per update
    remat="nothing_saveable",   # a decoder.REMAT_POLICIES name, or "best"
    lm_head_chunk=4096,         # tokens per chunk of the fused LM head
    lm_head="checkpointed",     # checkpointed | fused (lm_head.fused_loss); the step: needs
                                # config.model.lm_head_impl
    w_dtype="bfloat16",         # head: the head weight's dtype (the step passes the compute dtype)
    compare=False,              # head: also the checkpointed head's gradients, their difference
    param_dtype="float32",
    compute_dtype="bfloat16",
    attention="auto",           # cudnn on GPU
    mu_dtype=None,              # AdamW first moment dtype (needs config.optimizer.mu_dtype)
    doc_len=(256, 2048),        # document lengths drawn uniformly in [lo, hi]; (T, T): 1 per row
    steps=10,
    warmup=2,
    xla_flags="",               # appended to XLA_FLAGS for this variant's process
    liger=False,                # torch: Liger's fused linear cross entropy
    probe_batches=(),           # torch: extra batch sizes tried for one step each, until OOM
    est_s=60,                   # sweep: expected wall time (skip if the budget is short)
    group="",                   # sweep: "policy" records compete for remat="best"
)

PLANS = {
    # The H100 plan, in priority order: when the budget runs short the tail is skipped.
    # est_s: process start + init + compile + steps, H100 (1.5B compile ~30-45 s).
    "gpu": [
        dict(name="torch/dft", framework="torch", objective="dft", est_s=30),
        dict(name="jax/dft/nothing", remat="nothing_saveable", group="policy"),
        dict(name="jax/dft/dots", remat="dots_with_no_batch_dims_saveable", group="policy"),
        dict(name="jax/dft/dots_attn", remat="dots_attention_saveable", group="policy"),
        dict(name="head/dft/checkpointed", framework="head", est_s=30),
        dict(name="head/dft/fused", framework="head", lm_head="fused", compare=True, est_s=40),
        dict(name="jax/dft/fused_head", lm_head="fused", remat="best", est_s=50),
        dict(name="jax/sft", objective="sft", remat="best", est_s=50),
        dict(name="jax/psft/k1", objective="psft", remat="best", est_s=55),
        dict(name="jax/dft/lean", remat="nothing_saveable", mu_dtype="bfloat16", est_s=50),
        dict(name="jax/eaft", objective="eaft", remat="best", est_s=50),
        dict(name="jax/deft", objective="deft", remat="best", est_s=50),
        dict(name="jax/gem", objective="gem", remat="best", est_s=50),
        dict(name="torch/sft", framework="torch", objective="sft", probe_batches=(6, 8),
             est_s=35),
        dict(name="jax/dft/lean_attn", remat="attention_saveable", mu_dtype="bfloat16",
             est_s=50),
        dict(name="torch/dft/liger", framework="torch", objective="dft", liger=True,
             probe_batches=(16, 32), est_s=45),
        dict(name="jax/dft/one_doc", remat="best", doc_len=(4096, 4096)),
        dict(name="jax/0.5b/dft", model="qwen2.5-0.5b", remat="best", est_s=40),
        dict(name="jax/dft/max_batch", remat="best", batch="max", est_s=90),
        dict(name="jax/psft/k4", objective="psft", minibatches=4, remat="best", est_s=80),
        dict(name="jax/dft/no_triton_gemm", remat="best",
             xla_flags="--xla_gpu_enable_triton_gemm=false"),
    ],
    # The second H100 call: what the first one's budget left out (explicit remat, no "best").
    "gpu_extra": [
        dict(name="torch/dft/liger", framework="torch", objective="dft", liger=True,
             probe_batches=(8, 16, 32), est_s=45),
        dict(name="jax/dft/lean_chunk1024", remat="nothing_saveable", mu_dtype="bfloat16",
             lm_head_chunk=1024, est_s=50),
        dict(name="jax/psft/k4", objective="psft", minibatches=4,
             remat="dots_attention_saveable", est_s=60),
        dict(name="jax/dft/nothing_b16", remat="nothing_saveable", batch=16, est_s=70),
        dict(name="jax/0.5b/dft", model="qwen2.5-0.5b", remat="dots_attention_saveable",
             est_s=40),
    ],
    # The LM head alone at the 1.5B shape (4 x 4096 tokens, D 1,536, V 151,936, chunks of 4,096):
    # every per-token objective through both heads (EAFT's records hold the top-k timings).
    "head": [dict(name=f"head/{objective}/{head}", framework="head", objective=objective,
                  lm_head=head, compare=head == "fused" and objective in ("dft", "eaft"),
                  est_s=35 if head == "fused" and objective in ("dft", "eaft") else 25)
             for objective in ("dft", "eaft", "sft", "gem", "deft", "psft", "power")
             for head in ("checkpointed", "fused")],
    # The full step with the fused head next to the checkpointed one, per objective (needs
    # config.model.lm_head_impl; dots_attention_saveable: the fastest policy on the H100).
    "fused_step": [dict(name=f"jax/{objective}/{head}" + ("/k4" if k == 4 else ""),
                        objective=objective, lm_head=head, minibatches=k,
                        remat="dots_attention_saveable", est_s=50 + 20 * (k > 1))
                   for objective, k in (("dft", 1), ("eaft", 1), ("sft", 1), ("psft", 4),
                                        ("gem", 1), ("deft", 1), ("psft", 1))
                   for head in ("fused", "checkpointed")],
    # Tiny shapes on CPU: the plumbing of every path above in seconds.
    "smoke": [
        dict(name="torch/dft", framework="torch", model="tiny-qwen2", seq_len=128,
             doc_len=(16, 64), compute_dtype="float32", steps=3, warmup=1, probe_batches=(8,),
             est_s=5),
        dict(name="jax/psft/k2", model="tiny-qwen2", seq_len=128, batch=2, lm_head_chunk=64,
             doc_len=(16, 64), objective="psft", minibatches=2, compute_dtype="float32",
             steps=3, warmup=1, group="policy", est_s=5),
        dict(name="jax/dft/needs_hook", model="tiny-qwen2", remat="no_such_policy", est_s=5),
        dict(name="head/eaft/checkpointed", framework="head", model="tiny-qwen2", seq_len=128,
             batch=2, lm_head_chunk=64, doc_len=(16, 64), objective="eaft",
             compute_dtype="float32", w_dtype="float32", steps=3, warmup=1, est_s=5),
        dict(name="head/eaft/fused", framework="head", model="tiny-qwen2", seq_len=128, batch=2,
             lm_head_chunk=64, doc_len=(16, 64), objective="eaft", lm_head="fused",
             compute_dtype="float32", w_dtype="float32", compare=True, steps=3, warmup=1,
             est_s=5),
        dict(name="jax/dft/over_budget", model="tiny-qwen2", remat="best", est_s=10 ** 6),
    ],
}


# Compile-only memory analysis of the 1.5B step (--memory_sweep): XLA's buffer sizes per option.
MEMORY_PLAN = [
    dict(name="nothing/chunk4096", remat="nothing_saveable", lm_head_chunk=4096),
    dict(name="nothing/chunk1024", remat="nothing_saveable", lm_head_chunk=1024),
    dict(name="dots/chunk4096", remat="dots_with_no_batch_dims_saveable", lm_head_chunk=4096),
    dict(name="nothing/chunk1024/micro2", remat="nothing_saveable", lm_head_chunk=1024,
         microbatches=2),
    dict(name="nothing/chunk1024/b8", remat="nothing_saveable", lm_head_chunk=1024, batch=8),
    dict(name="nothing/chunk1024/psft", remat="nothing_saveable", lm_head_chunk=1024,
         objective="psft"),
    dict(name="nothing/chunk1024/bf16_params", remat="nothing_saveable", lm_head_chunk=1024,
         param_dtype="bfloat16"),
]


MEMORY_NOTE = (
    "Compile-only. argument_bytes (the donated state) is exact on any backend and "
    "saved_activation_bytes (print_saved_residuals) is backend-independent; on CPU, temp_bytes "
    "holds XLA's explicit [B, N, T, T] attention (attention_temp_bytes; cuDNN flash attention "
    "has none) and bf16 activations widened to f32, so GPU temporaries are smaller. "
    "head_temp_bytes: the LM head's forward + backward alone.")


class NeedsHook(Exception):
  """The variant needs a config knob or registry entry that dft_jax does not have (yet)."""

  def __str__(self):
    return f"needs a dft_jax hook: {self.args[0]}"


# ----------------------------------------------------------------------------- inputs


def packed_rows(rng, rows, seq_len, vocab, doc_len=(256, 2048)):
  """Random packed rows {tokens, targets, loss_mask, segment_ids, positions}, numpy [rows, T].

  Each row is filled with documents of uniform random length in doc_len (the last one cut at T);
  targets[t] = tokens[t + 1] within a document; the loss covers the last ~75% of each document
  (the "response"), never its last token (its target would cross into the next document).
  """
  lo, hi = (min(int(x), seq_len) for x in doc_len)
  tokens = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  loss_mask = np.zeros((rows, seq_len), np.float32)
  targets = np.zeros((rows, seq_len), np.int32)
  for r in range(rows):
    start, seg = 0, 1
    while start < seq_len:
      n = min(int(rng.integers(lo, hi + 1)), seq_len - start)
      end = start + n
      segment_ids[r, start:end] = seg
      positions[r, start:end] = np.arange(n)
      targets[r, start:end - 1] = tokens[r, start + 1:end]
      loss_mask[r, start + n // 4:end - 1] = 1.0
      start, seg = end, seg + 1
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
              positions=positions)


def bench_config(v):
  """configs/default.py with the variant's model, dtypes, remat, head chunk, objective, shapes."""
  from dft_jax.data.testing import default_config
  from dft_jax.models import decoder
  c = default_config()
  if v["remat"] not in decoder.REMAT_POLICIES:
    raise NeedsHook(f"remat={v['remat']!r} is not in dft_jax.models.decoder.REMAT_POLICIES "
                    f"({', '.join(decoder.REMAT_POLICIES)})")
  c.model.update(name=f"preset:{v['model']}", param_dtype=v["param_dtype"],
                 compute_dtype=v["compute_dtype"], remat=v["remat"], attention=v["attention"],
                 lm_head_chunk=v["lm_head_chunk"])
  if v["lm_head"] != "checkpointed":
    if "lm_head_impl" not in c.model:
      raise NeedsHook(f"lm_head={v['lm_head']!r} needs config.model.lm_head_impl "
                      "(checkpointed | fused): the step's choice of LM head")
    c.model.lm_head_impl = v["lm_head"]
  c.objective.name = v["objective"]
  c.train.update(global_batch_size=v["batch"] * v["minibatches"], seq_len=v["seq_len"],
                 minibatches=v["minibatches"], microbatches=v["microbatches"], num_steps=1000)
  c.data.max_length = min(c.data.max_length, v["seq_len"])
  if v["mu_dtype"]:
    if "mu_dtype" not in c.optimizer:
      raise NeedsHook("mu_dtype needs config.optimizer.mu_dtype (passed to optax.adamw)")
    c.optimizer.mu_dtype = v["mu_dtype"]
  return c


def single_device_mesh():
  import jax
  from dft_jax import sharding
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


# ----------------------------------------------------------------------------- one variant


def memory_stats(compiled):
  """XLA's buffer sizes for a compiled step (bytes); peak_estimate = arguments + outputs -
  aliased (donated) + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
             code_bytes=m.generated_code_size_in_bytes)
  out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                                + out["temp_bytes"])
  return out


def versions(*names):
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in names:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def device_info():
  import jax
  d = jax.devices()[0]
  return dict(device=getattr(d, "device_kind", str(d)), platform=d.platform,
              device_count=jax.device_count())


def timing_fields(times, tokens_per_step, flops_per_token, peak_flops):
  """Median step time, tokens/s and MFU from per-step wall times (seconds)."""
  median = statistics.median(times)
  tokens_per_s = tokens_per_step / median
  return dict(step_time_s=median, step_times_s=[round(t, 6) for t in times],
              step_time_spread=(max(times) - min(times)) / median,
              tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
              peak_flops=peak_flops,
              mfu=tokens_per_s * flops_per_token / peak_flops if peak_flops else None)


def load_model(model_cfg):
  """The decoder of config.model (a preset: random init; benchmarks need no tokenizer)."""
  from dft_jax import models
  return models.load(model_cfg.name, **models.decoder_options(model_cfg))[0]


def time_train_step(v, config, mesh, make_model, peak_flops):
  """make_model() -> its TrainState -> the compiled train step, timed over v["warmup"] +
  v["steps"] steps on two alternating batches of packed random rows.

  Returns (state, first batch, record fields every benchmark reports): sizes, init and compile
  seconds, losses, XLA's memory analysis, versions, device, and timing_fields over the steps after
  the warm-up (MFU against peak_flops, None: not reported).
  """
  import itertools
  import jax
  from dft_jax import loop
  from dft_jax import step as step_lib
  t0 = time.perf_counter()
  model = make_model()
  model_cfg = model.config
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh)
  del model
  jax.block_until_ready((state, frozen))
  init_s = time.perf_counter() - t0
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen))
  rng = np.random.default_rng(0)
  rows = config.train.global_batch_size
  batches = [step_lib.global_batch(packed_rows(rng, rows, v["seq_len"], model_cfg.vocab_size,
                                               v["doc_len"]), mesh) for _ in range(2)]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0], frozen).compile()
  compile_s = time.perf_counter() - t0
  # The train job's loop: each step's time is the interval between reading its metrics and the
  # previous step's (the next step is dispatched first, as in training).
  recorder = loop.Recorder(num_steps=v["warmup"] + v["steps"])
  state = loop.train_loop(state, compiled, ((b, None) for b in itertools.cycle(batches)),
                          num_steps=v["warmup"] + v["steps"], record=recorder, frozen=frozen)
  times = [h["step_seconds"] for h in recorder.history]
  losses = [h["loss"] for h in recorder.history]
  num_params = step_lib.count_params(state.params)
  tokens = rows * v["seq_len"]
  record = dict(
      num_params=num_params, num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
      vocab_size=model_cfg.vocab_size, tokens_per_step=tokens, init_s=init_s,
      compile_s=compile_s, losses=losses, memory_analysis=memory_stats(compiled),
      versions=versions("jax", "jaxlib", "flax", "optax", "numpy"), **device_info())
  record.update(timing_fields(times[v["warmup"]:], tokens,
                              throughput.flops_per_token(num_params, model_cfg, v["seq_len"]),
                              peak_flops))
  return state, batches[0], record


def run_jax(v):
  """Builds, compiles and times one variant in this process; returns its record fields."""
  import jax
  from dft_jax import step as step_lib
  config = bench_config(v)
  step_lib.validate(config, 1)
  _, batch, record = time_train_step(v, config, single_device_mesh(),
                                     lambda: load_model(config.model),
                                     throughput.peak_flops(jax.devices()[0]))
  stats = jax.devices()[0].memory_stats() or {}
  seg = np.asarray(batch["segment_ids"])
  record.update(docs_per_row=float(np.mean(seg.max(axis=1))),
                loss_token_frac=float(np.asarray(batch["loss_mask"]).mean()),
                peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  return record


def run_variant(v):
  """One variant in this process -> its record (status ok / oom / skipped / error)."""
  v = dict(DEFAULTS, **v)
  record = {k: v[k] for k in DEFAULTS if k not in ("est_s", "group", "probe_batches", "liger")}
  record.update(name=v.get("name") or f"{v['framework']}/{v['model']}/{v['objective']}",
                group=v["group"], status="ok")
  return run_recorded(record, lambda: run_jax(v), skipped=(NeedsHook,))


def run_recorded(record, measure, skipped=()):
  """`record` with measure()'s fields and status ok; or status skipped (an exception of a
  `skipped` type, its message), oom (RESOURCE_EXHAUSTED / out of memory) or error (the message;
  the traceback printed); wall_s either way."""
  t0 = time.perf_counter()
  try:
    record.update(measure())
  except skipped as e:
    record.update(status="skipped", error=str(e))
  except Exception as e:  # pylint: disable=broad-except
    text = f"{type(e).__name__}: {e}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    record.update(status="oom" if oom else "error", error=text[-2000:])
    if not oom:
      traceback.print_exc()
  record["wall_s"] = time.perf_counter() - t0
  return record


# ----------------------------------------------------------------------------- compile-only memory


def abstract_state(config, mesh):
  """(graphdef, abstract TrainState, tx) as train.init_train_state builds them, but shapes and
  dtypes only: nothing allocated (every leaf on the mesh's one device)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dft_jax import models, sharding
  from dft_jax import step as step_lib
  model = nnx.eval_shape(lambda: load_model(config.model))
  graphdef, params = nnx.split(model)
  logical = models.logical_specs(params)
  tx, _ = step_lib.make_optimizer(config.optimizer, config.train.num_steps, logical)
  replicated = sharding.replicated(mesh)
  state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(tx.init, params))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       state)
  return graphdef, state, tx


def compiled_memory(v):
  """XLA's memory analysis of one variant's step, compiled for this machine's default backend
  without running it (the 1.5B step compiles on a CPU with no device memory to spare)."""
  import jax
  from dft_jax import sharding
  from dft_jax import step as step_lib
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  mesh = single_device_mesh()
  graphdef, state, tx = abstract_state(config, mesh)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(step_lib.Frozen()))
  rows = config.train.global_batch_size
  batch = {k: jax.ShapeDtypeStruct((rows, v["seq_len"]), x.dtype,
                                   sharding=sharding.batch_sharding(mesh))
           for k, x in packed_rows(np.random.default_rng(0), 1, 8, 8).items()}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, step_lib.Frozen()).compile()
  out = memory_stats(compiled)
  out.update(compile_s=time.perf_counter() - t0, backend=jax.default_backend(),
             num_params=step_lib.count_params(state.params))
  return out


def run_memory_sweep(out_path, model):
  """compiled_memory for every MEMORY_PLAN option (plus the attention-only temporaries at each
  option's shape); writes a JSON list and prints a table in GiB."""
  rows = []
  for option in MEMORY_PLAN:
    v = dict(option, model=model)
    mem = compiled_memory(v)
    mem.update(name=option["name"], option=option, attention_temp_bytes=attention_memory(v),
               saved_activation_bytes=saved_activation_bytes(v),
               head_temp_bytes=head_temp_bytes(v))
    rows.append(mem)
    print(f"{mem['name']:32s} " + " ".join(
        f"{k[:-6]}={mem[k] / GIB:6.2f}" for k in (
            "argument_bytes", "temp_bytes", "peak_estimate_bytes", "attention_temp_bytes",
            "saved_activation_bytes", "head_temp_bytes")),
          flush=True)
  with open(out_path, "w") as f:
    json.dump(dict(backend=rows[0]["backend"], model=model, compile_only=True, note=MEMORY_NOTE,
                   versions=versions("jax", "jaxlib", "flax", "optax"), rows=rows), f, indent=1)
  return rows


def abstract_batch(rows, seq_len):
  import jax
  return {k: jax.ShapeDtypeStruct((rows, seq_len), x.dtype)
          for k, x in packed_rows(np.random.default_rng(0), 1, 8, 8).items()}


def objective_of(config):
  """(statistics the head computes, fn(stats, batch) -> loss) for config.objective; PSFT's
  old_logp is the current logp (K=1: same shapes as any snapshot)."""
  import jax
  from dft_jax import objectives
  needs_old = "old_logp" in objectives.needs(config.objective)

  def loss(stats, batch):
    if needs_old:
      stats = dict(stats, old_logp=jax.lax.stop_gradient(stats["logp"]))
    return objectives.objective_loss(stats, batch, config.objective)[0]
  return objectives.required_stats(config.objective), loss


def saved_activation_bytes(v):
  """Bytes the forward leaves for the backward (jax.ad_checkpoint.saved_residuals of one
  microbatch's loss, the step's inputs excluded): the remat policy's saved set over all layers.
  Traced only, so backend-independent except for the attention kernel's own residuals."""
  import contextlib
  import io
  import re
  import jax
  from jax.ad_checkpoint import print_saved_residuals
  from dft_jax import step as step_lib
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  graphdef, state, _ = abstract_state(config, single_device_mesh())
  stats, objective = objective_of(config)

  def loss(params, batch):
    return objective(step_lib.model_token_stats(step_lib.merge_model(graphdef, params), batch,
                                                v["lm_head_chunk"], stats), batch)

  batch = abstract_batch(v["batch"] // v["microbatches"], v["seq_len"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  text = io.StringIO()
  with contextlib.redirect_stdout(text):  # lines "bf16[28,4,4096,1536] output of ..."
    print_saved_residuals(loss, params, batch)
  total = 0
  for dtype, dims, src in re.findall(r"^([a-z]+\d*)\[([\d,]*)\] (.*)$", text.getvalue(), re.M):
    if not src.startswith("from the argument"):
      total += int(np.prod([int(d) for d in dims.split(",") if d])) * RESIDUAL_BYTES[dtype]
  return total


RESIDUAL_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "u32": 4, "i64": 8, "i8": 1,
                  "u8": 1, "bool": 1}


def head_temp_bytes(v):
  """Temporary bytes of the fused LM head's forward + backward alone (token_stats, the variant's
  objective, gradients to hidden and head weight), compiled for this backend."""
  import jax
  import jax.numpy as jnp
  from dft_jax import lm_head
  from dft_jax.models import PRESETS
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  c, dtype = PRESETS[v["model"]], jnp.dtype(v["compute_dtype"])
  rows = v["batch"] // v["microbatches"]
  stats, objective = objective_of(config)

  def loss(hidden, w, batch):
    return objective(lm_head.token_stats(hidden, w, batch["targets"],
                                         chunk_size=v["lm_head_chunk"], stats=stats), batch)

  hidden = jax.ShapeDtypeStruct((rows, v["seq_len"], c.hidden_size), dtype)
  w = jax.ShapeDtypeStruct((c.hidden_size, c.vocab_size), dtype)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      hidden, w, abstract_batch(rows, v["seq_len"])).compile()
  return memory_stats(compiled)["temp_bytes"]


def attention_memory(v):
  """Temporary bytes of one attention forward + backward at the variant's shape through the same
  `attend` path (on CPU: XLA's explicit [B, N, T, T] scores), to subtract from a CPU analysis."""
  import jax
  import jax.numpy as jnp
  from dft_jax.models import PRESETS, attention
  v = dict(DEFAULTS, **v)
  c = PRESETS[v["model"]]
  b, t = v["batch"] // v["microbatches"], v["seq_len"]
  q = jax.ShapeDtypeStruct((b, t, c.num_heads, c.head_dim), jnp.dtype(v["compute_dtype"]))
  kv = jax.ShapeDtypeStruct((b, t, c.num_kv_heads, c.head_dim), jnp.dtype(v["compute_dtype"]))
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    out = attention.attend(q, k, v, segment_ids_BxT=seg, impl=v_impl)
    return jnp.sum(out.astype(jnp.float32))

  v_impl = v["attention"]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
  return memory_stats(compiled)["temp_bytes"]


# ----------------------------------------------------------------------------- the sweep


def fixed_bytes(r):
  """Bytes that do not grow with the batch: parameters, their gradients and the optimizer
  moments (JAX: XLA's argument bytes, i.e. the donated state, plus one gradient per parameter;
  PyTorch: fp32 parameters, gradients, exp_avg, exp_avg_sq = 16 bytes per parameter)."""
  if r["framework"] == "torch":
    return 16 * r["num_params"]
  return r["memory_analysis"]["argument_bytes"] + r["num_params"] * (
      4 if r["param_dtype"] == "float32" else 2)


def predicted_max_batch(r, margin=1.0):
  """Largest batch whose peak, fixed + (peak - fixed) / batch per row, fits margin * the device
  limit; None without a measured peak."""
  if not r.get("peak_bytes") or not r.get("bytes_limit"):
    return None
  fixed = fixed_bytes(r)
  per_row = (r["peak_bytes"] - fixed) / r["batch"]
  if per_row <= 0:
    return None
  return int((margin * r["bytes_limit"] - fixed) // per_row)


def resolve(v, records):
  """Fills remat="best" (the fastest ok "policy" record's) and batch="max" (that record's
  predicted_max_batch at 92% of the limit, at least its own batch, at most 64)."""
  v = dict(v)
  policy = [r for r in records if r.get("group") == "policy" and r["status"] == "ok"]
  best = max(policy, key=lambda r: r["tokens_per_s"]) if policy else None
  if v.get("remat") == "best":
    v["remat"] = best["remat"] if best else "nothing_saveable"
  if v.get("batch") == "max":
    same = [r for r in policy if r["remat"] == v["remat"]]
    predicted = predicted_max_batch(same[0], margin=0.92) if same else None
    v["batch"] = max(same[0]["batch"], min(64, predicted)) if predicted else 8
  return v


def precheck(v):
  """The NeedsHook reason for a JAX variant this dft_jax cannot build, else None (no process
  needs starting to find out)."""
  if v["framework"] != "jax":
    return None
  try:
    bench_config(v)
  except NeedsHook as e:
    return str(e)
  return None


def subprocess_record(v, timeout_s, log):
  """Runs one variant in a fresh process (fresh peak memory) and parses its RESULT line."""
  v = dict(DEFAULTS, **v)
  script = {"torch": PEER_SCRIPT, "head": HEAD_SCRIPT}.get(v["framework"],
                                                           os.path.abspath(__file__))
  env = dict(os.environ)
  if v["xla_flags"]:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + v["xla_flags"]).strip()
  cmd = [sys.executable, script, "--variant", json.dumps(v)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    out, err, rc = text(e.stdout), text(e.stderr), None
  log.write(f"===== {v['name']} rc={rc}\n{out}\n{err}\n")
  log.flush()
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  if lines:
    return json.loads(lines[-1][len("RESULT "):])
  status = "timeout" if rc is None else "error"
  return dict(name=v["name"], framework=v["framework"], group=v["group"], status=status,
              error=(err or out)[-2000:], wall_s=time.perf_counter() - t0)


def run_sweep(plan, out_dir, budget_s):
  """Runs the plan's variants one process each, within budget_s; writes train_step.json and
  logs.txt under out_dir; returns the result dict."""
  os.makedirs(out_dir, exist_ok=True)
  records, started = [], time.perf_counter()
  with open(os.path.join(out_dir, "logs.txt"), "w") as log:
    for v in PLANS[plan]:
      v = resolve(dict(DEFAULTS, **v), records)
      left = budget_s - (time.perf_counter() - started)
      skip = precheck(v)
      if skip is None and left < v["est_s"]:
        skip = f"budget: {left:.0f} s left, needs ~{v['est_s']} s"
      if skip:
        records.append(dict(name=v["name"], framework=v["framework"], group=v["group"],
                            status="skipped", error=skip))
      else:  # a hung variant may not eat the rest of the budget
        records.append(subprocess_record(v, min(left, max(60.0, 2.5 * v["est_s"])), log))
      r = records[-1]
      print(f"[{time.perf_counter() - started:6.0f} s] {r['name']}: {r['status']}"
            + (f"  {r['tokens_per_s']:,.0f} tok/s" if r["status"] == "ok" else
               f"  {r.get('error', '')[:160]}"), flush=True)
  for r in records:
    if r["status"] == "ok" and r["framework"] != "head":
      r["max_batch_predicted"] = predicted_max_batch(r)
  result = dict(plan=plan, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_s=time.perf_counter() - started, records=records, summary=summarize(records))
  with open(os.path.join(out_dir, "train_step.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(records, result["summary"]), flush=True)
  return result


def _ok(records, **match):
  return [r for r in records if r["status"] == "ok"
          and all(r.get(k) == want for k, want in match.items())]


# Fields that make a fused-head record and a checkpointed one a like-for-like pair.
TWIN_KEYS = ("framework", "model", "objective", "batch", "seq_len", "minibatches", "microbatches",
             "remat", "lm_head_chunk", "compute_dtype", "w_dtype", "mu_dtype", "xla_flags",
             "doc_len")


def summarize(records):
  """The issue's targets, read off the records of one run (absent where a record is missing)."""
  s = {}
  ref = lambda name: next(iter(_ok(records, name=name)), None)
  peer, liger = ref("torch/dft"), ref("torch/dft/liger")
  ours = _ok(records, framework="jax", model=DEFAULTS["model"], objective="dft", batch=4,
             seq_len=DEFAULTS["seq_len"])
  if ours:
    fastest = max(ours, key=lambda r: r["tokens_per_s"])
    s.update(dft_fastest=fastest["name"], dft_tokens_per_s=fastest["tokens_per_s"],
             dft_mfu=fastest["mfu"])
    if peer:
      s["dft_speedup_vs_transformers"] = fastest["tokens_per_s"] / peer["tokens_per_s"]
    with_peak = [r for r in ours if r.get("peak_bytes")]
    if with_peak:
      leanest = min(with_peak, key=lambda r: r["peak_bytes"])
      s.update(dft_leanest=leanest["name"], dft_leanest_peak_gib=leanest["peak_bytes"] / GIB)
    if liger and liger.get("peak_bytes"):
      s["liger_peak_gib"] = liger["peak_bytes"] / GIB
  for r in _ok(records, framework="jax", mu_dtype=None, xla_flags=""):
    # per-token step time over SFT's at the same remat, head and head chunk
    same = [q for q in _ok(records, framework="jax", objective="sft", mu_dtype=None, xla_flags="")
            if all(q[k] == r[k] for k in ("model", "remat", "lm_head", "lm_head_chunk", "batch"))]
    if r["objective"] != "sft" and same:
      s[f"{r['name']} / {same[0]['name']} step time per token"] = (
          r["step_time_s"] / r["tokens_per_step"]) / (
              same[0]["step_time_s"] / same[0]["tokens_per_step"])
  for r in _ok(records, lm_head="fused"):
    twin = [q for q in _ok(records, lm_head="checkpointed") if all(q[k] == r[k] for k in TWIN_KEYS)]
    if twin:
      s[f"{r['name']} / {twin[0]['name']} time"] = r["step_time_s"] / twin[0]["step_time_s"]
  s["max_batch_predicted"] = {r["name"]: r["max_batch_predicted"] for r in records
                              if r.get("max_batch_predicted")}
  s["max_batch_ran"] = {r["name"]: r["max_batch_fit"] for r in records if r.get("max_batch_fit")}
  s["max_batch_ran"].update({r["name"]: r["batch"] for r in _ok(records, name="jax/dft/max_batch")})
  return s


def format_table(records, summary):
  """The compact table printed last (the device reply keeps the end of the output)."""
  head = (f"{'variant':24s} {'status':7s} {'remat':>10s} {'chunk':>5s} {'B':>3s} {'tok/s':>8s} "
          f"{'step ms':>8s} {'MFU':>6s} {'peak GiB':>8s} {'maxB':>4s} {'compile':>7s}")
  lines = [head, "-" * len(head)]
  for r in records:
    if r["status"] != "ok":
      lines.append(f"{r['name']:24s} {r['status']:7s} {(r.get('error') or '')[-90:]}")
      continue
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "     -"
    peak = f"{r['peak_bytes'] / GIB:8.1f}" if r.get("peak_bytes") else "       -"
    remat = "-" if r["framework"] == "head" else REMAT_SHORT.get(r["remat"], r["remat"])[:10]
    chunk = r.get("lm_head_chunk") or "-"
    lines.append(f"{r['name']:24s} {'ok':7s} {remat:>10s} {chunk:>5} {r['batch']:3d} "
                 f"{r['tokens_per_s']:8,.0f} {1e3 * r['step_time_s']:8.1f} {mfu} {peak} "
                 f"{r.get('max_batch_predicted') or 0:4d} {r.get('compile_s', 0):7.1f}")
  lines.append("summary: " + json.dumps(rounded(summary)))
  return "\n".join(lines)


def rounded(x, digits=4):
  if isinstance(x, float):
    return round(x, digits)
  if isinstance(x, dict):
    return {k: rounded(v, digits) for k, v in x.items()}
  return x


REMAT_SHORT = {"nothing_saveable": "nothing", "dots_with_no_batch_dims_saveable": "dots",
               "dots_attention_saveable": "dots+attn", "checkpoint_layers": "hf-ckpt"}


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", choices=sorted(PLANS), help="run a plan, one process per variant")
  p.add_argument("--out", default="benchmarks/results/latest", help="sweep output folder")
  p.add_argument("--budget_s", type=float, default=450.0, help="sweep wall-time budget")
  p.add_argument("--variant", help="one variant as JSON (what the sweep passes to a subprocess)")
  p.add_argument("--memory", action="store_true",
                 help="compile only and print XLA's memory analysis (no execution)")
  p.add_argument("--memory_sweep", metavar="OUT_JSON",
                 help="compile-only memory analysis of every MEMORY_PLAN option for --model")
  for key, value in DEFAULTS.items():
    if key in ("framework", "group", "est_s", "liger", "probe_batches", "doc_len"):
      continue
    kind = type(value) if value is not None else str
    p.add_argument(f"--{key}", type=kind, default=value)
  p.add_argument("--name", default=None)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.sweep:
    run_sweep(args.sweep, args.out, args.budget_s)
    return
  if args.memory_sweep:
    run_memory_sweep(args.memory_sweep, args.model)
    return
  if args.variant:
    v = json.loads(args.variant)
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
  else:
    v = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    v["name"] = args.name
  if args.memory:
    print("MEMORY " + json.dumps(dict(v, **compiled_memory(v))), flush=True)
    return
  print("RESULT " + json.dumps(run_variant(v)), flush=True)


if __name__ == "__main__":
  main()
