"""The train step: TrainState, the optimizer, and one jitted, sharded `train_step(state, batch, ref)`.

The objective arrives resolved (objectives.Setting, from objectives.validate at the config edge):
the step reads its terms, statistics and needs, never config.objective. Per global batch [G, T]
(rows sharded over the mesh's (data, fsdp) axes), the step
  1. provides what the objective needs (objectives.NEEDS), each need by one provider:
     old_logp  a snapshot of the policy: with K = train.minibatches > 1 a forward-only pass with
               the parameters before this batch's updates; with K = 1 the snapshot is the
               current policy, old_logp = sg(logp), no extra pass;
     ref_logp  a forward-only pass of the frozen reference (starting) model;
     token_key a PRNG key per token of the global batch, from train.seed and the step number;
     segments  the batch's loss_mask and segment_ids;
  2. makes K optimizer updates, each on 1/K of the rows, each summing the gradients of
     train.microbatches accumulation slices (a lax.scan), all against the same old_logp;
  3. keeps parameters and optimizer state unchanged on an update whose loss or gradient norm is
     not finite, or that would move the parameters by more than optimizer.max_update_ratio times
     their norm (||update|| / ||params||, `update_ratio`: a learning rate far too large), and counts
     it (`skipped`; `oversized` the updates skipped for their size).
The loss normalisation uses the token / sequence counts of each update's whole minibatch, so
slices and devices give the gradient of one big batch. The step also reads, never updates,
`Frozen`: with LoRA the frozen base; without it a copy of the starting parameters when the
objective compares with the starting model (KL anchor, statistics against the reference).
"""
from typing import Any, NamedTuple

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
LM_HEAD_IMPLS = ("checkpointed", "fused")  # lm_head.token_stats | lm_head.fused_loss
SAMPLING_STREAM = 0x5A4D  # folded into the seed's key for the per-token keys (token_keys)


class TrainState(struct.PyTreeNode):
  """What the step updates (donated) and checkpoints."""
  step: jax.Array       # global batches done
  params: Any           # what trains: every parameter, or with LoRA the adapters
  opt_state: Any


class Frozen(struct.PyTreeNode):
  """What the step reads and never updates (not donated, not checkpointed)."""
  base: Any = None       # with LoRA: the frozen base weights
  reference: Any = None  # without LoRA, when the objective compares with the starting model: a
                         # copy of the starting parameters (with LoRA: the base, adapters off)


# ----------------------------------------------------------------------------- config edge


def validate(config, num_devices, process_count=1):
  """Checks config.train, config.optimizer, the mesh against the devices and the LM head's chunk;
  ConfigError naming the field (every number is checked for its range, NaN and inf)."""
  t = config.train
  for name in ("num_steps", "global_batch_size", "seq_len", "microbatches", "minibatches"):
    check_number(f"train.{name}", t[name], integer=True, minimum=1)
  check_number("train.seed", t.seed, integer=True, minimum=0)
  check_number("model.lm_head_chunk", config.model.lm_head_chunk, integer=True, minimum=1)
  check_number("model.router_aux_loss_coef", config.model.get("router_aux_loss_coef"),
               optional=True, minimum=0)
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
  if config.model.lm_head_impl not in LM_HEAD_IMPLS:
    raise ConfigError(f"model.lm_head_impl={config.model.lm_head_impl!r}: expected one of "
                      f"{', '.join(LM_HEAD_IMPLS)}")
  o = config.optimizer
  if o.schedule not in SCHEDULES:
    raise ConfigError(f"optimizer.schedule={o.schedule!r}: expected one of {sorted(SCHEDULES)}")
  for moment in ("mu_dtype", "nu_dtype"):
    if o.get(moment) not in (None, "float32", "bfloat16"):
      raise ConfigError(f"optimizer.{moment}={o.get(moment)!r}: expected None (the parameters' "
                        "dtype), 'float32' or 'bfloat16'")
  check_number("optimizer.learning_rate", o.learning_rate, above=0)
  check_number("optimizer.warmup_steps", o.warmup_steps, integer=True, minimum=0)
  check_number("optimizer.min_lr_ratio", o.min_lr_ratio, minimum=0, maximum=1)
  check_number("optimizer.weight_decay", o.weight_decay, minimum=0)
  check_number("optimizer.b1", o.b1, minimum=0, below=1)
  check_number("optimizer.b2", o.b2, minimum=0, below=1)
  check_number("optimizer.eps", o.eps, above=0)
  check_number("optimizer.grad_clip_norm", o.grad_clip_norm, minimum=0)  # 0: no clipping
  check_number("optimizer.finch.ema", o.finch.ema, minimum=0, below=1)
  check_number("optimizer.finch.max_learning_rate", o.finch.max_learning_rate, above=0)
  check_number("optimizer.finch.initial_loss", o.finch.initial_loss, above=0, optional=True)
  check_number("optimizer.max_update_ratio", o.get("max_update_ratio", 0.0), minimum=0)  # 0: off
  updates = t.num_steps * t.minibatches
  if o.warmup_steps >= updates:  # the schedule counts updates
    per_step = (f" x train.minibatches={t.minibatches} = {updates} updates"
                if t.minibatches > 1 else "")
    raise ConfigError(
        f"optimizer.warmup_steps={o.warmup_steps} must be below train.num_steps={t.num_steps}"
        f"{per_step}: the run would end before its learning rate reaches "
        f"optimizer.learning_rate={o.learning_rate}; lower the warm-up or train longer")


