"""Fused LM head: hidden states -> per-token statistics (logp, entropy, ...), chunked over tokens.

`token_stats` never holds the full [tokens, vocab] logits (151,936 x 16k tokens is ~9 GiB in
bf16): it scans over chunks of tokens, each chunk's logits -> statistics under `jax.checkpoint`,
so the forward keeps only the [B, T] statistics and the backward recomputes one chunk's logits at
a time. The matmul runs in the compute dtype with float32 accumulation; softmax math is float32.

Chunks cut the time axis, not the flattened B*T: every chunk holds all B rows for
`chunk_size // B` positions, so a batch sharded over rows (data parallelism) stays local to each
device through the scan.

Statistics are named functions of one chunk's float32 log-softmax and targets (STATISTICS). A
name may carry parameters after colons: "topk_entropy:20" (k), "gem_cross_entropy:0.7:linear"
(beta, h); the returned dict is keyed by the names as given. Gate statistics (topk_entropy,
renyi2_entropy, gem_mass) are computed under stop_gradient: the objectives use them only as
stop-gradient gates, and this spares their backward (top_k, softmax) in the recomputed chunks.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dft_jax import objectives
from dft_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Statistic:
  """fn(logp_xV, targets_x, *params) -> x; `params` convert the name's ':'-separated parameters."""
  fn: Callable
  params: tuple = ()
  usage: str = ""        # how the name is written when it has parameters
  gradient: bool = True  # False: computed under stop_gradient


STATISTICS = {
    "logp": Statistic(objectives.target_log_prob),
    "entropy": Statistic(lambda logp_xV, _: objectives.entropy(logp_xV)),
    "renyi2_entropy": Statistic(lambda logp_xV, _: objectives.renyi2_entropy(logp_xV),
                                gradient=False),
    "topk_entropy": Statistic(lambda logp_xV, _, k: objectives.topk_entropy(logp_xV, k),
                              params=(int,), usage="topk_entropy:K", gradient=False),
    "gem_cross_entropy": Statistic(objectives.gem_cross_entropy, params=(float, str),
                                   usage="gem_cross_entropy:BETA:H"),
    "gem_mass": Statistic(objectives.gem_mass, params=(float, str), usage="gem_mass:BETA:H",
                          gradient=False),
}
DEFAULT_STATS = ("logp", "entropy")


def _parse(name):
  """"topk_entropy:20" -> (STATISTICS["topk_entropy"], (20,)); ConfigError if malformed."""
  base, *args = name.split(":") if isinstance(name, str) else ("",)
  stat = STATISTICS.get(base)
  allowed = ", ".join(s.usage or n for n, s in STATISTICS.items())
  if stat is None or len(args) != len(stat.params):
    raise ConfigError(f"lm_head stats name {name!r} is unknown; allowed names are {allowed}")
  try:
    return stat, tuple(convert(arg) for convert, arg in zip(stat.params, args))
  except ValueError:
    raise ConfigError(
        f"lm_head stats name {name!r}: bad parameter; allowed: {stat.usage}") from None


def _check_stats(names):
  if isinstance(names, str) or not names:
    raise ConfigError(f"lm_head stats={names!r}: allowed: a non-empty tuple of names like "
                      f"{DEFAULT_STATS}")
  for name in names:
    _parse(name)


def _statistics(logits_xV, targets_x, names):
  logp_xV = objectives.log_softmax(logits_xV)
  out = {}
  for name in names:
    stat, params = _parse(name)
    source_xV = logp_xV if stat.gradient else jax.lax.stop_gradient(logp_xV)
    out[name] = stat.fn(source_xV, targets_x, *params)
  return out


def _logits(hidden_xD, w_DxV):
  """hidden @ w in the operands' dtype, accumulated and returned in float32."""
  return jnp.einsum("...d,dv->...v", hidden_xD, w_DxV, preferred_element_type=jnp.float32)


def token_stats_naive(hidden_BxTxD, w_DxV, targets_BxT, *, compute_dtype=None,
                      stats=DEFAULT_STATS):
  """Reference path: the same statistics from the full [B, T, V] logits."""
  _check_stats(stats)
  dtype = jnp.dtype(compute_dtype or hidden_BxTxD.dtype)
  logits_BxTxV = _logits(hidden_BxTxD.astype(dtype), w_DxV.astype(dtype))
  return _statistics(logits_BxTxV, targets_BxT, stats)


def token_stats(hidden_BxTxD, w_DxV, targets_BxT, *, chunk_size=1024, compute_dtype=None,
                stats=DEFAULT_STATS):
  """Per-token statistics {name: float32 [B, T]} without materialising the full logits.

  hidden_BxTxD: final hidden states (after the final norm); w_DxV: LM head weight;
  targets_BxT: next-token ids (out-of-range ids, e.g. -100, give finite values; mask them).
  chunk_size: tokens per chunk of the global batch, B rows x max(1, chunk_size // B) positions
    (T is padded up to a multiple of the latter; a chunk holds at least B tokens).
  compute_dtype: matmul dtype (default: hidden's); accumulation and softmax are float32.
  stats: statistic names (STATISTICS, with parameters: "topk_entropy:20"); objectives.
    required_stats(cfg) gives those an objective needs.
  Gradients flow to hidden and w through every statistic but the gate statistics (module doc).
  """
  _check_stats(stats)
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

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_stats(w_DxV, hidden_BxCxD, targets_BxC):
    return _statistics(_logits(hidden_BxCxD, w_DxV), targets_BxC, stats)

  w_DxV = w_DxV.astype(dtype)
  scan_body = lambda carry, xs: (carry, chunk_stats(w_DxV, *xs))
  _, out = jax.lax.scan(scan_body, None,
                        (to_chunks(hidden_BxTxD.astype(dtype)), to_chunks(targets_BxT)))
  return {name: v.swapaxes(0, 1).reshape(batch, num_chunks * steps)[:, :seq_len]
          for name, v in out.items()}
