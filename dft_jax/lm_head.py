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

Statistics are named functions of one chunk's float32 log-softmax and targets (STATISTICS),
generic over objectives (an objective names the ones it needs). A name may carry parameters
after colons: "topk_entropy:20" (k), "gem_cross_entropy:0.7:linear" (beta, h); the returned dict
is keyed by the names as given. Gate statistics (topk_entropy, renyi2_entropy, gem_mass) are
computed under stop_gradient: objectives use them only as stop-gradient gates, and this spares
their backward (top_k, softmax) in the recomputed chunks. Statistics marked `needs_ref` compare the
model's distribution with a reference model's, whose final hidden states and head weight are then
passed as `ref_hidden_BxTxD`, `ref_w_DxV` (no gradient flows into them; token_stats only).
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dft_jax.errors import ConfigError

# Scale of the logit gap in GEM's h = logsigmoid weights sigmoid(0.01 (z_v - z_y)): a constant of
# the official code (liziniu/GEM, sft_trainer.py gem_loss), not one of its options.
GEM_LOGSIGMOID_SCALE = 0.01
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
  """Entropy of the softmax over the k largest logits (or log-probs: the same up to a shift):
  EAFT's gate statistic, k = 20 in the reference implementations (which take it from the logits,
  no_grad). float32 whatever the scores' dtype."""
  top_xK = top_k_values(scores_xV, k).astype(jnp.float32)
  return entropy(jax.nn.log_softmax(top_xK, axis=-1))


def renyi2_entropy(logp_xV):
  """Renyi-2 (collision) entropy H2 = -log sum_v p_v**2, in [0, log V]; DEFT's gate statistic."""
  return -jax.nn.logsumexp(2.0 * logp_xV, axis=-1)


def gem_weights(logp_xV, targets_x, beta, h):
  """GEM's per-class weights sg(a_v) = sg(q_v * w_v) (arXiv 2408.16673, official code):
  q = softmax(logits / beta) (= softmax(logp / beta)); w_v = 1 (h=linear) or
  sigmoid(0.01 * (z_v - z_y)) (h=logsigmoid; z_v - z_y = logp_v - logp_y, y the target)."""
  a_xV = jax.nn.softmax(logp_xV / beta, axis=-1)
  if h == "logsigmoid":
    gap_xV = logp_xV - target_log_prob(logp_xV, targets_x)[..., None]
    a_xV = a_xV * jax.nn.sigmoid(GEM_LOGSIGMOID_SCALE * gap_xV)
  return jax.lax.stop_gradient(a_xV)


def gem_cross_entropy(logp_xV, targets_x, beta, h):
  """X = -sum_v sg(a_v) log p_v (gem_weights): cross-entropy of the model against its own
  tempered distribution; differentiable in logp (d X / d logits = A * softmax - a)."""
  return -jnp.sum(gem_weights(logp_xV, targets_x, beta, h) * logp_xV, axis=-1)


def gem_mass(logp_xV, targets_x, beta, h):
  """A = sum_v sg(a_v) (gem_weights): 1 for h=linear, in (0, 1) for h=logsigmoid; no gradient."""
  return jnp.sum(gem_weights(logp_xV, targets_x, beta, h), axis=-1)


def kl_from_ref(logp_xV, ref_logp_xV):
  """KL(ref || model) = sum_v p_ref,v (log p_ref,v - log p_v) over the full vocabulary, with the
  reference's log-probs held fixed; d/dlogits = softmax - p_ref."""
  ref_logp_xV = jax.lax.stop_gradient(ref_logp_xV)
  return jnp.sum(jnp.exp(ref_logp_xV) * (ref_logp_xV - logp_xV), axis=-1)


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


def gem_cross_entropy_grad(logp_xV, targets_x, beta, h):
  """d X / d z = A p - a (gem_cross_entropy; a = gem_weights, A = sum_v a_v)."""
  a_xV = gem_weights(logp_xV, targets_x, beta, h)
  return jnp.sum(a_xV, axis=-1, keepdims=True) * jnp.exp(logp_xV) - a_xV