# ----------------------------------------------------------------------------- optimizer

SCHEDULES = {
    "cosine": lambda lr, steps, floor: optax.cosine_decay_schedule(lr, max(steps, 1), alpha=floor),
    "linear": lambda lr, steps, floor: optax.linear_schedule(lr, lr * floor, max(steps, 1)),
    "constant": lambda lr, steps, floor: optax.constant_schedule(lr),
    # FINCH: the constant rate is the base that the batch's loss scales (finch_rate)
    "finch": lambda lr, steps, floor: optax.constant_schedule(lr),
}


def make_schedule(opt_cfg, total_updates):
  """Linear warmup from 0 over optimizer.warmup_steps, then cosine / linear decay to
  learning_rate * min_lr_ratio at the last update, or constant."""
  lr, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
  decay = SCHEDULES[opt_cfg.schedule](lr, total_updates - warmup, opt_cfg.min_lr_ratio)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


class FinchState(NamedTuple):
  """scale_by_loss_adaptive_rate's state (checkpointed with the optimizer: a resume continues the
  average)."""
  count: jax.Array          # updates applied
  average_loss: jax.Array   # the moving average of the updates' losses
  learning_rate: jax.Array  # the rate of the last update


def finch_rate(base_rate, average_loss, max_rate):
  """FINCH's rate min(base / sqrt(average loss), max_rate)."""
  return jnp.minimum(base_rate / jnp.sqrt(jnp.maximum(average_loss, 1e-12)), max_rate)


def scale_by_loss_adaptive_rate(base_schedule, *, ema, max_rate, initial_loss=None):
  """FINCH, loss-adaptive learning rates (arXiv 2605.20005, "Fine-Tuning Without Forgetting via
  Loss-Adaptive Learning Rates"): per-step forgetting is bounded by the learning rate times the
  square root of the training loss, so the rate is lowered on high-loss batches and raised as the
  loss falls, the objective unchanged. Each update u becomes -eta_t u,

    L_avg,t = ema L_avg,t-1 + (1 - ema) L_t,   eta_t = min(base_t / sqrt(L_avg,t), max_rate),

  L_t the update's batch loss (update's keyword `loss`), L_avg,0 = initial_loss, or the first
  update's loss when None (L_avg,1 = L_1). Where it comes from: the paper's abstract (arXiv
  listing: the bound and the direction of the schedule); the formula, ema = 0.9 and the default
  base 2e-5 with cap 5e-5 from focusvector/finch train_finch.py (inverse_lr: base / sqrt(EMA of
  the batch losses) capped at eta_max; a QLoRA port that "keeps the FINCH schedule intact"),
  which starts the average at the model's mean loss over the training set before training
  (initial_loss here; None starts it at the first batch's). The paper body could not be read
  here. base_schedule: the base rate by update count (the warmup, then constant).
  """

  def init(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return FinchState(count=jnp.zeros((), jnp.int32), average_loss=zero, learning_rate=zero)

  def update(updates, state, params=None, *, loss, **extra_args):
    del params, extra_args
    loss = jnp.asarray(loss, jnp.float32)
    start = loss if initial_loss is None else jnp.float32(initial_loss)
    previous = jnp.where(state.count == 0, start, state.average_loss)
    average = ema * previous + (1.0 - ema) * loss
    rate = finch_rate(base_schedule(state.count), average, max_rate)
    updates = jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates)
    return updates, FinchState(count=state.count + 1, average_loss=average, learning_rate=rate)

  return optax.GradientTransformationExtraArgs(init, update)


