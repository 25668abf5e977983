"""cuDNN flash attention (GPU only; skipped elsewhere) against the XLA path: plain, packed, with a
sliding window and another scale; the decoder of each attention pattern (and the experts' grouped
matmuls) in bfloat16.

  JAX_PLATFORMS=cuda python -m pytest -q tests/test_models_gpu.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dft_jax import models
from dft_jax.models import attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")

# Shapes cuDNN flash attention takes (head_dim 64); GQA 8 query heads over 2 kv heads.
CONFIG = models.ModelConfig(
    "qwen2", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
    num_heads=8, num_kv_heads=2, head_dim=64, attention_bias=True, tie_word_embeddings=True)
# Gemma 3's pattern (a windowed layer, a global one, its norms and scale) and Qwen3-MoE's experts.
GEMMA = models.ModelConfig(
    "gemma3_text", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
    num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True, norm_plus_one=True,
    sandwich_norms=True, embed_scale=True, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
    layer_types=("sliding_attention", "full_attention"), sliding_window=48, local_rope_theta=1e4,
    query_pre_attn_scalar=96)
MOE = models.ModelConfig(
    "qwen3_moe", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
    num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=256, norm_topk_prob=True)


def _segments(b, t):
  seg = np.ones((b, t), np.int32)
  seg[0, 100:180], seg[0, 180:240], seg[0, 240:] = 2, 3, 0
  seg[-1, 7:] = 2
  return seg


@pytest.mark.parametrize("packed, window, scale", [
    (False, None, None), (True, None, None), (False, 48, 0.1), (True, 48, 0.1)])
def test_cudnn_attention_matches_xla(packed, window, scale):
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, 256, 8, 64), jnp.bfloat16)
  k, v = (jnp.asarray(rng.randn(2, 256, 2, 64), jnp.bfloat16) for _ in range(2))
  seg = _segments(2, 256)
  segment_ids = jnp.asarray(seg) if packed else None

  def loss(impl, q, k, v):
    out = attention.attend(q, k, v, segment_ids_BxT=segment_ids, impl=impl, window=window,
                           scale=scale)
    keep = (seg != 0)[..., None, None] if packed else 1.0
    return jnp.sum(out.astype(jnp.float32) * keep), out

  (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), (0, 1, 2),
                                           has_aux=True)(q, k, v)
  (_, out), grads = jax.value_and_grad(lambda *a: loss("cudnn", *a), (0, 1, 2),
                                       has_aux=True)(q, k, v)
  keep = seg != 0 if packed else np.ones(seg.shape, bool)
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))[keep]
  assert diff.max() < 3e-2, diff.max()
  for g, r in zip(grads, ref_grads):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.all(np.isfinite(g))
    assert np.abs(g - r).max() < 5e-2 * max(1.0, np.abs(r).max()), np.abs(g - r).max()


@pytest.mark.parametrize("config", [CONFIG, GEMMA, MOE], ids=["qwen2", "gemma3", "qwen3_moe"])
def test_decoder_cudnn_packed_matches_xla(config):
  model = models.Decoder(config, compute_dtype="bfloat16", attention="cudnn",
                         remat="nothing_saveable", rngs=nnx.Rngs(0))
  rng = np.random.RandomState(1)
  tokens = jnp.asarray(rng.randint(0, 512, (2, 256)), jnp.int32)
  seg = _segments(2, 256)
  positions = np.zeros_like(seg)
  for b in range(2):
    for s in np.unique(seg[b]):
      positions[b, seg[b] == s] = np.arange((seg[b] == s).sum())
  args = (tokens, jnp.asarray(positions), jnp.asarray(seg))
  cudnn = np.asarray(jax.jit(lambda m, *a: m(*a))(model, *args))
  model.attention = "xla"
  xla = np.asarray(jax.jit(lambda m, *a: m(*a))(model, *args))
  keep = seg != 0
  assert np.all(np.isfinite(cudnn))
  assert np.abs(cudnn - xla)[keep].max() < 0.1, np.abs(cudnn - xla)[keep].max()
  assert np.mean(cudnn.argmax(-1)[keep] == xla.argmax(-1)[keep]) > 0.97


def test_cudnn_keeps_runs_apart_only_up_to_max_segments():
  """Four documents and padding (5 runs) are exact with max_segments=5; with 3, runs past the
  third merge and document 4 sees document 3 -- why the data path refuses rows with more runs
  than model.max_segments (dft_jax.data.packing.check_segment_runs)."""
  rng = np.random.RandomState(2)
  q = jnp.asarray(rng.randn(1, 256, 8, 64), jnp.bfloat16)
  k, v = (jnp.asarray(rng.randn(1, 256, 2, 64), jnp.bfloat16) for _ in range(2))
  seg = np.zeros((1, 256), np.int32)
  for s, (start, end) in enumerate(((0, 60), (60, 120), (120, 180), (180, 240)), 1):
    seg[0, start:end] = s
  attend = lambda impl, m: np.asarray(attention.attend(
      q, k, v, segment_ids_BxT=jnp.asarray(seg), impl=impl, max_segments=m), np.float32)
  xla = attend("xla", 64)
  exact, merged = attend("cudnn", 5), attend("cudnn", 3)
  assert np.abs(exact - xla)[seg != 0].max() < 3e-2
  assert np.abs(merged - xla)[seg == 4].max() > 0.1
  assert np.abs(merged - xla)[(seg > 0) & (seg < 4)].max() < 3e-2
