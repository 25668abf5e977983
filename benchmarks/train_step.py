"""Train-step throughput, MFU and peak memory of dft_jax's full step, and the benchmark harness
that runs the plans of benchmarks/plans.py.

  python benchmarks/train_step.py --plan=h200 --out=DIR     # a plan: every variant in a fresh
                                                            # process, JAX and the PyTorch peers
  python benchmarks/train_step.py --config.model.remat=nothing_saveable \
      --config.train.global_batch_size=8                    # one variant, in this process
  python benchmarks/train_step.py --memory --config.model.name=preset:qwen2.5-7b   # compile only
                                                            # (XLA's buffer sizes; CPU is fine)
  python benchmarks/train_step.py --plan=smoke --out=DIR    # tiny shapes on CPU (tests)
  python benchmarks/train_step.py --plan=h200 --tiny --out=DIR   # a GPU plan at tiny shapes

Fields: configs/benchmark.py (the main job's, configs/default.py, plus `bench`), set as
`--config.<field>=<value>`; a plan's variant is a name and a dict of those overrides, and the
harness starts each variant's process with exactly those flags.

The step is dft_jax.step.make_train_step itself (forward, fused LM head, objective, backward,
clip + AdamW, donated state) run by the train job's loop (dft_jax.loop.train_loop) on a
random-init preset, fed random packed rows built on the host: several documents per row
(segment_ids 1..n, positions restarting), loss on ~75% of each document. Timing: compile (AOT),
`bench.warmup` steps, then `bench.steps` timed steps; a step's time is the interval between
reading its metrics and the previous step's (the loop dispatches the next step first, as in
training); the median is the step time. tokens/s = B*T / median (padding included: rows are full).
MFU = tokens/s * (6 N + 12 L d T) / 989e12, N = all parameters including the (tied) embedding,
T = seq_len (dft_jax.throughput); mfu_segments counts the attention the rows' documents do instead
(causal within each document: 12 L d sum n (n + 1) / 2 over the documents). Peak memory is the device allocator's peak_bytes_in_use, which
only grows within a process: hence one process per variant.
"""
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

from benchmarks import plans  # noqa: E402  (data only)
from dft_jax import cli  # noqa: E402  (no jax at import)
from dft_jax import config_files  # noqa: E402
from dft_jax import throughput  # noqa: E402
from dft_jax.errors import cli_entry  # noqa: E402

BENCH_CONFIG = os.path.join(ROOT, "configs", "benchmark.py")
SCRIPTS = {"jax": "train_step.py", "torch": "torch_peer.py", "head": "head.py",
           "sampler": "sampling.py", "generate": "sampling.py"}  # bench.framework -> script
GIB = 2 ** 30

# A record's flat fields (its knobs, what the summary matches records on) and the config field
# each comes from; `batch` (rows per optimizer update: train.global_batch_size /
# train.minibatches) and `model` (the preset's name) are derived.
KNOBS = {
    "framework": "bench.framework", "objective": "objective.name", "seq_len": "train.seq_len",
    "kl_coef": "objective.kl_coef", "ref_logp": "objective.ref_logp",
    "minibatches": "train.minibatches", "microbatches": "train.microbatches",
    "remat": "model.remat", "lm_head_chunk": "model.lm_head_chunk", "lm_head": "model.lm_head_impl",
    "w_dtype": "bench.w_dtype", "compare": "bench.compare", "param_dtype": "model.param_dtype",
    "compute_dtype": "model.compute_dtype", "attention": "model.attention",
    "mu_dtype": "optimizer.mu_dtype", "nu_dtype": "optimizer.nu_dtype", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "lora_targets": "lora.targets", "base_quant": "lora.base_quant",
    "quant_block_size": "lora.block_size", "doc_len": "bench.doc_len",
    "max_segments": "model.max_segments", "steps": "bench.steps", "warmup": "bench.warmup",
    "xla_flags": "bench.xla_flags", "topk_method": "bench.topk_method", "group": "bench.group",
    "liger": "bench.liger",
}


class NeedsHook(Exception):
  """The variant needs a config field or registry entry that dft_jax does not have (yet)."""

  def __str__(self):
    return f"needs a dft_jax hook: {self.args[0]}"


# ----------------------------------------------------------------------------- configs


def field(config, path):
  """config's value at a dotted path ("model.remat")."""
  for key in path.split("."):
    config = config[key]
  return config


def variant_config(overrides=None, arg=None):
  """configs/benchmark.py[:arg] with `overrides` ({dotted field: value}) set, as the command line
  `--config.<field>=<value>` sets them. NeedsHook for a field the config does not have or a remat
  policy the decoder does not know (a plan written ahead of its hook)."""
  from dft_jax.models import decoder
  config = config_files.load(BENCH_CONFIG, arg)
  for path, value in (overrides or {}).items():
    try:
      config.update_from_flattened_dict({path: value})
    except KeyError:
      raise NeedsHook(f"configs/benchmark.py has no field {path}") from None
  if config.model.remat not in decoder.REMAT_POLICIES:
    raise NeedsHook(f"model.remat={config.model.remat!r} is not in dft_jax.models.decoder."
                    f"REMAT_POLICIES ({', '.join(decoder.REMAT_POLICIES)})")
  return config


def override_flags(overrides):
  """The command-line flags that set `overrides`: ["--config.model.remat=...", ...] (None values
  are the config's own and left out)."""
  return [f"--config.{path}={value}" for path, value in overrides.items() if value is not None]


def preset(config):
  """The model preset's name ("qwen2.5-1.5b" of model.name "preset:qwen2.5-1.5b")."""
  return config.model.name.removeprefix("preset:")


def knobs(config):
  """The record's flat knob fields (KNOBS) of a variant's config, its name and its rows."""
  out = {name: field(config, path) for name, path in KNOBS.items()}
  out["doc_len"] = list(out["doc_len"])
  out.update(name=config.bench.name or f"{config.bench.framework}/{preset(config)}/"
             f"{config.objective.name}", model=preset(config),
             batch=config.train.global_batch_size // config.train.minibatches,
             max_segments=segment_bound(config))
  return out


