"""The train step: TrainState, the optimizer, and one jitted, sharded `train_step(state, batch, ref)`.

Per global batch [G, T] (rows sharded over the mesh's (data, fsdp) axes), the step
  1. takes `old_logp` from a snapshot of the policy when the objective needs it (PSFT): with
     K = train.minibatches > 1 a forward-only pass with the parameters before this batch's
     updates; with K = 1 the snapshot is the current policy, old_logp = sg(logp), no extra pass;
  2. makes K optimizer updates, each on 1/K of the rows, each summing the gradients of
     train.microbatches accumulation slices (a lax.scan), all against the same old_logp;
  3. keeps parameters and optimizer state unchanged on an update whose loss or gradient norm is
     not finite, and counts it (`skipped`).
The loss normalisation uses the token / sequence counts of each update's whole minibatch, so
slices and devices give the gradient of one big batch. `ref` holds the frozen reference
parameters when the objective needs them (KL anchor, statistics against the reference), else None.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import struct

from dft_jax import lm_head
from dft_jax import objectives
from dft_jax import sharding
from dft_jax.errors import ConfigError, check_number

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class TrainState(struct.PyTreeNode):
  step: jax.Array       # global batches done
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------- config edge


def validate(config, num_devices, process_count=1):
  """Checks config.train, config.optimizer, the mesh against the devices and the LM head's chunk;
  ConfigError naming the field (every number is checked for its range, NaN and inf)."""
  t = config.train
  for name in ("num_steps", "global_batch_size", "seq_len", "microbatches", "minibatches"):
    check_number(f"train.{name}", t[name], integer=True, minimum=1)
  check_number("train.seed", t.seed, integer=True, minimum=0)
  check_number("model.lm_head_chunk", config.model.lm_head_chunk, integer=True, minimum=1)
  if t.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite={t.nonfinite!r}: expected 'skip' or 'stop'")
  for axis in sharding.MESH_AXES:  # sizes, or -1 for the rest of the devices
    check_number(f"mesh.{axis}", config.mesh[axis], integer=True, minimum=-1)
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
  o = config.optimizer
  if o.schedule not in SCHEDULES:
    raise ConfigError(f"optimizer.schedule={o.schedule!r}: expected one of {sorted(SCHEDULES)}")
  if o.get("mu_dtype") not in (None, "float32", "bfloat16"):
    raise ConfigError(f"optimizer.mu_dtype={o.mu_dtype!r}: expected None, 'float32' or 'bfloat16'")
  check_number("optimizer.learning_rate", o.learning_rate, above=0)
  check_number("optimizer.warmup_steps", o.warmup_steps, integer=True, minimum=0)
  check_number("optimizer.min_lr_ratio", o.min_lr_ratio, minimum=0, maximum=1)
  check_number("optimizer.weight_decay", o.weight_decay, minimum=0)
  check_number("optimizer.b1", o.b1, minimum=0, below=1)
  check_number("optimizer.b2", o.b2, minimum=0, below=1)
  check_number("optimizer.eps", o.eps, above=0)
  check_number("optimizer.grad_clip_norm", o.grad_clip_norm, minimum=0)  # 0: no clipping


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
  """(tx, schedule): global-norm clipping, then AdamW with decoupled weight decay on the
  schedule."""
  schedule = make_schedule(opt_cfg, total_updates)
  clip = opt_cfg.grad_clip_norm
  tx = optax.chain(
      optax.clip_by_global_norm(clip) if clip else optax.identity(),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=decay_mask(logical_specs),
                  mu_dtype=opt_cfg.get("mu_dtype")))
  return tx, schedule


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
  """jax.ShapeDtypeStruct (with sharding) of every array: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def init_train_state(model, config, mesh):
  """(graphdef, TrainState, tx, schedule): the model's parameters sharded over the mesh by the
  logical-axis rules, the optimizer moments placed like the parameters they follow."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
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


def global_batch(local_batch, mesh):
  """Process-local numpy rows -> one global jax.Array per key, rows sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(local_batch[k]))
          for k in BATCH_KEYS}


def count_params(params):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- the step


