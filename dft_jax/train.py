"""The main job: fine-tune a language model with an SFT-family objective.

  python -m dft_jax.train [--config=configs/default.py[:variant]] [--workdir=DIR] [--config.a.b=v ...]

One jitted `train_step(state, batch)` over a device Mesh does, per global batch:
  1. (PSFT only) old_logp = log pi_old(y_t) with the current parameters, forward only;
  2. K = train.minibatches optimizer updates, each on 1/K of the rows, each summing the gradients
     of train.microbatches gradient-accumulation slices, all against the same old_logp.
Running the same command with the same --workdir resumes from the last complete checkpoint. A
first SIGTERM / SIGINT ends the run after the current step with a checkpoint (exit 0); see
dft_jax/faults.py for that and the other faults a run survives.
"""
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import struct

from dft_jax import checkpoint as ckpt
from dft_jax import config_files
from dft_jax import faults
from dft_jax import lm_head
from dft_jax import metrics as metrics_lib
from dft_jax import objectives
from dft_jax import sharding
from dft_jax.errors import ConfigError, ModelError, UserInputError, cli_entry

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
DEFAULT_CONFIG = config_files.DEFAULT
# Dense bf16 peak FLOP/s by device kind, for the MFU estimate (None: not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


class TrainState(struct.PyTreeNode):
  step: jax.Array       # global batches done
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------- config checks


def validate_config(config, num_devices, process_count=1):
  """Checks the fields the train step relies on; raises ConfigError naming the field."""
  objectives.validate(config.objective)
  t = config.train
  for name in ("num_steps", "global_batch_size", "seq_len", "microbatches", "minibatches"):
    value = t[name]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"train.{name}={value!r}: must be a positive integer")
  mesh_shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  per_update = t.minibatches * t.microbatches * shards
  if t.global_batch_size % per_update:
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} must be divisible by train.minibatches "
        f"({t.minibatches}) x train.microbatches ({t.microbatches}) x mesh data*fsdp ({shards}) "
        f"= {per_update}")
  if t.global_batch_size % process_count:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be divisible by the "
                      f"{process_count} processes")
  if config.data.max_length > t.seq_len:
    raise ConfigError(f"data.max_length={config.data.max_length} exceeds train.seq_len={t.seq_len}")
  if t.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite={t.nonfinite!r}: expected 'skip' or 'stop'")
  o = config.optimizer
  if o.schedule not in SCHEDULES:
    raise ConfigError(f"optimizer.schedule={o.schedule!r}: expected one of {sorted(SCHEDULES)}")
  if not o.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate={o.learning_rate!r}: must be > 0")
  if o.get("mu_dtype") not in (None, "float32", "bfloat16"):
    raise ConfigError(f"optimizer.mu_dtype={o.mu_dtype!r}: expected None, 'float32' or 'bfloat16'")
  if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip_norm < 0:
    raise ConfigError("optimizer.warmup_steps, weight_decay and grad_clip_norm must be >= 0")


# ----------------------------------------------------------------------------- optimizer

SCHEDULES = {
    "cosine": lambda lr, steps, floor: optax.cosine_decay_schedule(lr, max(steps, 1), alpha=floor),
    "linear": lambda lr, steps, floor: optax.linear_schedule(lr, lr * floor, max(steps, 1)),
    "constant": lambda lr, steps, floor: optax.constant_schedule(lr),
}


def make_schedule(opt_cfg, total_updates):
  """Linear warmup from 0 over optimizer.warmup_steps, then cosine / linear decay to
  learning_rate * min_lr_ratio at the last update, or constant."""
  lr, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
  decay = SCHEDULES[opt_cfg.schedule](lr, total_updates - warmup, opt_cfg.min_lr_ratio)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(logical_specs):
  """AdamW weight decay on weight matrices (every parameter with an "embed" axis), not on norm
  scales or biases."""
  return jax.tree.map(lambda spec: "embed" in spec, logical_specs)


