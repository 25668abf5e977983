"""EAFT, GEM and DEFT vs float64 numpy references written from the papers' formulas: losses,
gradients wrt logits under jit, the stop-gradient of each gate, metrics, config validation."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import lm_head
from dft_jax import objectives
from dft_jax.errors import ConfigError
from objectives_testlib import objective_cfg, packed_logits, ref_logsoftmax, stats_from_logits

B, T, V, D = 4, 7, 32, 6
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 0],
                     [1, 1, 1, 1, 1, 1, 1],
                     [1, 1, 2, 2, 3, 3, 3],
                     [1, 1, 1, 1, 0, 0, 0]], np.int32)
# (objective, hyperparameters): the defaults first, then other settings of each knob.
CASES = [
    ("eaft", dict()),  # top-20 entropy / 3.0, alpha 1 (LLaMA-Factory)
    ("eaft", dict(alpha=0.5, k=5, norm=1.5)),
    ("eaft", dict(alpha=2.0, entropy="full", norm=math.log(V))),
    ("gem", dict()),  # beta 0.7, h linear (official train.py)
    ("gem", dict(beta=0.4, h="logsigmoid")),
    ("gem", dict(beta=1.5, h="logsigmoid")),
    ("deft", dict()),  # parameter-free
]
IDS = ["-".join([name] + ([f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in hp.items()] or ["default"])) for name, hp in CASES]
SCALES = (0.7, 4.0)  # flat and peaked predictions: gates spread over their range


def make_data(seed=0, scale=4.0):
  return packed_logits(SEGMENTS, V, D, seed=seed, scale=scale, argmax_frac=0.5)[0]


# ------------------------------------------------------------------------------------ float64


def ref_entropy(logq):
  return -(np.exp(logq) * logq).sum(-1)


def ref_per_token(data, name, **hp):
  """float64 (loss [B, T], d loss / d logits [B, T, V], gate-like values) from the formulas."""
  hp = {**defaults(name), **hp}
  z = np.asarray(data["logits"], np.float64)
  logp_all = ref_logsoftmax(z)
  probs = np.exp(logp_all)
  onehot = np.eye(V)[np.clip(data["targets"], 0, V - 1)]
  logp = (logp_all * onehot).sum(-1)
  p = np.exp(logp)
  sft_grad = probs - onehot  # d(-log p_t) / d logits
  if name == "eaft":  # arXiv 2601.02151: -sg((H / norm)**alpha) log p_t
    if hp["entropy"] == "full":
      h = ref_entropy(logp_all)
    else:
      h = ref_entropy(ref_logsoftmax(np.sort(z, -1)[..., -hp["k"]:]))
    gate = (h / hp["norm"]) ** hp["alpha"]
    return -gate * logp, gate[..., None] * sft_grad, dict(gate=gate, gate_entropy=h)
  if name == "gem":  # arXiv 2408.16673: sum_v sg(q_v w_v) (log p_v - log p_t)
    q = np.exp(ref_logsoftmax(z / hp["beta"]))
    zy = (z * onehot).sum(-1, keepdims=True)
    wts = np.ones_like(z) if hp["h"] == "linear" else 1 / (1 + np.exp(-0.01 * (z - zy)))
    a = q * wts
    mass = a.sum(-1)
    loss = (a * (logp_all - logp[..., None])).sum(-1)
    return loss, a - mass[..., None] * onehot, dict(xent=-(a * logp_all).sum(-1), mass=mass)
  if name == "deft":  # arXiv 2602.11424 + luludus/DEFT: -(p**a - 1) / (a + 1e-6), a = sg(sum p**2)
    alpha = (probs**2).sum(-1)
    gate = p**alpha
    return (-(gate - 1) / (alpha + 1e-6), (alpha / (alpha + 1e-6) * gate)[..., None] * sft_grad,
            dict(alpha=alpha, gate=gate))
  raise ValueError(name)


def ref_loss_and_grad(data, name, **hp):
  loss, grad, _ = ref_per_token(data, name, **hp)
  weights = data["loss_mask"] / data["loss_mask"].sum()  # token_mean
  return (weights * loss).sum(), weights[..., None] * grad


# ------------------------------------------------------------------------------------ jax


def defaults(name):
  return {k: hp.default for k, hp in objectives.OBJECTIVES[name].hparams.items()}


def cfg_for(name, **hp):
  return objective_cfg(name, **hp)


def loss_from_logits(logits, data, cfg, denominators=None):
  setting = objectives.validate(cfg)
  stats = stats_from_logits(logits, data["targets"], setting.stats)
  batch = dict(loss_mask=data["loss_mask"], segment_ids=data["segment_ids"])
  return objectives.objective_loss(stats, batch, setting, denominators=denominators)


@functools.lru_cache
def _jitted_grad(cfg_json):
  cfg = json.loads(cfg_json)
  return jax.jit(jax.value_and_grad(functools.partial(loss_from_logits, cfg=cfg), has_aux=True))


def grad_wrt_logits(data, cfg):
  """(loss, metrics, d loss / d logits) under jit; compiled once per config."""
  (loss, metrics), grad = _jitted_grad(json.dumps(cfg, sort_keys=True))(data["logits"], data)
  return loss, metrics, grad


def assert_close(actual, expected, rtol=2e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_gradient_matches_float64(name, hp, scale):
  data = make_data(scale=scale)
  loss, _, grad = grad_wrt_logits(data, cfg_for(name, **hp))
  ref_loss, ref_grad = ref_loss_and_grad(data, name, **hp)
  assert_close(loss, ref_loss)
  assert_close(grad, ref_grad)


def _ungated(logits, data, name, hp):
  """The same per-token formulas with the gate's stop-gradient removed (what must NOT happen)."""
  hp = {**defaults(name), **hp}
  logp_all = lm_head.log_softmax(logits)
  logp = lm_head.target_log_prob(logp_all, data["targets"])
  if name == "eaft":
    h = lm_head.topk_entropy(logp_all, hp["k"]) if hp["entropy"] == "topk" else (
        lm_head.entropy(logp_all))
    loss = -(h / hp["norm"]) ** hp["alpha"] * logp
  elif name == "gem":
    a = jax.nn.softmax(logp_all / hp["beta"], axis=-1)
    if hp["h"] == "logsigmoid":
      a = a * jax.nn.sigmoid(0.01 * (logp_all - logp[..., None]))
    loss = jnp.sum(a * (logp_all - logp[..., None]), axis=-1)
  else:
    alpha = jnp.sum(jnp.exp(2 * logp_all), axis=-1)
    loss = -jnp.expm1(alpha * logp) / (alpha + objectives.DEFT_EPSILON)
  return objectives.aggregate(loss, data["loss_mask"])


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_stop_gradient_of_the_gate_matters(name, hp):
  """Differentiating through the gate changes the gradient a lot on this data, so the float64
  comparison above catches a missing stop-gradient."""
  data = make_data()
  _, _, grad = grad_wrt_logits(data, cfg_for(name, **hp))
  ungated = functools.partial(_ungated, data=data, name=name, hp=hp)
  loss, full_grad = jax.jit(jax.value_and_grad(ungated))(data["logits"])
  assert_close(loss, ref_loss_and_grad(data, name, **hp)[0])  # same values...
  assert np.abs(np.asarray(full_grad) - grad).max() > 0.1 * np.abs(grad).max()  # ...other grad


