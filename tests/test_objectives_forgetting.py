"""TALR, OTR and FINCH (the newest answers to "SFT forgets") against float64 numpy references:
TALR's value and gradient, OTR's expected gradient over its draws and its determinism per key,
the inverse-CDF sampler's distribution, FINCH's rates on a known loss sequence; and each in the
train step: exact under microbatching and data parallelism, the same draws on a resumed step,
FINCH's rate reported every step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dft_jax import lm_head, objectives
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError
from objectives_testlib import objective_cfg, ref_logsoftmax, run_train_steps

B, T, D, V = 3, 12, 8, 300  # V spans three blocks of the sampler (lm_head.TOPK_BLOCK = 128)
CHUNK = 12                   # 3 rows x 4 positions a chunk
SEGMENTS = np.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 8 + [0] * 4], np.int32)


def make_data(seed=0, scale=3.0):
  """Packed rows: hidden states, head weight (logits = hidden @ w with p_t spread over (0, 1)),
  targets (the argmax on half the tokens, one of the 8 likeliest on the others: every target is
  drawn often by OTR's sampler), loss mask (0 on padding and each segment's end)."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (scale * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  logits = hidden.astype(np.float64) @ w
  likely = np.take_along_axis(np.argsort(-logits, -1), rng.integers(0, 8, (B, T, 1)), -1)[..., 0]
  targets = np.where(rng.random((B, T)) < 0.5, logits.argmax(-1), likely).astype(np.int32)
  last = np.append(SEGMENTS[:, 1:] != SEGMENTS[:, :-1], np.ones((B, 1), bool), axis=1)
  mask = ((SEGMENTS > 0) & ~last).astype(np.float32)
  targets[SEGMENTS == 0] = -100
  return dict(hidden=hidden, w=w, targets=targets, loss_mask=mask, segment_ids=SEGMENTS)


def head_loss(hidden, w, data, setting, token_key=None, fused=True):
  """The step's loss of `setting` through the fused (or the checkpointed) head."""
  extra = {} if token_key is None else {"token_key": token_key}
  if fused:
    return step_lib.objective_loss_fused(hidden, w, data, setting, extra_BxT=extra,
                                         chunk_size=CHUNK)[0]
  stats = lm_head.token_stats(hidden, w, data["targets"], chunk_size=CHUNK, stats=setting.stats,
                              extra_BxT=extra)
  return objectives.objective_loss({**stats, **extra}, data, setting)[0]


def grads_through_logits(data, dlogits):
  """(d loss / d hidden, d loss / d w) in float64 from d loss / d logits [B, T, V]."""
  hidden, w = (np.asarray(data[k], np.float64) for k in ("hidden", "w"))
  return dlogits @ w.T, np.einsum("btd,btv->dv", hidden, dlogits)


def logp64(data):
  """(log-softmax [B, T, V], one-hot targets [B, T, V], token-mean weights [B, T]) in float64."""
  logp_all = ref_logsoftmax(np.asarray(data["hidden"], np.float64) @ data["w"])
  onehot = np.eye(V)[np.clip(data["targets"], 0, V - 1)]
  return logp_all, onehot, data["loss_mask"] / data["loss_mask"].sum()