def make_optimizer(opt_cfg, total_updates, logical_specs):
  """Global-norm clipping, then AdamW with decoupled weight decay on the schedule."""
  schedule = make_schedule(opt_cfg, total_updates)
  clip = opt_cfg.grad_clip_norm
  tx = optax.chain(
      optax.clip_by_global_norm(clip) if clip else optax.identity(),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=decay_mask(logical_specs),
                  mu_dtype=opt_cfg.get("mu_dtype")))
  return tx, schedule


# ----------------------------------------------------------------------------- the step


def split_rows(x, n, axis=0):
  """[..., N, ...] -> [..., n, N/n, ...] where slice k holds rows k, k+n, k+2n, ...

  Interleaving keeps every slice spread evenly over the devices that hold contiguous row blocks,
  so splitting a sharded batch into minibatches / microbatches moves no data.
  """
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // n, n) + shape[axis + 1:])
  return jnp.swapaxes(x, axis, axis + 1)


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def merge_leading(tree):
  """[n, rows, ...] -> [n * rows, ...]"""
  return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), tree)


def make_train_step(graphdef, tx, config, mesh, state_shardings, ref_needed):
  """Builds the jitted `train_step(state, batch, ref_params) -> (state, metrics)`.

  `batch` holds the global batch [G, T] sharded over (data, fsdp); `ref_params` are the frozen
  starting parameters when the objective has a KL anchor, else None.
  """
  obj_cfg, t, chunk = config.objective, config.train, config.model.lm_head_chunk
  needs_old = objectives.needs_old_logp(obj_cfg)
  # With one update per batch the snapshot is the current policy: old_logp = sg(logp), no extra
  # forward. With K > 1 updates, pi_old is computed once, before the first of them.
  snapshot_forward = needs_old and t.minibatches > 1
  stat_names = objectives.required_stats(obj_cfg)

  def target_logp(params, mb):  # forward only: the policy snapshot's or the reference's logp
    return jax.lax.stop_gradient(model_token_stats(graphdef, params, mb, chunk, ("logp",))["logp"])

  def microbatch_loss(params, mb, old_logp_BxT, ref_params, denominators):
    stats = model_token_stats(graphdef, params, mb, chunk, stat_names)
    if needs_old:
      stats["old_logp"] = old_logp_BxT if snapshot_forward else jax.lax.stop_gradient(stats["logp"])
    if ref_needed:
      stats["ref_logp"] = target_logp(ref_params, mb)
    return objectives.objective_loss(stats, mb, obj_cfg, denominators=denominators)

  grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

  def train_step(state, batch, ref_params):
    split = jax.tree.map(lambda v: split_rows(split_rows(v, t.minibatches), t.microbatches, axis=1), batch)
    old_logp = None
    if snapshot_forward:  # pi_old: the parameters before this batch's K updates, forward only
      old_logp = jax.lax.map(lambda mini: jax.lax.map(lambda mb: target_logp(state.params, mb), mini),
                             split)

    def minibatch_update(carry, xs):
      params, opt_state = carry
      micro, old = xs  # [microbatches, rows, T]
      rows = merge_leading(micro)
      denominators = objectives.global_denominators(rows["loss_mask"], rows["segment_ids"])
      loss_and_grads = lambda mb, o: grad_fn(params, mb, o, ref_params, denominators)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(loss_and_grads, *jax.tree.map(lambda v: v[0], (micro, old))))
      ((loss, mets), grads), _ = jax.lax.scan(
          lambda acc, x: (tree_add(acc, loss_and_grads(*x)), None), zeros, (micro, old))
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      keep_if_finite = lambda new, prev: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, prev)
      carry = (keep_if_finite(new_params, params), keep_if_finite(new_opt_state, opt_state))
      return carry, dict(mets, loss=loss, grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))

    (params, opt_state), per_update = jax.lax.scan(
        minibatch_update, (state.params, state.opt_state), (split, old_logp))
    summed = jax.tree.map(lambda v: v.sum(0), per_update)
    out = objectives.finalize_metrics(summed)
    out.update(loss=summed["loss"] / t.minibatches, grad_norm=summed["grad_norm"] / t.minibatches,
               skipped=summed["skipped"], tokens=(batch["segment_ids"] > 0).sum(),
               loss_tokens=batch["loss_mask"].sum())
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  return jax.jit(
      train_step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    state_shardings.params if ref_needed else None),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def model_token_stats(graphdef, params, batch, chunk_size, stats):
  """Per-token statistics (e.g. logp, entropy) of batch["targets"] through the fused LM head."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(
      batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
  return lm_head.token_stats(hidden_BxTxD, model.head_weight(), batch["targets"],
                             chunk_size=chunk_size, stats=stats)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
  """Everything a training run holds between steps."""
  config: Any
  workdir: str
  mesh: Any
  model_graphdef: Any
  tokenizer: Any
  state: TrainState
  state_shardings: Any
  base_params: Any      # the starting parameters (KL anchor, evaluation), or None
  model_config: Any
  train_step: Any
  schedule: Any
  manager: Any
  data_iter: Any
  num_params: int


def load_model(model_cfg):
  from dft_jax import models
  return models.load(
      model_cfg.name, param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype,
      remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, attention=model_cfg.attention)


def init_train_state(model, config, mesh):
  """(graphdef, TrainState, tx, schedule): the model's parameters sharded over the mesh by the
  logical-axis rules, the optimizer moments placed like the parameters they follow."""
  from dft_jax import models
  graphdef, params = nnx.split(model)
  logical = models.logical_specs(params)
  params = jax.device_put(params, sharding.param_shardings(params, logical, mesh))
  t = config.train
  tx, schedule = make_optimizer(config.optimizer, t.num_steps * t.minibatches, logical)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(  # moments follow their parameters; counts replicated
      tx, lambda _, param_sharding: param_sharding, jax.eval_shape(tx.init, params),
      shardings_of(params), transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                     opt_state=opt_state)
  return graphdef, state, tx, schedule


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def global_batch(local_batch, mesh):
  """Process-local numpy rows -> one global jax.Array per key, rows sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(local_batch[k])) for k in BATCH_KEYS}