@dataclasses.dataclass(frozen=True)
class Statistic:
  """fn(logp_xV, targets_x, [ref_logp_xV,] *params) -> x; `params` convert the name's
  ':'-separated parameters."""
  fn: Callable
  params: tuple = ()
  usage: str = ""          # how the name is written when it has parameters
  gradient: bool = True    # False: computed under stop_gradient
  needs_ref: bool = False  # True: fn also takes the reference model's log-probs
  k_of_vocab: bool = False  # True: its parameter is a count k in [2, vocabulary size]
  # (logp_xV, targets_x, value_x, *params) -> d value / d logits [x, V]: fused_loss's gradient of
  # a statistic with `gradient` (None: fused_loss does not take this statistic).
  logits_grad: Callable | None = None
  # True: fn takes the logits in the compute dtype instead of float32 log-probs (a statistic
  # invariant to a shift of the logits whose op, top_k, reads a materialised array).
  from_logits: bool = False


STATISTICS = {
    "logp": Statistic(target_log_prob,
                      logits_grad=lambda logp_xV, targets_x, _: target_log_prob_grad(logp_xV,
                                                                                     targets_x)),
    "entropy": Statistic(lambda logp_xV, _: entropy(logp_xV),
                         logits_grad=lambda logp_xV, _, entropy_x: entropy_grad(logp_xV,
                                                                                entropy_x)),
    "renyi2_entropy": Statistic(lambda logp_xV, _: renyi2_entropy(logp_xV), gradient=False),
    "topk_entropy": Statistic(lambda logits_xV, _, k: topk_entropy(logits_xV, k), params=(int,),
                              usage="topk_entropy:K", gradient=False, from_logits=True,
                              k_of_vocab=True),
    "gem_cross_entropy": Statistic(
        gem_cross_entropy, params=(float, str), usage="gem_cross_entropy:BETA:H",
        logits_grad=lambda logp_xV, targets_x, _, beta, h: gem_cross_entropy_grad(
            logp_xV, targets_x, beta, h)),
    "gem_mass": Statistic(gem_mass, params=(float, str), usage="gem_mass:BETA:H", gradient=False),
    "kl_from_ref": Statistic(lambda logp_xV, _, ref_logp_xV: kl_from_ref(logp_xV, ref_logp_xV),
                             needs_ref=True),
}
DEFAULT_STATS = ("logp", "entropy")


def parse(name):
  """"topk_entropy:20" -> (STATISTICS["topk_entropy"], (20,)); ConfigError if malformed."""
  base, *args = name.split(":") if isinstance(name, str) else ("",)
  stat = STATISTICS.get(base)
  allowed = ", ".join(s.usage or n for n, s in STATISTICS.items())
  if stat is None or len(args) != len(stat.params):
    raise ConfigError(f"lm_head statistic {name!r} is unknown; allowed names are {allowed}")
  try:
    return stat, tuple(convert(arg) for convert, arg in zip(stat.params, args))
  except ValueError:
    raise ConfigError(f"lm_head statistic {name!r}: bad parameter; allowed: {stat.usage}") from None


def needs_ref(names):
  """Whether any of the statistics `names` compares with a reference model."""
  return any(parse(name)[0].needs_ref for name in names)


def _statistics(logits_xV, targets_x, names, ref_logits_xV=None):
  logp_xV = log_softmax(logits_xV)
  ref_logp_xV = None if ref_logits_xV is None else jax.lax.stop_gradient(log_softmax(ref_logits_xV))
  out = {}
  for name in names:
    stat, params = parse(name)
    source_xV = logits_xV if stat.from_logits else logp_xV
    source_xV = source_xV if stat.gradient else jax.lax.stop_gradient(source_xV)
    refs = (ref_logp_xV,) if stat.needs_ref else ()
    out[name] = stat.fn(source_xV, targets_x, *refs, *params)
  return out