# ----------------------------------------------------------------------------- inputs


def segment_bound(config):
  """The variant's model.max_segments: its own, else ceil(T / lo) + 1: `packed_rows` puts at most
  ceil(T / lo) documents in a row (every one but the last has at least lo tokens), and one run
  more is the slot the train packer leaves for padding (these rows have none)."""
  if config.model.max_segments:
    return int(config.model.max_segments)
  seq_len = config.train.seq_len
  lo = min(int(config.bench.doc_len[0]), seq_len)
  return max(2, -(-seq_len // lo) + 1)


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


def step_config(config):
  """The variant's config as the train step reads it: model.max_segments at segment_bound."""
  config = config.copy_and_resolve_references()
  config.model.max_segments = segment_bound(config)
  return config


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


def load_model(config):
  """The decoder of config.model with config.lora's adapters (a preset: random init; benchmarks
  need no tokenizer)."""
  from dft_jax import models
  return models.load(config.model.name,
                     **models.decoder_options(config.model, config.get("lora")))[0]


def sharded_model(config, mesh):
  """load_model(config) with each parameter created on its shards: `jit` with out_shardings (a
  partitionable PRNG), so no device holds the whole model and no parameter is materialised in
  float32 before its cast to the base's bf16 or its quantisation (the eager init would hold each
  stacked float32 weight once: 7.6 GB for the 7B shape's MLP)."""
  import jax
  from flax import nnx
  from dft_jax import models, sharding
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: load_model(config)))
  shardings = sharding.param_shardings(abstract, models.logical_specs(abstract), mesh)
  params = jax.jit(lambda: nnx.split(load_model(config))[1], out_shardings=shardings)()
  return nnx.merge(graphdef, params)


def head_that_runs(config):
  """The LM head the step takes: model.lm_head_impl, unless the objective does not fit the fused
  head (a sequence-level or reference-distribution objective: the checkpointed one)."""
  from dft_jax import objectives
  from dft_jax import step as step_lib
  if (config.model.lm_head_impl == "fused"
      and step_lib.fused_head_fits(objectives.validate(config.objective))):
    return "fused"
  return "checkpointed"


def base_param_count(model_cfg):
  """N of the plain decoder (every parameter once, tied embedding once): the base a LoRA run
  freezes, counted from shapes (a quantised base packs two weights a byte)."""
  from flax import nnx
  from dft_jax import models
  from dft_jax import step as step_lib
  return step_lib.count_params(nnx.state(nnx.eval_shape(
      lambda: models.Decoder(model_cfg, rngs=nnx.Rngs(0)))))


def time_train_step(config, mesh, make_model, peak_flops):
  """make_model() -> its TrainState -> the compiled train step, timed over bench.warmup +
  bench.steps steps on two alternating batches of packed random rows.

  Returns (state, first batch, record fields every benchmark reports): sizes, init and compile
  seconds, losses, XLA's memory analysis, versions, device, and timing_fields over the steps after
  the warm-up (MFU against peak_flops, None: not reported).
  """
  import itertools
  import jax
  from dft_jax import loop, models, objectives
  from dft_jax import step as step_lib
  b, seq_len = config.bench, config.train.seq_len
  t0 = time.perf_counter()
  model = make_model()
  model_cfg = model.config
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  del model
  jax.block_until_ready((state, frozen))  # frozen: a LoRA base, or ASFT / iw-SFT's reference
  init_s = time.perf_counter() - t0
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  rng = np.random.default_rng(0)
  rows = config.train.global_batch_size
  host = [packed_rows(rng, rows, seq_len, model_cfg.vocab_size, b.doc_len) for _ in range(2)]
  if setting.ref_logp == "precomputed":  # what reference_logp.py puts beside the tokens
    host = [dict(x, ref_logp=-5.0 + rng.normal(size=x["targets"].shape).astype(np.float32))
            for x in host]
  batches = [step_lib.global_batch(x, mesh) for x in host]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0], frozen).compile()
  compile_s = time.perf_counter() - t0
  # The train job's loop: each step's time is the interval between reading its metrics and the
  # previous step's (the next step is dispatched first, as in training).
  recorder = loop.Recorder(num_steps=b.warmup + b.steps)
  state = loop.train_loop(state, compiled, ((x, None) for x in itertools.cycle(batches)),
                          num_steps=b.warmup + b.steps, record=recorder, frozen=frozen)
  times = [h["step_seconds"] for h in recorder.history]
  losses = [h["loss"] for h in recorder.history]
  lora = frozen.base is not None
  tokens = rows * seq_len
  num_params = base_param_count(model_cfg) if lora else step_lib.count_params(state.params)
  record = dict(
      num_params=num_params, active_params=num_params - models.inactive_param_count(model_cfg),
      trainable_params=step_lib.count_params(state.params), num_layers=model_cfg.num_layers,
      hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, tokens_per_step=tokens,
      init_s=init_s, compile_s=compile_s, losses=losses, memory_analysis=memory_stats(compiled),
      versions=versions("jax", "jaxlib", "flax", "optax", "numpy"), **device_info())
  record.update(timing_fields(times[b.warmup:], tokens,
                              step_lib.train_flops_per_token(state, frozen, model_cfg, seq_len),
                              peak_flops))
  record.update(segment_fields(
      np.concatenate([np.asarray(x["segment_ids"]) for x in batches]), model_cfg,
      throughput.dense_flops_per_token(record["active_params"],
                                       record["trainable_params"] if lora else None),
      record["tokens_per_s"], peak_flops))
  return state, batches[0], record