def adaptive_rates(opt_state):
  """The rates of the last update of every loss-adaptive schedule (FINCH) in the optimizer
  state; empty without one."""
  is_finch = lambda x: isinstance(x, FinchState)
  return [s.learning_rate for s in jax.tree.leaves(opt_state, is_leaf=is_finch) if is_finch(s)]


def decay_mask(logical_specs):
  """AdamW weight decay on weight matrices (every parameter with an "embed" axis) and LoRA
  adapters, not on norm scales or biases."""
  return jax.tree.map(lambda spec: "embed" in spec or "lora_rank" in spec, logical_specs)


def scale_by_adam_stored_in(b1, b2, eps, mu_dtype, nu_dtype):
  """Adam's update m_hat / (sqrt(v_hat) + eps) (arXiv 1412.6980) with both moments stored in the
  given dtypes and updated in float32: optax.scale_by_adam, whose second moment can only be kept
  in the parameters' dtype. A bfloat16 moment keeps 8 significant bits, so an update smaller than
  ~0.4 % of it rounds away: fine for b2 <= 0.99 (a step moves v by 1 - b2 >= 1 %), not for 0.999."""

  def init(params):
    zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros(p.shape, dtype or p.dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(mu_dtype),
                                  nu=zeros(nu_dtype))

  def update(grads, state, params=None):
    del params
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, f32(state.mu), f32(grads))
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, f32(state.nu), f32(grads))
    count = state.count + 1
    correction_1, correction_2 = 1 - b1 ** count, 1 - b2 ** count
    updates = jax.tree.map(
        lambda m, v, g: ((m / correction_1) / (jnp.sqrt(v / correction_2) + eps)).astype(g.dtype),
        mu, nu, grads)
    cast = lambda new, old: jax.tree.map(lambda x, o: x.astype(o.dtype), new, old)
    return updates, optax.ScaleByAdamState(count=count, mu=cast(mu, state.mu),
                                           nu=cast(nu, state.nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(opt_cfg, total_updates, logical_specs):
  """(tx, schedule): global-norm clipping, then AdamW with decoupled weight decay on the
  schedule; optimizer.mu_dtype / nu_dtype store the moments in another dtype (the lean mode:
  bfloat16 moments save 4 bytes a parameter). optimizer.schedule='finch' scales the base
  schedule by the update's loss (scale_by_loss_adaptive_rate; tx.update then takes `loss`, the
  step passes every update's mean -log p_t), and schedule is None: the rate is data-dependent
  and the step reports it (metric learning_rate)."""
  schedule = make_schedule(opt_cfg, total_updates)
  clip = opt_cfg.grad_clip_norm
  mask = decay_mask(logical_specs)
  if opt_cfg.schedule == "finch":
    f = opt_cfg.finch
    rate = scale_by_loss_adaptive_rate(schedule, ema=f.ema, max_rate=f.max_learning_rate,
                                       initial_loss=f.initial_loss)
  else:
    rate = optax.scale_by_learning_rate(schedule)
  if opt_cfg.get("nu_dtype") is None:
    scale = optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                                mu_dtype=opt_cfg.get("mu_dtype"))
  else:
    scale = scale_by_adam_stored_in(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, opt_cfg.get("mu_dtype"),
                                    opt_cfg.nu_dtype)
  adamw = optax.chain(scale, optax.add_decayed_weights(opt_cfg.weight_decay, mask), rate)
  tx = optax.chain(optax.clip_by_global_norm(clip) if clip else optax.identity(), adamw)
  return tx, None if opt_cfg.schedule == "finch" else schedule


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
  """jax.ShapeDtypeStruct (with sharding) of every array: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def split_model(model):
  """(graphdef, trainable, frozen): every parameter trains (frozen None), or with LoRA the
  adapters (nnx.LoRAParam) train and the rest is frozen."""
  if model.lora is None:
    graphdef, params = nnx.split(model)
    return graphdef, params, None
  return nnx.split(model, nnx.LoRAParam, ...)


def merge_model(graphdef, params, frozen=None):
  """The model of split_model's parts (frozen None: params holds every parameter)."""
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def full_params(params, frozen=None):
  """One state with every variable of the model: what nnx.split(model) gives."""
  return params if frozen is None else nnx.merge_state(params, frozen)


def _placed(tree, mesh):
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  if tree is None:
    return None
  return jax.device_put(tree, sharding.param_shardings(tree, models.logical_specs(tree), mesh))


def init_train_state(model, config, mesh, *, setting):
  """(graphdef, TrainState, Frozen, tx, schedule): the model's trainable parameters (all, or
  with LoRA the adapters; the frozen base in Frozen.base) sharded over the mesh by the
  logical-axis rules, the optimizer moments placed like the parameters they follow, and a copy
  of the starting parameters in Frozen.reference when the objective (setting, an
  objectives.Setting) runs the starting model, in the compute dtype (the forward casts to it
  anyway; a bfloat16 copy is half the memory)."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  graphdef, params, base = split_model(model)
  logical = models.logical_specs(params)
  params, base = _placed(params, mesh), _placed(base, mesh)
  reference = None
  if base is None and setting.needs_reference:
    reference = jax.tree.map(lambda p: jnp.copy(p).astype(model.compute_dtype), params)
  t = config.train
  tx, schedule = make_optimizer(config.optimizer, t.num_steps * t.minibatches, logical)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(  # moments follow their parameters; counts replicated
      tx, lambda _, param_sharding: param_sharding, jax.eval_shape(tx.init, params),
      shardings_of(params), transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                     opt_state=opt_state)
  return graphdef, state, Frozen(base=base, reference=reference), tx, schedule


def global_batch(local_batch, mesh):
  """Process-local numpy rows -> one global jax.Array per key (BATCH_KEYS, and ref_logp when
  precomputed: reference_logp.py), rows sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in local_batch.items()}