def test_gem_beta_one_linear_is_sft_gradient():
  data = make_data()
  _, _, gem_grad = grad_wrt_logits(data, cfg_for("gem", beta=1.0))
  _, _, sft_grad = grad_wrt_logits(data, cfg_for("sft"))
  np.testing.assert_allclose(gem_grad, sft_grad, rtol=1e-5, atol=1e-7)


def test_deft_is_power_with_alpha_per_token():
  """deft and power share the q-log: with a constant Renyi-2 entropy log(2), deft = power(0.5)
  up to the official code's epsilon in the divisor, 0.5 / (0.5 + 1e-6)."""
  logp = jnp.linspace(-8.0, 0.0, 9)
  deft = objectives.deft(logp, renyi2=jnp.full_like(logp, math.log(2.0)))
  np.testing.assert_allclose(deft, objectives.power(logp, alpha=0.5) * 0.5 / (0.5 + 1e-6),
                             rtol=1e-7)
  flat = objectives.deft(logp, renyi2=jnp.full_like(logp, math.log(151_936.0)))  # a = 1/V
  assert 0.12 < 1 - float(flat[0] / objectives.power(logp, alpha=1 / 151_936.0)[0]) < 0.14
  np.testing.assert_allclose(objectives.neg_qlog(logp, 1.0), 1 - np.exp(logp), rtol=1e-6)