def count_params(params):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def flops_per_token(num_params, model_cfg, seq_len):
  """Training FLOPs per token, 6N + 12 L d T (the benchmark issue's MFU formula)."""
  return 6 * num_params + 12 * model_cfg.num_layers * model_cfg.hidden_size * seq_len


def peak_flops(device):
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


# ----------------------------------------------------------------------------- the run


def host_metrics(metrics):
  """Device metrics -> (scalars, histograms) as Python floats / numpy on the host."""
  metrics = jax.device_get(metrics)
  scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  histograms = {k: (objectives.HIST_EDGES, np.asarray(v)) for k, v in metrics.items()
                if k.startswith("hist/")}
  return scalars, histograms


def setup(config, workdir):
  """Validates the config, loads the model and data, builds the step, restores a checkpoint."""
  from dft_jax import data
  t = config.train
  validate_config(config, jax.device_count(), jax.process_count())
  data.validate(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                process_count=jax.process_count())
  faults.check_workdir(workdir)
  ckpt.check_config(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  model, tokenizer = load_model(config.model)
  tokenizer = tokenizer or load_tokenizer(config.model)
  model_config = model.config
  graphdef, state, tx, schedule = init_train_state(model, config, mesh)
  del model
  keep_base = objectives.needs_ref_logp(config.objective) or config.eval.before or config.eval.after
  base_params = jax.tree.map(jnp.copy, state.params) if keep_base else None
  state_shardings = shardings_of(state)
  manager = ckpt.make_manager(workdir, config.checkpoint)
  data_iter = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                       global_batch_size=t.global_batch_size, seed=t.seed)
  if manager.latest_step() is not None:
    state, data_state = ckpt.restore(manager, abstract_of(state))
    data_iter.restore(data_state)
  ckpt.write_config(workdir, config)  # only once the checkpoints are known to fit this run
  train_step = make_train_step(graphdef, tx, config, mesh, state_shardings,
                               ref_needed=objectives.needs_ref_logp(config.objective))
  return Run(config=config, workdir=workdir, mesh=mesh, model_graphdef=graphdef,
             tokenizer=tokenizer, state=state, state_shardings=state_shardings,
             base_params=base_params, model_config=model_config, train_step=train_step,
             schedule=schedule, manager=manager,
             data_iter=data_iter, num_params=count_params(state.params))