def segment_fields(segment_ids_BxT, model_cfg, dense_flops, tokens_per_s, peak_flops):
  """The second count: flops_per_token_segments = the dense FLOPs (6 N; with LoRA 4 N + 6 N_a)
  + the causal attention of the rows' actual documents (throughput.segment_attention_flops) a
  token, and mfu_segments with it."""
  seg = np.asarray(segment_ids_BxT)
  attention = throughput.segment_attention_flops(seg, model_cfg.num_layers,
                                                 model_cfg.num_heads * model_cfg.head_dim)
  flops = dense_flops + attention / seg.size
  return dict(flops_per_token_segments=flops,
              mfu_segments=tokens_per_s * flops / peak_flops if peak_flops else None)


def run_jax(config):
  """Builds, compiles and times one variant in this process; returns its record fields."""
  import functools
  import jax
  from dft_jax import lm_head
  from dft_jax import step as step_lib
  if config.bench.topk_method != "blocks":  # this process's top-k: one lax.top_k over the vocab
    lm_head.top_k_values = functools.partial(lm_head.top_k_values,
                                             method=config.bench.topk_method)
  config = step_config(config)
  step_lib.validate(config, 1)
  mesh = single_device_mesh()
  _, batch, record = time_train_step(config, mesh, lambda: sharded_model(config, mesh),
                                     throughput.peak_flops(jax.devices()[0]))
  stats = jax.devices()[0].memory_stats() or {}
  seg = np.asarray(batch["segment_ids"])
  record.update(docs_per_row=float(np.mean(seg.max(axis=1))),
                loss_token_frac=float(np.asarray(batch["loss_mask"]).mean()),
                peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"),
                lm_head=head_that_runs(config), lm_head_requested=config.model.lm_head_impl)
  return record


def new_record(config):
  """A variant's record before it runs: its knobs, the overrides it ran with, status ok."""
  return dict(knobs(config), overrides=dict(overridden(config)), status="ok")


def overridden(config):
  """(field, value) of the config fields the command line set."""
  return [(path, field(config, path)) for path in cli.overridden()]


def run_variant(config):
  """One variant in this process -> its record (status ok / oom / skipped / error)."""
  return run_recorded(new_record(config), lambda: run_jax(config), skipped=(NeedsHook,))


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


MEMORY_NOTE = (
    "Compile-only. argument_bytes (the donated state) is exact on any backend and "
    "saved_activation_bytes (print_saved_residuals) is backend-independent; on CPU, temp_bytes "
    "holds XLA's explicit [B, N, T, T] attention (attention_temp_bytes; cuDNN flash attention "
    "has none) and bf16 activations widened to f32, so GPU temporaries are smaller. "
    "head_temp_bytes: the LM head's forward + backward alone.")


def abstract_state(config, mesh):
  """(graphdef, abstract TrainState, abstract Frozen, tx) as step.init_train_state builds them
  (with LoRA the adapters train and the base is Frozen.base; ASFT / iw-SFT without LoRA get the
  copy of the starting parameters in Frozen.reference), but shapes and dtypes only: nothing
  allocated (every leaf on the mesh's one device)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dft_jax import models, objectives, sharding
  from dft_jax import step as step_lib
  model = nnx.eval_shape(lambda: load_model(config))
  graphdef, params, base = step_lib.split_model(model)
  logical = models.logical_specs(params)
  tx, _ = step_lib.make_optimizer(config.optimizer, config.train.num_steps, logical)
  replicated = sharding.replicated(mesh)
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
  state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(tx.init, params))
  needs_reference = objectives.validate(config.objective).needs_reference
  reference = params if base is None and needs_reference else None
  return graphdef, abstract(state), abstract(step_lib.Frozen(base=base, reference=reference)), tx


def microbatch_rows(config):
  """Rows of one gradient-accumulation slice."""
  t = config.train
  return t.global_batch_size // (t.minibatches * t.microbatches)


def compiled_memory(config):
  """XLA's memory analysis of one variant's step, compiled for this machine's default backend
  without running it (the 1.5B step compiles on a CPU with no device memory to spare)."""
  import jax
  from dft_jax import objectives, sharding
  from dft_jax import step as step_lib
  config = step_config(config)
  mesh = single_device_mesh()
  graphdef, state, frozen, tx = abstract_state(config, mesh)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen),
                                  setting=objectives.validate(config.objective))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=sharding.batch_sharding(mesh)),
                       abstract_batch(config.train.global_batch_size, config.train.seq_len))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  out = memory_stats(compiled)
  out.update(compile_s=time.perf_counter() - t0, backend=jax.default_backend(),
             num_params=step_lib.count_params(state.params))
  return out


def run_memory_sweep(out_path, plan):
  """compiled_memory for every plans.MEMORY_PLANS[plan] option (plus the attention-only
  temporaries at each option's shape); writes a JSON list and prints a table in GiB."""
  rows = []
  for name, overrides in plans.MEMORY_PLANS[plan]:
    config = variant_config(overrides)
    mem = compiled_memory(config)
    mem.update(name=name, overrides=overrides, attention_temp_bytes=attention_memory(config),
               saved_activation_bytes=saved_activation_bytes(config),
               head_temp_bytes=head_temp_bytes(config))
    rows.append(mem)
    print(f"{mem['name']:32s} " + " ".join(
        f"{k[:-6]}={mem[k] / GIB:6.2f}" for k in (
            "argument_bytes", "temp_bytes", "peak_estimate_bytes", "attention_temp_bytes",
            "saved_activation_bytes", "head_temp_bytes")),
          flush=True)
  with open(out_path, "w") as f:
    json.dump(dict(backend=rows[0]["backend"], plan=plan, compile_only=True, note=MEMORY_NOTE,
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
  setting = objectives.validate(config.objective)

  def loss(stats, batch):
    if "old_logp" in setting.needs:
      stats = dict(stats, old_logp=jax.lax.stop_gradient(stats["logp"]))
    return objectives.objective_loss(stats, batch, setting)[0]
  return setting.stats, loss


def saved_activation_bytes(config):
  """Bytes the forward leaves for the backward (jax.ad_checkpoint.saved_residuals of one
  microbatch's loss, the step's inputs excluded): the remat policy's saved set over all layers.
  Traced only, so backend-independent except for the attention kernel's own residuals."""
  import contextlib
  import io
  import re
  import jax
  from jax.ad_checkpoint import print_saved_residuals
  from dft_jax import step as step_lib
  config = step_config(config)
  graphdef, state, frozen, _ = abstract_state(config, single_device_mesh())
  stats, objective = objective_of(config)
  chunk = config.model.lm_head_chunk

  def loss(params, base, batch):  # a LoRA run's frozen base an argument: its arrays are no
    model = step_lib.merge_model(graphdef, params, base)  # residuals (the policy saves the same)
    return objective(step_lib.model_token_stats(model, batch, chunk, stats), batch)

  batch = abstract_batch(microbatch_rows(config), config.train.seq_len)
  params, base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                              (state.params, frozen.base))
  text = io.StringIO()
  with contextlib.redirect_stdout(text):  # lines "bf16[28,4,4096,1536] output of ..."
    print_saved_residuals(loss, params, base, batch)
  total = 0
  for dtype, dims, src in re.findall(r"^([a-z]+\d*)\[([\d,]*)\] (.*)$", text.getvalue(), re.M):
    if not src.startswith("from the argument"):
      total += int(np.prod([int(d) for d in dims.split(",") if d])) * RESIDUAL_BYTES[dtype]
  return total


RESIDUAL_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "u32": 4, "i64": 8, "i8": 1,
                  "u8": 1, "bool": 1}


def head_temp_bytes(config):
  """Temporary bytes of the fused LM head's forward + backward alone (token_stats, the variant's
  objective, gradients to hidden and head weight), compiled for this backend."""
  import jax
  import jax.numpy as jnp
  from dft_jax import lm_head
  from dft_jax.models import PRESETS
  c, dtype = PRESETS[preset(config)], jnp.dtype(config.model.compute_dtype)
  rows, seq_len, chunk = microbatch_rows(config), config.train.seq_len, config.model.lm_head_chunk
  stats, objective = objective_of(config)

  def loss(hidden, w, batch):
    return objective(lm_head.token_stats(hidden, w, batch["targets"], chunk_size=chunk,
                                         stats=stats), batch)

  hidden = jax.ShapeDtypeStruct((rows, seq_len, c.hidden_size), dtype)
  w = jax.ShapeDtypeStruct((c.hidden_size, c.vocab_size), dtype)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      hidden, w, abstract_batch(rows, seq_len)).compile()
  return memory_stats(compiled)["temp_bytes"]