def test_statistics_match_float64():
  data = make_data(scale=20.0)
  names = ("renyi2_entropy", "topk_entropy:20", "topk_entropy:5", f"topk_entropy:{V}")
  statistics = (*objectives.validate(cfg_for("deft")).stats,
                *(objectives.topk_entropy_statistic(k) for k in (20, 5, V)))
  stats = jax.jit(functools.partial(stats_from_logits, stats=statistics))(
      data["logits"], data["targets"])
  assert set(names) <= set(stats)
  logp_all = ref_logsoftmax(data["logits"])
  assert_close(stats["renyi2_entropy"], -np.log((np.exp(logp_all)**2).sum(-1)), rtol=1e-5)
  for k in (20, 5):
    top = ref_logsoftmax(np.sort(np.asarray(data["logits"], np.float64), -1)[..., -k:])
    assert_close(stats[f"topk_entropy:{k}"], ref_entropy(top), rtol=1e-4)
  assert_close(stats[f"topk_entropy:{V}"], ref_entropy(logp_all), rtol=1e-4)  # k = V: exact


@pytest.mark.parametrize("name, hp", [CASES[0], CASES[4], CASES[6]], ids=[IDS[0], IDS[4], IDS[6]])
def test_metrics_match_float64(name, hp):
  data = make_data(scale=2.0)
  _, metrics, _ = grad_wrt_logits(data, cfg_for(name, **hp))
  final = objectives.finalize_metrics(metrics)
  _, _, ref = ref_per_token(data, name, **hp)
  live = data["loss_mask"] > 0
  ref = {k: v[live] for k, v in ref.items()}
  if name == "gem":
    expected = {"gem/tempered_xent": ref["xent"].mean(), "gem/tempered_mass": ref["mass"].mean()}
  else:
    down = ref["gate"] < objectives.GATED_DOWN_BELOW
    assert 0 < down.mean() < 1  # the data has tokens on both sides of the threshold
    expected = {f"{name}/gate": ref["gate"].mean(), f"{name}/gated_down": down.mean()}
    extra = "gate_entropy" if name == "eaft" else "alpha"
    expected[f"{name}/{extra}"] = ref[extra].mean()
  for key, value in expected.items():
    np.testing.assert_allclose(final[key], value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name, hp", [CASES[0], CASES[4], CASES[6]], ids=[IDS[0], IDS[4], IDS[6]])
def test_microbatches_equal_full_batch(name, hp):
  data = make_data()
  cfg = cfg_for(name, aggregation="seq_mean", entropy_coef=0.05, **hp)
  loss_fn = lambda w, d, den: loss_from_logits(jnp.einsum("btd,dv->btv", d["hidden"], w), d, cfg,
                                               den)
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, metrics), grad = step(data["w"], data, None)
  den = objectives.global_denominators(data["loss_mask"], data["segment_ids"])
  parts = [step(data["w"], {k: v if k == "w" else v[i:i + 2] for k, v in data.items()}, den)
           for i in (0, 2)]
  (micro_loss, micro_metrics), micro_grad = jax.tree.map(lambda a, b: a + b, *parts)
  np.testing.assert_allclose(micro_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(micro_grad, grad, rtol=1e-5, atol=1e-7)
  full, micro = objectives.finalize_metrics(metrics), objectives.finalize_metrics(micro_metrics)
  for key in full:
    np.testing.assert_allclose(micro[key], full[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_extreme_and_masked_batches_stay_finite(name, hp):
  data = make_data(scale=300.0)  # logp down to about -1000, entropies ~0
  loss, metrics, grad = grad_wrt_logits(data, cfg_for(name, **hp))
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  assert all(np.all(np.isfinite(v)) for v in objectives.finalize_metrics(metrics).values())
  data["loss_mask"][:] = 0.0
  loss, metrics, grad = grad_wrt_logits(data, cfg_for(name, **hp))
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("name, hp", CASES, ids=IDS)
def test_bfloat16_stats_give_float32(name, hp):
  data = make_data()
  setting = objectives.validate(cfg_for(name, **hp))
  stats = stats_from_logits(data["logits"], data["targets"], setting.stats)
  stats = {k: v.astype(jnp.bfloat16) for k, v in stats.items()}
  loss, metrics = objectives.objective_loss(stats, data, setting)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  # The math runs in float32: the same numbers as the same (bf16-rounded) stats given in float32.
  upcast = {k: v.astype(jnp.float32) for k, v in stats.items()}
  ref_loss, ref_metrics = objectives.objective_loss(upcast, data, setting)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_resolved_statistics():
  names = lambda cfg: tuple(s.name for s in objectives.validate(cfg).stats)
  assert names(cfg_for("eaft")) == ("logp", "entropy", "topk_entropy:20")
  assert names(cfg_for("eaft", k=7.0)) == ("logp", "entropy", "topk_entropy:7")
  assert names(cfg_for("eaft", entropy="full")) == ("logp", "entropy")
  assert names(cfg_for("gem")) == ("logp", "entropy", "gem_cross_entropy:0.7:linear")
  assert names(cfg_for("gem", beta=1, h="logsigmoid")) == (
      "logp", "entropy", "gem_cross_entropy:1.0:logsigmoid", "gem_mass:1.0:logsigmoid")
  assert names(cfg_for("deft")) == ("logp", "entropy", "renyi2_entropy")
  gates = {s.name: s.gradient for s in objectives.validate(cfg_for("gem", h="logsigmoid")).stats}
  assert gates == {"logp": True, "entropy": True, "gem_cross_entropy:0.7:logsigmoid": True,
                   "gem_mass:0.7:logsigmoid": False}


@pytest.mark.parametrize("field, value, allowed", [
    ("eaft.alpha", 0.0, "> 0"), ("eaft.alpha", float("nan"), "> 0"), ("eaft.alpha", "x", "> 0"),
    ("eaft.k", 1, "integer >= 2"), ("eaft.k", 2.5, "integer >= 2"), ("eaft.k", True, "integer"),
    ("eaft.norm", 0.0, "> 0"), ("eaft.entropy", "exact", "topk, full"),
    ("gem.beta", 0.0, "> 0"), ("gem.beta", float("inf"), "> 0"),
    ("gem.h", "tanh", "linear, logsigmoid"),
])
def test_bad_config_names_field_and_allowed_values(field, value, allowed):
  name, hparam = field.split(".")
  cfg = cfg_for(name)
  cfg[name][hparam] = value
  with pytest.raises(ConfigError, match=f"objective.{field}=") as err:
    objectives.validate(cfg)
  assert allowed in str(err.value)
  data = make_data()
  with pytest.raises(ConfigError, match=f"objective.{field}="):
    jax.jit(functools.partial(loss_from_logits, cfg=cfg))(data["logits"], data)


def test_topk_larger_than_the_vocabulary_is_named():
  data = make_data()
  with pytest.raises(ConfigError, match=rf"topk_entropy:40.*vocabulary size \({V}\)"):
    lm_head.token_stats(data["hidden"], data["w"], data["targets"],
                        stats=objectives.validate(cfg_for("eaft", k=40)).stats)
