"""Objectives vs float64 numpy references: losses, gradients wrt logits, aggregation, metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import objectives
from dft_jax.errors import ConfigError
from objectives_testlib import logp_and_entropy, objective_cfg, packed_logits, ref_logsoftmax

B, T, V, D = 8, 6, 9, 5
NAMES = ("sft", "dft", "dft_seq", "power", "psft")  # eaft, gem, deft: test_objectives_family.py
AGGREGATIONS = objectives.AGGREGATIONS
HP = dict(alpha=0.5, eps_low=0.2, eps_high=0.28, norm_constant=7.0)
# PSFT: old_logp = logp + delta, so r = exp(-delta) = 1.82, 1.35, 1.11, 0.90, 0.74, 0.55 cycles
# through all three regions (above 1 + eps_high, inside, below 1 - eps_low), away from the edges.
PSFT_DELTAS = np.array([-0.6, -0.3, -0.1, 0.1, 0.3, 0.6])
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0],
                     [1, 1, 1, 1, 1, 1],
                     [1, 2, 2, 3, 3, 0],
                     [1, 1, 2, 2, 2, 2],
                     [1, 1, 1, 1, 0, 0],
                     [1, 1, 2, 2, 3, 3],
                     [1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0]], np.int32)


def make_data(seed=0, scale=3.0):
  """Packed batch + logits (= hidden @ w) + float64 log-probs; old/ref logp around them."""
  data, rng = packed_logits(SEGMENTS, V, D, seed=seed, scale=scale, argmax_frac=0.6)
  data["loss_mask"][1, 0] = data["loss_mask"][6, :2] = 0.0  # a few prompt tokens
  logp = ref_logp_all(data["logits"])[np.arange(B)[:, None], np.arange(T),
                                      np.clip(data["targets"], 0, V - 1)]
  old_logp = logp + np.resize(PSFT_DELTAS, (B, T))
  ref_logp = logp + rng.normal(scale=0.5, size=(B, T))
  return dict(data, old_logp=old_logp.astype(np.float32), ref_logp=ref_logp.astype(np.float32))


ref_logp_all = ref_logsoftmax


def ref_segments(mask, seg):
  """{(row, id): boolean [T] selector} of segments with at least one loss token (loops)."""
  return {(b, s): seg[b] == s for b in range(mask.shape[0]) for s in np.unique(seg[b])
          if mask[b][seg[b] == s].sum() > 0}


def ref_weights(mask, seg, aggregation, norm_constant):
  if aggregation == "token_mean":
    return mask / max(mask.sum(), 1.0)
  if aggregation == "sum_norm":
    return mask / norm_constant
  segments = ref_segments(mask, seg)
  w = np.zeros(mask.shape)
  for (b, _), sel in segments.items():
    w[b, sel] = mask[b, sel] / mask[b, sel].sum() / len(segments)
  return w


def ref_loss_and_grad(data, name, aggregation="token_mean", entropy_coef=0.0, kl_coef=0.0):
  """float64 loss and d loss / d logits from closed forms, written independently of the code."""
  logp_all = ref_logp_all(data["logits"])
  probs = np.exp(logp_all)
  mask, seg = data["loss_mask"].astype(np.float64), data["segment_ids"]
  onehot = np.eye(V)[np.clip(data["targets"], 0, V - 1)]
  logp = (logp_all * onehot).sum(-1)
  p = np.exp(logp)
  if name == "sft":
    loss, coef = -logp, -np.ones_like(logp)
  elif name == "dft":
    loss, coef = -p * logp, -p
  elif name == "power":
    a = HP["alpha"]
    loss, coef = -(p**a - 1) / a, -p**a
  elif name == "psft":
    r = np.exp(logp - data["old_logp"])
    loss = -np.minimum(r, np.clip(r, 1 - HP["eps_low"], 1 + HP["eps_high"]))
    coef = np.where(r > 1 + HP["eps_high"], 0.0, -r)
  elif name == "dft_seq":
    seq_prob = np.zeros_like(logp)
    for (b, _), sel in ref_segments(mask, seg).items():
      seq_prob[b, sel] = np.exp(logp[b, sel & (mask[b] > 0)].sum())
    loss, coef = -seq_prob * logp, -seq_prob
  grad = coef[..., None] * (onehot - probs)
  ent = -(probs * logp_all).sum(-1)
  loss = loss - entropy_coef * ent
  grad = grad + entropy_coef * probs * (logp_all + ent[..., None])  # d(-H)/dz = p (log p + H)
  d = data["ref_logp"] - logp
  loss = loss + kl_coef * (np.exp(d) - d - 1)
  grad = grad + (kl_coef * (1 - np.exp(d)))[..., None] * (onehot - probs)
  w = ref_weights(mask, seg, aggregation, HP["norm_constant"])
  return (w * loss).sum(), w[..., None] * grad


def cfg_for(name, aggregation="token_mean", entropy_coef=0.0, kl_coef=0.0, **overrides):
  return objective_cfg(name, aggregation=aggregation, entropy_coef=entropy_coef, kl_coef=kl_coef,
                       **{**HP, **overrides})


def loss_from_logits(logits, data, cfg, denominators=None):
  logp, ent = logp_and_entropy(logits, data["targets"])
  stats = dict(logp=logp, entropy=ent, old_logp=data["old_logp"], ref_logp=data["ref_logp"])
  batch = dict(loss_mask=data["loss_mask"], segment_ids=data["segment_ids"])
  return objectives.objective_loss(stats, batch, objectives.validate(cfg),
                                   denominators=denominators)


def loss_from_params(w, data, denominators, cfg):
  """Loss as a function of a shared parameter (as model weights are), for accumulation tests."""
  return loss_from_logits(jnp.einsum("btd,dv->btv", data["hidden"], w), data, cfg, denominators)


def grad_wrt_logits(data, cfg):
  fn = jax.jit(jax.value_and_grad(functools.partial(loss_from_logits, cfg=cfg), has_aux=True))
  (loss, metrics), grad = fn(data["logits"], data)
  return loss, metrics, grad


def assert_close(actual, expected, rtol=2e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_logp_and_entropy_match_float64():
  data = make_data(scale=40.0)  # large logits: needs the max shift
  logp, ent = jax.jit(logp_and_entropy)(data["logits"], data["targets"])
  logp_all = ref_logp_all(data["logits"])
  ref = logp_all[np.arange(B)[:, None], np.arange(T), np.clip(data["targets"], 0, V - 1)]
  assert logp.dtype == ent.dtype == jnp.float32
  assert_close(logp, ref, rtol=1e-5)
  assert_close(ent, -(np.exp(logp_all) * logp_all).sum(-1), rtol=1e-4)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_float64(name, aggregation):
  data = make_data()
  loss, _, grad = grad_wrt_logits(data, cfg_for(name, aggregation))
  ref_loss, ref_grad = ref_loss_and_grad(data, name, aggregation)
  assert_close(loss, ref_loss)
  assert_close(grad, ref_grad)


@pytest.mark.parametrize("name", NAMES)
def test_entropy_bonus_and_kl_anchor_match_float64(name):
  data = make_data(seed=1)
  cfg = cfg_for(name, entropy_coef=0.05, kl_coef=0.2)
  loss, metrics, grad = grad_wrt_logits(data, cfg)
  ref_loss, ref_grad = ref_loss_and_grad(data, name, entropy_coef=0.05, kl_coef=0.2)
  assert_close(loss, ref_loss)
  assert_close(grad, ref_grad)
  terms = sum(metrics[k] for k in ("loss/objective", "loss/entropy_bonus", "loss/kl_anchor"))
  np.testing.assert_allclose(terms, loss, rtol=1e-6)


def test_psft_gradient_by_region():
  """A=1: zero above 1 + eps_high, r * (softmax - onehot) inside AND below 1 - eps_low."""
  data = make_data()
  _, _, grad = grad_wrt_logits(data, cfg_for("psft"))
  r = np.resize(np.exp(-PSFT_DELTAS), (B, T))
  live = data["loss_mask"] > 0
  assert np.all(np.asarray(grad)[live & (r > 1.28)] == 0.0)
  _, sft_grad = ref_loss_and_grad(data, "sft")
  for region in (r < 0.8, (r > 0.8) & (r < 1.28)):
    sel = live & region
    assert sel.any()
    assert_close(np.asarray(grad)[sel], (r[..., None] * sft_grad)[sel])


def test_psft_with_old_equal_new_is_sft():
  """old_logp is the very same traced array: PSFT must stop its gradient (r = 1, grad = SFT's)."""
  data = make_data()

  def psft_old_is_new(logits):
    logp, _ = logp_and_entropy(logits, data["targets"])
    return objectives.objective_loss(dict(logp=logp, old_logp=logp), data,
                                     objectives.validate(cfg_for("psft")))[0]

  psft_grad = jax.jit(jax.grad(psft_old_is_new))(data["logits"])
  _, _, sft_grad = grad_wrt_logits(data, cfg_for("sft"))
  np.testing.assert_allclose(psft_grad, sft_grad, rtol=1e-6, atol=1e-9)


def test_dft_stop_gradient_matters():
  """DFT's gradient p * (softmax - onehot) differs from that of -p * logp differentiated fully."""
  data = make_data()
  _, _, dft_grad = grad_wrt_logits(data, cfg_for("dft"))

  def no_stop_gradient(logits):
    logp, _ = logp_and_entropy(logits, data["targets"])
    return objectives.aggregate(-jnp.exp(logp) * logp, data["loss_mask"])

  full_grad = jax.jit(jax.grad(no_stop_gradient))(data["logits"])
  assert np.abs(np.asarray(full_grad) - dft_grad).max() > 0.1 * np.abs(dft_grad).max()


def test_power_links_sft_and_dft():
  data = make_data()
  _, _, dft_grad = grad_wrt_logits(data, cfg_for("dft"))
  _, _, sft_grad = grad_wrt_logits(data, cfg_for("sft"))
  _, _, alpha1_grad = grad_wrt_logits(data, cfg_for("power", alpha=1.0))
  _, _, alpha0_grad = grad_wrt_logits(data, cfg_for("power", alpha=1e-6))
  np.testing.assert_allclose(alpha1_grad, dft_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(alpha0_grad, sft_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_is_zero_and_finite(name, aggregation):
  data = make_data(scale=300.0)  # logp down to about -1000 on some tokens
  data["loss_mask"] = np.zeros((B, T), np.float32)
  data["targets"][:] = -100
  data["old_logp"][:] = -2000.0  # ratio exp(1000) without the clamp
  data["ref_logp"][:] = 0.0      # k3 exp(1000) without the clamp
  loss, metrics, grad = grad_wrt_logits(data, cfg_for(name, aggregation, 0.1, 0.1))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  final = objectives.finalize_metrics(metrics)
  assert all(np.all(np.isfinite(v)) for v in final.values())
  assert float(final["num_tokens"]) == 0.0 and float(final["target_prob"]) == 0.0


def test_aggregate_ignores_nonfinite_loss_on_masked_tokens():
  loss = jnp.array([[1.0, jnp.nan, jnp.inf, 3.0]])
  mask = jnp.array([[1.0, 0.0, 0.0, 1.0]])
  for mode in AGGREGATIONS:
    assert np.isfinite(objectives.aggregate(loss, mask, mode, norm_constant=2.0)), mode
  np.testing.assert_allclose(objectives.aggregate(loss, mask), 2.0)


def test_extreme_ratios_keep_gradients_finite():
  """Live tokens far from old/ref policies: PSFT flat (zero grad), k3 clamped, nothing NaN."""
  data = make_data()
  data["old_logp"][:] = -2000.0
  data["ref_logp"][:] = 0.0
  data["logits"] = data["logits"] * 300.0
  for name in NAMES:
    loss, _, grad = grad_wrt_logits(data, cfg_for(name, entropy_coef=0.1, kl_coef=0.1))
    assert np.isfinite(loss) and np.all(np.isfinite(grad)), name


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_give_float32(name):
  data = make_data()
  logits = jnp.asarray(data["logits"], jnp.bfloat16)
  data["logits"] = np.asarray(logits.astype(jnp.float32))  # the reference sees the same values
  logp, ent = logp_and_entropy(logits, data["targets"])
  setting = objectives.validate(cfg_for(name))
  per_token = objectives.per_token_terms(
      dict(logp=logp.astype(jnp.bfloat16), old_logp=data["old_logp"]),
      dict(loss_mask=data["loss_mask"], segment_ids=data["segment_ids"]), setting)["objective"]
  loss, metrics, _ = grad_wrt_logits({**data, "logits": logits}, cfg_for(name, kl_coef=0.1))
  assert {logp.dtype, ent.dtype, per_token.dtype, loss.dtype} == {jnp.dtype(jnp.float32)}
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  ref_loss, _ = ref_loss_and_grad(data, name, kl_coef=0.1)
  assert_close(loss, ref_loss, rtol=1e-5)  # bf16 math would be off by ~1e-2


def _split(data, num):
  rows = B // num
  return [{k: v if k == "w" else v[i * rows:(i + 1) * rows] for k, v in data.items()}
          for i in range(num)]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", ("dft", "psft", "dft_seq"))
def test_microbatches_equal_full_batch(name, aggregation):
  data = make_data()
  cfg = cfg_for(name, aggregation, entropy_coef=0.05, kl_coef=0.1)
  step = jax.jit(jax.value_and_grad(functools.partial(loss_from_params, cfg=cfg), has_aux=True))
  (loss, metrics), grad = step(data["w"], data, None)
  denominators = objectives.global_denominators(data["loss_mask"], data["segment_ids"])
  parts = [step(data["w"], part, denominators) for part in _split(data, 4)]
  summed = jax.tree.map(lambda *xs: sum(xs), *parts)
  (micro_loss, micro_metrics), micro_grad = summed
  np.testing.assert_allclose(micro_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(micro_grad, grad, rtol=1e-5, atol=1e-7)
  full, micro = objectives.finalize_metrics(metrics), objectives.finalize_metrics(micro_metrics)
  for key in full:
    np.testing.assert_allclose(micro[key], full[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_devices_equal_full_batch(aggregation):
  """Each of 8 devices holds one row and uses the global denominators; the sum = full batch."""
  if jax.device_count() < B:
    pytest.skip(f"needs {B} devices")
  data = make_data()
  cfg = cfg_for("dft_seq", aggregation, entropy_coef=0.05)
  grad_fn = jax.value_and_grad(functools.partial(loss_from_params, cfg=cfg), has_aux=True)
  (loss, _), grad = jax.jit(grad_fn)(data["w"], data, None)
  denominators = objectives.global_denominators(data["loss_mask"], data["segment_ids"])
  mesh = jax.make_mesh((B,), ("data",))
  P = jax.sharding.PartitionSpec
  batch = jax.device_put({k: v for k, v in data.items() if k != "w"},
                         jax.sharding.NamedSharding(mesh, P("data")))

  def per_device(w, shard, denominators):
    (l, _), g = grad_fn(w, shard, denominators)  # g of the replicated w: already summed (psum)
    return jax.lax.psum(l, "data"), g

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P()),
                                  out_specs=(P(), P())))
  dev_loss, dev_grad = sharded(data["w"], batch, denominators)
  np.testing.assert_allclose(dev_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(dev_grad, grad, rtol=1e-5, atol=1e-7)


def test_dft_seq_long_response_underflows_to_zero_finitely():
  segment_ids = jnp.concatenate([jnp.ones((2, 100), jnp.int32), 2 * jnp.ones((2, 200), jnp.int32)],
                                axis=1)
  logp = jnp.where(segment_ids == 1, -0.5, -1.0)  # sums -50 and -200: exp(-200) underflows
  mask = jnp.ones((2, 300))
  setting = objectives.validate({"name": "dft_seq"})
  loss_fn = lambda lp: objectives.aggregate(objectives.per_token_terms(
      {"logp": lp}, dict(loss_mask=mask, segment_ids=segment_ids), setting)["objective"], mask)
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(logp)
  np.testing.assert_allclose(grad[:, :100], -np.exp(-50.0) / 600, rtol=1e-5)  # short: live
  assert np.all(np.asarray(grad[:, 100:]) == 0.0) and np.isfinite(loss)      # long: underflow


def test_metrics_match_numpy():
  data = make_data(scale=6.0)
  cfg = cfg_for("psft", kl_coef=0.1)
  _, metrics, _ = grad_wrt_logits(data, cfg)
  final = objectives.finalize_metrics(metrics)
  live = data["loss_mask"] > 0
  logp_all = ref_logp_all(data["logits"])
  logp = logp_all[np.arange(B)[:, None], np.arange(T), np.clip(data["targets"], 0, V - 1)][live]
  p = np.exp(logp)
  r = np.exp(logp - data["old_logp"][live])
  d = data["ref_logp"][live] - logp
  expected = {
      "num_tokens": live.sum(),
      "target_prob": p.mean(),
      "entropy": -(np.exp(logp_all) * logp_all).sum(-1)[live].mean(),
      "p_below_0.1": (p < 0.1).mean(),
      "p_above_0.9": (p > 0.9).mean(),
      "psft/clip_frac_high": (r > 1.28).mean(),
      "psft/clip_frac_low": (r < 0.8).mean(),
      "psft/ratio": r.mean(),
      "psft/approx_kl": (r - 1 - np.log(r)).mean(),
      "kl_anchor/k3": (np.exp(d) - d - 1).mean(),
      "hist/target_prob": np.histogram(p, bins=objectives.HIST_EDGES)[0],
  }
  assert 0 < expected["p_below_0.1"] and 0 < expected["p_above_0.9"]  # data exercises both
  for key, value in expected.items():
    np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_objectives_vmap_over_rows(name):
  data = make_data()
  setting = objectives.validate(cfg_for(name))
  per_token = lambda lp, old, m, s: objectives.per_token_terms(
      dict(logp=lp, old_logp=old), dict(loss_mask=m, segment_ids=s), setting)["objective"]
  args = (data["ref_logp"], data["old_logp"], data["loss_mask"], data["segment_ids"])
  np.testing.assert_allclose(jax.vmap(per_token)(*args), per_token(*args), rtol=1e-6)


@pytest.mark.parametrize("field, value, allowed", [
    ("name", "dpo", "sft, dft, dft_seq, power, psft"),
    ("aggregation", "mean", "token_mean, seq_mean, sum_norm"),
    ("power.alpha", 0.0, "> 0"), ("power.alpha", -1.0, "> 0"),
    ("power.alpha", float("nan"), "> 0"), ("power.alpha", float("inf"), "> 0"),
    ("power.alpha", "big", "> 0"), ("power.alpha", True, "> 0"),
    ("psft.eps_low", 0.0, "(0, 1)"), ("psft.eps_high", 1.0, "(0, 1)"),
    ("psft.eps_high", -0.1, "(0, 1)"),
    ("entropy_coef", -0.01, ">= 0"), ("kl_coef", -1.0, ">= 0"), ("norm_constant", 0.0, "> 0"),
])
def test_bad_config_names_field_and_allowed_values(field, value, allowed):
  name = field.split(".")[0] if "." in field else "dft"
  cfg = cfg_for(name if name in objectives.OBJECTIVES else "dft")
  if "." in field:
    cfg[name][field.split(".")[1]] = value
  else:
    cfg[field] = value
  with pytest.raises(ConfigError, match=f"objective.{field}=") as err:
    objectives.validate(cfg)
  assert allowed in str(err.value)
  data = make_data()  # raised at trace time, before any compute
  with pytest.raises(ConfigError, match=f"objective.{field}="):
    jax.jit(functools.partial(loss_from_logits, cfg=cfg))(data["logits"], data)


def test_unknown_fields_are_named():
  with pytest.raises(ConfigError, match=r"objective.eps_low is not a field.*objective.psft"):
    objectives.validate({"name": "psft", "eps_low": 0.1})
  with pytest.raises(ConfigError, match=r"objective.psft.alpha is not a hyperparameter of psft; "
                     r"allowed: eps_low, eps_high"):
    objectives.validate({"name": "psft", "psft": {"alpha": 0.1}})


def test_needs():
  needs = lambda cfg: objectives.validate(cfg).needs
  assert needs(cfg_for("psft")) == {"old_logp"}
  assert needs(cfg_for("dft", kl_coef=0.1)) == {"ref_logp"}
  assert needs(cfg_for("dft_seq")) == {"segments"}
  assert needs(cfg_for("sft", entropy_coef=0.1)) == set()