def attention_memory(config):
  """Temporary bytes of one attention forward + backward at the variant's shape through the same
  `attend` path (on CPU: XLA's explicit [B, N, T, T] scores), to subtract from a CPU analysis."""
  import jax
  import jax.numpy as jnp
  from dft_jax.models import PRESETS, attention
  c, dtype = PRESETS[preset(config)], jnp.dtype(config.model.compute_dtype)
  b, t = microbatch_rows(config), config.train.seq_len
  q = jax.ShapeDtypeStruct((b, t, c.num_heads, c.head_dim), dtype)
  kv = jax.ShapeDtypeStruct((b, t, c.num_kv_heads, c.head_dim), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    out = attention.attend(q, k, v, segment_ids_BxT=seg, impl=config.model.attention,
                           max_segments=segment_bound(config))
    return jnp.sum(out.astype(jnp.float32))

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


def resolve(overrides, records):
  """Fills model.remat="best" (the fastest ok "policy" record's) and
  train.global_batch_size="max" (that record's predicted_max_batch at 92% of the limit, at least
  its own batch, at most 64)."""
  o = dict(overrides)
  policy = [r for r in records if r.get("group") == "policy" and r["status"] == "ok"]
  best = max(policy, key=lambda r: r["tokens_per_s"]) if policy else None
  if o.get("model.remat") == "best":
    o["model.remat"] = best["remat"] if best else "nothing_saveable"
  if o.get("train.global_batch_size") == "max":
    same = [r for r in policy if r["remat"] == o["model.remat"]]
    predicted = predicted_max_batch(same[0], margin=0.92) if same else None
    o["train.global_batch_size"] = max(same[0]["batch"], min(64, predicted)) if predicted else 8
  return o


def tiny(overrides):
  """A GPU plan's variant at the shapes of plans.TINY (--tiny: the plan's plumbing on a CPU): the
  same fields, with the tiny model (of the variant's family, plans.TINY_MODELS), lengths and
  steps; 2 rows a gradient slice (1 if the variant has 1), one document a row if the variant has
  one, longer rows probed at the same ratios."""
  o = {**overrides, **plans.TINY}
  o["model.name"] = plans.TINY_MODELS.get(overrides.get("model.name"), o["model.name"])
  slices = overrides.get("train.minibatches", 1) * overrides.get("train.microbatches", 1)
  one_row = overrides.get("train.global_batch_size") == 1
  o["train.global_batch_size"] = slices * (1 if one_row else 2)
  seq_len, tiny_len = overrides.get("train.seq_len", 4096), o["train.seq_len"]
  if overrides.get("bench.doc_len", (0,))[0] >= seq_len:
    o["bench.doc_len"] = (tiny_len,) * 2
  o["bench.probe_seq_lens"] = tuple(t * tiny_len // seq_len
                                    for t in overrides.get("bench.probe_seq_lens", ()))
  return o


def subprocess_record(name, overrides, config, timeout_s, log):
  """Runs one variant in a fresh process (fresh peak memory) with its overrides as
  `--config.<field>=<value>` flags, and parses its RESULT line."""
  script = os.path.join(ROOT, "benchmarks", SCRIPTS[config.bench.framework])
  env = dict(os.environ)
  if config.bench.xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + config.bench.xla_flags).strip()
  cmd = [sys.executable, script, f"--config={BENCH_CONFIG}",
         *override_flags({"bench.name": name, **overrides})]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    out, err, rc = text(e.stdout), text(e.stderr), None
  log.write(f"===== {name} rc={rc}\n{' '.join(cmd[1:])}\n{out}\n{err}\n")
  log.flush()
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  if lines:
    return json.loads(lines[-1][len("RESULT "):])
  status = "timeout" if rc is None else "error"
  return dict(name=name, framework=config.bench.framework, group=config.bench.group,
              status=status, error=(err or out)[-2000:], wall_s=time.perf_counter() - t0)


