"""Chunked and naive LM head vs full logits + objectives: statistics, losses, gradients, memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import lm_head, objectives
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError
from objectives_testlib import objective_cfg, stats_from_logits

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
  ref_hidden = (hidden + 0.5 * rng.normal(size=hidden.shape)).astype(np.float32)
  ref_w = (w + 0.2 * rng.normal(size=w.shape)).astype(np.float32)
  ref_hidden[segment_ids == 0] = 0.0
  ref_logp = lm_head.token_stats_naive(ref_hidden, ref_w, targets)["logp"]
  return dict(hidden=hidden, w=w, targets=targets, loss_mask=mask, segment_ids=segment_ids,
              old_logp=old_logp.astype(np.float32), ref_logp=np.asarray(ref_logp),
              ref_hidden=ref_hidden, ref_w=ref_w,
              token_key=np.asarray(step_lib.token_keys(seed, 0, (B, T))))


def composite_loss(hidden, w, data, cfg, head):
  setting = objectives.validate(cfg)
  stats = head(hidden, w, data["targets"], stats=setting.stats,
               ref_hidden_BxTxD=data["ref_hidden"], ref_w_DxV=data["ref_w"],
               extra_BxT={"token_key": data["token_key"]})
  stats = dict(stats, old_logp=data["old_logp"], ref_logp=data["ref_logp"],
               token_key=data["token_key"])
  return objectives.objective_loss(stats, data, setting)[0]


def reference_head(hidden, w, targets, stats=lm_head.DEFAULT_STATS, ref_hidden_BxTxD=None,
                   ref_w_DxV=None, extra_BxT=None):
  """Full logits -> the statistics' own math directly, not through the heads."""
  full = lambda h, m: jnp.einsum("btd,dv->btv", h, m, precision="highest")
  ref_logits = None if ref_hidden_BxTxD is None else full(ref_hidden_BxTxD, ref_w_DxV)
  return stats_from_logits(full(hidden, w), targets, stats, ref_logits, extra_BxT)


NAIVE = lm_head.token_stats_naive
CHUNKED = functools.partial(lm_head.token_stats, chunk_size=CHUNK)
def stats_of(*cfgs):
  """The resolved statistics of the objective configs, in order, each once."""
  return tuple(dict.fromkeys(s for cfg in cfgs for s in objectives.validate(cfg).stats))


# logp, entropy, renyi2_entropy, topk_entropy:20 and :3, gem_cross_entropy (0.7 linear, 0.4
# logsigmoid), gem_mass:0.4:logsigmoid
ALL_STATS = stats_of(dict(name="deft"), dict(name="eaft"), objective_cfg("eaft", k=3),
                     dict(name="gem"), objective_cfg("gem", beta=0.4, h="logsigmoid"))
# logp, entropy, topk_entropy:20, renyi2_entropy, gem_cross_entropy and gem_mass 0.7 logsigmoid
FAMILY_STATS = stats_of(dict(name="eaft"), dict(name="deft"), objective_cfg("gem", h="logsigmoid"))
# Every objective, plus the family's other statistics (full-entropy EAFT, logsigmoid GEM).
OBJECTIVE_CFGS = [dict(name=name) for name in objectives.OBJECTIVES] + [
    objective_cfg("eaft", entropy="full", norm=4.0),
    objective_cfg("gem", beta=0.4, h="logsigmoid")]


@pytest.mark.parametrize("chunk_size", [1, CHUNK, 10_000])
def test_stats_match_reference(chunk_size):
  data = make_data()
  args = (data["hidden"], data["w"], data["targets"])
  chunked = jax.jit(functools.partial(lm_head.token_stats, chunk_size=chunk_size,
                                      stats=ALL_STATS))(*args)
  naive = jax.jit(functools.partial(NAIVE, stats=ALL_STATS))(*args)
  ref = jax.jit(functools.partial(reference_head, stats=ALL_STATS))(*args)
  assert set(chunked) == set(naive) == {s.name for s in ALL_STATS}
  assert len(ALL_STATS) == 8
  for name in ref:
    for got in (chunked[name], naive[name]):
      assert got.shape == (B, T) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_default_stats_are_logp_and_entropy():
  data = make_data()
  assert set(CHUNKED(data["hidden"], data["w"], data["targets"])) == {"logp", "entropy"}


@pytest.mark.parametrize("cfg", OBJECTIVE_CFGS, ids=lambda c: "-".join(map(str, c.values())))
def test_loss_and_gradients_match_reference(cfg):
  data = make_data()
  cfg = dict(cfg, entropy_coef=0.05, kl_coef=0.1)  # entropy and k3 gradients flow too

  def value_and_grads(head):
    fn = jax.value_and_grad(functools.partial(composite_loss, cfg=cfg, head=head), argnums=(0, 1))
    return jax.jit(fn)(data["hidden"], data["w"], data)

  ref_loss, (ref_d_hidden, ref_d_w) = value_and_grads(reference_head)
  assert np.isfinite(ref_loss)
  assert np.all(np.isfinite(ref_d_hidden)) and np.all(np.isfinite(ref_d_w))
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


@pytest.mark.parametrize("cfg", [dict(name="psft"), dict(name="eaft"),
                                 objective_cfg("gem", h="logsigmoid")], ids=lambda c: c["name"])