def restore_model(workdir, step=None):
  """(model, tokenizer) with the parameters of a workdir's checkpoint (default: the latest)."""
  config = ckpt.read_config(workdir)
  model, tokenizer = load_model(config.model)
  tokenizer = tokenizer or load_tokenizer(config.model)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  graphdef, state, _, _ = init_train_state(model, config, mesh)
  manager = ckpt.make_manager(workdir, config.checkpoint)
  if manager.latest_step() is None:
    raise ModelError(f"--checkpoint={workdir}: no complete checkpoint in "
                     f"{ckpt.checkpoint_dir(workdir)}")
  state, _ = ckpt.restore(manager, abstract_of(state), step)
  return nnx.merge(graphdef, state.params), tokenizer


def load_tokenizer(model_cfg):
  """The tokenizer for a model that has none of its own (presets): model.tokenizer, an HF folder."""
  if not model_cfg.get("tokenizer"):
    raise ConfigError(f"model.name={model_cfg.name!r} comes without a tokenizer; set "
                      "model.tokenizer to an HF tokenizer folder")
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(model_cfg.tokenizer)
  except (OSError, ValueError) as e:
    first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
    raise ModelError(f"model.tokenizer={model_cfg.tokenizer!r}: no usable tokenizer there "
                     f"({first_line})") from None


class NonFiniteError(UserInputError):
  """train.nonfinite='stop' and a step had a non-finite loss or gradient (one line from the CLI,
  naming the step and where its batch starts in the data)."""