def run_sweep(plan, out_dir, budget_s, tiny_shapes=False):
  """Runs the plan's variants one process each, within budget_s (at plans.TINY's shapes with
  tiny_shapes); writes train_step.json and logs.txt under out_dir; returns the result dict."""
  os.makedirs(out_dir, exist_ok=True)
  records, started = [], time.perf_counter()
  with open(os.path.join(out_dir, "logs.txt"), "w") as log:
    for name, overrides in plans.PLANS[plan]:
      overrides = resolve(overrides, records)
      if tiny_shapes:
        overrides = tiny(overrides)
      left = budget_s - (time.perf_counter() - started)
      try:
        config = variant_config(overrides)
      except NeedsHook as e:  # no process needs starting to find out
        config, skip = variant_config({"bench.name": name}), str(e)
      else:
        est_s = config.bench.est_s
        skip = f"budget: {left:.0f} s left, needs ~{est_s} s" if left < est_s else None
      if skip:
        records.append(dict(name=name, framework=config.bench.framework,
                            group=config.bench.group, status="skipped", error=skip))
      else:  # a hung variant may not eat the rest of the budget
        records.append(subprocess_record(name, overrides, config,
                                         min(left, max(60.0, 2.5 * est_s)), log))
      r = records[-1]
      print(f"[{time.perf_counter() - started:6.0f} s] {r['name']}: {r['status']}"
            + (f"  {r['tokens_per_s']:,.0f} tok/s" if r["status"] == "ok" else
               f"  {r.get('error', '')[:160]}"), flush=True)
  for r in records:
    if r["status"] == "ok" and r["framework"] in ("jax", "torch"):
      r["max_batch_predicted"] = predicted_max_batch(r)
  result = dict(plan=plan, tiny=tiny_shapes, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_s=time.perf_counter() - started, records=records, summary=summarize(records))
  with open(os.path.join(out_dir, "train_step.json"), "w") as f:
    json.dump(result, f, indent=1)
  write_sampling(result, os.path.join(out_dir, "sampling.json"))
  print(format_table(records, result["summary"]), flush=True)
  return result


def write_sampling(result, path):
  """The sampling records of a result and their summary (speedup_vs_transformers and
  bandwidth_fraction of the largest batch, every batch's row) in a file of their own, if it has
  any."""
  records = [r for r in result["records"] if r.get("framework") in ("sampler", "generate")]
  s = result["summary"]
  if not records:
    return
  with open(path, "w") as f:
    json.dump(dict(plan=result["plan"], created=result["created"], records=records,
                   summary=dict(batch=s.get("sampling_batch"),
                                speedup_vs_transformers=s.get("sampling_speedup_vs_transformers"),
                                bandwidth_fraction=s.get("sampling_bandwidth_fraction"),
                                rows=s.get("sampling", []))), f, indent=1)


def merge_results(paths, out_path):
  """One result of several sweeps' train_step.json (e.g. the h200 and h200_7b calls): their
  records in order, the summary over all of them; written to out_path, the table printed."""
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  records = [r for result in results for r in result["records"]]
  merged = dict(plan="+".join(r["plan"] for r in results), created=results[0]["created"],
                wall_s=sum(r["wall_s"] for r in results), parts=list(paths), records=records,
                summary=summarize(records))
  with open(out_path, "w") as f:
    json.dump(merged, f, indent=1)
  print(format_table(records, merged["summary"]), flush=True)
  return merged


def _ok(records, **match):
  return [r for r in records if r["status"] == "ok"
          and all(r.get(k) == want for k, want in match.items())]


# Fields that make two records a like-for-like pair (a fused head against the checkpointed one).
TWIN_KEYS = ("framework", "model", "objective", "batch", "seq_len", "minibatches", "microbatches",
             "remat", "lm_head_chunk", "compute_dtype", "param_dtype", "w_dtype", "mu_dtype",
             "nu_dtype", "xla_flags", "doc_len", "max_segments", "lora_rank", "base_quant")
# An objective's step time per token is compared with SFT's at the same shape, head and remat.
VS_SFT_KEYS = ("model", "batch", "seq_len", "remat", "lm_head", "lm_head_chunk", "param_dtype",
               "mu_dtype", "nu_dtype", "xla_flags", "doc_len", "max_segments", "lora_rank",
               "base_quant")