def assert_close(got, want, rtol=2e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ----------------------------------------------------------------------------------------- TALR


def talr64(data, tau, floor):
  """arXiv 2509.20758 as re-implemented in shankarp8/distillation-retains-capabilities: loss
  -w_t log p_t, w_t = max(max(p_t, 1e-6) ** (1 / tau), floor) held fixed, token mean; d/dz =
  w_t (p - e_y)."""
  logp_all, onehot, mean = logp64(data)
  logp = (logp_all * onehot).sum(-1)
  weight = np.maximum(np.maximum(np.exp(logp), 1e-6) ** (1.0 / tau), floor)
  loss = (mean * -weight * logp).sum()
  dlogits = (mean * weight)[..., None] * (np.exp(logp_all) - onehot)
  return (loss, *grads_through_logits(data, dlogits)), weight


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("tau,floor", [(1.0, 0.01), (0.5, 0.01), (2.0, 0.2), (0.3, 0.0)])
def test_talr_value_and_gradient_match_float64(tau, floor, fused):
  data = make_data()
  setting = objectives.validate(objective_cfg("talr", tau=tau, floor=floor))
  fn = jax.jit(jax.value_and_grad(functools.partial(head_loss, data=data, setting=setting,
                                                    fused=fused), argnums=(0, 1)))
  loss, (d_hidden, d_w) = fn(data["hidden"], data["w"])
  (ref_loss, ref_hidden, ref_w), weight = talr64(data, tau, floor)
  live = data["loss_mask"] > 0
  if floor > 0:
    assert 0 < (weight[live] <= floor).mean() < 1  # the floor binds on some tokens, not all
  assert_close(loss, ref_loss)
  assert_close(d_hidden, ref_hidden)
  assert_close(d_w, ref_w)


def test_talr_metrics_match_float64():
  data = make_data(seed=1)
  setting = objectives.validate(objective_cfg("talr", tau=0.5, floor=0.05))
  stats = lm_head.token_stats(data["hidden"], data["w"], data["targets"], stats=setting.stats)
  _, metrics = objectives.objective_loss(stats, data, setting)
  final = objectives.finalize_metrics(metrics)
  _, weight = talr64(data, 0.5, 0.05)
  live = data["loss_mask"] > 0
  np.testing.assert_allclose(final["talr/weight"], weight[live].mean(), rtol=1e-5)
  np.testing.assert_allclose(final["talr/floored"], (weight[live] <= 0.05).mean(), rtol=1e-6)
  np.testing.assert_allclose(final["talr/gated_down"], (weight[live] < 0.5).mean(), rtol=1e-6)


# ------------------------------------------------------------------------------------------ OTR


def sampling_probs64(logp_all, temperature):
  return np.exp(ref_logsoftmax(logp_all / temperature))


def otr_expected64(data, temperature, penalty):
  """float64 expectation over the draws of OTR's loss gradient: the loss -(1/K) sum_k r_k
  log p(a_k), a_k ~ q = softmax(z / T), r = 1 on the target and -penalty elsewhere, has
  E[d/dz] = -sum_v q_v r_v (e_v - p), whatever K; token mean."""
  logp_all, onehot, mean = logp64(data)
  q = sampling_probs64(logp_all, temperature)
  reward = np.where(onehot > 0, 1.0, -penalty)
  qr = q * reward
  dlogits = -(qr - qr.sum(-1, keepdims=True) * np.exp(logp_all))
  return grads_through_logits(data, mean[..., None] * dlogits)


def otr_gradients(data, setting, steps):
  """d loss / d (hidden, w) of OTR through the fused head with the token keys of each step."""
  grad = jax.grad(lambda h, w, key: head_loss(h, w, data, setting, key), argnums=(0, 1))
  keys = jax.vmap(lambda s: step_lib.token_keys(0, s, (B, T)))(steps)
  return jax.jit(jax.vmap(lambda key: grad(data["hidden"], data["w"], key)))(keys)


@pytest.mark.parametrize("temperature,penalty,samples", [
    pytest.param(1.0, 1.0, 8, marks=pytest.mark.slow), (0.7, 0.5, 4),
    pytest.param(1.5, 0.0, 2, marks=pytest.mark.slow)])
def test_otr_expected_gradient_over_the_draws_matches_float64(temperature, penalty, samples):
  """The mean of OTR's gradient over 3,000 draws of keys equals the float64 expectation within
  five standard errors (elementwise); the expectation at another temperature or penalty does
  not (the test can tell them apart)."""
  data = make_data(seed=2, scale=1.5)  # flat enough that every candidate gets drawn
  setting = objectives.validate(objective_cfg("otr", temperature=temperature, penalty=penalty,
                                              samples=samples))
  grads = otr_gradients(data, setting, jnp.arange(3000))
  for got, want, wrong in zip(grads, otr_expected64(data, temperature, penalty),
                              otr_expected64(data, temperature * 1.3, penalty + 0.5)):
    got = np.asarray(got, np.float64)
    mean, stderr = got.mean(0), got.std(0) / np.sqrt(len(got))
    tolerance = 5 * stderr + 1e-7
    assert np.all(np.abs(mean - want) <= tolerance), np.abs(mean - want).max()
    assert np.any(np.abs(mean - wrong) > tolerance)


def test_otr_is_deterministic_per_key_and_differs_across_steps():
  data = make_data()
  setting = objectives.validate(dict(name="otr"))
  first, again, other = (otr_gradients(data, setting, jnp.array([s])) for s in (5, 5, 6))
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0
  keys = np.asarray(step_lib.token_keys(0, 5, (B, T)))
  assert len({tuple(k) for k in keys.reshape(-1, 2)}) == B * T  # one key a token
  np.testing.assert_array_equal(keys, step_lib.token_keys(0, 5, (B, T)))
  assert not np.array_equal(keys, step_lib.token_keys(1, 5, (B, T)))  # another seed


@pytest.mark.parametrize("temperature", [pytest.param(1.0, marks=pytest.mark.slow), 0.5, 2.0])
def test_sampler_draws_the_tempered_distribution(temperature):
  """lm_head.sample_tokens over a 300-entry vocabulary (three blocks, the last partial) with
  zero-probability entries: the frequencies of 200,000 draws match softmax(logp / T) (chi-square
  within six of its standard deviations of its mean; entries expected fewer than 5 times pooled),
  a zero-probability entry is never drawn, each draw is the float64 inverse CDF of its uniform
  (up to float32 rounding at an edge)."""
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=2.0, size=(1, V))
  logits[0, [0, 127, 128, 250, V - 1]] = -np.inf  # block edges and the last entry
  logp = jnp.asarray(ref_logsoftmax(logits), jnp.float32)
  n = 200_000
  uniforms = jax.random.uniform(jax.random.key(7), (1, n))
  draws = np.asarray(jax.jit(lm_head.sample_tokens, static_argnums=2)(logp, uniforms,
                                                                      temperature))[0]
  q = sampling_probs64(ref_logsoftmax(logits), temperature)[0]
  counts = np.bincount(draws, minlength=V)
  assert counts[q == 0].sum() == 0
  live = q > 0
  big = n * q >= 5  # entries expected at least 5 times each; the others pooled into one cell
  pool = [counts[live & ~big].sum()] if np.any(live & ~big) else []
  observed = np.append(counts[big], pool)
  expected = np.append(n * q[big], [n * q[live & ~big].sum()] if pool else [])
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert big.sum() > 50 and chi2 < big.sum() + 6 * np.sqrt(2 * big.sum()), (chi2, big.sum())
  # each draw is the float64 inverse CDF of its uniform, but within float32 rounding of an edge
  u = np.append(np.asarray(uniforms[0, :5000], np.float64), 0.0)
  drawn = np.append(draws[:5000], lm_head.sample_tokens(logp, jnp.zeros((1, 1)), temperature)[0])
  cdf = np.cumsum(q)
  inverse = np.searchsorted(cdf, u, side="right")
  near_edge = np.min(np.abs(cdf[None, :] - u[:, None]), axis=-1) < 1e-5
  assert np.all((drawn == inverse) | near_edge) and near_edge.mean() < 0.05
  assert drawn[-1] == np.flatnonzero(live)[0]  # u = 0: the first entry that can be drawn


