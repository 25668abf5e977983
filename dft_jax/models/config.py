"""ModelConfig: the shape and switches of one decoder (Llama / Qwen2 / Qwen3 families).

Built from an HF `config.json` dict (`ModelConfig.from_hf`), written back by `to_hf`, or taken from
`PRESETS` for random init. Hashable, so it can sit in an nnx GraphDef used as a jit static arg.
"""
import dataclasses
from typing import Any

from dft_jax.errors import ModelError

# model_type -> HF architecture class name; the families one decoder covers.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",   # SmolLM/SmolLM2, Llama 2/3.x
    "qwen2": "Qwen2ForCausalLM",   # Qwen2, Qwen2.5 (qkv bias)
    "qwen3": "Qwen3ForCausalLM",   # Qwen3 dense (q/k RMSNorm)
}
ROPE_TYPES = ("default", "llama3")


def _unsupported(field, value, supported) -> ModelError:
  return ModelError(f"{field} {value!r} is not supported; supported: {', '.join(supported)}")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1 frequency-dependent RoPE scaling (HF rope_type "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and family switches (HF names in comments)."""
  model_type: str                    # "llama" | "qwen2" | "qwen3"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int                    # num_hidden_layers
  num_heads: int                     # num_attention_heads
  num_kv_heads: int                  # num_key_value_heads (GQA when < num_heads)
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False       # bias on q/k/v projections (Qwen2)
  qk_norm: bool = False              # RMSNorm over head_dim on q and k before RoPE (Qwen3)
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in ARCHITECTURES:
      raise _unsupported("model_type", self.model_type, ARCHITECTURES)
    if self.num_heads % self.num_kv_heads:
      raise ModelError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ModelError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Reads an HF `config.json` dict; unsupported types or field values raise ModelError."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise _unsupported("config.json model_type", model_type, ARCHITECTURES)
    _check_unsupported(hf)
    try:
      num_heads = int(hf["num_attention_heads"])
      hidden = int(hf["hidden_size"])
      kw = dict(
          vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads)
    except KeyError as e:
      raise ModelError(f"config.json ({model_type}) lacks the field {e.args[0]!r}") from None
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return cls(
        model_type=model_type, **kw,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        pad_token_id=hf.get("pad_token_id"))

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
        head_dim=self.head_dim, hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        rope_scaling=(None if self.rope_scaling is None else
                      dict(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))),
        tie_word_embeddings=self.tie_word_embeddings,
        bos_token_id=self.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=self.pad_token_id, torch_dtype=torch_dtype, use_cache=True)
    if self.model_type != "qwen2":
      hf.update(attention_bias=False)
    if self.model_type == "llama":
      hf.update(mlp_bias=False)
    else:
      hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _rope_from_hf(hf):
  """(rope_theta, rope_scaling) from either HF layout: rope_theta + rope_scaling (transformers 4,
  hub checkpoints) or one rope_parameters dict (transformers 5)."""
  params = hf.get("rope_parameters") or {}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = hf.get("rope_scaling") or params
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise _unsupported("config.json rope_scaling type", rope_type, ROPE_TYPES)
  factor = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor != 1.0:
    raise _unsupported("config.json partial_rotary_factor", factor, ["1.0"])
  if rope_type == "default":
    return theta, None
  try:
    return theta, Llama3RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise ModelError(f"config.json llama3 rope_scaling lacks {e.args[0]!r}") from None


def _check_unsupported(hf):
  """Fields whose non-default values this decoder does not implement."""
  checks = [
      ("hidden_act", hf.get("hidden_act", "silu"), ("silu",)),
      ("mlp_bias", bool(hf.get("mlp_bias", False)), (False,)),
      ("use_sliding_window", bool(hf.get("use_sliding_window", False)), (False,)),
      ("quantization_config", hf.get("quantization_config"), (None,)),
  ]
  if hf["model_type"] != "qwen2":  # Qwen2 always has q/k/v bias; elsewhere it adds an o_proj bias
    checks.append(("attention_bias", bool(hf.get("attention_bias", False)), (False,)))
  for name, value, allowed in checks:
    if value not in allowed:
      raise _unsupported(f"config.json {name}", value, map(repr, allowed))
  for kind in hf.get("layer_types") or ():
    if kind != "full_attention":
      raise _unsupported("config.json layer_types entry", kind, ["'full_attention'"])


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
    "smollm2-135m": ModelConfig(  # the embedded default's shape (the study's timing probe)
        "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2),
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
}
