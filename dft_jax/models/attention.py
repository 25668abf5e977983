"""Causal self-attention with packed-segment masking, through `jax.nn.dot_product_attention`.

Shapes: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0, GQA:
arXiv:2305.13245), H head dim. Softmax(scale q k^T) v (scale 1/sqrt(H) unless given), restricted to
keys at or before the query and in the same segment (documents packed in one row never see each
other), and with a sliding `window` W to the W most recent of those (the query itself and the
W - 1 before it; Mistral, Gemma 3's local layers; arXiv:2004.05150).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dft_jax.errors import ModelError

IMPLS = ("auto", "xla", "cudnn")


def resolve_impl(impl: str, dtype) -> str:
  """"auto" -> "cudnn" on GPU with a 16-bit dtype (cuDNN flash attention needs one), else "xla"."""
  if impl not in IMPLS:
    raise ModelError(f"attention {impl!r} is not supported; supported: {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def causal_segment_mask(segment_ids_BxT):
  """mask_Bx1xTxT[b, 0, i, j] = j <= i and seg[b, i] == seg[b, j] != 0, or i == j.

  Padding (segment 0) attends only to itself, so every row keeps one key (no NaN)."""
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  seg_q, seg_k = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
  same_BxTxT = (seg_q == seg_k) & (seg_k != 0)
  return ((same_BxTxT & causal_TxT) | jnp.eye(t, dtype=bool))[:, None]


def in_window(q_pos, k_pos, window):
  """Whether key position k_pos is among the `window` most recent at query position q_pos
  (q_pos - k_pos < window; keys after the query are the causal mask's business)."""
  return q_pos - k_pos < window


def attend_masked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale=None):
  """Attention under an explicit boolean mask (XLA; GQA handled without repeating k/v)."""
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
                                      scale=scale, implementation="xla")


def attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, segment_ids_BxT=None, impl="auto",
           max_segments=64, scale=None, window=None):
  """Causal self-attention; with segment_ids_BxT, only within each segment; with window (a
  static int), only over the `window` most recent keys.

  impl: "xla" (explicit mask), "cudnn" (flash attention; packed rows through cuDNN's ragged
  layout), "auto" (see `resolve_impl`). max_segments (config.model.max_segments): static bound on
  the runs of equal segment ids in a row (documents and padding) for the cudnn path. The jitted
  path cannot refuse a row over it (runs past it would merge and see each other), so the batch is
  checked on the host where it is built: the packer keeps rows under the bound and
  `dft_jax.data.packing.check_segment_runs` refuses any other batch that is not.
  """
  impl = resolve_impl(impl, q_BxTxNxH.dtype)
  local_window = None if window is None else (window - 1, 0)  # (left, right) keys beside the query
  if segment_ids_BxT is None:
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                                        scale=scale, local_window_size=local_window,
                                        implementation=impl)
  if impl == "xla":
    mask_Bx1xTxT = causal_segment_mask(segment_ids_BxT)
    if window is not None:
      pos_T = jnp.arange(q_BxTxNxH.shape[1])
      mask_Bx1xTxT &= in_window(pos_T[:, None], pos_T[None, :], window)
    return attend_masked(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, scale)
  return _cudnn_packed(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, max_segments, scale,
                       window)


def segment_runs(segment_ids_BxT, max_segments):
  """cuDNN packed-layout arguments from segment ids: (seqlen_BxM, offsets_BxM1), -1 padded.

  A run is a maximal stretch of equal ids (padding forms its own runs, so every token is covered
  and its output stays finite). Up to max_segments runs are described exactly; later runs would
  merge into the last one, which is why batches are checked before they get here (`attend`)."""
  b, t = segment_ids_BxT.shape
  m = max_segments
  start_BxT = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  run_BxT = jnp.minimum(jnp.cumsum(start_BxT, axis=1) - 1, m - 1)
  rows_BxT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  seqlen_BxM = jnp.zeros((b, m), jnp.int32).at[rows_BxT, run_BxT].add(1)
  seqlen_BxM = jnp.where(seqlen_BxM > 0, seqlen_BxM, -1)
  # Only the first token of each kept run writes its offset; others aim out of range (dropped).
  slot_BxT = jnp.where(start_BxT & (jnp.cumsum(start_BxT, axis=1) <= m), run_BxT, m + 1)
  offsets_BxM1 = jnp.full((b, m + 1), -1, jnp.int32).at[rows_BxT, slot_BxT].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
  return seqlen_BxM, offsets_BxM1


@functools.cache
def _packed_gqa_supported() -> bool:
  """Whether this jax scales cuDNN kv offsets by the kv head count (jax PR #39521); older
  versions use the query head count, which is only right without GQA."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  try:
    q = jnp.zeros((1, 2, 2, 1))
    k = jnp.zeros((1, 2, 1, 1))
    offsets = jnp.array([[0, 1, -1]], jnp.int32)
    seqlen = jnp.array([[1, 1]], jnp.int32)
    fix = fa._fix_seqlen_offsets  # pylint: disable=protected-access
    _, _, _, kv_offsets = fix(seqlen, seqlen, offsets, offsets, q, k)
    return int(np.asarray(kv_offsets)[0, 1]) == 1
  except Exception:  # pylint: disable=broad-except
    return False


def _cudnn_packed(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, max_segments, scale=None,
                  window=None):
  """cuDNN flash attention over packed rows: causal within each run of equal segment ids (and
  within the sliding window, cuDNN's sliding_window_length)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  n, k = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
  if n != k and not _packed_gqa_supported():
    k_BxTxKxH = jnp.repeat(k_BxTxKxH, n // k, axis=2)
    v_BxTxKxH = jnp.repeat(v_BxTxKxH, n // k, axis=2)
  seqlen_BxM, offsets_BxM1 = segment_runs(segment_ids_BxT, max_segments)
  return fa.dot_product_attention(
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, q_seqlen=seqlen_BxM, kv_seqlen=seqlen_BxM,
      q_offsets=offsets_BxM1, kv_offsets=offsets_BxM1,
      scale=1.0 / float(np.sqrt(q_BxTxNxH.shape[-1])) if scale is None else scale,
      mask_type=fa.MaskType.PADDING_CAUSAL, sliding_window_length=window)
