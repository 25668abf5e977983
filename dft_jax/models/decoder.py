"""One Flax NNX decoder for the Llama / Qwen2 / Qwen3 families (config switches, no per-model file).

Pre-norm blocks: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (arXiv:2302.13971), RoPE
(arXiv:2104.09864, HF rotate-half layout), GQA (arXiv:2305.13245), Qwen2 qkv bias, Qwen3 q/k norm.
Layer parameters are stacked on a leading "layers" axis and run under `jax.lax.scan` with
`jax.checkpoint`; float32 master weights are cast to the compute dtype one layer at a time inside
the scan body. The trunk (`hidden_states`) is separate from the LM head (`head_weight`) so a train
step can use a fused, chunked head; `model(tokens)` still returns float32 logits.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import ConfigError
from dft_jax.models import attention as attn_lib
from dft_jax.models.config import ModelConfig


def _cudnn_attention_saveable(prim, *_, **__):
  """Keep cuDNN flash attention's forward outputs (output + softmax statistics), so the backward
  pass does not run the attention forward again. Matches nothing off GPU."""
  return prim.name == "dot_product_attention_fwd_wrapper"


REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_saveable": _cudnn_attention_saveable,
    "dots_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _cudnn_attention_saveable),
}
PARAM_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class KVCache(NamedTuple):
  """Per-layer keys/values for incremental decoding; slot s holds the token written s-th."""
  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  valid_BxS: jax.Array    # bool: slot holds a real (non-pad) token
  index: jax.Array        # int32 scalar: next slot to write


def rms_norm(x, w, eps):
  """y = w * x / sqrt(mean(x^2) + eps) (arXiv:1910.07467), statistics in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """theta^(-2i/H) for i < H/2, with Llama 3.1's frequency-dependent scaling when configured."""
  h = config.head_dim
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
  s = config.rope_scaling
  if s is not None:
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    medium = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / s.factor,
                        np.where(wavelen < high_wavelen, inv_freq, medium))
  return inv_freq.astype(np.float32)