LORA_PEAK_GIB = 32.0  # a 40 GB card
LONG_TOKENS = 16384  # rows this long or longer are the long-context table's
# Objectives with a bound of their own on the step time per token over SFT's: summary key ->
# (what the record matches: objective and the reference's source, bound).
OBJECTIVE_TARGETS = {
    "talr": (dict(objective="talr"), 1.05),
    "otr": (dict(objective="otr"), 1.15),               # at its default 8 samples
    "asft": (dict(objective="asft"), 1.38),             # the floor of a reference forward: 1.33
    "iw_sft": (dict(objective="iw_sft", ref_logp="forward"), 1.36),
    "iw_sft_precomputed": (dict(objective="iw_sft", ref_logp="precomputed"), 1.05),
    "kl_anchor_precomputed": (dict(kl_coef=0.1, ref_logp="precomputed"), 1.05),
}
# The issues' targets: (summary key, comparison, bound).
TARGETS = (
    ("dft_mfu", ">=", 0.52),                       # 1.5B, 4 x 4096, DFT
    ("dft_speedup_vs_transformers", ">=", 1.6),
    ("lean_peak_gib", "<=", 25.5),                 # Liger's peak at 4 x 4096
    ("lean_mfu", ">=", 0.42),
    ("objective_per_token_vs_sft_max", "<=", 1.05),  # PSFT K=4 apart
    ("psft_k4_per_token_vs_sft", "<=", 1.15),
    ("large_mfu", ">=", 0.52),                     # 7B full fine-tune, 4 x 4096
    ("large_speedup_vs_transformers", ">=", 1.5),  # its largest batch that fits
    ("lora_peak_gib", "<=", LORA_PEAK_GIB),        # 7B LoRA rank 16, 4 x 4096
    ("lora_speedup_vs_peft", ">=", 1.5),
    ("qlora_peak_gib", "<=", 16.0),                # 7B QLoRA, 1 x 4096
    ("long_speedup_vs_peft_16k", ">=", 1.5),       # 7B LoRA r16, one 16k / 32k document
    ("long_speedup_vs_peft_32k", ">=", 1.5),
    ("lora_longest_row", ">=", 131072),            # 7B LoRA trains 128k-token rows
    ("sampling_speedup_vs_transformers", ">=", 3.0),  # 1.5B, bf16, 256 rows, 256 + 1024
    ("sampling_bandwidth_fraction", ">=", 0.5),
    *((f"{key}_per_token_vs_sft", "<=", bound) for key, (_, bound) in OBJECTIVE_TARGETS.items()),
)


def _same(r, q, keys):
  return all(r.get(k) == q.get(k) for k in keys)


def _brief(r):
  """name, tokens/s, both MFUs and peak GiB of a record (the summary's rows)."""
  return dict(name=r["name"], tokens_per_s=r["tokens_per_s"], mfu=r.get("mfu"),
              mfu_segments=r.get("mfu_segments"),
              peak_gib=r["peak_bytes"] / GIB if r.get("peak_bytes") else None)


def summarize(records):
  """The issues' targets, read off the records of one run (absent where a record is missing):
  the 1.5B DFT row and its ratio to transformers, fused / checkpointed head, each objective's step
  time per token over SFT's, the lean peak against Liger's, the 7B full fine-tune, LoRA against
  the peft peer at the same batch, QLoRA's peak, and `targets` (value, bound, met)."""
  s = {}
  first = lambda **match: next(iter(_ok(records, **match)), None)
  base = dict(model="qwen2.5-1.5b", objective="dft", batch=4, seq_len=4096,
              lora_rank=0)
  peer = first(framework="torch", liger=False, **base)
  liger = first(framework="torch", liger=True, **base)
  ours = _ok(records, framework="jax", **base)
  if ours:
    fastest = max(ours, key=lambda r: r["tokens_per_s"])
    s.update(dft_fastest=fastest["name"], dft_tokens_per_s=fastest["tokens_per_s"],
             dft_mfu=fastest["mfu"], dft_mfu_segments=fastest.get("mfu_segments"))
    if peer:
      s["dft_speedup_vs_transformers"] = fastest["tokens_per_s"] / peer["tokens_per_s"]
    lean = [r for r in ours if r.get("peak_bytes")]
    if lean:
      leanest = min(lean, key=lambda r: r["peak_bytes"])
      s.update(lean=leanest["name"], lean_peak_gib=leanest["peak_bytes"] / GIB,
               lean_mfu=leanest["mfu"])
  if liger and liger.get("peak_bytes"):
    s["liger_peak_gib"] = liger["peak_bytes"] / GIB
  s["fused_vs_checkpointed_time"] = {
      f"{r['name']} / {twin['name']}": r["step_time_s"] / twin["step_time_s"]
      for r in _ok(records, framework="jax", lm_head="fused")
      for twin in _ok(records, framework="jax", lm_head="checkpointed")
      if _same(r, twin, TWIN_KEYS)}
  per_token = lambda r: r["step_time_s"] / r["tokens_per_step"]
  vs_sft = {}
  for r in _ok(records, framework="jax"):
    sft = [q for q in _ok(records, framework="jax", objective="sft", minibatches=1)
           if _same(r, q, VS_SFT_KEYS)]
    if r["objective"] != "sft" and sft:
      vs_sft[r["name"]] = dict(sft=sft[0]["name"], lm_head=r["lm_head"],
                               ratio=per_token(r) / per_token(sft[0]))
  s["step_time_per_token_vs_sft"] = vs_sft
  for key, (match, _) in OBJECTIVE_TARGETS.items():  # a bound of their own: the slowest record
    ratios = [x["ratio"] for n, x in vs_sft.items() if first(name=n, **match)]
    if ratios:
      s[f"{key}_per_token_vs_sft"] = max(ratios)
  with_own = {n for n in vs_sft for match, _ in OBJECTIVE_TARGETS.values()
              if first(name=n, **match)}
  psft_k4 = [x["ratio"] for n, x in vs_sft.items() if first(name=n)["minibatches"] > 1]
  others = [x["ratio"] for n, x in vs_sft.items()
            if first(name=n)["minibatches"] == 1 and n not in with_own]
  if others:
    s["objective_per_token_vs_sft_max"] = max(others)
  if psft_k4:
    s["psft_k4_per_token_vs_sft"] = max(psft_k4)
  large = _ok(records, framework="jax", model="qwen2.5-7b", lora_rank=0)
  large_peers = _ok(records, framework="torch", model="qwen2.5-7b", lora_rank=0)
  if large:
    best = max(large, key=lambda r: r["mfu"] or 0)
    s["large"] = [_brief(r) for r in large + large_peers]
    s.update(large_fastest=best["name"], large_mfu=best["mfu"])
    if large_peers:
      s["large_speedup_vs_transformers"] = best["tokens_per_s"] / max(
          r["tokens_per_s"] for r in large_peers)
  lora = [r for r in _ok(records, framework="jax") if r.get("lora_rank")]
  s["lora"] = []
  for r in lora:
    row = dict(_brief(r), batch=r["batch"], base_quant=r["base_quant"])
    peft = [q for q in _ok(records, framework="torch") if q.get("lora_rank")
            and _same(r, q, ("model", "batch", "seq_len", "objective", "lora_rank"))]
    if peft:
      row.update(peft=peft[0]["name"], peft_tokens_per_s=peft[0]["tokens_per_s"],
                 peft_peak_gib=(peft[0]["peak_bytes"] or 0) / GIB,
                 speedup_vs_peft=r["tokens_per_s"] / peft[0]["tokens_per_s"])
    s["lora"].append(row)
  plain = [x for x in s["lora"] if x["base_quant"] == "none" and x["batch"] == 4]
  if plain:  # the fastest within the peak target, else the fastest
    best = max(plain, key=lambda x: (x["peak_gib"] is not None and x["peak_gib"] <= LORA_PEAK_GIB,
                                     x["tokens_per_s"]))
    s.update(lora_fastest=best["name"], lora_peak_gib=best["peak_gib"])
    if "speedup_vs_peft" in best:
      s["lora_speedup_vs_peft"] = best["speedup_vs_peft"]
  quantised = [x for x in s["lora"] if x["base_quant"] != "none" and x["peak_gib"]]
  if quantised:
    s["qlora_peak_gib"] = min(x["peak_gib"] for x in quantised)
  s["peft"] = [_brief(r) for r in _ok(records, framework="torch") if r.get("lora_rank")]
  s["max_batch_predicted"] = {r["name"]: r["max_batch_predicted"] for r in records
                              if r.get("max_batch_predicted")}
  s["max_batch_ran"] = {r["name"]: r["max_batch_fit"] for r in records if r.get("max_batch_fit")}
  s["max_batch_ran"].update({r["name"]: r["batch"] for r in _ok(records, name="jax/dft/max_batch")})
  s.update(long_context_summary(records))
  s.update(sampling_summary(records))
  s["targets"] = {key: dict(value=s[key], target=f"{op} {bound}",
                            met=s[key] >= bound if op == ">=" else s[key] <= bound)
                  for key, op, bound in TARGETS if s.get(key) is not None}
  return s


