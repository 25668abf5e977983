"""Fused LM head: hidden states -> per-token statistics (logp, entropy, ...), chunked over tokens.

Two heads, neither of which holds the full [tokens, vocab] logits (151,936 x 16k tokens is ~9 GiB
in bf16); both scan over chunks of tokens:

  token_stats  each chunk's logits -> statistics under `jax.checkpoint`: the forward keeps only
               the [B, T] statistics and autodiff's backward recomputes one chunk's logits at a
               time (4 matmuls a chunk). Any loss of the statistics, also sequence-level ones.
  fused_loss   a loss that is a weighted sum of a per-token function of the statistics: each
               chunk's forward also forms d loss / d logits (closed forms, `Statistic.logits_grad`)
               and the two gradient matmuls (3 matmuls a chunk, no recomputation); the backward
               only scales the stored gradients. What fused linear-cross-entropy kernels do, for
               every per-token objective (the train step's `objective_loss_fused` wires an
               objective to it).

The matmul runs in the compute dtype with float32 accumulation; softmax math is float32.

Chunks cut the time axis, not the flattened B*T: every chunk holds all B rows for
`chunk_size // B` positions, so a batch sharded over rows (data parallelism) stays local to each
device through the scan.

A statistic is a `Statistic`: a named function of one chunk's float32 log-softmax (or logits) and
targets, with its closed-form gradient when the fused head should take it. The head knows only the
generic ones (LOGP, ENTROPY, KL_FROM_REF; `STATISTICS` names them for callers that pass names);
an objective's own statistics, gates and closed-form gradients are declared by its record
(dft_jax/objectives.py) and applied here as given. The returned dicts are keyed by
`Statistic.name`. A statistic without `gradient` is computed under stop_gradient (a gate: this
also spares its backward in the recomputed chunks). A statistic may read per-token side inputs
(`Statistic.side`): "reference", the reference model's log-probs of the chunk (from the
`ref_hidden_BxTxD`, `ref_w_DxV` passed to the head; no gradient flows into them), or any per-token
array of `extra_BxT` (e.g. "token_key", a PRNG key per token for sampling statistics).
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dft_jax.errors import ConfigError

# top_k_values' first stage: the maxima of blocks of this many vocabulary entries.
TOPK_BLOCK = 128

# ---------------------------------------------------------------------------------------------
# Statistics of a next-token distribution, from full float32 log-probs logp_xV (x: any leading
# shape). These are also the reference path (full logits) the tests compare the chunks with.


def log_softmax(logits_xV):
  """log softmax over the last axis, in float32 (stable: max-shifted)."""
  return jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)


def target_log_prob(logp_xV, targets_x):
  """log p(target). Out-of-range targets (e.g. -100 on padding) are clipped into the vocabulary:
  finite, meaningless, and must be masked."""
  targets_x = jnp.clip(targets_x, 0, logp_xV.shape[-1] - 1)
  return jnp.take_along_axis(logp_xV, targets_x[..., None], axis=-1)[..., 0]


def entropy(logp_xV):
  """H = -sum_v p_v log p_v of the full next-token distribution (logits must be finite)."""
  return -jnp.sum(jnp.exp(logp_xV) * logp_xV, axis=-1)


def top_k_values(x_xV, k, method="blocks"):
  """The k largest entries along the last axis, in descending order: exactly
  jax.lax.top_k(x_xV, k)[0] (method="lax" is that call).

  method="blocks" (exact, cheaper over a large vocabulary): the maximum of every block of
  TOPK_BLOCK entries (one pass), the k blocks with the largest maxima, and lax.top_k over those
  k blocks' entries only. Every one of the k largest entries lies in one of those blocks: an entry
  in another block has k block maxima at least as large in other blocks. EAFT's top-20 over
  151,936 logits then sorts 1,187 maxima and 2,560 entries a row instead of 151,936.
  """
  if method == "lax":
    return jax.lax.top_k(x_xV, k)[0]
  vocab = x_xV.shape[-1]
  num_blocks = -(-vocab // TOPK_BLOCK)
  if num_blocks <= k:
    return jax.lax.top_k(x_xV, k)[0]
  pad = [(0, 0)] * (x_xV.ndim - 1) + [(0, num_blocks * TOPK_BLOCK - vocab)]
  blocks_xBxE = jnp.pad(x_xV, pad, constant_values=-jnp.inf).reshape(
      *x_xV.shape[:-1], num_blocks, TOPK_BLOCK)
  _, best_xK = jax.lax.top_k(jnp.max(blocks_xBxE, axis=-1), k)
  candidates_xKxE = jnp.take_along_axis(blocks_xBxE, best_xK[..., None], axis=-2)
  return jax.lax.top_k(candidates_xKxE.reshape(*x_xV.shape[:-1], k * TOPK_BLOCK), k)[0]


def topk_entropy(scores_xV, k):
  """Entropy of the softmax over the k largest logits (or log-probs: the same up to a shift).
  float32 whatever the scores' dtype."""
  top_xK = top_k_values(scores_xV, k).astype(jnp.float32)
  return entropy(jax.nn.log_softmax(top_xK, axis=-1))


