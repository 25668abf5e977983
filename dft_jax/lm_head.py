"""Fused LM head: hidden states -> per-token statistics (logp, entropy, ...), chunked over tokens.

`token_stats` never holds the full [tokens, vocab] logits (151,936 x 16k tokens is ~9 GiB in
bf16): it scans over chunks of tokens, each chunk's logits -> statistics under `jax.checkpoint`,
so the forward keeps only the [B, T] statistics and the backward recomputes one chunk's logits at
a time. The matmul runs in the compute dtype with float32 accumulation; softmax math is float32.

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
passed as `ref_hidden_BxTxD`, `ref_w_DxV` (no gradient flows into them).
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


def topk_entropy(logp_xV, k):
  """Entropy of the softmax over the k largest log-probs (= logits, up to a shift): EAFT's gate
  statistic, k = 20 in the reference implementations (which take it from the logits, no_grad)."""
  top_xK = jax.lax.top_k(logp_xV, k)[0]
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


STATISTICS = {
    "logp": Statistic(target_log_prob),
    "entropy": Statistic(lambda logp_xV, _: entropy(logp_xV)),
    "renyi2_entropy": Statistic(lambda logp_xV, _: renyi2_entropy(logp_xV), gradient=False),
    "topk_entropy": Statistic(lambda logp_xV, _, k: topk_entropy(logp_xV, k), params=(int,),
                              usage="topk_entropy:K", gradient=False, k_of_vocab=True),
    "gem_cross_entropy": Statistic(gem_cross_entropy, params=(float, str),
                                   usage="gem_cross_entropy:BETA:H"),
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
    source_xV = logp_xV if stat.gradient else jax.lax.stop_gradient(logp_xV)
    refs = (ref_logp_xV,) if stat.needs_ref else ()
    out[name] = stat.fn(source_xV, targets_x, *refs, *params)
  return out


def _logits(hidden_xD, w_DxV):
  """hidden @ w in the operands' dtype, accumulated and returned in float32."""
  return jnp.einsum("...d,dv->...v", hidden_xD, w_DxV, preferred_element_type=jnp.float32)


def _check(stats, vocab_size, ref_hidden_BxTxD, ref_w_DxV):
  """ConfigError for statistics this head cannot compute (shapes are known when it is traced)."""
  for name in stats:
    stat, params = parse(name)
    if stat.k_of_vocab and not 2 <= params[0] <= vocab_size:
      raise ConfigError(f"lm_head statistic {name!r}: k must be in [2, the vocabulary size "
                        f"({vocab_size})]; the objective's hyperparameters choose k")
  if needs_ref(stats) and (ref_hidden_BxTxD is None or ref_w_DxV is None):
    raise ConfigError(f"lm_head statistics {stats} compare with a reference model: pass its "
                      "ref_hidden_BxTxD and ref_w_DxV")


def token_stats_naive(hidden_BxTxD, w_DxV, targets_BxT, *, compute_dtype=None,
                      stats=DEFAULT_STATS, ref_hidden_BxTxD=None, ref_w_DxV=None):
  """Reference path: the same statistics from the full [B, T, V] logits."""
  _check(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  logits_BxTxV = _logits(hidden_BxTxD.astype(dtype), w_DxV.astype(dtype))
  ref_logits_BxTxV = None
  if needs_ref(stats):
    ref_logits_BxTxV = _logits(ref_hidden_BxTxD.astype(dtype), ref_w_DxV.astype(dtype))
  return _statistics(logits_BxTxV, targets_BxT, stats, ref_logits_BxTxV)


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
  _check(stats, w_DxV.shape[-1], ref_hidden_BxTxD, ref_w_DxV)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ConfigError(f"lm_head chunk_size={chunk_size!r}: allowed: an integer >= 1")
  batch, seq_len, _ = hidden_BxTxD.shape
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  steps = max(1, min(seq_len, chunk_size // batch))  # positions per chunk
  num_chunks = -(-seq_len // steps)
  pad = num_chunks * steps - seq_len

  def to_chunks(x):  # [B, T, ...] -> [num_chunks, B, steps, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, num_chunks, steps, *x.shape[2:]).swapaxes(0, 1)

  with_ref = needs_ref(stats)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_stats(weights, hidden_BxCxD, targets_BxC, ref_hidden_BxCxD):
    w_DxV, ref_w_DxV = weights
    ref_logits = _logits(ref_hidden_BxCxD, ref_w_DxV) if with_ref else None
    return _statistics(_logits(hidden_BxCxD, w_DxV), targets_BxC, stats, ref_logits)

  weights = (w_DxV.astype(dtype), jax.lax.stop_gradient(ref_w_DxV).astype(dtype) if with_ref
             else None)
  ref_chunks = (to_chunks(jax.lax.stop_gradient(ref_hidden_BxTxD).astype(dtype)) if with_ref
                else None)
  scan_body = lambda carry, xs: (carry, chunk_stats(weights, *xs))
  _, out = jax.lax.scan(scan_body, None, (to_chunks(hidden_BxTxD.astype(dtype)),
                                          to_chunks(targets_BxT), ref_chunks))
  return {name: v.swapaxes(0, 1).reshape(batch, num_chunks * steps)[:, :seq_len]
          for name, v in out.items()}
