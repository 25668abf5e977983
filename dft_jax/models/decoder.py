"""One Flax NNX decoder for the Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE and Gemma 3 text
families (config switches, no per-model file).

Pre-norm blocks: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)) (arXiv:2302.13971), RoPE
(arXiv:2104.09864, HF rotate-half layout; Llama 3.1, linear and YaRN scaling), GQA
(arXiv:2305.13245). Switches: Qwen2 qkv bias; Qwen3 / Gemma 3 q/k norm; sliding-window layers
(Mistral, Gemma 3's local layers with their own RoPE base); Gemma 3's (1 + w) norms, norms on the
attention and MLP outputs too (x += RMSNorm(Attn(RMSNorm(x)))), sqrt(D)-scaled embeddings, GELU
gate and 1/sqrt(query_pre_attn_scalar) attention scale (arXiv:2503.19786); Qwen3-MoE's top-k
routed experts as grouped matmuls (`moe_mlp`).
Layer parameters are stacked on a leading "layers" axis and run under `jax.lax.scan` with
`jax.checkpoint`; float32 master weights are cast to the compute dtype one layer at a time inside
the scan body. The trunk (`hidden_states`) is separate from the LM head (`head_weight`) so a train
step can use a fused, chunked head; `model(tokens)` still returns float32 logits.

With `lora=LoRAConfig(...)` the targeted projections carry low-rank adapters beside their weights
(models/lora.py) and, for QLoRA, the seven projection weights are stored quantised
(models/quant.py) and dequantised one layer at a time inside the scan body. `adapters=False`
runs the frozen base (the reference policy) from the same weights.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import ConfigError
from dft_jax.models import attention as attn_lib
from dft_jax.models import config as config_lib
from dft_jax.models import lora as lora_lib
from dft_jax.models import quant
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


ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def rms_norm(x, w, eps, plus_one=False):
  """x / sqrt(mean(x^2) + eps) * w (arXiv:1910.07467), statistics in float32. Llama casts the
  normalised x to x's dtype, then * w; Gemma (plus_one) stores w - 1: * (1 + w) in float32, then
  the cast."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if plus_one:
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w * y.astype(x.dtype)


def _llama3_inv_freq(inv_freq, s: config_lib.Llama3RopeScaling):
  """Llama 3.1: wavelengths above original / low_freq_factor interpolated (/ factor), below
  original / high_freq_factor kept, smoothly blended between."""
  wavelen = 2 * np.pi / inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  medium = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  return np.where(wavelen > low_wavelen, inv_freq / s.factor,
                  np.where(wavelen < high_wavelen, inv_freq, medium))


