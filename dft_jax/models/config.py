"""ModelConfig: the shape and switches of one decoder (Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE
and Gemma 3 text families).

Built from an HF `config.json` dict (`ModelConfig.from_hf`), written back by `to_hf`, or taken from
`PRESETS` for random init. Hashable, so it can sit in an nnx GraphDef used as a jit static arg.
A family is a set of switches (`_FAMILY_SWITCHES`), never a code path of its own.
"""
import dataclasses
from typing import Any

from dft_jax.errors import ModelError

# model_type -> HF architecture class name; the families one decoder covers.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",        # SmolLM/SmolLM2, Llama 2/3.x, DeepSeekMath
    "mistral": "MistralForCausalLM",    # Mistral (sliding-window attention when configured)
    "qwen2": "Qwen2ForCausalLM",        # Qwen2, Qwen2.5 (qkv bias; YaRN for long contexts)
    "qwen3": "Qwen3ForCausalLM",        # Qwen3 dense (q/k RMSNorm)
    "qwen3_moe": "Qwen3MoeForCausalLM",  # Qwen3-MoE (q/k RMSNorm, top-k routed experts)
    "gemma3_text": "Gemma3ForCausalLM",  # Gemma 3 text decoder (1B; the text part of 4B-27B)
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
SLIDING = "sliding_attention"

# Switches each family fixes (the rest come from config.json).
_FAMILY_SWITCHES = {
    "llama": {},
    "mistral": {},
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm=True),
    "qwen3_moe": dict(qk_norm=True),
    "gemma3_text": dict(qk_norm=True, norm_plus_one=True, sandwich_norms=True, embed_scale=True),
}
# Defaults of the transformers config classes where they differ by family.
_DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
_DEFAULT_TIED = {"gemma3_text": True}


