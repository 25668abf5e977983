"""Weight-only quantisation of the frozen base for QLoRA (arXiv:2305.14314).

A weight W is stored as (codes, scale); `dequantize(quantize(W))` approximates W:
  int8  per output channel, symmetric: scale = max|W| over the input axes / 127,
        codes = round(W / scale) in [-127, 127]; |W - W~| <= scale / 2.
  nf4   4-bit NormalFloat in blocks of `block_size` (64 in QLoRA) consecutive input elements (the
        blocks bitsandbytes forms over an [out, in] row): scale = max|W| over the block,
        codes = the nearest of the 16 NF4 values to W / scale, two codes per uint8;
        |W - W~| <= scale * (largest gap between neighbouring NF4 values) / 2.
Input axes are given from the end (`in_axes`, negative), so one spec serves a stacked [L, ...]
weight and the one-layer slice the scan body dequantises. `scale` keeps every axis of W (input
axes reduced to 1 for int8, the blocked axis divided by block_size for nf4), so W's logical axis
names still describe it. QLoRA's double quantisation of the scales is not implemented (float32
scales cost 0.5 bit per weight for nf4 instead of 0.127).
"""
from statistics import NormalDist

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import ConfigError

KINDS = ("int8", "nf4")
NF4_OFFSET = 0.9677083  # QLoRA: the outermost quantile, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def nf4_code_book() -> np.ndarray:
  """The 16 NF4 values, float64, ascending in [-1, 1] (arXiv:2305.14314 Sec. 3): normal quantiles
  of 8 evenly spaced probabilities in [0.5, offset) for the positive half, 7 for the negative
  half, an exact 0, all divided by the largest."""
  inv_cdf = NormalDist().inv_cdf
  positive = [inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
  negative = [-inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
  values = np.sort(np.array(positive + negative + [0.0]))
  return values / values.max()


NF4 = nf4_code_book().astype(np.float32)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


def check_kind(kind, field="lora.base_quant"):
  if kind is not None and kind not in KINDS:
    raise ConfigError(f"{field} {kind!r} is not supported; supported: None, {', '.join(KINDS)}")


def _with_axis(shape, axis, *sizes):
  """shape with the dimension at `axis` replaced by `sizes` (one or more dimensions)."""
  return tuple(shape[:axis]) + sizes + tuple(shape[axis + 1:])


def quantize(w, kind, in_axes, block_size=64):
  """(codes, scale) of w (float); in_axes: W's input (contracting) axes, negative."""
  w = jnp.asarray(w, jnp.float32)
  if kind == "int8":
    scale = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True) / 127
    codes = jnp.round(w / jnp.where(scale > 0, scale, 1))
    return codes.astype(jnp.int8), scale
  a = in_axes[-1] % w.ndim
  n = w.shape[a]
  if n % block_size or block_size % 2:
    raise ConfigError(f"lora.block_size={block_size} must be even and divide the input size {n} "
                      "of every quantised projection")
  blocks = w.reshape(_with_axis(w.shape, a, n // block_size, block_size))
  absmax = jnp.max(jnp.abs(blocks), axis=a + 1)
  normalised = blocks / jnp.expand_dims(jnp.where(absmax > 0, absmax, 1), a + 1)
  nearest = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normalised, method="compare_all")
  pairs = nearest.astype(jnp.uint8).reshape(_with_axis(w.shape, a, n // 2, 2))
  return (jnp.take(pairs, 0, axis=a + 1) << 4) | jnp.take(pairs, 1, axis=a + 1), absmax


def dequantize(codes, scale, kind, in_axes, dtype):
  """W~ in dtype from (codes, scale) of `quantize` (arithmetic in float32)."""
  if kind == "int8":
    return (codes.astype(jnp.float32) * scale).astype(dtype)
  a = in_axes[-1] % codes.ndim
  shape = _with_axis(codes.shape, a, 2 * codes.shape[a])
  pairs = jnp.stack([codes >> 4, codes & 15], axis=a + 1)  # [..., n / 2, 2, ...]
  values = jnp.asarray(NF4)[pairs.astype(jnp.int32)]
  blocks = values.reshape(_with_axis(shape, a, scale.shape[a], -1))
  return (blocks * jnp.expand_dims(scale, a + 1)).reshape(shape).astype(dtype)


class QuantizedWeight(nnx.Variable):
  """Frozen quantised storage (codes or scales). Not an nnx.Param: `nnx.state(model, nnx.Param)`
  and optimisers never see it."""


def stored_names(param: str) -> tuple[str, str]:
  """("wq_codes", "wq_scale") for "wq"."""
  return param + "_codes", param + "_scale"


def is_stored(name: str) -> bool:
  return name.endswith(("_codes", "_scale"))