def count_params(params):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_flops_per_token(state, frozen, model_config, seq_len):
  """throughput.flops_per_token of this state: 6 N, or with LoRA 4 N_base + 6 N_adapters (N_base
  from the shapes of the plain decoder: a quantised base packs two weights a byte); N counts the
  parameters a token uses (a mixture of experts: its top k experts)."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  from dft_jax import throughput  # pylint: disable=g-import-not-at-top
  inactive = models.inactive_param_count(model_config)
  if frozen.base is None:
    return throughput.flops_per_token(count_params(state.params) - inactive, model_config,
                                      seq_len)
  base = nnx.eval_shape(lambda: models.Decoder(model_config, rngs=nnx.Rngs(0)))
  return throughput.flops_per_token(count_params(nnx.state(base)) - inactive, model_config,
                                    seq_len, num_trainable=count_params(state.params))


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


def hidden_and_head(model, batch, adapters=True):
  """(final hidden states [B, T, D], head weight [D, V]) of `model` (adapters=False: its frozen
  base alone, with LoRA)."""
  hidden_BxTxD = model.hidden_states(
      batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"],
      adapters=adapters)
  return hidden_BxTxD, model.head_weight()


def model_token_stats(model, batch, chunk_size, stats, reference=None, extra_BxT=None):
  """Per-token statistics (e.g. logp, entropy) of batch["targets"] through the chunked LM head;
  reference: the reference's (hidden states, head weight), for statistics that compare with it;
  extra_BxT: the statistics' per-token side inputs (lm_head.Statistic.side)."""
  return head_token_stats(*hidden_and_head(model, batch), batch, chunk_size, stats, reference,
                          extra_BxT)


def head_token_stats(hidden_BxTxD, w_DxV, batch, chunk_size, stats, reference=None,
                     extra_BxT=None):
  """model_token_stats from the model's (hidden states, head weight)."""
  ref = {}
  if lm_head.needs_reference(stats):
    ref = dict(zip(("ref_hidden_BxTxD", "ref_w_DxV"), jax.lax.stop_gradient(reference)))
  return lm_head.token_stats(hidden_BxTxD, w_DxV, batch["targets"], chunk_size=chunk_size,
                             stats=stats, extra_BxT=extra_BxT, **ref)


def forward_logp(hidden_and_w, targets_BxT, chunk_size):
  """log p(targets) [B, T] of (hidden states, head weight), forward only (no gradient)."""
  hidden_BxTxD, w_DxV = jax.lax.stop_gradient(hidden_and_w)
  return lm_head.token_stats(hidden_BxTxD, w_DxV, targets_BxT, chunk_size=chunk_size,
                             stats=(lm_head.LOGP,))["logp"]