def _logits(hidden_xD, w_DxV, dtype=jnp.float32):
  """hidden @ w in the operands' dtype, accumulated in float32, returned in `dtype`."""
  return jnp.einsum("...d,dv->...v", hidden_xD, w_DxV, preferred_element_type=dtype)


def _check_names(stats, vocab_size):
  """ConfigError for statistics this head cannot compute (shapes are known when it is traced)."""
  if isinstance(stats, str) or not isinstance(stats, (tuple, list)) or not stats:
    raise ConfigError(f"lm_head stats={stats!r}: allowed: a non-empty tuple of statistic names")
  for name in stats:
    stat, params = parse(name)
    if stat.k_of_vocab and not 2 <= params[0] <= vocab_size:
      raise ConfigError(f"lm_head statistic {name!r}: k must be in [2, the vocabulary size "
                        f"({vocab_size})]; the objective's hyperparameters choose k")


def _check_stats(stats, vocab_size, ref_hidden_BxTxD, ref_w_DxV):
  _check_names(stats, vocab_size)
  if needs_ref(stats) and (ref_hidden_BxTxD is None or ref_w_DxV is None):
    raise ConfigError(f"lm_head statistics {stats} compare with a reference model: pass its "
                      "ref_hidden_BxTxD and ref_w_DxV")