def _unsupported(field, value, supported) -> ModelError:
  return ModelError(f"{field} {value!r} is not supported; supported: {', '.join(supported)}")


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
  """Position interpolation (arXiv:2306.15595; HF rope_type "linear"): every frequency / factor."""
  factor: float


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1 frequency-dependent RoPE scaling (HF rope_type "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class YarnRopeScaling:
  """YaRN (arXiv:2309.00071; HF rope_type "yarn"): frequencies between interpolated (/ factor) and
  kept, by a linear ramp over the dimensions whose rotations in the original context fall between
  beta_slow and beta_fast; cos and sin scaled by attention_factor (None: 0.1 ln(factor) + 1, or
  the mscale / mscale_all_dim ratio when both are given)."""
  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True


ROPE_SCALINGS = {"linear": LinearRopeScaling, "llama3": Llama3RopeScaling,
                 "yarn": YarnRopeScaling}
ROPE_TYPES = ("default", *ROPE_SCALINGS)
RopeScaling = LinearRopeScaling | Llama3RopeScaling | YarnRopeScaling


def rope_type(scaling) -> str:
  """HF rope_type of a scaling record (None: "default")."""
  return next((k for k, v in ROPE_SCALINGS.items() if isinstance(scaling, v)), "default")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and family switches (HF names in comments)."""
  model_type: str                    # one of ARCHITECTURES
  vocab_size: int
  hidden_size: int
  intermediate_size: int             # dense MLP width
  num_layers: int                    # num_hidden_layers
  num_heads: int                     # num_attention_heads
  num_kv_heads: int                  # num_key_value_heads (GQA when < num_heads)
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False       # bias on q/k/v projections (Qwen2)
  qk_norm: bool = False              # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  hidden_act: str = "silu"           # MLP gate activation: silu | gelu_pytorch_tanh (Gemma)
  # Attention pattern: layer_types[i] is "full_attention" or "sliding_attention" (() = all full);
  # a sliding layer's query sees itself and the sliding_window - 1 keys before it.
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  local_rope_theta: float | None = None  # RoPE base of sliding layers (Gemma 3
                                     # rope_local_base_freq); None: rope_theta, unscaled or not
  query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) (Gemma); None: head_dim
  norm_plus_one: bool = False        # RMSNorm scale (1 + w), product in float32 (Gemma)
  sandwich_norms: bool = False       # also a norm on the attention and MLP outputs (Gemma)
  embed_scale: bool = False          # embeddings * sqrt(hidden_size) (Gemma)
  # Mixture of experts (num_experts > 0: every layer's MLP is routed experts; Qwen3-MoE).
  num_experts: int = 0
  num_experts_per_tok: int = 0       # top-k
  moe_intermediate_size: int = 0     # one expert's MLP width
  norm_topk_prob: bool = False       # renormalise the top-k router probabilities to sum 1
  router_aux_loss_coef: float = 0.0  # config.json's load-balancing coefficient
  output_router_logits: bool = False  # config.json: transformers adds coef * aux to its loss

  def __post_init__(self):
    if self.model_type not in ARCHITECTURES:
      raise _unsupported("model_type", self.model_type, ARCHITECTURES)
    if self.num_heads % self.num_kv_heads:
      raise ModelError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.hidden_act not in ACTIVATIONS:
      raise _unsupported("hidden_act", self.hidden_act, ACTIVATIONS)
    if not self.layer_types:
      object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
    if len(self.layer_types) != self.num_layers:
      raise ModelError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_layers} layers")
    for kind in self.layer_types:
      if kind not in LAYER_TYPES:
        raise _unsupported("layer_types entry", kind, map(repr, LAYER_TYPES))
    if SLIDING in self.layer_types and not (self.sliding_window or 0) > 0:
      raise ModelError(f"sliding_attention layers need a sliding_window > 0, got "
                       f"{self.sliding_window!r}")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ModelError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                       f"got {self.num_experts_per_tok}")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends through the sliding window."""
    return tuple(kind == SLIDING for kind in self.layer_types)

  @property
  def attention_scale(self) -> float:
    """Softmax scale of q k^T: 1/sqrt(query_pre_attn_scalar or head_dim)."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Reads an HF `config.json` dict; unsupported types or field values raise ModelError."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      hint = (" (the multimodal Gemma 3 checkpoint; its text decoder alone is gemma3_text)"
              if model_type == "gemma3" else "")
      raise _unsupported(f"config.json model_type{hint}", model_type, ARCHITECTURES)
    _check_unsupported(hf)
    try:
      num_heads = int(hf["num_attention_heads"])
      hidden = int(hf["hidden_size"])
      num_layers = int(hf["num_hidden_layers"])
      kw = dict(
          vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]), num_layers=num_layers,
          num_heads=num_heads, **_moe_from_hf(hf))
    except KeyError as e:
      raise ModelError(f"config.json ({model_type}) lacks the field {e.args[0]!r}") from None
    theta, scaling, local_theta = _rope_from_hf(hf)
    layer_types, window = _attention_pattern(hf, num_layers)
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    gemma = model_type == "gemma3_text"
    return cls(
        model_type=model_type, **kw,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                        _DEFAULT_TIED.get(model_type, False))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        pad_token_id=hf.get("pad_token_id"),
        hidden_act=_activation(hf),
        layer_types=layer_types, sliding_window=window,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
        **_FAMILY_SWITCHES[model_type])

  @classmethod
  def from_gguf(cls, path) -> "ModelConfig":
    """Reads a GGUF file's metadata (no tensor is dequantised)."""
    from dft_jax.models import gguf  # pylint: disable=g-import-not-at-top
    return cls.from_hf(gguf.read_gguf_config(path))

  def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` dict (legacy rope_theta/rope_scaling keys: transformers 4 and 5 read
    them)."""
    eos = list(self.eos_token_ids)
    hf = dict(
        architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type,
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, rope_scaling=_rope_to_hf(self.rope_scaling),
        tie_word_embeddings=self.tie_word_embeddings,
        bos_token_id=self.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=self.pad_token_id, torch_dtype=torch_dtype, use_cache=True)
    if self.model_type != "qwen2":
      hf.update(attention_bias=False)
    if self.model_type == "llama":
      hf.update(mlp_bias=False)
    hf.update(self._attention_pattern_to_hf())
    if self.model_type == "gemma3_text":
      hf.update(hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                rope_local_base_freq=self.local_rope_theta, final_logit_softcapping=None,
                attn_logit_softcapping=None, use_bidirectional_attention=False)
    if self.model_type == "qwen3_moe":
      hf.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=self.output_router_logits, decoder_sparse_step=1,
                mlp_only_layers=[])
    return hf

  def _attention_pattern_to_hf(self) -> dict[str, Any]:
    """The sliding-window fields in the family's own terms (see `_attention_pattern`)."""
    window = self.sliding_window if SLIDING in self.layer_types else None
    if self.model_type == "mistral":
      return dict(sliding_window=window)
    if self.model_type == "qwen3_moe":
      return dict(use_sliding_window=window is not None, sliding_window=window)
    if self.model_type in ("qwen2", "qwen3"):
      first = self.sliding_layers.index(True) if window else self.num_layers
      return dict(use_sliding_window=window is not None, sliding_window=window,
                  max_window_layers=first, layer_types=list(self.layer_types))
    if self.model_type == "gemma3_text":
      return dict(sliding_window=self.sliding_window, layer_types=list(self.layer_types))
    return {}


def _activation(hf) -> str:
  """The MLP activation (Gemma 3 names it hidden_activation)."""
  if hf["model_type"] == "gemma3_text":
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  else:
    act = hf.get("hidden_act", "silu")
  if act not in ACTIVATIONS:
    raise _unsupported("config.json hidden_act", act, map(repr, ACTIVATIONS))
  return act


def _moe_from_hf(hf) -> dict[str, Any]:
  """The expert fields of a qwen3_moe config (transformers' Qwen3MoeConfig defaults; transformers
  5 saves num_experts as num_local_experts)."""
  if hf["model_type"] != "qwen3_moe":
    return {}
  return dict(
      num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 128))),
      num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
      moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
      output_router_logits=bool(hf.get("output_router_logits", False)))


def _attention_pattern(hf, num_layers):
  """(layer_types, sliding_window) as transformers derives them for the family: Mistral and
  Qwen3-MoE put every layer in the window when there is one; Qwen2/Qwen3 (use_sliding_window) the
  layers from max_window_layers on, unless layer_types says; Gemma 3 per layer_types, else every
  sliding_window_pattern-th layer global; Llama never."""
  model_type = hf["model_type"]
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
    window = None
  if model_type == "gemma3_text":
    window = hf.get("sliding_window", 4096)
  full = ["full_attention"] * num_layers
  if window is None or model_type == "llama":
    return tuple(full), None
  if model_type in ("mistral", "qwen3_moe"):
    return (SLIDING,) * num_layers, int(window)
  types = hf.get("layer_types")
  if types is None and model_type == "gemma3_text":
    pattern = int(hf.get("sliding_window_pattern", 6))
    types = [SLIDING if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
  elif types is None:
    first = int(hf.get("max_window_layers", 28))
    types = [SLIDING if i >= first else "full_attention" for i in range(num_layers)]
  if len(types) != num_layers:
    raise ModelError(f"config.json layer_types has {len(types)} entries for "
                     f"num_hidden_layers={num_layers}")
  return tuple(types), int(window)


def _rope_params_from_hf(scaling: dict, hf: dict):
  """One rope scaling record from an HF rope dict (None for "default")."""
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise _unsupported("config.json rope_scaling type", kind, ROPE_TYPES)
  factor = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor != 1.0:
    raise _unsupported("config.json partial_rotary_factor", factor, ["1.0"])
  if kind == "default":
    return None
  record = ROPE_SCALINGS[kind]
  values = {}
  for field in dataclasses.fields(record):
    value = scaling.get(field.name)
    if value is None and field.name == "original_max_position_embeddings":
      value = hf.get("max_position_embeddings")  # transformers' default
    if value is None and field.default is dataclasses.MISSING:
      raise ModelError(f"config.json {kind} rope_scaling lacks {field.name!r}")
    if value is not None:
      values[field.name] = value
  return record(**values)


def _rope_from_hf(hf):
  """(rope_theta, rope_scaling, local_rope_theta) from either HF layout: rope_theta + rope_scaling
  (+ Gemma's rope_local_base_freq; transformers 4, hub checkpoints) or rope_parameters
  (transformers 5; per layer type for Gemma 3)."""
  params = hf.get("rope_parameters") or {}
  nested = "full_attention" in params or "sliding_attention" in params
  global_params = (params.get("full_attention") or {}) if nested else params
  theta = float(global_params.get(
      "rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(hf["model_type"], 10000.0))))
  scaling = _rope_params_from_hf(hf.get("rope_scaling") or global_params, hf)
  if hf["model_type"] != "gemma3_text":
    return theta, scaling, None
  local = (params.get("sliding_attention") or {}) if nested else {}
  if _rope_params_from_hf(local, hf) is not None:
    raise _unsupported("config.json sliding_attention rope type", local.get("rope_type"),
                       ["default"])
  return theta, scaling, float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def _rope_to_hf(scaling):
  if scaling is None:
    return None
  values = {k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}
  return dict(rope_type=rope_type(scaling), **values)


def _check_unsupported(hf):
  """Fields whose non-default values this decoder does not implement."""
  checks = [
      ("mlp_bias", bool(hf.get("mlp_bias", False)), (False,)),
      ("quantization_config", hf.get("quantization_config"), (None,)),
      ("final_logit_softcapping", hf.get("final_logit_softcapping"), (None,)),
      ("attn_logit_softcapping", hf.get("attn_logit_softcapping"), (None,)),
      ("use_bidirectional_attention", bool(hf.get("use_bidirectional_attention")), (False,)),
  ]
  if hf["model_type"] != "qwen2":  # Qwen2 always has q/k/v bias; elsewhere it adds an o_proj bias
    checks.append(("attention_bias", bool(hf.get("attention_bias", False)), (False,)))
  if hf["model_type"] == "qwen3_moe":  # every layer routed: no dense layers between
    checks += [("decoder_sparse_step", hf.get("decoder_sparse_step", 1), (1,)),
               ("mlp_only_layers", hf.get("mlp_only_layers") or [], ([],))]
  for name, value, allowed in checks:
    if value not in allowed:
      raise _unsupported(f"config.json {name}", value, map(repr, allowed))
  for kind in hf.get("layer_types") or ():
    if kind not in LAYER_TYPES:
      raise _unsupported("config.json layer_types entry", kind, map(repr, LAYER_TYPES))


PRESETS = {
    # Real shapes (random init; for benchmarks and sharding tests).
    "qwen2.5-0.5b": ModelConfig(
        "qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=True,
        attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": ModelConfig(
        "qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
        attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-7b": ModelConfig(
        "qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, tie_word_embeddings=False,
        attention_bias=True, max_position_embeddings=32768),
    # Qwen3-30B-A3B's attention and experts (2048 wide; top 8 of experts 768 wide) with 64
    # experts in 12 layers: 1.30B active parameters of 4.47B, whose float32 weights and AdamW
    # moments (72 GB) fit one H200 beside a 4 x 4096 step (the MoE benchmark's shape).
    "qwen3-moe-a1.3b": ModelConfig(
        "qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=12,
        num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1e6, qk_norm=True,
        max_position_embeddings=40960, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001),
    # Tiny shapes for CPU tests (one per family switch set).
    "tiny-llama": ModelConfig(
        "llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64), tie_word_embeddings=False),
    "tiny-qwen2": ModelConfig(
        "qwen2", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=True,
        attention_bias=True),
    "tiny-qwen3": ModelConfig(
        "qwen3", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=False,
        qk_norm=True),
    "tiny-qwen3-moe": ModelConfig(
        "qwen3_moe", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, qk_norm=True, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        router_aux_loss_coef=0.001),
}