def needs_reference(objective_cfg):
  """Whether the step needs the frozen reference parameters (KL anchor, reference statistics)."""
  return ("ref_logp" in objectives.needs(objective_cfg)
          or lm_head.needs_ref(objectives.required_stats(objective_cfg)))


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


def hidden_and_head(graphdef, params, batch):
  """(final hidden states [B, T, D], head weight [D, V]) of the model with `params`."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(
      batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
  return hidden_BxTxD, model.head_weight()


def model_token_stats(graphdef, params, batch, chunk_size, stats, ref_params=None):
  """Per-token statistics (e.g. logp, entropy) of batch["targets"] through the fused LM head;
  ref_params: the reference model's, for statistics that compare with it."""
  hidden_BxTxD, w_DxV = hidden_and_head(graphdef, params, batch)
  ref = {}
  if lm_head.needs_ref(stats):
    ref_hidden_BxTxD, ref_w_DxV = hidden_and_head(graphdef, ref_params, batch)
    ref = dict(ref_hidden_BxTxD=jax.lax.stop_gradient(ref_hidden_BxTxD),
               ref_w_DxV=jax.lax.stop_gradient(ref_w_DxV))
  return lm_head.token_stats(hidden_BxTxD, w_DxV, batch["targets"], chunk_size=chunk_size,
                             stats=stats, **ref)


def make_train_step(graphdef, tx, config, mesh, state_shardings):
  """The jitted `train_step(state, batch, ref_params) -> (state, metrics)`, state donated.

  `batch` holds the global batch [G, T] sharded over (data, fsdp); `ref_params` are the frozen
  reference parameters when needs_reference(config.objective), else None.
  """
  setting = objectives.validate(config.objective)
  t, chunk = config.train, config.model.lm_head_chunk
  needs = objectives.needs(config.objective)
  stat_names = objectives.required_stats(config.objective)
  ref_needed = needs_reference(config.objective)
  # With one update per batch the snapshot is the current policy: old_logp = sg(logp), no extra
  # forward. With K > 1 updates, pi_old is computed once, before the first of them.
  snapshot_forward = "old_logp" in needs and t.minibatches > 1

  def target_logp(params, mb):  # forward only: the policy snapshot's or the reference's logp
    return jax.lax.stop_gradient(model_token_stats(graphdef, params, mb, chunk, ("logp",))["logp"])

  def microbatch_loss(params, mb, old_logp_BxT, ref_params, denominators):
    stats = model_token_stats(graphdef, params, mb, chunk, stat_names, ref_params)
    if "old_logp" in needs:
      stats["old_logp"] = old_logp_BxT if snapshot_forward else jax.lax.stop_gradient(stats["logp"])
    if "ref_logp" in needs:
      stats["ref_logp"] = target_logp(ref_params, mb)
    return objectives.objective_loss(stats, mb, setting, denominators=denominators)

  grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

  def train_step(state, batch, ref_params):
    split = jax.tree.map(
        lambda v: split_rows(split_rows(v, t.minibatches), t.microbatches, axis=1), batch)
    old_logp = None
    if snapshot_forward:  # pi_old: the parameters before this batch's K updates, forward only
      old_logp = jax.lax.map(
          lambda mini: jax.lax.map(lambda mb: target_logp(state.params, mb), mini), split)

    def minibatch_update(carry, xs):
      params, opt_state = carry
      micro, old = xs  # [microbatches, rows, T]
      rows = merge_leading(micro)
      denominators = objectives.global_denominators(rows["loss_mask"], rows["segment_ids"])
      loss_and_grads = lambda mb, o: grad_fn(params, mb, o, ref_params, denominators)
      first = jax.tree.map(lambda v: v[0], (micro, old))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(loss_and_grads, *first))
      ((loss, mets), grads), _ = jax.lax.scan(
          lambda acc, x: (tree_add(acc, loss_and_grads(*x)), None), zeros, (micro, old))
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      keep_if_finite = lambda new, prev: jax.tree.map(lambda a, b: jnp.where(finite, a, b),
                                                      new, prev)
      carry = (keep_if_finite(new_params, params), keep_if_finite(new_opt_state, opt_state))
      return carry, dict(mets, loss=loss, grad_norm=grad_norm,
                         skipped=1.0 - finite.astype(jnp.float32))

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
