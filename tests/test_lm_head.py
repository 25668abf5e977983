"""Chunked and naive LM head vs full logits + objectives: statistics, losses, gradients, memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import lm_head, objectives
from dft_jax.errors import ConfigError

B, T, D, V = 3, 37, 16, 50  # B * T = 111 tokens: not a multiple of any chunk size used
CHUNK = 16                   # 3 rows x 5 positions per chunk, T padded to 40


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (2.0 * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, 20:] = 2
  segment_ids[2, 30:] = 0  # padding: zero hidden states, -100 targets, no loss
  hidden[segment_ids == 0] = 0.0
  targets[segment_ids == 0] = -100
  mask = (segment_ids > 0).astype(np.float32)
  mask[:, 19] = 0.0
  logp = np.asarray(lm_head.token_stats_naive(hidden, w, targets)["logp"])
  old_logp = logp + rng.normal(scale=0.3, size=(B, T))
  ref_logp = logp + rng.normal(scale=0.3, size=(B, T))
  return dict(hidden=hidden, w=w, targets=targets, loss_mask=mask, segment_ids=segment_ids,
              old_logp=old_logp.astype(np.float32), ref_logp=ref_logp.astype(np.float32))


def composite_loss(hidden, w, data, cfg, head):
  stats = head(hidden, w, data["targets"])
  stats = dict(stats, old_logp=data["old_logp"], ref_logp=data["ref_logp"])
  return objectives.objective_loss(stats, data, cfg)[0]


def reference_head(hidden, w, targets):
  """Full logits -> objectives.logp_and_entropy, independent of lm_head's statistics table."""
  logits = jnp.einsum("btd,dv->btv", hidden, w, precision="highest")
  return dict(zip(("logp", "entropy"), objectives.logp_and_entropy(logits, targets)))


NAIVE = lm_head.token_stats_naive
CHUNKED = functools.partial(lm_head.token_stats, chunk_size=CHUNK)


@pytest.mark.parametrize("chunk_size", [1, CHUNK, 10_000])
def test_stats_match_reference(chunk_size):
  data = make_data()
  args = (data["hidden"], data["w"], data["targets"])
  chunked = jax.jit(functools.partial(lm_head.token_stats, chunk_size=chunk_size))(*args)
  naive, ref = jax.jit(NAIVE)(*args), jax.jit(reference_head)(*args)
  assert set(chunked) == set(naive) == {"logp", "entropy"}
  for name in ref:
    for got in (chunked[name], naive[name]):
      assert got.shape == (B, T) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", tuple(objectives.OBJECTIVES))
def test_loss_and_gradients_match_reference(name):
  data = make_data()
  cfg = dict(name=name, entropy_coef=0.05, kl_coef=0.1)  # entropy and k3 gradients flow too

  def value_and_grads(head):
    fn = jax.value_and_grad(functools.partial(composite_loss, cfg=cfg, head=head), argnums=(0, 1))
    return jax.jit(fn)(data["hidden"], data["w"], data)

  ref_loss, (ref_d_hidden, ref_d_w) = value_and_grads(reference_head)
  for head in (CHUNKED, NAIVE):
    loss, (d_hidden, d_w) = value_and_grads(head)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in ((d_hidden, ref_d_hidden), (d_w, ref_d_w)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert np.all(np.asarray(d_hidden)[data["segment_ids"] == 0] == 0)
  assert np.abs(ref_d_w).max() > 0


def test_bfloat16_compute_close_to_float32():
  data = make_data()
  args = (data["hidden"], data["w"], data["targets"])
  bf16 = jax.jit(functools.partial(lm_head.token_stats, chunk_size=CHUNK,
                                   compute_dtype="bfloat16"))(*args)
  f32 = jax.jit(NAIVE)(*args)
  for name in f32:
    assert bf16[name].dtype == jnp.float32
    np.testing.assert_allclose(bf16[name], f32[name], atol=0.05)
  cfg = dict(name="dft", entropy_coef=0.05)
  grad = lambda head: jax.jit(jax.grad(functools.partial(composite_loss, cfg=cfg, head=head)))(
      data["hidden"], data["w"], data)
  bf16_grad, f32_grad = grad(functools.partial(CHUNKED, compute_dtype=jnp.bfloat16)), grad(NAIVE)
  np.testing.assert_allclose(bf16_grad, f32_grad, atol=0.03 * np.abs(f32_grad).max())


def test_padding_tokens_give_no_nan():
  data = make_data()
  data["hidden"][data["segment_ids"] == 0] = 1e4  # garbage on padding must not leak
  cfg = dict(name="psft", entropy_coef=0.05, kl_coef=0.1)
  fn = jax.jit(jax.value_and_grad(functools.partial(composite_loss, cfg=cfg, head=CHUNKED),
                                  argnums=(0, 1)))
  loss, (d_hidden, d_w) = fn(data["hidden"], data["w"], data)
  assert np.isfinite(loss) and np.all(np.isfinite(d_hidden)) and np.all(np.isfinite(d_w))
  stats = CHUNKED(data["hidden"], data["w"], data["targets"])
  assert all(np.all(np.isfinite(v)) for v in stats.values())


def _temp_bytes(head, tokens, vocab, dim=64):
  """Compiled temp memory of d(loss)/d(hidden, w) for a [1, tokens] batch (compile only)."""
  shapes = (jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32),
            jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32))

  def loss(hidden, w, targets):
    stats = head(hidden, w, targets)
    return jnp.sum(stats["logp"]) + jnp.sum(stats["entropy"])

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_backward_does_not_keep_per_chunk_logits():
  chunked = functools.partial(lm_head.token_stats, chunk_size=256)
  logits_bytes = 2048 * 8192 * 4
  naive = _temp_bytes(NAIVE, 2048, 8192)
  short, long = _temp_bytes(chunked, 2048, 8192), _temp_bytes(chunked, 8192, 8192)
  assert naive > logits_bytes          # the naive path holds full logits (and their gradient)
  assert short < naive / 4
  assert long - short < logits_bytes / 8  # 4x the tokens: no per-chunk [256, V] buffers kept


def test_bad_arguments_raise_config_error():
  data = make_data()
  args = (data["hidden"], data["w"], data["targets"])
  with pytest.raises(ConfigError, match="chunk_size=0"):
    lm_head.token_stats(*args, chunk_size=0)
  with pytest.raises(ConfigError, match="allowed names are logp, entropy"):
    lm_head.token_stats(*args, stats=("logp", "renyi2"))