def test_padding_tokens_give_no_nan(cfg):
  """Garbage hidden states on padding change nothing: the same loss, d_w and d_hidden as with
  clean (zero) padding, no gradient into padding, finite statistics everywhere."""
  data = make_data()
  clean = data["hidden"].copy()
  pad = data["segment_ids"] == 0
  data["hidden"][pad] = 1e4
  cfg = dict(cfg, entropy_coef=0.05, kl_coef=0.1)
  fn = jax.jit(jax.value_and_grad(functools.partial(composite_loss, cfg=cfg, head=CHUNKED),
                                  argnums=(0, 1)))
  loss, (d_hidden, d_w) = fn(data["hidden"], data["w"], data)
  clean_loss, (clean_d_hidden, clean_d_w) = fn(clean, data["w"], data)
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  np.testing.assert_allclose(d_w, clean_d_w, rtol=1e-5, atol=1e-7)
  d_hidden, clean_d_hidden = np.asarray(d_hidden), np.asarray(clean_d_hidden)
  assert np.all(d_hidden[pad] == 0)
  np.testing.assert_allclose(d_hidden[~pad], clean_d_hidden[~pad], rtol=1e-5, atol=1e-7)
  stats = CHUNKED(data["hidden"], data["w"], data["targets"], stats=ALL_STATS)
  assert all(np.all(np.isfinite(v)) for v in stats.values())


def _temp_bytes(head, tokens, vocab, stats, dim=64):
  """Compiled temp memory of d(loss)/d(hidden, w) for a [1, tokens] batch (compile only)."""
  shapes = (jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32),
            jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32))

  def loss(hidden, w, targets):
    return sum(jnp.sum(v) for v in head(hidden, w, targets, stats=stats).values())

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("stats", [lm_head.DEFAULT_STATS, FAMILY_STATS], ids=["default", "family"])
def test_backward_does_not_keep_per_chunk_logits(stats):
  chunked = functools.partial(lm_head.token_stats, chunk_size=256)
  logits_bytes = 2048 * 8192 * 4
  naive = _temp_bytes(NAIVE, 2048, 8192, stats)
  short, long = (_temp_bytes(chunked, 2048, 8192, stats), _temp_bytes(chunked, 8192, 8192, stats))
  assert naive > logits_bytes          # the naive path holds full logits (and their gradient)
  assert short < naive / 4
  assert long - short < logits_bytes / 8  # 4x the tokens: no per-chunk [256, V] buffers kept


def test_bad_arguments_raise_config_error():
  data = make_data()
  args = (data["hidden"], data["w"], data["targets"])
  with pytest.raises(ConfigError, match="chunk_size=0"):
    lm_head.token_stats(*args, chunk_size=0)
  for bad in ("renyi2_entropy", "topk_entropy:5", "gem_mass:0.7"):  # not generic: records' own
    with pytest.raises(ConfigError, match=f"{bad!r} is unknown; by name: logp, entropy, "
                                          "kl_from_ref"):
      lm_head.token_stats(*args, stats=("logp", bad))
  for bad in ("logp", lm_head.LOGP, ()):
    with pytest.raises(ConfigError, match="a non-empty tuple of statistics"):
      lm_head.token_stats(*args, stats=bad)
  with pytest.raises(ConfigError, match=rf"'topk_entropy:51'.*vocabulary size \({V}\)"):
    lm_head.token_stats(*args, stats=(objectives.topk_entropy_statistic(51),))
  with pytest.raises(ConfigError, match="compare with a reference model"):
    lm_head.token_stats(*args, stats=("logp", "kl_from_ref"))


def test_gate_statistics_carry_no_gradient():
  """topk/Renyi-2 entropy and GEM's mass are stop-gradient gates; entropy and GEM's X are not."""
  data = make_data()
  for statistic in FAMILY_STATS:
    name = statistic.name
    for head in (CHUNKED, NAIVE):
      stat = lambda h, s=statistic, f=head: jnp.sum(f(h, data["w"], data["targets"],
                                                      stats=(s,))[s.name])
      grad = jax.jit(jax.grad(stat))(data["hidden"])
      gate = name.startswith(("topk_entropy", "renyi2_entropy", "gem_mass"))
      assert (np.abs(grad).max() == 0) == gate, name


def test_kl_from_ref_matches_float64_and_stops_the_reference_gradient():
  """KL(ref || model) over the full vocabulary from the reference's own hidden states, chunk by
  chunk: float64 value; d/dlogits = softmax - p_ref; no gradient into the reference."""
  data = make_data()
  rng = np.random.default_rng(3)
  ref_hidden = (data["hidden"] + 0.5 * rng.normal(size=data["hidden"].shape)).astype(np.float32)
  ref_w = (data["w"] + 0.2 * rng.normal(size=data["w"].shape)).astype(np.float32)
  logq = ref_logp64(ref_hidden, ref_w)
  logp = ref_logp64(data["hidden"], data["w"])
  expected = (np.exp(logq) * (logq - logp)).sum(-1)
  for head in (CHUNKED, NAIVE):
    kl = lambda h, rh, f=head: f(h, data["w"], data["targets"], stats=("kl_from_ref",),
                                 ref_hidden_BxTxD=rh, ref_w_DxV=ref_w)["kl_from_ref"]
    np.testing.assert_allclose(jax.jit(kl)(data["hidden"], ref_hidden), expected, rtol=2e-4,
                               atol=1e-5)
    grad_h, grad_ref = jax.jit(jax.grad(lambda h, rh: jnp.sum(kl(h, rh)), argnums=(0, 1)))(
        data["hidden"], ref_hidden)
    expected_grad = np.einsum("btv,dv->btd", np.exp(logp) - np.exp(logq), data["w"])
    np.testing.assert_allclose(grad_h, expected_grad, rtol=2e-4, atol=1e-5)
    assert np.abs(grad_ref).max() == 0


def ref_logp64(hidden, w):
  z = np.einsum("btd,dv->btv", hidden.astype(np.float64), w.astype(np.float64))
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))