def model_label(r):
  """'qwen2.5-7b/lora16' or 'qwen2.5-1.5b/full': what a long-row table row trains."""
  return f"{r['model']}/" + (f"lora{r['lora_rank']}" if r.get("lora_rank") else "full")


def long_context_summary(records):
  """Rows of one document of LONG_TOKENS or more: each of ours with the peer of the same model,
  LoRA rank and length (tokens/s, peak, both MFUs, speedup); for each model the longest row ours
  trained and the longest the peer fitted (its rows and its seq_len probes); the targets' values
  (the fastest of ours over the peer at 16k and 32k, the 7B LoRA's longest row)."""
  peers = [q for q in _ok(records, framework="torch") if q["seq_len"] >= LONG_TOKENS]
  ours = [r for r in _ok(records, framework="jax") if r["seq_len"] >= LONG_TOKENS]
  rows = []
  for r in ours:
    row = dict(_brief(r), label=model_label(r), seq_len=r["seq_len"], remat=r["remat"])
    peer = next((q for q in peers if _same(r, q, ("model", "seq_len", "lora_rank", "batch"))),
                None)
    if peer:
      row.update(peer=peer["name"], peer_tokens_per_s=peer["tokens_per_s"],
                 peer_peak_gib=peer["peak_bytes"] / GIB if peer.get("peak_bytes") else None,
                 peer_mfu=peer.get("mfu"), speedup=r["tokens_per_s"] / peer["tokens_per_s"])
    rows.append(row)
  s = {"long_context": rows, "longest_row": longest_by_label(ours, lambda r: r["seq_len"]),
       "peer_longest_row": longest_by_label(
           peers, lambda r: max(r["seq_len"], r.get("longest_seq_fit") or 0))}
  for tokens, key in ((16384, "long_speedup_vs_peft_16k"), (32768, "long_speedup_vs_peft_32k")):
    paired = [x["speedup"] for x in rows if x["seq_len"] == tokens and "speedup" in x
              and x["label"].endswith("/lora16")]
    if paired:
      s[key] = max(paired)
  lora = [label for label in s["longest_row"] if label.endswith("/lora16")]
  if lora:
    s["lora_longest_row"] = max(s["longest_row"][label] for label in lora)
  return s


def longest_by_label(records, length):
  """{model_label: the largest length(r) of its records}."""
  out = {}
  for r in records:
    out[model_label(r)] = max(out.get(model_label(r), 0), length(r))
  return out


SAMPLING_KEYS = ("model", "batch", "prompt_len", "new_tokens", "temperature", "top_p")


def sampling_summary(records):
  """Each of our sampler's records with the fastest transformers generate of the same shapes:
  tokens/s, the bandwidth bound's fraction, the 500 x 16 time, speedup_vs_transformers; the
  largest batch's speedup and bound fraction (the targets, at 256 rows)."""
  rows = []
  for r in _ok(records, framework="sampler"):
    row = {k: r.get(k) for k in ("name", "batch", "tokens_per_s", "run_s", "decode_s",
                                 "bound_s", "bandwidth_fraction", "problems_500x16_s")}
    peers = [q for q in _ok(records, framework="generate") if _same(r, q, SAMPLING_KEYS)]
    if peers:
      best = max(peers, key=lambda q: q["tokens_per_s"])
      row.update(peer=best["name"], peer_tokens_per_s=best["tokens_per_s"],
                 peer_problems_500x16_s=best["problems_500x16_s"],
                 speedup_vs_transformers=r["tokens_per_s"] / best["tokens_per_s"])
    rows.append(row)
  if not rows:
    return {}
  top = max(rows, key=lambda x: x["batch"])
  return dict(sampling=rows, sampling_batch=top["batch"],
              sampling_speedup_vs_transformers=top.get("speedup_vs_transformers"),
              sampling_bandwidth_fraction=top.get("bandwidth_fraction"))


