"""LoRA adapters (arXiv:2106.09685) for the decoder's stacked projection weights.

A targeted projection y = x W becomes y = x W + scale * (x A) B with A [*in, r], B [r, *out]
(W [*in, *out], the decoder's input-axes-first layout), scale = alpha / r (PEFT's default;
rsLoRA's alpha / sqrt(r) is off). A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT initialises it
(kaiming_uniform with a = sqrt(5)), B = 0: at step 0 the adapted model is the base.

Adapters sit in `Decoder.layers` beside the weight they adapt ("wq" -> "wq_lora_a",
"wq_lora_b"), stacked on the same leading "layers" axis, as `nnx.LoRAParam` (float32), so
`nnx.split(model, nnx.LoRAParam, ...)` gives (trainable adapters, frozen rest). The rank axis is
"lora_rank", which no sharding rule names (replicated).

Why not qwix (Google's LoRA/QLoRA library, 0.1.8): it intercepts jnp.einsum and recognises the
weight operand among the calling nnx.Module's own nnx.Param attributes (by identity, tracer
parent or equal shape). Here the operand is one layer's slice of a stacked [L, ...] Param taken by
lax.scan, a new tracer of another shape: qwix adds no adapter and quantises nothing, silently.
The NNX idiom for stacked layers (a Block made by nnx.vmap, run by nnx.scan) fails on its first
call, as qwix creates adapter variables lazily inside the scanned body.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dft_jax.errors import ConfigError
from dft_jax.models import quant

# Target name (config, PEFT "<name>_proj") -> the decoder parameter it adapts.
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
           "down": "w_down"}
RANK_AXIS = "lora_rank"
_A, _B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapters on `targets` (names of TARGETS); base_quant "int8" / "nf4" quantises the frozen
  base's seven projections (QLoRA) with nf4 blocks of `block_size` input elements."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = tuple(TARGETS)
  base_quant: str | None = None
  block_size: int = 64

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
    if not 0 < self.alpha < math.inf:
      raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
    targets = tuple(self.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      raise ConfigError(f"lora.targets {list(targets)!r}: give distinct names among "
                        f"{', '.join(TARGETS)}")
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
    quant.check_kind(self.base_quant)
    if self.block_size < 2 or self.block_size % 2:
      raise ConfigError(f"lora.block_size must be an even number >= 2, got {self.block_size!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapted(self) -> tuple[str, ...]:
    """The decoder parameter names that carry adapters."""
    return tuple(TARGETS[t] for t in self.targets)


def adapter_names(param: str) -> tuple[str, str]:
  """("wq_lora_a", "wq_lora_b") for "wq"."""
  return param + _A, param + _B


def is_adapter(name: str) -> bool:
  return name.endswith((_A, _B))


def adapter_shapes(weight_shape, weight_axes, num_in, rank):
  """((A shape, A axes), (B shape, B axes)) for a stacked weight [L, *in, *out] with logical axes
  weight_axes and num_in input axes."""
  lead, ins, outs = weight_shape[:1], weight_shape[1:1 + num_in], weight_shape[1 + num_in:]
  lead_ax, ins_ax, outs_ax = weight_axes[:1], weight_axes[1:1 + num_in], weight_axes[1 + num_in:]
  return (((*lead, *ins, rank), (*lead_ax, *ins_ax, RANK_AXIS)),
          ((*lead, rank, *outs), (*lead_ax, RANK_AXIS, *outs_ax)))


def init_adapter(key, weight_shape, num_in, rank):
  """(A, B) float32 for a stacked weight [L, *in, *out]: A ~ U(+-1/sqrt(prod(in))), B = 0."""
  (a_shape, _), (b_shape, _) = adapter_shapes(weight_shape, (None,) * len(weight_shape), num_in,
                                              rank)
  bound = 1 / math.sqrt(math.prod(weight_shape[1:1 + num_in]))
  a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
  return a, jnp.zeros(b_shape, jnp.float32)


def delta_equations(equation: str) -> tuple[str, str]:
  """The einsums of x A and (x A) B for a projection einsum "x,w->y", e.g. "btd,dnh->btnh" ->
  ("btd,dr->btr", "btr,rnh->btnh")."""
  inputs, out = equation.split("->")
  x, w = inputs.split(",")
  ins = "".join(c for c in w if c in x)
  batch = "".join(c for c in x if c not in w)
  return f"{x},{ins}r->{batch}r", f"{batch}r,r{w[len(ins):]}->{out}"


def fold(w, a, b, scale, num_in):
  """W + scale * A B (float32 numpy) for one stacked weight [L, *in, *out]."""
  layers, ins = a.shape[0], math.prod(a.shape[1:1 + num_in])
  a2 = np.asarray(a, np.float32).reshape(layers, ins, -1)
  b2 = np.asarray(b, np.float32).reshape(layers, b.shape[1], -1)
  return np.asarray(w, np.float32) + scale * np.matmul(a2, b2).reshape(w.shape)