def reference_hidden_and_head(graphdef, params, frozen, batch):
  """(hidden states, head weight) of the frozen reference (starting) model, without gradient:
  with LoRA the base with its adapters off (params: the adapters), else frozen.reference."""
  if frozen.base is not None:
    model = merge_model(graphdef, params, frozen.base)
    return jax.lax.stop_gradient(hidden_and_head(model, batch, adapters=False))
  return jax.lax.stop_gradient(hidden_and_head(merge_model(graphdef, frozen.reference), batch))


def make_reference_logp(graphdef, config, mesh):
  """The jitted `reference_logp(params, frozen, batch) -> [G, T]`: the reference model's
  log-probability of batch["targets"], forward only, rows sharded like the batch
  (reference_hidden_and_head; objective.ref_logp='precomputed' runs it once over the data with
  frozen.reference the starting parameters)."""
  chunk = config.model.lm_head_chunk

  def reference_logp(params, frozen, batch):
    hidden_and_w = reference_hidden_and_head(graphdef, params, frozen, batch)
    return forward_logp(hidden_and_w, batch["targets"], chunk)
  return jax.jit(reference_logp, out_shardings=sharding.batch_sharding(mesh))


def with_router_loss(loss, metrics, router_loss, coef, share):
  """A mixture-of-experts model's objective total: loss + coef * share * router_loss (the
  load-balancing loss, models.decoder.load_balancing_loss), and the metric router_aux_loss;
  share = 1 / the slices summed into one update, so the sums are means over them."""
  total = loss + coef * share * router_loss
  return total, dict(metrics, loss=total, router_aux_loss=share * router_loss)


def token_keys(seed, step, shape):
  """[*shape, 2] uint32: a PRNG key per token (the key data of fold_in(fold_in(fold_in(key(seed),
  SAMPLING_STREAM), step), the token's index in the global batch)): the same draws however the
  batch is split over minibatches, microbatches and devices, and again when a run resumes."""
  step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SAMPLING_STREAM), step)
  index = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)
  return jax.random.key_data(keys).reshape(*shape, -1)


def objective_loss_fused(hidden_BxTxD, w_DxV, batch, setting, *, extra_BxT=None,
                         ref_hidden_BxTxD=None, ref_w_DxV=None, current_old_logp=False,
                         denominators=None, chunk_size=1024, compute_dtype=None, sources=()):
  """objectives.objective_loss of the LM head's statistics, through lm_head.fused_loss: the same
  (loss, metrics) with d loss / d (hidden, w) formed in the head's forward pass.

  batch: targets, loss_mask and optionally segment_ids [B, T]; setting: an objectives.Setting;
  extra_BxT: what setting.needs names besides "segments" (old_logp, ref_logp, token_key);
  ref_hidden_BxTxD, ref_w_DxV: the reference model's, when a statistic compares whole
  distributions with it (asft): its chunk logits are formed in the head's loop;
  current_old_logp: the policy snapshot is the current parameters (True: one update per batch;
  a traced boolean: the first of K updates), old_logp = sg(logp) of this forward;
  denominators: as in objectives.objective_loss. A sequence-gated objective (dft_seq, iw_sft)
  first takes logp from a forward-only pass of the head (one more matmul a chunk) for its gates.
  Only for objectives the fused head fits (fused_head_fits).
  """
  if not fused_head_fits(setting):
    raise ConfigError(f"objective.name={setting.name!r}: the fused LM head takes statistics "
                      "with a closed-form gradient; lm_head.token_stats takes it")
  extra_BxT = dict(extra_BxT or {})
  if setting.sequence_gated:
    current = forward_logp((hidden_BxTxD, w_DxV), batch["targets"], chunk_size)
    gated = objectives.with_sequence_gates({**extra_BxT, "logp": current}, batch, setting)
    extra_BxT = {k: v for k, v in gated.items() if k != "logp"}

  def with_old_logp(values):
    if current_old_logp is False:
      return values
    current = jax.lax.stop_gradient(values["logp"])
    if "old_logp" in values:  # a traced flag: is this update's snapshot the current policy?
      current = jnp.where(current_old_logp, current, values["old_logp"])
    return {**values, "old_logp": current}

  mask, segment_ids = batch["loss_mask"], batch.get("segment_ids")
  if denominators is None:
    denominators = objectives.global_denominators(mask, segment_ids)
  weights_BxT = objectives.token_weights(mask, setting.aggregation, segment_ids=segment_ids,
                                         norm_constant=setting.norm_constant, **denominators)
  loss, stats_BxT = lm_head.fused_loss(
      hidden_BxTxD, w_DxV, batch["targets"],
      per_token_loss=lambda values: sum(
          objectives.per_token_terms(with_old_logp(values), {}, setting).values()),
      weights_BxT=weights_BxT, stats=setting.stats, extra_BxT=extra_BxT,
      ref_hidden_BxTxD=ref_hidden_BxTxD, ref_w_DxV=ref_w_DxV, chunk_size=chunk_size,
      compute_dtype=compute_dtype)
  _, metrics = objectives.objective_loss(with_old_logp({**stats_BxT, **extra_BxT}), batch,
                                         setting, denominators=denominators, sources=sources)
  return loss, dict(metrics, loss=loss)