def rope_angles(positions_BxT, inv_freq):
  """(cos, sin) of positions * inv_freq, float32 [B, T, 1, H/2] (broadcast over heads)."""
  angles = positions_BxT.astype(jnp.float32)[..., None, None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxNxH, cos, sin):
  """Rotate-half RoPE: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (HF weight layout)."""
  cos, sin = cos.astype(x_BxTxNxH.dtype), sin.astype(x_BxTxNxH.dtype)
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def block(x_BxTxD, p, layer_cache, *, config, cos, sin, attention_fn, dtype):
  """One decoder layer. p: this layer's params (any dtype, cast here); attention_fn(q, k, v,
  layer_cache) -> (out, new_layer_cache)."""
  c = config
  p = jax.tree.map(lambda a: a.astype(dtype), p)
  h = rms_norm(x_BxTxD, p["attn_norm"], c.rms_norm_eps)
  q = jnp.einsum("btd,dnh->btnh", h, p["wq"])
  k = jnp.einsum("btd,dkh->btkh", h, p["wk"])
  v = jnp.einsum("btd,dkh->btkh", h, p["wv"])
  if c.attention_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if c.qk_norm:
    q, k = rms_norm(q, p["q_norm"], c.rms_norm_eps), rms_norm(k, p["k_norm"], c.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  out_BxTxNxH, layer_cache = attention_fn(q, k, v, layer_cache)
  x_BxTxD = x_BxTxD + jnp.einsum("btnh,nhd->btd", out_BxTxNxH, p["wo"])
  h = rms_norm(x_BxTxD, p["mlp_norm"], c.rms_norm_eps)
  gate = jnp.einsum("btd,df->btf", h, p["w_gate"])
  up = jnp.einsum("btd,df->btf", h, p["w_up"])
  x_BxTxD = x_BxTxD + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
  return x_BxTxD, layer_cache


def layer_param_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Per-layer parameter name -> (shape without the layers axis, logical axis names)."""
  d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  shapes = dict(
      attn_norm=((d,), ("norm",)),
      wq=((d, n, h), ("embed", "q_heads", "head_dim")),
      wk=((d, k, h), ("embed", "kv_heads", "head_dim")),
      wv=((d, k, h), ("embed", "kv_heads", "head_dim")),
      wo=((n, h, d), ("q_heads", "head_dim", "embed")),
      mlp_norm=((d,), ("norm",)),
      w_gate=((d, f), ("embed", "mlp")),
      w_up=((d, f), ("embed", "mlp")),
      w_down=((f, d), ("mlp", "embed")),
  )
  if c.attention_bias:
    shapes.update(bq=((n, h), ("q_heads", "head_dim")), bk=((k, h), ("kv_heads", "head_dim")),
                  bv=((k, h), ("kv_heads", "head_dim")))
  if c.qk_norm:
    shapes.update(q_norm=((h,), ("norm",)), k_norm=((h,), ("norm",)))
  return shapes


def _dtype(value, allowed, field):
  name = jnp.dtype(value).name
  if name not in allowed:
    raise ConfigError(f"{field} {name!r} is not supported; supported: {', '.join(allowed)}")
  return jnp.dtype(name)


class Decoder(nnx.Module):
  """Decoder-only LM. Parameters (nnx.Param, logical axes in `out_sharding`):
  embed [V, D], layers/* [L, ...] (see `layer_param_shapes`), final_norm [D], lm_head [D, V]
  (absent when tied: the head is embed^T)."""

  def __init__(self, config: ModelConfig, *, param_dtype="float32", compute_dtype=None,
               remat="none", scan_layers=True, attention="auto", max_segments=64,
               rngs: nnx.Rngs):
    """compute_dtype None: bfloat16 on GPU/TPU, float32 on CPU. max_segments: static bound on
    documents per packed row for cuDNN attention (see attention.attend)."""
    if remat not in REMAT_POLICIES:
      raise ConfigError(f"remat {remat!r} is not supported; supported: "
                        f"{', '.join(REMAT_POLICIES)}")
    if attention not in attn_lib.IMPLS:
      raise ConfigError(f"attention {attention!r} is not supported; supported: "
                        f"{', '.join(attn_lib.IMPLS)}")
    if max_segments < 2:
      raise ConfigError(f"max_segments must be >= 2, got {max_segments}")
    if compute_dtype is None:
      compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    self.config = config
    self.param_dtype = _dtype(param_dtype, PARAM_DTYPES, "param_dtype")
    self.compute_dtype = _dtype(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    self.remat = remat
    self.scan_layers = scan_layers
    self.attention = attention
    self.max_segments = max_segments

    def param(init, shape, axes):
      value = init(rngs.params(), shape, jnp.float32).astype(self.param_dtype)
      return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    normal = jax.nn.initializers.normal(0.02)
    ones = jax.nn.initializers.ones
    zeros = jax.nn.initializers.zeros
    c, L = config, config.num_layers
    self.embed = param(normal, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    layers = {}
    for name, (shape, axes) in layer_param_shapes(c).items():
      init = ones if "norm" in name else zeros if name.startswith("b") else normal
      layers[name] = param(init, (L, *shape), ("layers", *axes))
    self.layers = nnx.Dict(layers)
    self.final_norm = param(ones, (c.hidden_size,), ("norm",))
    self.lm_head = (None if c.tie_word_embeddings else
                    param(normal, (c.hidden_size, c.vocab_size), ("embed", "vocab")))

  def head_weight(self):
    """w_DxV in the compute dtype: embed^T when tied, else lm_head."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return w.astype(self.compute_dtype)

  def logits(self, hidden_BxTxD):
    """float32 logits hidden @ w_DxV (float32 accumulation)."""
    return jnp.einsum("btd,dv->btv", hidden_BxTxD, self.head_weight(),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    """float32 logits_BxTxV."""
    return self.logits(self.hidden_states(tokens_BxT, positions_BxT=positions_BxT,
                                          segment_ids_BxT=segment_ids_BxT))

  def hidden_states(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None):
    """Final-norm hidden states [B, T, D] in the compute dtype. positions default to arange(T);
    without segment_ids the row is one causal sequence."""
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

    def attention_fn(q, k, v, layer_cache):
      out = attn_lib.attend(q, k, v, segment_ids_BxT=segment_ids_BxT, impl=self.attention,
                            max_segments=self.max_segments)
      return out, layer_cache

    hidden, _ = self._trunk(tokens_BxT, positions_BxT, attention_fn, None)
    return hidden

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache of max_len slots in the compute dtype."""
    c = self.config
    shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype),
                   jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32))

  def forward_cached(self, tokens_BxT, positions_BxT, valid_BxT, cache: KVCache):
    """Appends T tokens to the cache (slots index..index+T) and returns (hidden_BxTxD, cache).

    A token attends to earlier valid slots and itself; invalid (pad) slots are never attended."""
    t, s = tokens_BxT.shape[1], cache.valid_BxS.shape[1]
    valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT, cache.index, 1)
    q_slot_Tx1 = (cache.index + jnp.arange(t))[:, None]
    kv_slot_S = jnp.arange(s)
    mask_Bx1xTxS = (((kv_slot_S <= q_slot_Tx1) & valid_BxS[:, None, :])
                    | (kv_slot_S == q_slot_Tx1))[:, None]

    def attention_fn(q, k, v, layer_cache):
      k_cache, v_cache = (jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype),
                                                              cache.index, 1)
                          for old, new in zip(layer_cache, (k, v)))
      return attn_lib.attend_masked(q, k_cache, v_cache, mask_Bx1xTxS), (k_cache, v_cache)

    hidden, (k_new, v_new) = self._trunk(tokens_BxT, positions_BxT, attention_fn,
                                         (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH))
    return hidden, KVCache(k_new, v_new, valid_BxS, cache.index + t)

  def _trunk(self, tokens_BxT, positions_BxT, attention_fn, cache_xs):
    """embed -> layers (scanned or unrolled, rematerialised per policy) -> final norm."""
    x = self.embed[...][tokens_BxT].astype(self.compute_dtype)
    cos, sin = rope_angles(positions_BxT, rope_inv_freq(self.config))
    step = functools.partial(block, config=self.config, cos=cos, sin=sin,
                             attention_fn=attention_fn, dtype=self.compute_dtype)
    if self.remat != "none":
      step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat],
                            prevent_cse=not self.scan_layers)
    params = {name: v[...] for name, v in self.layers.items()}
    if self.scan_layers:
      x, cache_ys = jax.lax.scan(lambda x, xs: step(x, *xs), x, (params, cache_xs))
    else:
      ys = []
      for i in range(self.config.num_layers):
        x, y = step(x, *jax.tree.map(lambda a: a[i], (params, cache_xs)))
        ys.append(y)
      cache_ys = jax.tree.map(lambda *a: jnp.stack(a), *ys) if cache_xs is not None else None
    return rms_norm(x, self.final_norm[...].astype(self.compute_dtype),
                    self.config.rms_norm_eps), cache_ys


def logical_specs(params):
  """Logical PartitionSpec per parameter (same tree as `params`, e.g. nnx.state(model, nnx.Param)),
  e.g. P("layers", "embed", "q_heads", "head_dim"); sharding rules map names to mesh axes."""
  return nnx.get_partition_spec(params)
