"""Fused LM head: hidden states -> per-token statistics (logp, entropy, ...), chunked over tokens.

`token_stats` never holds the full [tokens, vocab] logits (151,936 x 16k tokens is ~9 GiB in
bf16): it scans over chunks of tokens, each chunk's logits -> statistics under `jax.checkpoint`,
so the forward keeps only the [B, T] statistics and the backward recomputes one chunk's logits at
a time. The matmul runs in the compute dtype with float32 accumulation; softmax math is float32.

Chunks cut the time axis, not the flattened B*T: every chunk holds all B rows for
`chunk_size // B` positions, so a batch sharded over rows (data parallelism) stays local to each
device through the scan.

Statistics are named functions of one chunk's float32 log-softmax, `fn(logp_xV, targets_x) -> x`;
a new one (e.g. top-k or Renyi-2 entropy) is one entry in STATISTICS.
"""
import functools

import jax
import jax.numpy as jnp

from dft_jax import objectives
from dft_jax.errors import ConfigError


def _logp(logp_xV, targets_x):
  return objectives.target_log_prob(logp_xV, targets_x)


def _entropy(logp_xV, targets_x):
  del targets_x
  return objectives.entropy(logp_xV)


STATISTICS = {"logp": _logp, "entropy": _entropy}
DEFAULT_STATS = ("logp", "entropy")


def _statistics(logits_xV, targets_x, names):
  logp_xV = objectives.log_softmax(logits_xV)
  return {name: STATISTICS[name](logp_xV, targets_x) for name in names}


def _check_stats(names):
  unknown = [n for n in names if n not in STATISTICS]
  if unknown or not names:
    raise ConfigError(f"lm_head stats={tuple(names)!r}: allowed names are {', '.join(STATISTICS)}")


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
  Gradients flow to hidden and w through every statistic (logp and entropy).
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