def test_otr_metrics():
  """hit_rate: the share of candidates equal to the target, whose expectation is q_y."""
  data = make_data(seed=4, scale=1.5)
  setting = objectives.validate(objective_cfg("otr", samples=64))
  key = step_lib.token_keys(0, 0, (B, T))
  stats = lm_head.token_stats(data["hidden"], data["w"], data["targets"], stats=setting.stats,
                              extra_BxT={"token_key": key})
  _, metrics = objectives.objective_loss(dict(stats, token_key=key), data, setting)
  final = objectives.finalize_metrics(metrics)
  logp_all, onehot, _ = logp64(data)
  live = data["loss_mask"] > 0
  p_target = (np.exp(logp_all) * onehot).sum(-1)[live]
  np.testing.assert_allclose(final["otr/hit_rate"], p_target.mean(), atol=0.03)
  np.testing.assert_allclose(final["loss"], -final["otr/return"], rtol=1e-6)


# ------------------------------------------------------------------------- FINCH (optimizer)


def finch64(losses, base, ema, max_rate, initial_loss=None):
  """focusvector/finch train_finch.py's inverse_lr with its EMA: rate_t = min(base_t /
  sqrt(avg_t), max_rate), avg_t = ema avg_{t-1} + (1 - ema) L_t; avg_0 = initial_loss (None: the
  first loss)."""
  rates, average = [], initial_loss if initial_loss is not None else losses[0]
  for t, loss in enumerate(losses):
    average = ema * average + (1 - ema) * loss
    rates.append(min(base[t] / np.sqrt(average), max_rate))
  return np.array(rates)


@pytest.mark.parametrize("initial_loss,max_rate,warmup,ema", [
    (None, 5e-5, 0, 0.9), (3.0, 5e-5, 0, 0.9), (None, 1.6e-5, 3, 0.5)])