def _yarn_mscale(factor, mscale=1.0):
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(inv_freq, head_dim, theta, s: config_lib.YarnRopeScaling):
  """YaRN (arXiv:2309.00071, as transformers computes it): dimension d (of H/2) keeps its
  frequency below the ramp, is interpolated (/ factor) above it, linearly between; the ramp runs
  from the dimension that turns beta_fast times over the original context to the one that turns
  beta_slow times, d(r) = H ln(L_orig / (2 pi r)) / (2 ln theta) (floor / ceil when truncate).
  Returns (inv_freq, attention factor on cos and sin)."""
  def dim_turning(rotations):
    return (head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))
  low, high = dim_turning(s.beta_fast), dim_turning(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
  inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
  if s.attention_factor is not None:
    factor = s.attention_factor
  elif s.mscale and s.mscale_all_dim:
    factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
  else:
    factor = _yarn_mscale(s.factor)
  return inv_freq, factor


def rope_inv_freq(head_dim, theta, scaling=None) -> tuple[np.ndarray, float]:
  """(theta^(-2i/H) for i < H/2, float32, after the scaling; the factor on cos and sin: 1 but for
  YaRN)."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  factor = 1.0
  if isinstance(scaling, config_lib.LinearRopeScaling):
    inv_freq = inv_freq / scaling.factor
  elif isinstance(scaling, config_lib.Llama3RopeScaling):
    inv_freq = _llama3_inv_freq(inv_freq, scaling)
  elif isinstance(scaling, config_lib.YarnRopeScaling):
    inv_freq, factor = _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
  return inv_freq.astype(np.float32), factor


def rope_angles(positions_BxT, inv_freq, factor=1.0):
  """factor * (cos, sin) of positions * inv_freq, float32 [B, T, 1, H/2] (broadcast over
  heads)."""
  angles = positions_BxT.astype(jnp.float32)[..., None, None] * inv_freq
  return factor * jnp.cos(angles), factor * jnp.sin(angles)


def rope_tables(config: ModelConfig, positions_BxT):
  """{"full": (cos, sin), "sliding": (cos, sin)}: sliding layers have their own RoPE base, unscaled,
  when local_rope_theta is set (Gemma 3), else the full layers' tables."""
  c = config
  full = rope_angles(positions_BxT, *rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
  if c.local_rope_theta is None:
    return dict(full=full, sliding=full)
  return dict(full=full,
              sliding=rope_angles(positions_BxT, *rope_inv_freq(c.head_dim, c.local_rope_theta)))


def apply_rope(x_BxTxNxH, cos, sin):
  """Rotate-half RoPE: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (HF weight layout)."""
  cos, sin = cos.astype(x_BxTxNxH.dtype), sin.astype(x_BxTxNxH.dtype)
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# The layer's linear projections: parameter -> einsum (x, W -> y). W's leading axes contract with x
# (HF's "in"), the others are its output axes.
PROJECTIONS = {
    "wq": "btd,dnh->btnh", "wk": "btd,dkh->btkh", "wv": "btd,dkh->btkh", "wo": "btnh,nhd->btd",
    "w_gate": "btd,df->btf", "w_up": "btd,df->btf", "w_down": "btf,fd->btd",
}


def num_input_axes(name: str) -> int:
  """How many leading axes of the projection weight `name` are input axes (1, or 2 for wo)."""
  x, w = PROJECTIONS[name].split("->")[0].split(",")
  return sum(c in x for c in w)


def input_axes(name: str) -> tuple[int, ...]:
  """The input axes of projection weight `name`, negative (valid with or without "layers")."""
  ndim = len(PROJECTIONS[name].split("->")[0].split(",")[1])
  return tuple(range(-ndim, -ndim + num_input_axes(name)))


def projections(c: ModelConfig) -> tuple[str, ...]:
  """The PROJECTIONS this config's layers have (a MoE layer's MLP is its experts)."""
  shapes = layer_param_shapes(c)
  return tuple(name for name in PROJECTIONS if name in shapes)


def project(x, p, name, *, lora, dtype):
  """x W by PROJECTIONS[name], + lora.scale * (x A) B when p holds adapters for `name`. A quantised
  W is dequantised here, inside a rematerialised region: the backward pass dequantises it again
  rather than keeping every layer's dequantised weight."""
  equation = PROJECTIONS[name]
  if name in p:
    y = jnp.einsum(equation, x, p[name])
  else:
    dequantized_matmul = jax.checkpoint(lambda x, codes, scale: jnp.einsum(
        equation, x, quant.dequantize(codes, scale, lora.base_quant, input_axes(name), dtype)))
    y = dequantized_matmul(x, *(p[n] for n in quant.stored_names(name)))
  a_name, b_name = lora_lib.adapter_names(name)
  if a_name in p:
    eq_a, eq_b = lora_lib.delta_equations(equation)
    y = y + lora.scale * jnp.einsum(eq_b, jnp.einsum(eq_a, x, p[a_name]), p[b_name])
  return y


def moe_mlp(h_BxTxD, p, *, config, valid_BxT):
  """Top-k routed experts (Qwen3-MoE; routing as in arXiv:2101.03961 with k experts a token):
  router probabilities softmax(h W_r) in float32, each token's k most probable experts (weights
  renormalised to sum 1 when norm_topk_prob), out = sum_k w_k SwiGLU_{e_k}(h). The N*k
  (token, expert) pairs are sorted by expert and every expert's SwiGLU runs as one grouped matmul
  over its contiguous rows (jax.lax.ragged_dot), never a loop over experts.

  Returns (out_BxTxD, router_stats_2xE): per expert, the (token, slot) assignments and the sum of
  router probabilities over the valid (non-padding) tokens, what `load_balancing_loss` needs."""
  c = config
  b, t, d = h_BxTxD.shape
  k = c.num_experts_per_tok
  x_NxD = h_BxTxD.reshape(b * t, d)
  probs_NxE = jax.nn.softmax((x_NxD @ p["router"]).astype(jnp.float32), axis=-1)
  top_NxK, expert_NxK = jax.lax.top_k(probs_NxE, k)
  if c.norm_topk_prob:
    top_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
  expert_A = expert_NxK.reshape(-1)                    # A = N * k assignments, token-major
  order_A = jnp.argsort(expert_A, stable=True)         # assignments grouped by expert
  group_sizes_E = jnp.bincount(expert_A, length=c.num_experts).astype(jnp.int32)
  x_AxD = x_NxD[order_A // k]
  gate_AxF = jax.lax.ragged_dot(x_AxD, p["experts_gate"], group_sizes_E)
  up_AxF = jax.lax.ragged_dot(x_AxD, p["experts_up"], group_sizes_E)
  y_AxD = jax.lax.ragged_dot(ACTIVATIONS[c.hidden_act](gate_AxF) * up_AxF, p["experts_down"],
                             group_sizes_E)
  y_NxKxD = jnp.zeros_like(y_AxD).at[order_A].set(y_AxD).reshape(b * t, k, d)
  out_NxD = jnp.einsum("nkd,nk->nd", y_NxKxD, top_NxK.astype(y_NxKxD.dtype))
  valid_N = valid_BxT.reshape(-1).astype(jnp.float32)
  assigned_E = jnp.zeros(c.num_experts, jnp.float32).at[expert_A].add(jnp.repeat(valid_N, k))
  prob_E = jnp.einsum("ne,n->e", probs_NxE, valid_N)
  return out_NxD.reshape(b, t, d), jnp.stack([assigned_E, prob_E])


def load_balancing_loss(router_stats_Lx2xE, num_valid_tokens, num_experts):
  """Switch Transformer's auxiliary load-balancing loss (arXiv:2101.03961 eq. 4-6) as transformers'
  load_balancing_loss_func computes it, pooled over layers: E * sum_e f_e P_e with f_e the
  assignments to expert e and P_e its summed router probability, each over the L * n valid
  (token, layer) rows. Minimal (k) when routing is uniform."""
  stats_2xE = jnp.sum(router_stats_Lx2xE, axis=0)
  rows = router_stats_Lx2xE.shape[0] * jnp.maximum(num_valid_tokens, 1)
  return num_experts * jnp.sum((stats_2xE[0] / rows) * (stats_2xE[1] / rows))


def layer_rope(ropes, is_sliding, config: ModelConfig):
  """This layer's (cos, sin): the sliding tables on a sliding layer (where they differ)."""
  if config.local_rope_theta is None or not any(config.sliding_layers):
    return ropes["full"]
  if all(config.sliding_layers):
    return ropes["sliding"]
  return jax.tree.map(lambda s, f: jnp.where(is_sliding, s, f), ropes["sliding"], ropes["full"])


def layer_attention(attention_fn, q, k, v, layer_cache, is_sliding, config: ModelConfig):
  """attention_fn with this layer's window: config.sliding_window on sliding layers, None on full
  ones; a lax.cond when the layers differ (the window is static for cuDNN)."""
  sliding = config.sliding_layers
  if not any(sliding):
    return attention_fn(q, k, v, layer_cache, None)
  if all(sliding):
    return attention_fn(q, k, v, layer_cache, config.sliding_window)
  return jax.lax.cond(is_sliding,
                      lambda *a: attention_fn(*a, config.sliding_window),
                      lambda *a: attention_fn(*a, None), q, k, v, layer_cache)


def block(x_BxTxD, p, layer_cache, is_sliding, *, config, ropes, attention_fn, dtype, lora,
          valid_BxT):
  """One decoder layer. p: this layer's params (any dtype, cast here; quantised weights are
  dequantised by `project`); attention_fn(q, k, v, layer_cache, window) -> (out,
  new_layer_cache); is_sliding: whether this layer attends through the sliding window.
  Returns (x, (layer_cache, router statistics or None))."""
  c = config
  p = {name: a if quant.is_stored(name) else a.astype(dtype) for name, a in p.items()}
  proj = functools.partial(project, p=p, lora=lora, dtype=dtype)
  norm = functools.partial(rms_norm, eps=c.rms_norm_eps, plus_one=c.norm_plus_one)
  h = norm(x_BxTxD, p["attn_norm"])
  q, k, v = proj(h, name="wq"), proj(h, name="wk"), proj(h, name="wv")
  if c.attention_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if c.qk_norm:
    q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
  cos, sin = layer_rope(ropes, is_sliding, c)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  out_BxTxNxH, layer_cache = layer_attention(attention_fn, q, k, v, layer_cache, is_sliding, c)
  attn_BxTxD = proj(out_BxTxNxH, name="wo")
  if c.sandwich_norms:
    attn_BxTxD = norm(attn_BxTxD, p["post_attn_norm"])
  x_BxTxD = x_BxTxD + attn_BxTxD
  h = norm(x_BxTxD, p["mlp_norm"])
  router_stats = None
  if c.num_experts:
    mlp_BxTxD, router_stats = moe_mlp(h, p, config=c, valid_BxT=valid_BxT)
  else:
    gate, up = proj(h, name="w_gate"), proj(h, name="w_up")
    mlp_BxTxD = proj(ACTIVATIONS[c.hidden_act](gate) * up, name="w_down")
  if c.sandwich_norms:
    mlp_BxTxD = norm(mlp_BxTxD, p["post_mlp_norm"])
  return x_BxTxD + mlp_BxTxD, (layer_cache, router_stats)


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
  )
  if c.num_experts:
    e, f = c.num_experts, c.moe_intermediate_size
    shapes.update(router=((d, e), ("embed", "expert")),
                  experts_gate=((e, d, f), ("expert", "embed", "mlp")),
                  experts_up=((e, d, f), ("expert", "embed", "mlp")),
                  experts_down=((e, f, d), ("expert", "mlp", "embed")))
  else:
    shapes.update(w_gate=((d, f), ("embed", "mlp")), w_up=((d, f), ("embed", "mlp")),
                  w_down=((f, d), ("mlp", "embed")))
  if c.sandwich_norms:
    shapes.update(post_attn_norm=((d,), ("norm",)), post_mlp_norm=((d,), ("norm",)))
  if c.attention_bias:
    shapes.update(bq=((n, h), ("q_heads", "head_dim")), bk=((k, h), ("kv_heads", "head_dim")),
                  bv=((k, h), ("kv_heads", "head_dim")))
  if c.qk_norm:
    shapes.update(q_norm=((h,), ("norm",)), k_norm=((h,), ("norm",)))
  return shapes


def layer_specs(c: ModelConfig, lora) -> dict[str, tuple[type, tuple[str, ...]]]:
  """Stored per-layer entries -> (variable type, logical axes with "layers"): the weights of
  `layer_param_shapes` (nnx.Param), or for QLoRA the projections as codes + scales
  (quant.QuantizedWeight), and the adapters (nnx.LoRAParam)."""
  shapes = layer_param_shapes(c)
  specs = {name: (nnx.Param, ("layers", *axes)) for name, (_, axes) in shapes.items()}
  if lora is None:
    return specs
  if lora.base_quant:
    for name in projections(c):
      _, axes = specs.pop(name)
      specs.update(dict.fromkeys(quant.stored_names(name), (quant.QuantizedWeight, axes)))
  for name in lora.adapted():
    shape, axes = shapes[name]
    adapters = lora_lib.adapter_shapes((c.num_layers, *shape), ("layers", *axes),
                                       num_input_axes(name), lora.rank)
    for adapter, (_, adapter_axes) in zip(lora_lib.adapter_names(name), adapters):
      specs[adapter] = (nnx.LoRAParam, adapter_axes)
  return specs


def layer_arrays(c: ModelConfig, lora, weights, key) -> dict:
  """The stored per-layer arrays (see `layer_specs`) from (name, stacked base weight) pairs,
  consumed one at a time: QLoRA quantises each projection one layer at a time (so loading holds
  one float weight and one layer's temporaries beside the quantised ones); adapters start at A
  random (from key), B = 0."""
  arrays = {}
  for name, w in weights:
    if lora is not None and lora.base_quant and name in PROJECTIONS:
      stored = jax.lax.map(lambda w_l, name=name: quant.quantize(
          w_l, lora.base_quant, input_axes(name), lora.block_size), jnp.asarray(w))
      arrays.update(zip(quant.stored_names(name), stored))
    else:
      arrays[name] = w
    del w
  for i, name in enumerate(lora.adapted() if lora is not None else ()):
    shape = (c.num_layers, *layer_param_shapes(c)[name][0])
    adapters = lora_lib.init_adapter(jax.random.fold_in(key, i), shape, num_input_axes(name),
                                     lora.rank)
    arrays.update(zip(lora_lib.adapter_names(name), adapters))
  return arrays


def _dtype(value, allowed, field):
  name = jnp.dtype(value).name
  if name not in allowed:
    raise ConfigError(f"{field} {name!r} is not supported; supported: {', '.join(allowed)}")
  return jnp.dtype(name)


class Decoder(nnx.Module):
  """Decoder-only LM. Parameters (nnx.Param, logical axes in `out_sharding`):
  embed [V, D], layers/* [L, ...] (see `layer_param_shapes`), final_norm [D], lm_head [D, V]
  (absent when tied: the head is embed^T). With `lora`, layers/ also holds the adapters
  (nnx.LoRAParam, float32) and for QLoRA the quantised projections (see `layer_specs`)."""

  def __init__(self, config: ModelConfig, *, param_dtype="float32", compute_dtype=None,
               remat="none", scan_layers=True, attention="auto", max_segments=64,
               lora: lora_lib.LoRAConfig | None = None, router_aux_loss_coef=None,
               rngs: nnx.Rngs):
    """compute_dtype None: bfloat16 on GPU/TPU, float32 on CPU. max_segments: static bound on
    documents per packed row for cuDNN attention (see attention.attend). param_dtype is the base
    weights' dtype; adapters are float32. router_aux_loss_coef (experts only): the weight of the
    load-balancing loss in a training objective's total; None: as transformers trains this
    checkpoint (config.json's router_aux_loss_coef when its output_router_logits is true, else
    0)."""
    if remat not in REMAT_POLICIES:
      raise ConfigError(f"remat {remat!r} is not supported; supported: "
                        f"{', '.join(REMAT_POLICIES)}")
    if attention not in attn_lib.IMPLS:
      raise ConfigError(f"attention {attention!r} is not supported; supported: "
                        f"{', '.join(attn_lib.IMPLS)}")
    if max_segments < 2:
      raise ConfigError(f"max_segments must be >= 2, got {max_segments}")
    if lora is not None:
      _check_lora_targets(config, lora)
    if router_aux_loss_coef is None:
      router_aux_loss_coef = config.router_aux_loss_coef if config.output_router_logits else 0.0
    if compute_dtype is None:
      compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    self.config = config
    self.param_dtype = _dtype(param_dtype, PARAM_DTYPES, "param_dtype")
    self.compute_dtype = _dtype(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    self.remat = remat
    self.scan_layers = scan_layers
    self.attention = attention
    self.max_segments = max_segments
    self.lora = lora
    self.router_aux_loss_coef = float(router_aux_loss_coef)

    def param(init, shape, axes):
      value = init(rngs.params(), shape, jnp.float32).astype(self.param_dtype)
      return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    normal = jax.nn.initializers.normal(0.02)
    zeros = jax.nn.initializers.zeros
    ones = zeros if config.norm_plus_one else jax.nn.initializers.ones  # norm scales of 1
    c, L = config, config.num_layers
    self.embed = param(normal, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    def base_weights():  # one name at a time, drawn one layer at a time (see layer_arrays)
      for name, (shape, _) in layer_param_shapes(c).items():
        init = ones if "norm" in name else zeros if name.startswith("b") else normal
        yield name, jax.lax.map(lambda key, init=init, shape=shape: init(
            key, shape, jnp.float32).astype(self.param_dtype), jax.random.split(rngs.params(), L))

    arrays = layer_arrays(c, lora, base_weights(), rngs.params() if lora else None)
    self.layers = nnx.Dict({
        name: kind(arrays[name], out_sharding=axes, eager_sharding=False)
        for name, (kind, axes) in layer_specs(c, lora).items()})
    self.final_norm = param(ones, (c.hidden_size,), ("norm",))
    self.lm_head = (None if c.tie_word_embeddings else
                    param(normal, (c.hidden_size, c.vocab_size), ("embed", "vocab")))

  def merged_params(self) -> dict:
    """Pure-dict params (numpy) of the plain decoder this model computes, the layout of a Decoder
    without LoRA: adapters folded into their weights (W + scale A B, float32) and quantised
    weights dequantised (float32); the rest as stored."""
    pure = jax.tree.map(lambda a: np.asarray(jax.device_get(a)),
                        nnx.to_pure_dict(nnx.state(self)))
    if self.lora is None:
      return pure
    stored = pure["layers"]
    layers = {name: stored[name] for name in layer_param_shapes(self.config) if name in stored}
    for name in projections(self.config):
      if name not in layers:
        codes, scale = (stored[n] for n in quant.stored_names(name))
        layers[name] = np.asarray(quant.dequantize(codes, scale, self.lora.base_quant,
                                                   input_axes(name), jnp.float32))
    for name in self.lora.adapted():
      a, b = (stored[n] for n in lora_lib.adapter_names(name))
      layers[name] = lora_lib.fold(layers[name], a, b, self.lora.scale, num_input_axes(name))
    pure["layers"] = layers
    return pure

  def head_weight(self):
    """w_DxV in the compute dtype: embed^T when tied, else lm_head."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return w.astype(self.compute_dtype)

  def logits(self, hidden_BxTxD):
    """float32 logits hidden @ w_DxV (float32 accumulation)."""
    return jnp.einsum("btd,dv->btv", hidden_BxTxD, self.head_weight(),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, *, adapters=True):
    """float32 logits_BxTxV."""
    return self.logits(self.hidden_states(tokens_BxT, positions_BxT=positions_BxT,
                                          segment_ids_BxT=segment_ids_BxT, adapters=adapters))

  def hidden_states(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None,
                    adapters=True):
    """Final-norm hidden states [B, T, D] in the compute dtype. positions default to arange(T);
    without segment_ids the row is one causal sequence. adapters=False: the frozen base alone."""
    return self.hidden_states_and_router_loss(tokens_BxT, positions_BxT=positions_BxT,
                                              segment_ids_BxT=segment_ids_BxT,
                                              adapters=adapters)[0]

  def hidden_states_and_router_loss(self, tokens_BxT, *, positions_BxT=None,
                                    segment_ids_BxT=None, adapters=True):
    """(hidden_states, the experts' load-balancing loss over the non-padding tokens
    (`load_balancing_loss`; 0.0 without experts)) of one forward pass."""
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    valid_BxT = (jnp.ones(tokens_BxT.shape, bool) if segment_ids_BxT is None
                 else segment_ids_BxT > 0)

    def attention_fn(q, k, v, layer_cache, window):
      out = attn_lib.attend(q, k, v, segment_ids_BxT=segment_ids_BxT, impl=self.attention,
                            max_segments=self.max_segments, scale=self.config.attention_scale,
                            window=window)
      return out, layer_cache

    hidden, (_, router_stats) = self._trunk(tokens_BxT, positions_BxT, attention_fn, None,
                                            adapters, valid_BxT)
    if router_stats is None:
      return hidden, jnp.zeros((), jnp.float32)
    return hidden, load_balancing_loss(router_stats, jnp.sum(valid_BxT), self.config.num_experts)

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

    def attention_fn(q, k, v, layer_cache, window):
      k_cache, v_cache = (jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype),
                                                              cache.index, 1)
                          for old, new in zip(layer_cache, (k, v)))
      mask = mask_Bx1xTxS
      if window is not None:  # slots are positions here: prompts are left-padded
        mask = mask & attn_lib.in_window(q_slot_Tx1, kv_slot_S, window)
      out = attn_lib.attend_masked(q, k_cache, v_cache, mask, self.config.attention_scale)
      return out, (k_cache, v_cache)

    hidden, ((k_new, v_new), _) = self._trunk(
        tokens_BxT, positions_BxT, attention_fn, (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH), True,
        valid_BxT)
    return hidden, KVCache(k_new, v_new, valid_BxS, cache.index + t)

  def _trunk(self, tokens_BxT, positions_BxT, attention_fn, cache_xs, adapters, valid_BxT):
    """embed -> layers (scanned or unrolled, rematerialised per policy) -> final norm; adapters
    False leaves the LoRA adapters out. Returns (hidden, (layer caches, router statistics
    [L, 2, E] or None))."""
    c = self.config
    x = self.embed[...][tokens_BxT].astype(self.compute_dtype)
    if c.embed_scale:
      x = x * jnp.asarray(math.sqrt(c.hidden_size), self.compute_dtype)
    step = functools.partial(block, config=c, ropes=rope_tables(c, positions_BxT),
                             attention_fn=attention_fn, dtype=self.compute_dtype, lora=self.lora,
                             valid_BxT=valid_BxT)
    if self.remat != "none":
      step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat],
                            prevent_cse=not self.scan_layers)
    params = {name: v[...] for name, v in self.layers.items()
              if adapters or not lora_lib.is_adapter(name)}
    xs = (params, cache_xs, jnp.asarray(c.sliding_layers))
    if self.scan_layers:
      x, ys = jax.lax.scan(lambda x, xs: step(x, *xs), x, xs)
    else:
      per_layer = []
      for i in range(c.num_layers):
        x, y = step(x, *jax.tree.map(lambda a: a[i], xs))
        per_layer.append(y)
      ys = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    final = rms_norm(x, self.final_norm[...].astype(self.compute_dtype), c.rms_norm_eps,
                     c.norm_plus_one)
    return final, ys


def _check_lora_targets(config: ModelConfig, lora: lora_lib.LoRAConfig):
  """Every LoRA target names a projection this family's layers have (a MoE layer's MLP is its
  experts, which take no adapters)."""
  shapes = layer_param_shapes(config)
  missing = [t for t in lora.targets if lora_lib.TARGETS[t] not in shapes]
  if missing:
    have = [t for t in lora_lib.TARGETS if lora_lib.TARGETS[t] in shapes]
    raise ConfigError(f"lora.targets {','.join(missing)}: {config.model_type} layers have no such "
                      f"projection (experts take no adapters); targets for "
                      f"{config.model_type}: {','.join(have)}")


def inactive_param_count(config: ModelConfig) -> int:
  """Parameters a token does not use: the experts outside its top k (0 for dense models). Active
  parameters = all - this (the N of a MoE model's 6 N FLOPs per token)."""
  if not config.num_experts:
    return 0
  per_expert = 3 * config.hidden_size * config.moe_intermediate_size
  return config.num_layers * (config.num_experts - config.num_experts_per_tok) * per_expert


def logical_specs(params):
  """Logical PartitionSpec per parameter (same tree as `params`, e.g. nnx.state(model, nnx.Param)),
  e.g. P("layers", "embed", "q_heads", "head_dim"); sharding rules map names to mesh axes."""
  return nnx.get_partition_spec(params)