def token_stats_naive(hidden_BxTxD, w_DxV, targets_BxT, *, compute_dtype=None,
                      stats=DEFAULT_STATS, ref_hidden_BxTxD=None, ref_w_DxV=None):
  """Reference path: the same statistics from the full [B, T, V] logits."""
  _check_stats(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  logits_BxTxV = _logits(hidden_BxTxD.astype(dtype), w_DxV.astype(dtype))
  ref_logits_BxTxV = None
  if needs_ref(stats):
    ref_logits_BxTxV = _logits(ref_hidden_BxTxD.astype(dtype), ref_w_DxV.astype(dtype))
  return _statistics(logits_BxTxV, targets_BxT, stats, ref_logits_BxTxV)


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
                stats=DEFAULT_STATS, ref_hidden_BxTxD=None, ref_w_DxV=None):
  """Per-token statistics {name: float32 [B, T]} without materialising the full logits.

  hidden_BxTxD: final hidden states (after the final norm); w_DxV: LM head weight;
  targets_BxT: next-token ids (out-of-range ids, e.g. -100, give finite values; mask them).
  chunk_size: tokens per chunk of the global batch, B rows x max(1, chunk_size // B) positions
    (T is padded up to a multiple of the latter; a chunk holds at least B tokens).
  compute_dtype: matmul dtype (default: hidden's); accumulation and softmax are float32.
  stats: statistic names (STATISTICS, with parameters: "topk_entropy:20"); objectives.
    required_stats(cfg) gives those an objective needs.
  ref_hidden_BxTxD, ref_w_DxV: the reference model's, for statistics that need it (kl_from_ref).
  Gradients flow to hidden and w through every statistic but the gate statistics (module doc).
  """
  _check_stats(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV)
  split, merge = _chunking(hidden_BxTxD.shape, chunk_size)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  with_ref = needs_ref(stats)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_stats(weights, hidden_BxCxD, targets_BxC, ref_hidden_BxCxD):
    w_DxV, ref_w_DxV = weights
    ref_logits = _logits(ref_hidden_BxCxD, ref_w_DxV) if with_ref else None
    return _statistics(_logits(hidden_BxCxD, w_DxV), targets_BxC, stats, ref_logits)

  weights = (w_DxV.astype(dtype), jax.lax.stop_gradient(ref_w_DxV).astype(dtype) if with_ref
             else None)
  ref_chunks = (split(jax.lax.stop_gradient(ref_hidden_BxTxD).astype(dtype)) if with_ref
                else None)
  scan_body = lambda carry, xs: (carry, chunk_stats(weights, *xs))
  _, out = jax.lax.scan(scan_body, None, (split(hidden_BxTxD.astype(dtype)), split(targets_BxT),
                                          ref_chunks))
  return {name: merge(v) for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The head whose forward pass forms the gradient.


def _check_fused(stats, vocab_size):
  _check_names(stats, vocab_size)
  for name in stats:
    stat, _ = parse(name)
    if stat.needs_ref or (stat.gradient and stat.logits_grad is None):
      raise ConfigError(f"lm_head statistic {name!r} is not available in fused_loss (it needs "
                        "a reference model, or has no logits_grad); token_stats has it")


def _read_with_gradient(fn, values, names):
  """Those of `names` whose values fn reads other than under stop_gradient (the others get no
  gradient through fn), read off fn's jaxpr for the arguments `values` (a dict)."""
  jaxpr = jax.make_jaxpr(fn)(values).jaxpr
  var_of = dict(zip(sorted(values), jaxpr.invars))  # a dict's leaves come in sorted key order
  read = {id(v) for eqn in jaxpr.eqns if eqn.primitive.name != "stop_gradient"
          for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return tuple(name for name in names if id(var_of[name]) in read)


def _logits_cotangent(logits_xV, targets_x, stats_x, cotangents_x):
  """d loss / d logits = sum_s (d loss / d s) (d s / d logits) over the statistics s with a
  gradient (cotangents_x: {name: d loss / d s per token}), float32."""
  logp_xV = log_softmax(logits_xV)
  dlogits_xV = jnp.zeros(logits_xV.shape, jnp.float32)
  for name, cotangent_x in cotangents_x.items():
    stat, params = parse(name)
    jacobian_xV = stat.logits_grad(logp_xV, targets_x, stats_x[name], *params)
    dlogits_xV = dlogits_xV + cotangent_x[..., None] * jacobian_xV
  return dlogits_xV


def fused_loss(hidden_BxTxD, w_DxV, targets_BxT, *, per_token_loss, weights_BxT,
               stats=DEFAULT_STATS, extra_BxT=None, chunk_size=1024, compute_dtype=None):
  """(loss, stats): loss = sum_t [weights_t > 0] weights_t * per_token_loss(values)_t, a float32
  scalar whose gradient w.r.t. hidden and w is formed in the forward pass, and the per-token
  statistics {name: float32 [B, T]} (values only: no gradient flows through them).

  Chunk by chunk (chunks as in token_stats), the forward computes the logits (compute dtype,
  float32 accumulation), the statistics (float32), g_s = d loss / d s per token by jax.vjp of
  per_token_loss, dlogits = sum_s g_s * d s / d logits (Statistic.logits_grad; cast to the compute
  dtype), and accumulates dW += h^T dlogits (float32) and dh = dlogits W^T: three matmuls a chunk.
  The backward pass (jax.custom_vjp) scales dh and dW by the loss's cotangent.

  per_token_loss: values -> float32 per-token loss, values = the statistics and extra_BxT as
    {name: [B, C]} of one chunk. Elementwise over tokens (a token's loss reads only its own
    values: no sums over the sequence). Gate statistics (Statistic.gradient False), extra values
    and traced values it closes over get no gradient (differentiating w.r.t. the last is an
    error: pass per-token inputs in extra_BxT).
  weights_BxT: per-token weights (objectives.token_weights); tokens with weight <= 0 contribute
    exactly 0 to the loss and its gradient, even where per_token_loss is inf or NaN.
  stats: statistic names (STATISTICS); those that need a reference model (kl_from_ref) are not
    available here (token_stats has them).
  extra_BxT: {name: [B, T]} per-token inputs without gradient (old_logp, ref_logp, ...).
  chunk_size, compute_dtype: as in token_stats. The logits are held in the compute dtype (bf16
    logits with float32 softmax statistics, as fused linear-cross-entropy kernels do).
  """
  _check_fused(stats, w_DxV.shape[-1])
  stats = tuple(stats)
  split, merge = _chunking(hidden_BxTxD.shape, chunk_size)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  hidden_dtype, w_dtype = hidden_BxTxD.dtype, w_DxV.dtype

  def scan_chunks(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, form_gradient):
    """(loss, stats_BxT, dh_BxTxD, dw_DxV); the last two None unless form_gradient."""
    w_c = w_DxV.astype(dtype)

    def chunk(carry, xs):
      loss, dw_DxV = carry
      hidden_BxCxD, targets_BxC, weights_BxC, extra_BxC = xs
      logits_BxCxV = _logits(hidden_BxCxD, w_c, dtype)
      stats_BxC = _statistics(logits_BxCxV, targets_BxC, stats)

      def token_losses(differentiable):
        values = {**stats_BxC, **differentiable, **extra_BxC}
        per_token = per_token_loss(values).astype(jnp.float32)
        return jnp.where(weights_BxC > 0, per_token, 0.0) * weights_BxC

      if not form_gradient:
        return (loss + jnp.sum(token_losses({})), None), (stats_BxC, None)
      # the statistics with a gradient that the loss reads: only these enter dlogits
      with_gradient = _read_with_gradient(per_token_loss, {**stats_BxC, **extra_BxC},
                                          [n for n in stats if parse(n)[0].gradient])
      losses_BxC, vjp = jax.vjp(token_losses, {n: stats_BxC[n] for n in with_gradient})
      cotangents = jax.tree.map(lambda g: jnp.where(weights_BxC > 0, g, 0.0),
                                vjp(jnp.ones_like(losses_BxC))[0])
      dlogits_BxCxV = _logits_cotangent(logits_BxCxV, targets_BxC, stats_BxC,
                                        cotangents).astype(dtype)
      dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", hidden_BxCxD, dlogits_BxCxV,
                                   preferred_element_type=jnp.float32)
      dh_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, w_c,
                            preferred_element_type=jnp.float32).astype(hidden_dtype)
      return (loss + jnp.sum(losses_BxC), dw_DxV), (stats_BxC, dh_BxCxD)

    dw_DxV = jnp.zeros(w_DxV.shape, jnp.float32) if form_gradient else None
    xs = (split(hidden_BxTxD.astype(dtype)), split(targets_BxT), split(weights_BxT),
          {k: split(v) for k, v in extra_BxT.items()})
    (loss, dw_DxV), (stats_chunks, dh_chunks) = jax.lax.scan(chunk, (jnp.float32(0.0), dw_DxV),
                                                             xs)
    stats_BxT = {name: merge(v) for name, v in stats_chunks.items()}
    return loss, stats_BxT, None if dh_chunks is None else merge(dh_chunks), dw_DxV

  @jax.custom_vjp
  def head(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT):
    return scan_chunks(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT, False)[:2]

  def head_forward(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, extra_BxT):
    loss, stats_BxT, dh_BxTxD, dw_DxV = scan_chunks(hidden_BxTxD, w_DxV, targets_BxT,
                                                    weights_BxT, extra_BxT, True)
    return (loss, stats_BxT), (dh_BxTxD, dw_DxV)

  def head_backward(gradients, cotangents):
    dh_BxTxD, dw_DxV = gradients
    g = cotangents[0]  # the statistics' cotangents are zero: they are returned without gradient
    return ((g * dh_BxTxD.astype(jnp.float32)).astype(hidden_dtype),
            (g * dw_DxV).astype(w_dtype), None, None, None)

  head.defvjp(head_forward, head_backward)
  extra_BxT = {k: jax.lax.stop_gradient(v) for k, v in (extra_BxT or {}).items()}
  loss, stats_BxT = head(hidden_BxTxD, w_DxV, targets_BxT,
                         jax.lax.stop_gradient(jnp.asarray(weights_BxT, jnp.float32)), extra_BxT)
  return loss, jax.lax.stop_gradient(stats_BxT)