def format_table(records, summary):
  """The compact tables printed last (the device reply keeps the end of the output): the train
  steps, then the sampling runs."""
  head = (f"{'variant':26s} {'status':7s} {'remat':>9s} {'head':>5s} {'B':>3s} {'T':>6s} "
          f"{'tok/s':>8s} {'step ms':>8s} {'MFU':>6s} {'MFUseg':>6s} {'peak GiB':>8s} "
          f"{'maxB':>4s} {'compile':>7s}")
  lines = [head, "-" * len(head)]
  pct = lambda x: f"{100 * x:5.1f}%" if x else "     -"
  sampling = [r for r in records if r.get("framework") in ("sampler", "generate")]
  for r in records:
    if r in sampling:
      continue
    if r["status"] != "ok":
      lines.append(f"{r['name']:26s} {r['status']:7s} {(r.get('error') or '')[-90:]}")
      continue
    peak = f"{r['peak_bytes'] / GIB:8.1f}" if r.get("peak_bytes") else "       -"
    remat = "-" if r["framework"] == "head" else REMAT_SHORT.get(r["remat"], r["remat"])[:9]
    lm_head = {"fused": "fused", "checkpointed": "ckpt"}.get(r.get("lm_head"), "-")
    if r["framework"] == "torch":
      lm_head = "liger" if r.get("liger") else "full"
    lines.append(f"{r['name']:26s} {'ok':7s} {remat:>9s} {lm_head:>5s} {r['batch']:3d} "
                 f"{r['seq_len']:6d} {r['tokens_per_s']:8,.0f} {1e3 * r['step_time_s']:8.1f} "
                 f"{pct(r.get('mfu'))} {pct(r.get('mfu_segments'))} {peak} "
                 f"{r.get('max_batch_predicted') or 0:4d} {r.get('compile_s', 0):7.1f}")
  if sampling:
    head = (f"{'sampling':26s} {'status':7s} {'B':>3s} {'tok/s':>8s} {'run s':>7s} "
            f"{'ms/step':>7s} {'bound':>6s} {'500x16 s':>8s}")
    lines += ["", head, "-" * len(head)]
    for r in sampling:
      if r["status"] != "ok":
        lines.append(f"{r['name']:26s} {r['status']:7s} {(r.get('error') or '')[-90:]}")
        continue
      lines.append(f"{r['name']:26s} {'ok':7s} {r['batch']:3d} {r['tokens_per_s']:8,.0f} "
                   f"{r['run_s']:7.2f} {1e3 * r['run_s'] / r['new_tokens']:7.2f} "
                   f"{pct(r.get('bandwidth_fraction'))} {r['problems_500x16_s']:8.0f}")
  lines.append("summary: " + json.dumps(rounded(summary)))
  return "\n".join(lines)


def rounded(x, digits=4):
  if isinstance(x, float):
    return round(x, digits)
  if isinstance(x, dict):
    return {k: rounded(v, digits) for k, v in x.items()}
  if isinstance(x, list):
    return [rounded(v, digits) for v in x]
  return x


REMAT_SHORT = {"nothing_saveable": "nothing", "dots_with_no_batch_dims_saveable": "dots",
               "dots_attention_saveable": "dots+attn", "checkpoint_layers": "hf-ckpt"}


# ----------------------------------------------------------------------------- command line


def config_from_flags(argv, define_more=None, default=BENCH_CONFIG):
  """The variant's config from argv: `--config=FILE[:variant]` (default configs/benchmark.py)
  and `--config.<field>=<value>` overrides, parsed by the main job's own flag code (a field that
  does not exist is one line, exit 2); define_more() defines a script's other flags first. The
  process's settings first, as every command's (cli.prepare_process)."""
  cli.prepare_process()
  cli.define_config(argv, default=default, help_text="config file[:variant]")
  if define_more:
    define_more()
  cli.parse_flags(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.FLAGS.config


def variant_main(run_variant, argv=None):
  """A variant script's command line: its config from the flags, run_variant(config) in this
  process, the record printed as the RESULT line the harness reads; errors one line (exit 2)."""
  config = cli_entry(config_from_flags)(sys.argv if argv is None else argv)
  print("RESULT " + json.dumps(run_variant(config)), flush=True)


def define_harness_flags():
  cli.define("enum", "plan", None, "run a plan of benchmarks/plans.py, one process per variant",
             enum_values=sorted(plans.PLANS))
  cli.define("bool", "tiny", False, "the plan at plans.TINY's shapes (a CPU dry run)")
  cli.define("string", "out", "benchmarks/results/latest",
             "the plan's output folder (--merge: the merged file)")
  cli.define("float", "budget_s", 450.0, "the plan's wall-time budget (s)")
  cli.define("list", "merge", None, "merge these plans' train_step.json files into --out")
  cli.define("bool", "memory", False, "compile only and print XLA's memory analysis")
  cli.define("enum", "memory_plan", "1.5b", "the options --memory_sweep compiles",
             enum_values=sorted(plans.MEMORY_PLANS))
  cli.define("string", "memory_sweep", None,
             "compile-only memory analysis of every --memory_plan option, written to this JSON")


def main(argv=None):
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv
  config = config_from_flags(argv, define_harness_flags)
  f = flags.FLAGS
  if f.plan:
    run_sweep(f.plan, f.out, f.budget_s, f.tiny)
  elif f.merge:
    merge_results(f.merge, f.out)
  elif f.memory_sweep:
    run_memory_sweep(f.memory_sweep, f.memory_plan)
  elif f.memory:
    print("MEMORY " + json.dumps(dict(knobs(config), **compiled_memory(config))), flush=True)
  else:
    print("RESULT " + json.dumps(run_variant(config)), flush=True)


if __name__ == "__main__":
  cli_entry(main)()
