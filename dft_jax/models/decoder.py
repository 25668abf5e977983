"""One Flax NNX decoder for the Llama / Qwen2 / Qwen3 families (config switches, no per-model file).

Pre-norm blocks: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (arXiv:2302.13971), RoPE
(arXiv:2104.09864, HF rotate-half layout), GQA (arXiv:2305.13245), Qwen2 qkv bias, Qwen3 q/k norm.
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dft_jax.errors import ConfigError
from dft_jax.models import attention as attn_lib
from dft_jax.models import lora as lora_lib
from dft_jax.models import quant
from dft_jax.models.config import ModelConfig


def _cudnn_attention_saveable(prim, *_, **__):
  """Keep cuDNN flash attention's forward outputs (output + softmax statistics), so the backward
  pass does not run the attention forward again. Matches nothing off GPU."""
  return prim.name == "dot_product_attention_fwd_wrapper"


MLP_SAVED = ("mlp_gate", "mlp_up")  # checkpoint names of the MLP's two input projections


REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_saveable": _cudnn_attention_saveable,
    "dots_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _cudnn_attention_saveable),
    # Long rows: keep the MLP's gate and up projections (most of a layer's matmul FLOPs) and the
    # attention's outputs, recompute the rest (2 x intermediate_size values a token a layer).
    "mlp_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*MLP_SAVED), _cudnn_attention_saveable),
}
PARAM_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


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


def block(x_BxTxD, p, layer_cache, *, config, cos, sin, attention_fn, dtype, lora):
  """One decoder layer. p: this layer's params (any dtype, cast here; quantised weights are
  dequantised by `project`); attention_fn(q, k, v, layer_cache) -> (out, new_layer_cache)."""
  c = config
  p = {name: a if quant.is_stored(name) else a.astype(dtype) for name, a in p.items()}
  proj = functools.partial(project, p=p, lora=lora, dtype=dtype)
  h = rms_norm(x_BxTxD, p["attn_norm"], c.rms_norm_eps)
  q, k, v = proj(h, name="wq"), proj(h, name="wk"), proj(h, name="wv")
  if c.attention_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if c.qk_norm:
    q, k = rms_norm(q, p["q_norm"], c.rms_norm_eps), rms_norm(k, p["k_norm"], c.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  out_BxTxNxH, layer_cache = attention_fn(q, k, v, layer_cache)
  x_BxTxD = x_BxTxD + proj(out_BxTxNxH, name="wo")
  h = rms_norm(x_BxTxD, p["mlp_norm"], c.rms_norm_eps)
  gate, up = (checkpoint_name(proj(h, name=n), saved) for n, saved in zip(("w_gate", "w_up"),
                                                                          MLP_SAVED))
  x_BxTxD = x_BxTxD + proj(jax.nn.silu(gate) * up, name="w_down")
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


def layer_specs(c: ModelConfig, lora) -> dict[str, tuple[type, tuple[str, ...]]]:
  """Stored per-layer entries -> (variable type, logical axes with "layers"): the weights of
  `layer_param_shapes` (nnx.Param), or for QLoRA the projections as codes + scales
  (quant.QuantizedWeight), and the adapters (nnx.LoRAParam)."""
  shapes = layer_param_shapes(c)
  specs = {name: (nnx.Param, ("layers", *axes)) for name, (_, axes) in shapes.items()}
  if lora is None:
    return specs
  if lora.base_quant:
    for name in PROJECTIONS:
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
               remat="none", scan_layers=True, attention="auto",
               max_segments=attn_lib.DEFAULT_MAX_SEGMENTS, lora: lora_lib.LoRAConfig | None = None,
               rngs: nnx.Rngs):
    """compute_dtype None: bfloat16 on GPU/TPU, float32 on CPU. max_segments: static bound on
    documents per packed row for cuDNN attention (see attention.attend). param_dtype is the base
    weights' dtype; adapters are float32."""
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
    self.lora = lora

    def param(init, shape, axes):
      value = init(rngs.params(), shape, jnp.float32).astype(self.param_dtype)
      return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    normal = jax.nn.initializers.normal(0.02)
    ones = jax.nn.initializers.ones
    zeros = jax.nn.initializers.zeros
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
    for name in PROJECTIONS:
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
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

    def attention_fn(q, k, v, layer_cache):
      out = attn_lib.attend(q, k, v, segment_ids_BxT=segment_ids_BxT, impl=self.attention,
                            max_segments=self.max_segments)
      return out, layer_cache

    hidden, _ = self._trunk(tokens_BxT, positions_BxT, attention_fn, None, adapters)
    return hidden

  def decode_layers(self):
    """The layers' parameters as one dict a layer, cast to the compute dtype as `block` casts
    them (quantised weights as stored): what a sampler's decode step reads, each layer from arrays
    of its own instead of a slice of the stacked ones every step."""
    stacked = {name: v[...] for name, v in self.layers.items()}
    cast = lambda name, a: a if quant.is_stored(name) else a.astype(self.compute_dtype)
    return tuple({name: cast(name, a[i]) for name, a in stacked.items()}
                 for i in range(self.config.num_layers))

  def run_layers(self, tokens_BxT, positions_BxT, attention_fn, caches, layers=None):
    """(final-norm hidden_BxTxD, caches) of the trunk with attention_fn(q, k, v, cache) ->
    (out, cache) in place of causal attention: a sampler's prefill and decode steps, with caches
    of its own layout. caches: stacked on a leading layers axis (or None), scanned like the
    parameters; with `layers` (decode_layers()), a tuple of one cache a layer, and the layers run
    one after the other on their own arrays."""
    return self._trunk(tokens_BxT, positions_BxT, attention_fn, caches, True, layers)

  def _trunk(self, tokens_BxT, positions_BxT, attention_fn, cache_xs, adapters, layers=None):
    """embed -> layers (scanned or unrolled, rematerialised per policy) -> final norm; adapters
    False leaves the LoRA adapters out; `layers`: per-layer parameters and caches (run_layers)."""
    x = self.embed[...][tokens_BxT].astype(self.compute_dtype)
    cos, sin = rope_angles(positions_BxT, rope_inv_freq(self.config))
    step = functools.partial(block, config=self.config, cos=cos, sin=sin,
                             attention_fn=attention_fn, dtype=self.compute_dtype, lora=self.lora)
    if self.remat != "none":
      step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat],
                            prevent_cse=not self.scan_layers)
    params = {name: v[...] for name, v in self.layers.items()
              if adapters or not lora_lib.is_adapter(name)}
    if layers is not None:
      cache_ys = []
      for layer_params, layer_cache in zip(layers, cache_xs):
        x, layer_cache = step(x, layer_params, layer_cache)
        cache_ys.append(layer_cache)
      cache_ys = tuple(cache_ys)
    elif self.scan_layers:
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
