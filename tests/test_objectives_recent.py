"""Objectives researchers now compare DFT against, each against a float64 numpy reference of its
value and gradient written from the authors' code, through the chunked LM head (hidden states and
head weight in, gradients with respect to both out)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import lm_head, objectives
from objectives_testlib import objective_cfg

B, T, D, V = 3, 16, 8, 24
CHUNK = 20  # 3 rows x 6 positions a chunk: T is not a multiple
SEGMENTS = np.array([[1] * 7 + [2] * 9,
                     [1] * 16,
                     [1] * 5 + [2] * 6 + [0] * 5], np.int32)


def make_data(seed=0, scale=3.0):
  """Packed rows: hidden states, head weight, targets (the argmax on half the tokens, so p_t
  spreads over (0, 1)), loss mask (0 on padding and each segment's last token), and a reference
  model's hidden states and head weight near the policy's."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (scale * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  logits = hidden.astype(np.float64) @ w
  targets = np.where(rng.random((B, T)) < 0.5, logits.argmax(-1),
                     rng.integers(0, V, (B, T))).astype(np.int32)
  last = np.append(SEGMENTS[:, 1:] != SEGMENTS[:, :-1], np.ones((B, 1), bool), axis=1)
  mask = ((SEGMENTS > 0) & ~last).astype(np.float32)
  targets[SEGMENTS == 0] = -100
  ref_hidden = (hidden + 0.6 * rng.normal(size=hidden.shape)).astype(np.float32)
  ref_w = (w + 0.3 * rng.normal(size=w.shape)).astype(np.float32)
  return dict(hidden=hidden, w=w, targets=targets, loss_mask=mask, segment_ids=SEGMENTS,
              ref_hidden=ref_hidden, ref_w=ref_w)


def log_softmax64(hidden, w):
  z = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_grads(data, per_token):
  """float64 token-mean loss and its gradients wrt hidden and w, from per_token(logp_all, onehot)
  -> (loss [B, T], d loss / d logits [B, T, V])."""
  logp_all = log_softmax64(data["hidden"], data["w"])
  onehot = np.eye(V)[np.clip(data["targets"], 0, V - 1)]
  loss, dlogits = per_token(logp_all, onehot)
  weights = data["loss_mask"] / data["loss_mask"].sum()
  dlogits = weights[..., None] * dlogits
  return ((weights * loss).sum(), dlogits @ np.asarray(data["w"], np.float64).T,
          np.einsum("btd,btv->dv", np.asarray(data["hidden"], np.float64), dlogits))


def head_loss(hidden, w, data, cfg):
  """The step's loss from the chunked head; the reference model's logp when the objective needs
  it, from its own hidden states and head weight."""
  setting = objectives.validate(cfg)
  stats = lm_head.token_stats(hidden, w, data["targets"], chunk_size=CHUNK, stats=setting.stats,
                              ref_hidden_BxTxD=data["ref_hidden"], ref_w_DxV=data["ref_w"])
  if "ref_logp" in setting.needs:
    stats["ref_logp"] = lm_head.token_stats(data["ref_hidden"], data["ref_w"], data["targets"],
                                            stats=(lm_head.LOGP,))["logp"]
  return objectives.objective_loss(stats, data, setting)


def loss_and_grads(data, cfg):
  """(loss, metrics, d loss / d hidden, d loss / d w) through the chunked head, under jit."""
  fn = jax.jit(jax.value_and_grad(functools.partial(head_loss, data=data, cfg=cfg),
                                  argnums=(0, 1), has_aux=True))
  (loss, metrics), (d_hidden, d_w) = fn(data["hidden"], data["w"])
  return loss, objectives.finalize_metrics(metrics), d_hidden, d_w


def assert_matches(data, cfg, per_token, rtol=2e-5):
  loss, _, d_hidden, d_w = loss_and_grads(data, cfg)
  ref_loss, ref_d_hidden, ref_d_w = reference_grads(data, per_token)
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  for got, want in ((d_hidden, ref_d_hidden), (d_w, ref_d_w)):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ----------------------------------------------------------------------------------------- ASFT


def asft64(data, kl_weight):
  """ASFT from zhuchichi56/ASFT train_v2.py and LLaMA-Factory asft_loss_func: per token
  -sg(p_t) log p_t + kl_weight sum_v q_v (log q_v - log p_v); d/dz = p_t (p - e_y) + kl_weight
  (p - q)."""
  logq = log_softmax64(data["ref_hidden"], data["ref_w"])

  def per_token(logp_all, onehot):
    p_all, q = np.exp(logp_all), np.exp(logq)
    logp = (logp_all * onehot).sum(-1)
    kl = (q * (logq - logp_all)).sum(-1)
    loss = -np.exp(logp) * logp + kl_weight * kl
    return loss, np.exp(logp)[..., None] * (p_all - onehot) + kl_weight * (p_all - q)
  return per_token


@pytest.mark.parametrize("kl_weight", [0.1, 0.05, 1.0])
def test_asft_matches_float64(kl_weight):
  data = make_data()
  assert_matches(data, objective_cfg("asft", kl_weight=kl_weight), asft64(data, kl_weight))


def test_asft_without_the_anchor_is_dft_and_against_itself_has_zero_kl():
  data = make_data(seed=1)
  _, _, dft_h, dft_w = loss_and_grads(data, {"name": "dft"})
  _, _, h0, w0 = loss_and_grads(data, objective_cfg("asft", kl_weight=0.0))
  np.testing.assert_allclose(h0, dft_h, rtol=1e-6, atol=1e-9)
  same = dict(data, ref_hidden=data["hidden"], ref_w=data["w"])
  _, metrics, h, w = loss_and_grads(same, objective_cfg("asft", kl_weight=0.5))
  assert abs(float(metrics["asft/kl"])) < 1e-6
  np.testing.assert_allclose(h, dft_h, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(w, dft_w, rtol=1e-5, atol=1e-7)


def test_asft_metrics():
  data = make_data(seed=2)
  _, metrics, _, _ = loss_and_grads(data, objective_cfg("asft", kl_weight=0.1))
  logp_all = log_softmax64(data["hidden"], data["w"])
  logq = log_softmax64(data["ref_hidden"], data["ref_w"])
  live = data["loss_mask"] > 0
  kl = (np.exp(logq) * (logq - logp_all)).sum(-1)[live]
  p = np.exp(np.take_along_axis(logp_all, np.clip(data["targets"], 0, V - 1)[..., None],
                                -1)[..., 0])[live]
  loss = -p * np.log(p) + 0.1 * kl
  np.testing.assert_allclose(metrics["asft/kl"], kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["asft/kl_share"], (0.1 * kl / loss).mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["asft/gated_down"], (p < 0.5).mean(), rtol=1e-6)


# ------------------------------------------------------------------------------------ CHORD phi


def chord_phi64(cutoff):
  """Trinity-RFT sft_phi: -sg(p_t (1 - p_t)) min(log p_t, log c); d/dz = phi 1[p_t <= c] (p - e_y)."""

  def per_token(logp_all, onehot):
    p_all = np.exp(logp_all)
    logp = (logp_all * onehot).sum(-1)
    phi = np.exp(logp) * (1 - np.exp(logp))
    loss = -phi * np.minimum(logp, np.log(cutoff))
    return loss, (phi * (logp <= np.log(cutoff)))[..., None] * (p_all - onehot)
  return per_token


@pytest.mark.parametrize("cutoff", [1.0, 0.6])
def test_chord_phi_matches_float64(cutoff):
  data = make_data()
  assert_matches(data, objective_cfg("chord_phi", cutoff=cutoff), chord_phi64(cutoff))


def test_chord_phi_gradient_is_that_of_half_squared_complement():
  """An independent check of the stop-gradient: d/dz of -sg(p(1-p)) log p = d/dz of (1-p)^2 / 2."""
  data = make_data(seed=3)
  _, _, d_hidden, _ = loss_and_grads(data, {"name": "chord_phi"})

  def half_squared(hidden):
    logp = lm_head.token_stats(hidden, data["w"], data["targets"], stats=("logp",))["logp"]
    return objectives.aggregate(0.5 * (1 - jnp.exp(logp)) ** 2, data["loss_mask"])
  np.testing.assert_allclose(d_hidden, jax.grad(half_squared)(data["hidden"]), rtol=1e-5,
                             atol=1e-8)


def test_chord_phi_metrics():
  data = make_data(seed=4)
  _, metrics, _, _ = loss_and_grads(data, objective_cfg("chord_phi", cutoff=0.6))
  logp_all = log_softmax64(data["hidden"], data["w"])
  p = np.exp(np.take_along_axis(logp_all, np.clip(data["targets"], 0, V - 1)[..., None],
                                -1)[..., 0])[data["loss_mask"] > 0]
  assert 0 < (p > 0.6).mean() < 1
  np.testing.assert_allclose(metrics["chord_phi/phi"], (p * (1 - p)).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["chord_phi/past_peak"], (p > 0.5).mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["chord_phi/cut"], (p > 0.6).mean(), rtol=1e-6)


# ------------------------------------------------------------------------ Beyond Log Likelihood


def power64(alpha):
  """Beyond-LL "p" (alpha = 1: 1 - p_t) and "GeneralFamily-alpha": -(p_t^alpha - 1) / alpha, full
  autodiff in the authors' code; d/dz = p_t^alpha (p - e_y)."""

  def per_token(logp_all, onehot):
    logp = (logp_all * onehot).sum(-1)
    loss = -np.expm1(alpha * logp) / alpha
    return loss, np.exp(alpha * logp)[..., None] * (np.exp(logp_all) - onehot)
  return per_token


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_beyond_ll_p_and_general_family_are_the_power_family(alpha):
  """-p (alpha = 1, loss 1 - p_t) and GeneralFamily-alpha of Beyond Log Likelihood are
  objective.name=power with that alpha: no separate record."""
  data = make_data()
  assert_matches(data, objective_cfg("power", alpha=alpha), power64(alpha))


def prob_threshold64(base, side, tau):
  """OnlyTop/BottomP/LogP-tau (GaotangLi/Beyond-Log-Likelihood): f(p_t) s_t, token mean over the
  loss tokens here (the authors' denominator is the selected ones)."""

  def per_token(logp_all, onehot):
    logp = (logp_all * onehot).sum(-1)
    p = np.exp(logp)
    s = (p >= tau) if side == "top" else (p <= tau)
    sft_grad = np.exp(logp_all) - onehot
    if base == "p":
      return s * (1 - p), (s * p)[..., None] * sft_grad
    return s * -logp, s[..., None] * sft_grad
  return per_token


@pytest.mark.parametrize("base,side,tau", [("logp", "top", 0.1), ("p", "top", 0.3),
                                           ("logp", "bottom", 0.3), ("p", "bottom", 0.05)])
def test_prob_threshold_matches_float64(base, side, tau):
  data = make_data()
  cfg = objective_cfg("prob_threshold", base=base, side=side, tau=tau)
  assert_matches(data, cfg, prob_threshold64(base, side, tau))
  _, metrics, _, _ = loss_and_grads(data, cfg)
  logp_all = log_softmax64(data["hidden"], data["w"])
  p = np.exp(np.take_along_axis(logp_all, np.clip(data["targets"], 0, V - 1)[..., None],
                                -1)[..., 0])[data["loss_mask"] > 0]
  selected = (p >= tau) if side == "top" else (p <= tau)
  assert 0 < selected.mean() < 1  # the data has tokens on both sides of tau
  np.testing.assert_allclose(metrics["prob_threshold/selected"], selected.mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------------- iw-SFT


def iw_sft64(data, temp, w_max):
  """emmyqin/iw_sft IwSFTLoss (sum_over_time): w_s = clip(exp(temp * mean over the sequence's loss
  tokens of (logp - ref_logp)), 0, w_max), -w_s log p_t; d/dz = w_s (p - e_y)."""
  ref_logp_all = log_softmax64(data["ref_hidden"], data["ref_w"])
  onehot = np.eye(V)[np.clip(data["targets"], 0, V - 1)]
  ref_logp = (ref_logp_all * onehot).sum(-1)

  def per_token(logp_all, onehot):
    logp = (logp_all * onehot).sum(-1)
    weight = np.zeros((B, T))
    for b in range(B):
      for s in np.unique(SEGMENTS[b]):
        sel = SEGMENTS[b] == s
        live = sel & (data["loss_mask"][b] > 0)
        if live.any():
          weight[b, sel] = min(np.exp(temp * (logp[b, live] - ref_logp[b, live]).mean()), w_max)
    return -weight * logp, weight[..., None] * (np.exp(logp_all) - onehot)
  return per_token


@pytest.mark.parametrize("temp,w_max", [(1.0, 16.0), (3.0, 1.5)])
def test_iw_sft_matches_float64(temp, w_max):
  data = make_data()
  assert_matches(data, objective_cfg("iw_sft", temp=temp, w_max=w_max),
                 iw_sft64(data, temp, w_max))


def test_iw_sft_metrics_and_its_weight_per_sequence():
  data = make_data(seed=5)
  _, metrics, _, _ = loss_and_grads(data, objective_cfg("iw_sft", temp=3.0, w_max=1.5))
  assert 0 < float(metrics["iw_sft/clipped"]) < 1  # some sequences above the clip, some not
  same = dict(data, ref_hidden=data["hidden"], ref_w=data["w"])  # reference = policy: w = 1
  _, metrics, d_hidden, _ = loss_and_grads(same, {"name": "iw_sft"})
  _, _, sft_hidden, _ = loss_and_grads(same, {"name": "sft"})
  np.testing.assert_allclose(metrics["iw_sft/weight"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(d_hidden, sft_hidden, rtol=1e-5, atol=1e-8)