def save_json(workdir, name, obj):
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def load_json(workdir, name):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class StepLogger:
  """Turns each step's device metrics into logged scalars: throughput, MFU, non-finite policy."""

  def __init__(self, run, writer):
    self.run, self.writer, self.history = run, writer, []
    cfg = run.config
    self.flops_per_token = flops_per_token(run.num_params, run.model_config, cfg.train.seq_len)
    self.peak = peak_flops(jax.devices()[0])
    self.last_time = time.time()

  def __call__(self, step, metrics, batch_position):
    """batch_position: the data iterator state where this step's batch starts."""
    scalars, histograms = host_metrics(metrics)  # blocks until the step is done
    now = time.time()
    seconds, self.last_time = now - self.last_time, now
    tokens_per_s = scalars["tokens"] / seconds
    scalars.update(step_seconds=seconds, tokens_per_s=tokens_per_s,
                   learning_rate=float(self.run.schedule(step * self.run.config.train.minibatches - 1)))
    if self.peak:
      scalars["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * jax.device_count())
    self.history.append(dict(step=step, **scalars))
    if step % self.run.config.log.every_steps == 0 or step == self.run.config.train.num_steps:
      self.writer.write(step, scalars, histograms)
    if scalars["skipped"] > 0:
      message = (f"step {step}: non-finite loss or gradient (loss={scalars['loss']}, "
                 f"grad_norm={scalars['grad_norm']}) on the batch starting at data position "
                 f"{json.dumps(batch_position)}")
      if self.run.config.train.nonfinite == "stop":
        raise NonFiniteError(message + "; stopping (train.nonfinite='stop')")
      logging.warning("%s; the update was skipped (train.nonfinite='skip')", message)


def next_batch(run, step):
  """(global batch of `step`, the data iterator state where it starts); the NaN-injection knob
  poisons the host batch, so the compiled step is the same with the knob off."""
  position = run.data_iter.state()
  host_batch = next(run.data_iter)
  if step == faults.knob(run.config, "inject_nan_at_step"):
    host_batch = faults.poison(host_batch)
  return global_batch(host_batch, run.mesh), position


def save_checkpoint(run, step):
  """Starts writing checkpoint `step` (the slow-save knob holds its commit back)."""
  slow = step == faults.knob(run.config, "slow_save_at_step")
  delay = faults.knob(run.config, "save_delay_s") if slow else 0.0
  ckpt.save(run.manager, step, run.state, run.data_iter.state(), slow_commit_s=delay)


def train_steps(run, logger, ref_params):
  """Trains from the restored step to train.num_steps, checkpointing every checkpoint.every_steps
  and at the end. A stop signal checkpoints the current step and raises faults.Preempted."""
  config, t = run.config, run.config.train
  pending = None
  with faults.StopSignals() as signals, ckpt.finishing_saves(run.manager):
    for step in range(int(run.state.step) + 1, t.num_steps + 1):
      batch, position = next_batch(run, step)
      run.state, metrics = run.train_step(run.state, batch, ref_params)
      if pending is not None:  # read the previous step's metrics while this one runs
        logger(*pending)
      pending = (step, metrics, position)
      stop = signals.requested(step, run.manager)
      if stop or step % config.checkpoint.every_steps == 0 or step == t.num_steps:
        logger(*pending)  # the non-finite policy sees this step before its checkpoint is written
        pending = None
        save_checkpoint(run, step)
      if stop:
        ckpt.wait(run.manager)
        raise faults.Preempted(
            f"stopped by {signals.received} after step {step} of {t.num_steps}; checkpoint "
            f"{ckpt.checkpoint_dir(run.workdir)}/{step} written: run the same command to resume")
    ckpt.wait(run.manager)


def train_and_evaluate(config, workdir):
  """Runs (or resumes) training in `workdir`; returns the summary dict (also summary.json).

  Raises faults.Preempted when a stop signal ended the run early (after a checkpoint).
  """
  from dft_jax import evaluate
  run = setup(config, workdir)
  t, is_main = config.train, jax.process_index() == 0
  start_step = int(run.state.step)
  if is_main:  # rows a killed run logged after its last checkpoint are logged again
    faults.rewind_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
  evaluator = None
  if config.eval.before or config.eval.after:
    evaluator = evaluate.RunEvaluator(config.eval, config.data, run.tokenizer, run.model_graphdef,
                                      run.base_params)
  before = load_json(workdir, "eval_before.json")
  if config.eval.before and before is None:
    before = evaluator(run.base_params)
    if is_main:
      save_json(workdir, "eval_before.json", before)
  ref_params = run.base_params if objectives.needs_ref_logp(config.objective) else None
  writer = metrics_lib.make_writer(config.log, workdir, t.num_steps, is_main)
  logger, started = StepLogger(run, writer), time.time()
  try:
    train_steps(run, logger, ref_params)
  finally:
    writer.close()
  if config.checkpoint.export_hf and is_main:
    from dft_jax import export
    export.export_hf(nnx.merge(run.model_graphdef, run.state.params), run.tokenizer,
                     os.path.join(workdir, "hf"))
  after = evaluator(run.state.params) if config.eval.after else None
  summary = make_summary(config, logger.history, before, after, time.time() - started)
  if is_main:
    save_json(workdir, "summary.json", summary)
  return summary


def make_summary(config, history, before, after, train_seconds):
  """Before/after figures of the run (first and last logged step, evaluation results)."""
  summary = {"objective": config.objective.name, "model": config.model.name,
             "steps": config.train.num_steps, "train_seconds": round(train_seconds, 1)}
  if history:
    first, last = history[0], history[-1]
    for key in ("loss", "target_prob", "entropy"):
      summary[f"train_{key}"] = {"first": first.get(key), "last": last.get(key)}
    timed = history[1:] or history  # the first step includes compilation
    summary["tokens_per_s"] = float(np.mean([h["tokens_per_s"] for h in timed]))
    if "mfu" in last:
      summary["mfu"] = float(np.mean([h["mfu"] for h in timed]))
    summary["skipped_steps"] = int(sum(h["skipped"] for h in history))
  for name, results in (("before", before), ("after", after)):
    if results:
      summary[name] = {k: v for k, v in results.items() if k != "samples"}
  if after:
    summary["samples_after"] = after["samples"]
  return summary


def format_summary(summary):
  """A before/after table for the console (the evaluation rows of evaluate.ROWS, then training)."""
  from dft_jax import evaluate
  lines = [f"{summary['objective']} on {summary['model']}: {summary['steps']} steps in "
           f"{summary['train_seconds']:.0f} s, {summary.get('tokens_per_s', 0):,.0f} tokens/s"]
  before, after = summary.get("before") or {}, summary.get("after") or {}
  width = max(len(label) for _, label, _ in evaluate.ROWS) + 2
  if before or after:
    lines.append(f"{'':{width}s} {'before':>10s} {'after':>10s}")
  for key, label, fmt in evaluate.ROWS:
    if key in before or key in after:
      cells = [fmt.format(r[key]) if key in r else "-" for r in (before, after)]
      lines.append(f"{label:{width}s} {cells[0]:>10s} {cells[1]:>10s}")
  for key in ("loss", "target_prob", "entropy"):
    if f"train_{key}" in summary:
      v = summary[f"train_{key}"]
      label = f"train {key} (first -> last step)"
      lines.append(f"{label:{width}s} {v['first']:10.4f} {v['last']:10.4f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def maybe_initialize_distributed(flags):
  """jax.distributed.initialize() for multi-process runs: explicit flags, or DFT_JAX_DISTRIBUTED=1
  for auto-detection (TPU pods, SLURM)."""
  explicit = bool(flags.num_processes and flags.num_processes > 1)
  if not explicit and os.environ.get("DFT_JAX_DISTRIBUTED") != "1":
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs need it
  if explicit:
    jax.distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
  else:
    jax.distributed.initialize()


def quiet_library_logs():
  """Drops the INFO lines of the libraries under absl's handler (orbax writes about ten per
  checkpoint, jax one per missing backend); dft_jax's own INFO lines and every warning stay."""
  from absl import logging as absl_logging
  package = os.path.dirname(os.path.abspath(__file__))
  absl_logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or record.pathname.startswith(package))


def main(argv):
  del argv
  from absl import flags
  quiet_library_logs()
  FLAGS = flags.FLAGS
  maybe_initialize_distributed(FLAGS)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", config.objective.name)
  try:
    summary = train_and_evaluate(config, workdir)
  except faults.Preempted as stopped:  # every process says where it stopped
    print(f"dft_jax: {stopped}", flush=True)
    return
  if jax.process_index() == 0:
    print(format_summary(summary), flush=True)
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)


def define_flags(argv):
  """The CLI's flags; ml_collections reads the --config.a.b=v overrides from `argv`."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file[:variant]",
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run folder (default runs/<objective>); resumes if present")
  flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def cli(argv=None):
  """`python -m dft_jax.train ARGS`: a bad flag, config file or config field is one line (exit 2),
  as is every UserInputError of the run."""
  from absl import app
  argv = sys.argv if argv is None else argv
  # before define_flags: ml_collections reports an unknown field with a traceback
  cli_entry(faults.check_config_flags)(argv, DEFAULT_CONFIG)
  define_flags(argv)
  app.run(cli_entry(main), argv=argv, flags_parser=faults.parse_flags)


if __name__ == "__main__":
  cli()