def fused_head_fits(setting):
  """Whether the fused head takes all the objective's statistics (each a gate or with a
  closed-form gradient): then model.lm_head_impl='fused' runs it; otherwise the checkpointed head
  does."""
  return all(lm_head.fused_capable(stat) for stat in setting.stats)


def make_train_step(graphdef, tx, config, mesh, state_shardings, frozen_shardings, *, setting,
                    sources=()):
  """The jitted `train_step(state, batch, frozen) -> (state, metrics)` of `step_function`, state
  donated, `batch` [G, T] sharded over the mesh's (data, fsdp) axes."""
  return jax.jit(
      step_function(graphdef, tx, config, setting=setting, sources=sources,
                    lora=frozen_shardings.base is not None),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), frozen_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def step_function(graphdef, tx, config, *, setting, lora, sources=()):
  """`train_step(state, batch, frozen) -> (state, metrics)`, not jitted (make_train_step jits it
  over the mesh; the study vmaps it over a population of runs).

  `setting`: the objective, resolved (objectives.validate(config.objective) at the config edge).
  `batch` holds the global batch [G, T]; `frozen` (init_train_state's Frozen) is read, never
  updated: with LoRA (lora=True) the frozen base, whose adapters-off model is then the reference
  (KL anchor, reference statistics); else frozen.reference, a copy of the starting parameters,
  when the objective needs one. `sources`: a mixture's source names (data.mixture.source_names):
  the batch then holds source_ids and the metrics each source's tokens and mean loss
  (source/NAME/...).
  """
  t, chunk = config.train, config.model.lm_head_chunk
  needs = setting.needs
  fused = config.model.lm_head_impl == "fused" and fused_head_fits(setting)
  # The snapshot pi_old is the policy before the first of the K = train.minibatches updates: for
  # that update (K = 1: every update) old_logp = sg(logp) of its own forward; for the others one
  # forward-only pass with the snapshot's parameters, before the updates (with LoRA the snapshot
  # is a copy of the adapters only).
  snapshot_forward = "old_logp" in needs and t.minibatches > 1
  max_update_ratio = config.optimizer.get("max_update_ratio", 0.0)

  target_logp = lambda hidden_and_w, mb: forward_logp(hidden_and_w, mb["targets"], chunk)

  def objective(mb, hidden_BxTxD, w_DxV, old_logp_BxT, is_first, ref, denominators):
    inputs = {}
    if snapshot_forward:
      inputs["old_logp"] = old_logp_BxT
    if "ref_logp" in needs:  # the reference's forward, or precomputed with the data
      inputs["ref_logp"] = (mb["ref_logp"] if setting.ref_logp == "precomputed"
                            else target_logp(ref, mb))
    if "token_key" in needs:
      inputs["token_key"] = mb["token_key"]
    if fused:
      current = is_first if snapshot_forward else "old_logp" in needs
      distributions = {}
      if lm_head.needs_reference(setting.stats):
        distributions = dict(zip(("ref_hidden_BxTxD", "ref_w_DxV"), ref))
      return objective_loss_fused(
          hidden_BxTxD, w_DxV, mb, setting, extra_BxT=inputs, current_old_logp=current,
          denominators=denominators, chunk_size=chunk, sources=sources, **distributions)
    stats = head_token_stats(hidden_BxTxD, w_DxV, mb, chunk, setting.stats, ref, inputs)
    if "old_logp" in needs:
      current = jax.lax.stop_gradient(stats["logp"])
      inputs["old_logp"] = (jnp.where(is_first, current, old_logp_BxT) if snapshot_forward
                            else current)
    return objectives.objective_loss({**stats, **inputs}, mb, setting, denominators=denominators,
                                     sources=sources)

  def microbatch_loss(params, frozen, mb, old_logp_BxT, is_first, denominators):
    model = merge_model(graphdef, params, frozen.base)
    ref = (reference_hidden_and_head(graphdef, params, frozen, mb) if setting.needs_reference
           else None)
    hidden_BxTxD, router_loss = model.hidden_states_and_router_loss(
        mb["tokens"], positions_BxT=mb["positions"], segment_ids_BxT=mb["segment_ids"])
    loss, metrics = objective(mb, hidden_BxTxD, model.head_weight(), old_logp_BxT, is_first, ref,
                              denominators)
    if not model.config.num_experts:
      return loss, metrics
    return with_router_loss(loss, metrics, router_loss, model.router_aux_loss_coef,
                            1.0 / t.microbatches)

  grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

  def train_step(state, batch, frozen):
    if "token_key" in needs:
      batch = dict(batch, token_key=token_keys(t.seed, state.step, batch["tokens"].shape))
    split = jax.tree.map(
        lambda v: split_rows(split_rows(v, t.minibatches), t.microbatches, axis=1), batch)
    old_logp = None
    if snapshot_forward:  # pi_old's logp for updates 2..K, forward only; update 1 reads its own
      snapshot = lambda mb: target_logp(
          hidden_and_head(merge_model(graphdef, state.params, frozen.base), mb), mb)
      later = jax.lax.map(lambda mini: jax.lax.map(snapshot, mini),
                          jax.tree.map(lambda v: v[1:], split))
      old_logp = jnp.concatenate([jnp.zeros_like(later[:1]), later])
    first_update = jnp.arange(t.minibatches) == 0

    def minibatch_update(carry, xs):
      params, opt_state = carry
      micro, old, is_first = xs  # [microbatches, rows, T]
      rows = merge_leading(micro)
      denominators = objectives.global_denominators(rows["loss_mask"], rows["segment_ids"])
      loss_and_grads = lambda mb, o: grad_fn(params, frozen, mb, o, is_first, denominators)
      first = jax.tree.map(lambda v: v[0], (micro, old))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(loss_and_grads, *first))
      ((loss, mets), grads), _ = jax.lax.scan(
          lambda acc, x: (tree_add(acc, loss_and_grads(*x)), None), zeros, (micro, old))
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      nll = mets["tok/nll"] / jnp.maximum(mets["num_tokens"], 1.0)  # FINCH's batch loss
      updates, new_opt_state = tx.update(grads, opt_state, params, loss=nll)
      new_params = optax.apply_updates(params, updates)
      update_norm = optax.tree.norm(updates)  # the step's size: is an objective a smaller step?
      update_ratio = update_norm / optax.tree.norm(params)  # ||dtheta|| / ||theta||
      oversized = finite & (update_ratio > max_update_ratio if max_update_ratio else False)
      keep = finite & ~oversized
      keep_if_ok = lambda new, prev: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, prev)
      carry = (keep_if_ok(new_params, params), keep_if_ok(new_opt_state, opt_state))
      return carry, dict(mets, loss=loss, grad_norm=grad_norm, update_ratio=update_ratio,
                         update_norm=jnp.where(keep, update_norm, 0.0),
                         skipped=1.0 - keep.astype(jnp.float32),
                         oversized=oversized.astype(jnp.float32))

    (params, opt_state), per_update = jax.lax.scan(
        minibatch_update, (state.params, state.opt_state), (split, old_logp, first_update))
    summed = jax.tree.map(lambda v: v.sum(0), per_update)
    out = objectives.finalize_metrics(summed)
    if "router_aux_loss" in out:
      out["router_aux_loss"] /= t.minibatches
    out.update(loss=summed["loss"] / t.minibatches, grad_norm=summed["grad_norm"] / t.minibatches,
               update_norm=summed["update_norm"] / t.minibatches,
               update_ratio=summed["update_ratio"] / t.minibatches,
               skipped=summed["skipped"], tokens=(batch["segment_ids"] > 0).sum(),
               loss_tokens=batch["loss_mask"].sum())
    for rate in adaptive_rates(opt_state):  # FINCH's: data-dependent, reported every step
      out["learning_rate"] = rate
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  return train_step