def test_finch_rates_on_a_known_loss_sequence(initial_loss, max_rate, warmup, ema):
  """The rate of each update (the scale FINCH puts on a unit update) equals the float64
  recursion on a loss sequence that rises and falls (the cap binds on the low losses)."""
  losses = [2.5, 2.0, 3.0, 1.2, 0.6, 0.3, 0.2, 0.9, 0.1, 0.05]
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, schedule="finch", warmup_steps=warmup, min_lr_ratio=0.1,
      finch=dict(ema=ema, max_learning_rate=max_rate, initial_loss=initial_loss)))
  base = step_lib.make_schedule(cfg, len(losses))
  tx = step_lib.scale_by_loss_adaptive_rate(base, ema=ema, max_rate=max_rate,
                                            initial_loss=initial_loss)
  state, rates = tx.init(None), []
  for loss in losses:
    update, state = tx.update(jnp.ones(()), state, loss=loss)
    rates.append(-float(update))
    assert step_lib.adaptive_rates(state) == [state.learning_rate]
  want = finch64(losses, [float(base(t)) for t in range(len(losses))], ema, max_rate,
                 initial_loss)
  if max_rate < 3e-5:
    assert 0 < np.mean(want == max_rate) < 1  # the cap binds on the low losses only
  np.testing.assert_allclose(rates, want, rtol=1e-6)


# ----------------------------------------------------------------------------- in the train step


def assert_same_run(a, b, rtol=1e-5):
  (metrics_a, params_a), (metrics_b, params_b) = a, b
  for m_a, m_b in zip(metrics_a, metrics_b):
    for key in ("loss", "grad_norm", "otr/hit_rate", "talr/weight"):
      if key in m_a:
        np.testing.assert_allclose(m_a[key], m_b[key], rtol=rtol, err_msg=key)
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [dict(name="otr"), dict(name="talr", talr=dict(tau=0.5))],
                         ids=["otr", "talr"])
def test_step_is_exact_under_microbatching_and_data_parallelism(objective):
  one = run_train_steps(objective)
  assert_same_run(one, run_train_steps(objective, microbatches=4))
  assert_same_run(one, run_train_steps(objective, devices=4))


@pytest.mark.slow
def test_otr_step_draws_again_the_same_on_a_resumed_step():
  """The keys follow train.seed and the state's step: a state put back (as a restore does)
  draws what the uninterrupted run drew; another step draws otherwise."""
  run = run_train_steps(dict(name="otr"), steps=3)
  assert_same_run(run, run_train_steps(dict(name="otr"), steps=3, start_after=2), rtol=1e-6)
  hits = [float(m["otr/hit_rate"]) for m in run[0]]
  assert len(set(hits)) == 3


def test_finch_step_reports_the_rate_it_applied_every_step():
  """schedule=finch: the step reports each step's rate, which equals FINCH's recursion on the
  step's reported mean -log p_t (the batch loss FINCH reads, whatever the objective)."""
  metrics, _ = run_train_steps(dict(name="dft"), schedule="finch", steps=3)
  nll = [float(m["nll"]) for m in metrics]
  rates = [float(m["learning_rate"]) for m in metrics]
  base = [0.0, 1e-3, 1e-3]  # warmup_steps=1 from 0, then the constant learning rate
  np.testing.assert_allclose(rates, finch64(nll, base, 0.9, 1.0), rtol=1e-5)
  assert 0 < rates[1] != rates[2]


@pytest.mark.parametrize("field,value", [("ema", 1.0), ("ema", -0.1), ("max_learning_rate", 0.0),
                                         ("initial_loss", 0.0), ("initial_loss", float("nan"))])
def test_finch_fields_are_checked(field, value):
  from dft_jax.data.testing import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  config.optimizer.finch[field] = value
  with pytest.raises(ConfigError, match=f"optimizer.finch.{field}="):
    step_lib.validate(config, 1)


def test_every_objective_composes_with_finch():
  """optimizer.schedule=finch is an optimizer setting: the tx takes the update's loss whatever
  the objective, and the other schedules ignore it."""
  from dft_jax.data.testing import default_config  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.ones((2, 2))}
  for schedule in ("finch", "cosine"):
    config = default_config()
    config.optimizer.schedule = schedule
    tx, schedule_fn = step_lib.make_optimizer(config.optimizer, 10,
                                              {"w": jax.sharding.PartitionSpec("embed", "mlp")})
    updates, _ = tx.update(params, tx.init(params), params, loss=1.5)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    assert (schedule_fn is None) == (schedule == "finch")