def renyi2_entropy(logp_xV):
  """Renyi-2 (collision) entropy H2 = -log sum_v p_v**2, in [0, log V]."""
  return -jax.nn.logsumexp(2.0 * logp_xV, axis=-1)


def kl_from_ref(logp_xV, ref_logp_xV):
  """KL(ref || model) = sum_v p_ref,v (log p_ref,v - log p_v) over the full vocabulary, with the
  reference's log-probs held fixed; d/dlogits = softmax - p_ref."""
  ref_logp_xV = jax.lax.stop_gradient(ref_logp_xV)
  return jnp.sum(jnp.exp(ref_logp_xV) * (ref_logp_xV - logp_xV), axis=-1)


def token_uniforms(token_key_x, num):
  """[x, num] float32 uniforms in [0, 1) from per-token PRNG keys (token_key_x: [x, 2] uint32 key
  data): each token's draws depend on its key alone."""
  keys = jax.random.wrap_key_data(token_key_x.reshape(-1, token_key_x.shape[-1]))
  draws = jax.vmap(lambda key: jax.random.uniform(key, (num,), jnp.float32))(keys)
  return draws.reshape(*token_key_x.shape[:-1], num)


def sample_tokens(logp_xV, uniforms_xK, temperature=1.0):
  """[x, K] token ids drawn from softmax(logp / temperature) by inverse CDF, one per uniform.

  Two levels, so that nothing longer than a block is summed in sequence: the probability mass of
  each block of TOPK_BLOCK vocabulary entries (one pass over the distribution), the block where
  u * total falls in the cumulative block masses, then the entry within that block. Exact up to
  float32 rounding of the masses; a zero-probability entry is never drawn."""
  vocab = logp_xV.shape[-1]
  num_blocks = -(-vocab // TOPK_BLOCK)
  q_xV = jax.nn.softmax(logp_xV.astype(jnp.float32) / temperature, axis=-1)
  pad = [(0, 0)] * (q_xV.ndim - 1) + [(0, num_blocks * TOPK_BLOCK - vocab)]
  blocks_xBxE = jnp.pad(q_xV, pad).reshape(*q_xV.shape[:-1], num_blocks, TOPK_BLOCK)
  mass_xB = blocks_xBxE.sum(-1)
  cum_xB = jnp.cumsum(mass_xB, axis=-1)
  point_xK = uniforms_xK * cum_xB[..., -1:]
  block_xK = jnp.minimum(jnp.sum(cum_xB[..., None, :] <= point_xK[..., None], axis=-1),
                         num_blocks - 1)
  before_xK = jnp.take_along_axis(cum_xB - mass_xB, block_xK, axis=-1)
  entries_xKxE = jnp.take_along_axis(blocks_xBxE, block_xK[..., None], axis=-2)
  inside_xKxE = jnp.cumsum(entries_xKxE, axis=-1)
  last_xK = jnp.max(jnp.where(entries_xKxE > 0, jnp.arange(TOPK_BLOCK), 0), axis=-1)
  entry_xK = jnp.minimum(
      jnp.sum(inside_xKxE <= (point_xK - before_xK)[..., None], axis=-1), last_xK)
  return block_xK * TOPK_BLOCK + entry_xK


# d statistic / d logits of one token, [x, V] (fused_loss forms d loss / d logits from them).


def onehot(targets_x, vocab):
  """float32 one-hot of the targets, clipped into the vocabulary as target_log_prob clips them."""
  targets_x = jnp.clip(targets_x, 0, vocab - 1)
  return (jnp.arange(vocab) == targets_x[..., None]).astype(jnp.float32)


def target_log_prob_grad(logp_xV, targets_x):
  """d log p_y / d z = onehot(y) - softmax(z)."""
  return onehot(targets_x, logp_xV.shape[-1]) - jnp.exp(logp_xV)


def entropy_grad(logp_xV, entropy_x):
  """d H / d z = -p (log p + H)."""
  return -jnp.exp(logp_xV) * (logp_xV + entropy_x[..., None])


@dataclasses.dataclass(frozen=True)
class Statistic:
  """A per-token statistic of the next-token distribution, as the heads compute it chunk by chunk.

  name: its key in the returned dicts, and its identity (two statistics with one name are one:
    a name carries the parameters, e.g. "topk_entropy:20").
  fn(source_xV, targets_x, **side) -> x: source is the chunk's float32 log-softmax, or its logits
    in the compute dtype when from_logits (a statistic invariant to a shift of the logits whose
    op, e.g. top_k, reads a materialised array).
  gradient: False computes it under stop_gradient (a gate).
  logits_grad(logp_xV, targets_x, value_x, **side) -> d value / d logits [x, V]: the closed form
    fused_loss uses for a statistic with `gradient` (None: fused_loss does not take it).
  side: per-token inputs fn reads besides the distribution: "reference" (the reference model's
    log-softmax of the chunk) or names of per-token arrays of the heads' extra_BxT.
  min_vocab: the smallest vocabulary it is defined for (e.g. k of a top-k), checked when traced.
  """
  name: str
  fn: Callable = dataclasses.field(compare=False, repr=False)
  gradient: bool = dataclasses.field(default=True, compare=False)
  logits_grad: Callable | None = dataclasses.field(default=None, compare=False, repr=False)
  from_logits: bool = dataclasses.field(default=False, compare=False)
  side: tuple = dataclasses.field(default=(), compare=False)
  min_vocab: int = dataclasses.field(default=0, compare=False)

  @property
  def needs_reference(self):
    return "reference" in self.side


LOGP = Statistic("logp", lambda logp_xV, targets_x: target_log_prob(logp_xV, targets_x),
                 logits_grad=lambda logp_xV, targets_x, _: target_log_prob_grad(logp_xV,
                                                                                targets_x))
ENTROPY = Statistic("entropy", lambda logp_xV, _: entropy(logp_xV),
                    logits_grad=lambda logp_xV, _, entropy_x: entropy_grad(logp_xV, entropy_x))
KL_FROM_REF = Statistic(
    "kl_from_ref", lambda logp_xV, _, *, reference: kl_from_ref(logp_xV, reference),
    logits_grad=lambda logp_xV, _, __, *, reference: jnp.exp(logp_xV) - jnp.exp(reference),
    side=("reference",))
# The generic statistics by name, for callers that name them ("logp", "entropy", "kl_from_ref").
STATISTICS = {s.name: s for s in (LOGP, ENTROPY, KL_FROM_REF)}
DEFAULT_STATS = (LOGP, ENTROPY)


def resolve(stats):
  """A tuple of Statistic from Statistics or names of STATISTICS; ConfigError if it is not."""
  if isinstance(stats, (str, Statistic)) or not isinstance(stats, (tuple, list)) or not stats:
    raise ConfigError(f"lm_head stats={stats!r}: allowed: a non-empty tuple of statistics")
  out = []
  for stat in stats:
    if not isinstance(stat, Statistic) and stat not in STATISTICS:
      raise ConfigError(f"lm_head statistic {stat!r} is unknown; by name: "
                        f"{', '.join(STATISTICS)} (an objective's own come from its record)")
    out.append(stat if isinstance(stat, Statistic) else STATISTICS[stat])
  return tuple(dict.fromkeys(out))


def needs_reference(stats):
  """Whether any of `stats` compares with a reference model."""
  return any(stat.needs_reference for stat in stats)


def _side(ref_logits_xV, extra_x):
  """The per-token side inputs of one chunk: extra_x, and "reference" (the reference's
  log-softmax, no gradient) when the reference's logits are given."""
  side_x = dict(extra_x or {})
  if ref_logits_xV is not None:
    side_x["reference"] = jax.lax.stop_gradient(log_softmax(ref_logits_xV))
  return side_x


def _statistics(logits_xV, targets_x, stats, side_x):
  logp_xV = log_softmax(logits_xV)
  out = {}
  for stat in stats:
    source_xV = logits_xV if stat.from_logits else logp_xV
    source_xV = source_xV if stat.gradient else jax.lax.stop_gradient(source_xV)
    out[stat.name] = stat.fn(source_xV, targets_x, **{n: side_x[n] for n in stat.side})
  return out


def _logits(hidden_xD, w_DxV, dtype=jnp.float32):
  """hidden @ w in the operands' dtype, accumulated in float32, returned in `dtype`."""
  return jnp.einsum("...d,dv->...v", hidden_xD, w_DxV, preferred_element_type=dtype)


def _check_stats(stats, vocab_size, ref_hidden_BxTxD, ref_w_DxV, extra_BxT):
  """ConfigError for statistics this head cannot compute (shapes are known when it is traced)."""
  for stat in stats:
    if vocab_size < stat.min_vocab:
      raise ConfigError(f"lm_head statistic {stat.name!r} needs a vocabulary of at least "
                        f"{stat.min_vocab} entries, the vocabulary size ({vocab_size}) is "
                        "smaller; the objective's hyperparameters choose it")
    missing = [name for name in stat.side if name != "reference" and name not in extra_BxT]
    if missing:
      raise ConfigError(f"lm_head statistic {stat.name!r} reads the per-token input "
                        f"{missing[0]!r}: pass it in extra_BxT")
  if needs_reference(stats) and (ref_hidden_BxTxD is None or ref_w_DxV is None):
    raise ConfigError(f"lm_head statistics {[s.name for s in stats]} compare with a reference "
                      "model: pass its ref_hidden_BxTxD and ref_w_DxV")


def token_stats_naive(hidden_BxTxD, w_DxV, targets_BxT, *, compute_dtype=None,
                      stats=DEFAULT_STATS, ref_hidden_BxTxD=None, ref_w_DxV=None, extra_BxT=None):
  """Reference path: the same statistics from the full [B, T, V] logits."""
  stats, extra_BxT = resolve(stats), dict(extra_BxT or {})
  _check_stats(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV, extra_BxT)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  logits_BxTxV = _logits(hidden_BxTxD.astype(dtype), w_DxV.astype(dtype))
  ref_logits_BxTxV = None
  if needs_reference(stats):
    ref_logits_BxTxV = _logits(ref_hidden_BxTxD.astype(dtype), ref_w_DxV.astype(dtype))
  return _statistics(logits_BxTxV, targets_BxT, stats, _side(ref_logits_BxTxV, extra_BxT))


def _chunking(shape, chunk_size):
  """(split, merge) for chunks of the time axis of a [B, T, ...] batch: split -> [num_chunks, B,
  steps, ...] (steps = max(1, chunk_size // B) positions; T zero-padded to num_chunks * steps),
  merge -> [B, T, ...] back."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ConfigError(f"lm_head chunk_size={chunk_size!r}: allowed: an integer >= 1")
  batch, seq_len = shape[:2]
  steps = max(1, min(seq_len, chunk_size // batch))
  num_chunks = -(-seq_len // steps)
  pad = num_chunks * steps - seq_len

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, num_chunks, steps, *x.shape[2:]).swapaxes(0, 1)

  def merge(x):
    return x.swapaxes(0, 1).reshape(batch, num_chunks * steps, *x.shape[3:])[:, :seq_len]
  return split, merge


def token_stats(hidden_BxTxD, w_DxV, targets_BxT, *, chunk_size=1024, compute_dtype=None,
                stats=DEFAULT_STATS, ref_hidden_BxTxD=None, ref_w_DxV=None, extra_BxT=None):
  """Per-token statistics {name: float32 [B, T]} without materialising the full logits.

  hidden_BxTxD: final hidden states (after the final norm); w_DxV: LM head weight;
  targets_BxT: next-token ids (out-of-range ids, e.g. -100, give finite values; mask them).
  chunk_size: tokens per chunk of the global batch, B rows x max(1, chunk_size // B) positions
    (T is padded up to a multiple of the latter; a chunk holds at least B tokens).
  compute_dtype: matmul dtype (default: hidden's); accumulation and softmax are float32.
  stats: Statistics (or names of STATISTICS); an objective's come from its resolved setting
    (objectives.Setting.stats).
  ref_hidden_BxTxD, ref_w_DxV: the reference model's, for statistics that need it (kl_from_ref).
  extra_BxT: {name: [B, T, ...]} per-token side inputs of the statistics (Statistic.side).
  Gradients flow to hidden and w through every statistic but the gate statistics (module doc).
  """
  stats, extra_BxT = resolve(stats), dict(extra_BxT or {})
  _check_stats(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV, extra_BxT)
  split, merge = _chunking(hidden_BxTxD.shape, chunk_size)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  with_ref = needs_reference(stats)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_stats(weights, hidden_BxCxD, targets_BxC, ref_hidden_BxCxD, extra_BxC):
    w_DxV, ref_w_DxV = weights
    ref_logits = _logits(ref_hidden_BxCxD, ref_w_DxV) if with_ref else None
    return _statistics(_logits(hidden_BxCxD, w_DxV), targets_BxC, stats,
                       _side(ref_logits, extra_BxC))

  weights = (w_DxV.astype(dtype), jax.lax.stop_gradient(ref_w_DxV).astype(dtype) if with_ref
             else None)
  ref_chunks = (split(jax.lax.stop_gradient(ref_hidden_BxTxD).astype(dtype)) if with_ref
                else None)
  extra_chunks = {k: split(jax.lax.stop_gradient(v)) for k, v in extra_BxT.items()}
  scan_body = lambda carry, xs: (carry, chunk_stats(weights, *xs))
  _, out = jax.lax.scan(scan_body, None, (split(hidden_BxTxD.astype(dtype)), split(targets_BxT),
                                          ref_chunks, extra_chunks))
  return {name: merge(v) for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The head whose forward pass forms the gradient.


def fused_capable(stat):
  """Whether fused_loss takes the statistic: a gate, or one with a closed-form logits_grad."""
  return not stat.gradient or stat.logits_grad is not None


def _check_fused(stats):
  for stat in stats:
    if not fused_capable(stat):
      raise ConfigError(f"lm_head statistic {stat.name!r} is not available in fused_loss (it "
                        "has no logits_grad); token_stats has it")


def _read_with_gradient(fn, values, names):
  """Those of `names` whose values fn reads other than under stop_gradient (the others get no
  gradient through fn), read off fn's jaxpr for the arguments `values` (a dict)."""
  jaxpr = jax.make_jaxpr(fn)(values).jaxpr
  var_of = dict(zip(sorted(values), jaxpr.invars))  # a dict's leaves come in sorted key order
  read = {id(v) for eqn in jaxpr.eqns if eqn.primitive.name != "stop_gradient"
          for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return tuple(name for name in names if id(var_of[name]) in read)


def _logits_cotangent(logits_xV, targets_x, stats, stats_x, cotangents_x, side_x):
  """d loss / d logits = sum_s (d loss / d s) (d s / d logits) over the statistics s with a
  gradient (cotangents_x: {name: d loss / d s per token}), float32."""
  logp_xV = log_softmax(logits_xV)
  by_name = {stat.name: stat for stat in stats}
  dlogits_xV = jnp.zeros(logits_xV.shape, jnp.float32)
  for name, cotangent_x in cotangents_x.items():
    stat = by_name[name]
    jacobian_xV = stat.logits_grad(logp_xV, targets_x, stats_x[name],
                                   **{n: side_x[n] for n in stat.side})
    dlogits_xV = dlogits_xV + cotangent_x[..., None] * jacobian_xV
  return dlogits_xV


def fused_loss(hidden_BxTxD, w_DxV, targets_BxT, *, per_token_loss, weights_BxT,
               stats=DEFAULT_STATS, extra_BxT=None, ref_hidden_BxTxD=None, ref_w_DxV=None,
               chunk_size=1024, compute_dtype=None):
  """(loss, stats): loss = sum_t [weights_t > 0] weights_t * per_token_loss(values)_t, a float32
  scalar whose gradient w.r.t. hidden and w is formed in the forward pass, and the per-token
  statistics {name: float32 [B, T]} (values only: no gradient flows through them).

  Chunk by chunk (chunks as in token_stats), the forward computes the logits (compute dtype,
  float32 accumulation), the statistics (float32), g_s = d loss / d s per token by jax.vjp of
  per_token_loss, dlogits = sum_s g_s * d s / d logits (Statistic.logits_grad; cast to the compute
  dtype), and accumulates dW += h^T dlogits (float32) and dh = dlogits W^T: three matmuls a chunk,
  a fourth (forward only) for the reference's logits when a statistic compares with it.
  The backward pass (jax.custom_vjp) scales dh and dW by the loss's cotangent.

  per_token_loss: values -> float32 per-token loss, values = the statistics and extra_BxT as
    {name: [B, C]} of one chunk. Elementwise over tokens (a token's loss reads only its own
    values: no sums over the sequence). Gate statistics (Statistic.gradient False), extra values
    and traced values it closes over get no gradient (differentiating w.r.t. the last is an
    error: pass per-token inputs in extra_BxT).
  weights_BxT: per-token weights (objectives.token_weights); tokens with weight <= 0 contribute
    exactly 0 to the loss and its gradient, even where per_token_loss is inf or NaN.
  stats: Statistics (or names of STATISTICS) the fused head takes (fused_capable): gates, or
    with a closed-form logits_grad.
  extra_BxT: {name: [B, T, ...]} per-token inputs without gradient (old_logp, ref_logp, the side
    inputs of the statistics, ...).
  ref_hidden_BxTxD, ref_w_DxV: the reference model's, for statistics that compare with it
    (kl_from_ref): its chunk's logits are formed beside the model's, without gradient, never
    kept.
  chunk_size, compute_dtype: as in token_stats. The logits are held in the compute dtype (bf16
    logits with float32 softmax statistics, as fused linear-cross-entropy kernels do).
  """
  stats, extra_BxT = resolve(stats), dict(extra_BxT or {})
  _check_fused(stats)
  _check_stats(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV, extra_BxT)
  split, merge = _chunking(hidden_BxTxD.shape, chunk_size)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  hidden_dtype, w_dtype = hidden_BxTxD.dtype, w_DxV.dtype

  def scan_chunks(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, reference,
                  form_gradient):
    """(loss, stats_BxT, dh_BxTxD, dw_DxV); the last two None unless form_gradient."""
    w_c = w_DxV.astype(dtype)
    ref_w_c = None if reference is None else reference[1].astype(dtype)

    def chunk(carry, xs):
      loss, dw_DxV = carry
      hidden_BxCxD, targets_BxC, weights_BxC, extra_BxC, ref_hidden_BxCxD = xs
      logits_BxCxV = _logits(hidden_BxCxD, w_c, dtype)
      ref_logits = None if reference is None else _logits(ref_hidden_BxCxD, ref_w_c)
      side_BxC = _side(ref_logits, extra_BxC)
      stats_BxC = _statistics(logits_BxCxV, targets_BxC, stats, side_BxC)

      def token_losses(differentiable):
        values = {**stats_BxC, **differentiable, **extra_BxC}
        per_token = per_token_loss(values).astype(jnp.float32)
        return jnp.where(weights_BxC > 0, per_token, 0.0) * weights_BxC

      if not form_gradient:
        return (loss + jnp.sum(token_losses({})), None), (stats_BxC, None)
      # the statistics with a gradient that the loss reads: only these enter dlogits
      with_gradient = _read_with_gradient(per_token_loss, {**stats_BxC, **extra_BxC},
                                          [s.name for s in stats if s.gradient])
      losses_BxC, vjp = jax.vjp(token_losses, {n: stats_BxC[n] for n in with_gradient})
      cotangents = jax.tree.map(lambda g: jnp.where(weights_BxC > 0, g, 0.0),
                                vjp(jnp.ones_like(losses_BxC))[0])
      dlogits_BxCxV = _logits_cotangent(logits_BxCxV, targets_BxC, stats, stats_BxC,
                                        cotangents, side_BxC).astype(dtype)
      dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", hidden_BxCxD, dlogits_BxCxV,
                                   preferred_element_type=jnp.float32)
      dh_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, w_c,
                            preferred_element_type=jnp.float32).astype(hidden_dtype)
      return (loss + jnp.sum(losses_BxC), dw_DxV), (stats_BxC, dh_BxCxD)

    dw_DxV = jnp.zeros(w_DxV.shape, jnp.float32) if form_gradient else None
    xs = (split(hidden_BxTxD.astype(dtype)), split(targets_BxT), split(weights_BxT),
          {k: split(v) for k, v in extra_BxT.items()},
          None if reference is None else split(reference[0].astype(dtype)))
    (loss, dw_DxV), (stats_chunks, dh_chunks) = jax.lax.scan(chunk, (jnp.float32(0.0), dw_DxV),
                                                             xs)
    stats_BxT = {name: merge(v) for name, v in stats_chunks.items()}
    return loss, stats_BxT, None if dh_chunks is None else merge(dh_chunks), dw_DxV

  @jax.custom_vjp
  def head(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, reference):
    return scan_chunks(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, reference,
                       False)[:2]

  def head_forward(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, reference):
    loss, stats_BxT, dh_BxTxD, dw_DxV = scan_chunks(hidden_BxTxD, w_DxV, targets_BxT,
                                                    weights_BxT, extra_BxT, reference, True)
    return (loss, stats_BxT), (dh_BxTxD, dw_DxV)

  def head_backward(gradients, cotangents):
    dh_BxTxD, dw_DxV = gradients
    g = cotangents[0]  # the statistics' cotangents are zero: they are returned without gradient
    return ((g * dh_BxTxD.astype(jnp.float32)).astype(hidden_dtype),
            (g * dw_DxV).astype(w_dtype), None, None, None, None)

  head.defvjp(head_forward, head_backward)
  extra_BxT = {k: jax.lax.stop_gradient(v) for k, v in extra_BxT.items()}
  reference = None
  if needs_reference(stats):
    reference = jax.lax.stop_gradient((ref_hidden_BxTxD, ref_w_DxV))
  loss, stats_BxT = head(hidden_BxTxD, w_DxV, targets_BxT,
                         jax.lax.stop_gradient(jnp.asarray(weights_BxT, jnp.float32)), extra_BxT,
                         reference)
  return loss, jax.lax.stop_gradient(stats_BxT)
