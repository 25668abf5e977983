"""Objectives of the SFT family: one record per objective, aggregation and metrics.

An objective maps per-token log-probabilities of the target tokens (logp_t, p_t = exp(logp_t)) to
a per-token loss of the same shape; sg = stop_gradient. Each is one `Objective` record in
OBJECTIVES: its pure per-token function (formula and paper in the docstring), its hyperparameters
with defaults and allowed values, the LM-head statistics of the full next-token distribution it
reads (lm_head.Statistic: its own gates and closed-form gradients are declared here, the head
applies them), what else it needs (NEEDS) and its own gate metrics. Everything below the records
(validate, objective_loss, the metrics, config_block) is generic over the registry: adding an
objective is adding a record.

Resolve once: `validate(config.objective)` at the config edge (the train job, the study, the
benchmarks) returns a `Setting` (the record, its hyperparameters, the active terms, the
statistics and needs, all resolved); the train step, the LM head and the study take the Setting
and never read the raw config again.

Two extra terms combine with any objective, each on when its coefficient is > 0 (TERMS):
`entropy_coef * (-H_t)` (entropy bonus) and `kl_coef * k3(logp_t, ref_logp_t)` (KL anchor).

Config: config.objective holds `name`, the generic fields (GENERIC: aggregation, norm_constant,
entropy_coef, kl_coef) and one block per objective with hyperparameters (`objective.psft.eps_high`,
`objective.eaft.k`, ...): `config_block()` writes it from the records.

Aggregation is separate: a weighted sum over the loss tokens that takes the denominators of the
GLOBAL batch, so microbatches and devices each contribute `sum(loss * weight)` and the caller sums.

Metrics convention: `objective_loss` returns metrics as SUMS, so that microbatches and devices are
combined by adding them; `finalize_metrics` then divides. Keys:
  "loss", "loss/<term>", "num_tokens"   additive as they are (losses already carry the global
                                        denominator; num_tokens = sum of loss_mask)
  "tok/<name>"                          loss_mask-weighted sum of a per-token value; finalize
                                        divides by num_tokens and drops the "tok/" prefix; an
                                        objective's own metrics are "tok/<objective>/<name>"
  "hist/<name>"                         bin counts over HIST_EDGES; finalize keeps them as counts

This module imports jax lazily (dft_jax.lazy): the config files read the registry without it.
"""
import dataclasses
import math
import numbers
from typing import Any, Callable

import numpy as np

from dft_jax.errors import ConfigError
from dft_jax.lazy import LazyModule

jax = LazyModule("jax")
jnp = LazyModule("jax.numpy")
lm_head = LazyModule("dft_jax.lm_head")

HIST_EDGES = np.linspace(0.0, 1.0, 21)  # bins of the target-probability histogram
# Per-token metrics of every setting (token_metrics): p_t, its tails, -log p_t and the entropy H_t.
TOKEN_METRICS = ("target_prob", "p_below_0.1", "p_above_0.9", "nll", "entropy")
# Log-ratios are clamped to this before exp (PSFT ratio, k3) so that float32 stays finite; PSFT is
# unchanged by it (its loss is flat above log(1 + eps_high)), k3 loses its gradient beyond it.
MAX_LOG_RATIO = 20.0
# A token is "gated down" (metrics <objective>/gated_down) when its gate, the factor on SFT's
# gradient (softmax - onehot), is below this: it gets less than half of SFT's update.
GATED_DOWN_BELOW = 0.5
# DEFT's divisor is a_t + this (the official code's epsilon; a_t >= 1/V, so it matters only for
# near-uniform predictions over a large vocabulary: 13 % for a flat 151,936-token one).
DEFT_EPSILON = 1e-6
# What an objective may need beyond logp and LM-head statistics, and the keywords that bring it:
#   old_logp   the policy snapshot's logp (PSFT's pi_old), fixed over one global batch's updates
#   ref_logp   the frozen reference (starting) model's logp
#   segments   the batch's loss_mask and segment_ids (sequence-level objectives)
#   token_key  a PRNG key per token ([..., 2] uint32 key data), from the run's seed, the step
#              number and the token's place in the global batch (sampling objectives): the same
#              draws however the batch is split, and again on resume
NEEDS = ("old_logp", "ref_logp", "segments", "token_key")


# ---------------------------------------------------------------------------------------------
# Records.


@dataclasses.dataclass(frozen=True)
class Hparam:
  """A hyperparameter: its default, what is allowed (named in errors and --help) and the check."""
  default: Any
  allowed: str
  ok: Callable[[Any], bool]
  doc: str = ""
  fn_arg: bool = True  # False: it only chooses an LM-head statistic, fn does not take it


def _real(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive(default, doc="", fn_arg=True):
  return Hparam(default, "a finite number > 0", lambda v: _real(v) and v > 0, doc, fn_arg)


def nonnegative(default, doc="", fn_arg=True):
  return Hparam(default, "a finite number >= 0", lambda v: _real(v) and v >= 0, doc, fn_arg)


def unit_interval(default, doc=""):
  return Hparam(default, "a number in the open interval (0, 1)", lambda v: _real(v) and 0 < v < 1,
                doc)


def integer(default, minimum, doc="", fn_arg=True):
  return Hparam(default, f"an integer >= {minimum}",
                lambda v: _real(v) and v == int(v) and v >= minimum, doc, fn_arg)


def choice(default, options, doc="", fn_arg=True):
  return Hparam(default, ", ".join(options), lambda v: v in options, doc, fn_arg)


def _no_inputs(hparams):
  del hparams
  return {}


@dataclasses.dataclass(frozen=True)
class Objective:
  """One objective: fn(logp, **inputs, **needs, **hparams) -> per-token loss (float32).

  hparams: name -> Hparam (those with fn_arg=True are passed to fn and metrics).
  inputs: hparams -> {keyword of fn: lm_head.Statistic}: the generic ones (lm_head.LOGP,
    ENTROPY, KL_FROM_REF) or the record's own (gates with gradient=False, closed-form
    logits_grad for the fused head).
  needs: a subset of NEEDS that fn reads; each arrives as keyword(s) of fn and metrics (the side
    inputs of its statistics, e.g. token_key, are needs of the Setting without being fn's).
  metrics: same arguments as fn -> {name: per-token value}, reported as "<objective>/<name>".
  doc: one line for --help and the README: formula and source.
  sequence_gate: for an objective whose per-token loss scales by a factor of the whole sequence
    (dft_seq, iw_sft): (logp, **what fn would take) -> that factor per token, computed without
    gradient from whole rows; fn is then fn(logp, *, sequence_gate), elementwise (so the fused
    head takes it: the step computes the gate from a forward-only pass of the head first).
  """
  fn: Callable
  doc: str
  hparams: dict = dataclasses.field(default_factory=dict)
  inputs: Callable = _no_inputs
  needs: tuple = ()
  metrics: Callable | None = None
  sequence_gate: Callable | None = None


# ---------------------------------------------------------------------------------------------
# Per-token functions. float32 whatever the input dtype; no validation (validate() at the edge).


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _log_ratio(logp, other_logp):
  """logp - sg(other_logp) in float32, clamped above at MAX_LOG_RATIO."""
  return jnp.minimum(_f32(logp) - jax.lax.stop_gradient(_f32(other_logp)), MAX_LOG_RATIO)


def gate_metrics(gate):
  """{"gate", "gated_down"}: the factor on SFT's gradient and whether it is below 1/2."""
  return {"gate": gate, "gated_down": gate < GATED_DOWN_BELOW}


def sft(logp):
  """SFT / cross-entropy: -log p_t. Gradient wrt logits: softmax - onehot."""
  return -_f32(logp)


def dft(logp):
  """DFT, token level (arXiv 2508.05629): -sg(p_t) * log p_t.

  Gradient wrt logits: p_t * (softmax - onehot); without the stop-gradient it would differ.
  """
  logp = _f32(logp)
  return -jax.lax.stop_gradient(jnp.exp(logp)) * logp


def neg_qlog(logp, alpha):
  """-ln_q(p) = -(p**alpha - 1) / alpha, the Tsallis q-logarithm with alpha = 1 - q (> 0), from
  logp (float32). d/dlogp = -p**alpha for a constant alpha: the "gate" p**alpha times SFT's -1."""
  return -jnp.expm1(alpha * logp) / alpha


def power(logp, *, alpha):
  """Power family: -ln_q(p_t) = -(p_t**alpha - 1) / alpha with a fixed alpha = 1 - q.

  d/dlogp = -p_t**alpha: alpha -> 0 recovers SFT (-log p_t); alpha = 1 has DFT's gradient
  (loss 1 - p_t). DEFT is the same q-log with alpha set per token.
  """
  return neg_qlog(_f32(logp), alpha)


def psft(logp, *, old_logp, eps_low, eps_high):
  """PSFT (arXiv 2508.17784): PPO's clipped surrogate with advantage 1,

    -min(r, clip(r, 1 - eps_low, 1 + eps_high)),   r = exp(logp - sg(old_logp)).

  With A = 1 this is -r for r <= 1 + eps_high (gradient r * (softmax - onehot)) and the constant
  -(1 + eps_high) above (gradient 0); eps_low never binds (the min picks r below 1 - eps_low).
  Defaults 0.2 / 0.28 are clip_ratio_low / clip_ratio_high of the official run script
  (verl/recipe/psft/run_psft.sh). old_logp: the policy snapshot's logp, fixed over the minibatch
  updates of one global batch.
  """
  ratio = jnp.exp(_log_ratio(logp, old_logp))
  return -jnp.minimum(ratio, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))


def psft_metrics(logp, *, old_logp, eps_low, eps_high):
  """Clip fractions (high: gradient zeroed; low: reported only, A = 1 never clips it), mean ratio
  and the k3 estimate of KL(old || new)."""
  ratio = jnp.exp(_log_ratio(logp, old_logp))
  return {"clip_frac_high": ratio > 1.0 + eps_high, "clip_frac_low": ratio < 1.0 - eps_low,
          "ratio": ratio, "approx_kl": k3(old_logp, logp)}


def _segment_sums(values_BxT, segment_ids_BxT):
  """[B, T+1] sums of values per segment id of each row (ids in 0..T; 0 is padding)."""
  num_ids = values_BxT.shape[-1] + 1
  row_sums = lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_ids)
  return jax.vmap(row_sums)(values_BxT, jnp.clip(segment_ids_BxT, 0, num_ids - 1))


def segment_totals(values_BxT, segment_ids_BxT=None):
  """Each token's sum of `values` over its segment (whole row if segment_ids is None).

  Any leading shape [..., T] works (rows are the leading axes flattened); segments never span
  rows, so splitting a batch by rows (microbatches, devices) leaves the totals unchanged.
  """
  shape = values_BxT.shape
  values = values_BxT.reshape(-1, shape[-1])
  if segment_ids_BxT is None:
    return jnp.broadcast_to(values.sum(-1, keepdims=True), values.shape).reshape(shape)
  segment_ids = segment_ids_BxT.reshape(values.shape)
  sums = _segment_sums(values, segment_ids)
  return jnp.take_along_axis(sums, jnp.clip(segment_ids, 0, shape[-1]), axis=-1).reshape(shape)


def sequence_log_prob(logp_BxT, loss_mask_BxT=None, segment_ids_BxT=None):
  """log pi(y|x) of each token's segment: sum of logp over the segment's loss tokens."""
  logp = _f32(logp_BxT)
  if loss_mask_BxT is not None:
    logp = jnp.where(loss_mask_BxT > 0, logp, 0.0)
  return segment_totals(logp, segment_ids_BxT)


def gated_nll(logp, *, sequence_gate):
  """-sg(g_s) * log p_t: the per-token part of an objective with a sequence gate (its record's
  sequence_gate gives g_s). Gradient wrt logits: g_s (softmax - onehot)."""
  return -jax.lax.stop_gradient(_f32(sequence_gate)) * _f32(logp)


def dft_seq_gate(logp, *, loss_mask, segment_ids):
  """DFT, sequence level (arXiv 2508.05629): -sg(pi(y|x)) * log p_t (gated_nll with this gate),
  pi(y|x) = exp(sum of logp over the loss tokens of t's segment). Rows are the sequences if
  segment_ids is None.

  Unstable by design (kept to show it): pi(y|x) underflows in float32 once the response's summed
  logp is below about -87 (-104 counting subnormals), and such segments then get loss and
  gradient exactly 0 (finite): long responses stop training.
  """
  return jnp.exp(sequence_log_prob(logp, loss_mask, segment_ids))


def dft_seq_metrics(logp, *, loss_mask, segment_ids):
  return {"seq_prob": jnp.exp(sequence_log_prob(logp, loss_mask, segment_ids))}


def eaft_gate(gate_entropy, alpha, norm):
  """EAFT's gate (H_t / norm) ** alpha, without gradient (H_t >= 0 is clamped at 0)."""
  h = jnp.maximum(jax.lax.stop_gradient(_f32(gate_entropy)), 0.0)
  return jnp.power(h / norm, alpha)


def eaft(logp, *, gate_entropy, alpha, norm):
  """EAFT, Entropy-Adaptive Fine-Tuning (arXiv 2601.02151): cross-entropy under an entropy gate,

    -sg(g_t) * log p_t,   g_t = (H_t / norm) ** alpha.

  Gradient wrt logits: g_t * (softmax - onehot). Low-entropy tokens ("confident conflicts" when the
  target is unlikely) are gated down. H_t: `gate_entropy`, the entropy of the softmax over the
  top-k logits (statistic "topk_entropy:K", objective.eaft.entropy="topk") or the exact
  full-vocabulary entropy ("entropy", entropy="full"). Defaults k = 20, norm = 3.0 (~ ln 20: the
  top-20 entropy's maximum), alpha = 1 are those of the authors' code merged in LLaMA-Factory
  (`_eaft_cross_entropy`; also their ms-swift port); axolotl's port has eaft_k and eaft_alpha but
  no divisor (norm = 1). With the full entropy, g_t can exceed 1 unless norm >= ln(vocab size).
  """
  return -eaft_gate(gate_entropy, alpha, norm) * _f32(logp)


def eaft_metrics(logp, *, gate_entropy, alpha, norm):
  del logp
  return {"gate_entropy": gate_entropy, **gate_metrics(eaft_gate(gate_entropy, alpha, norm))}


def topk_entropy_statistic(k):
  """EAFT's gate statistic: the entropy of the softmax over the k largest logits (the reference
  implementations take it from the logits, no_grad), a gate (no gradient) needing k <= vocab."""
  return lm_head.Statistic(f"topk_entropy:{k}",
                           lambda logits_xV, _: lm_head.topk_entropy(logits_xV, k),
                           gradient=False, from_logits=True, min_vocab=k)


def eaft_inputs(hparams):
  """The gate entropy: over the top-k logits, or the exact full-vocabulary one."""
  if hparams["entropy"] == "full":
    return {"gate_entropy": lm_head.ENTROPY}
  return {"gate_entropy": topk_entropy_statistic(int(hparams["k"]))}


# Scale of the logit gap in GEM's h = logsigmoid weights sigmoid(0.01 (z_v - z_y)): a constant of
# the official code (liziniu/GEM, sft_trainer.py gem_loss), not one of its options.
GEM_LOGSIGMOID_SCALE = 0.01


def gem_weights(logp_xV, targets_x, beta, h):
  """GEM's per-class weights sg(a_v) = sg(q_v * w_v) over a full distribution [x, V]:
  q = softmax(logits / beta) (= softmax(logp / beta)); w_v = 1 (h=linear) or
  sigmoid(0.01 * (z_v - z_y)) (h=logsigmoid; z_v - z_y = logp_v - logp_y, y the target)."""
  a_xV = jax.nn.softmax(logp_xV / beta, axis=-1)
  if h == "logsigmoid":
    gap_xV = logp_xV - lm_head.target_log_prob(logp_xV, targets_x)[..., None]
    a_xV = a_xV * jax.nn.sigmoid(GEM_LOGSIGMOID_SCALE * gap_xV)
  return jax.lax.stop_gradient(a_xV)


def gem_cross_entropy(logp_xV, targets_x, beta, h):
  """X = -sum_v sg(a_v) log p_v (gem_weights): cross-entropy of the model against its own
  tempered distribution; differentiable in logp."""
  return -jnp.sum(gem_weights(logp_xV, targets_x, beta, h) * logp_xV, axis=-1)


def gem_cross_entropy_grad(logp_xV, targets_x, beta, h):
  """d X / d z = A p - a (gem_cross_entropy; a = gem_weights, A = sum_v a_v)."""
  a_xV = gem_weights(logp_xV, targets_x, beta, h)
  return jnp.sum(a_xV, axis=-1, keepdims=True) * jnp.exp(logp_xV) - a_xV


def gem_mass(logp_xV, targets_x, beta, h):
  """A = sum_v sg(a_v) (gem_weights): 1 for h=linear, in (0, 1) for h=logsigmoid; no gradient."""
  return jnp.sum(gem_weights(logp_xV, targets_x, beta, h), axis=-1)


def gem(logp, *, tempered_xent, tempered_mass=None):
  """GEM (arXiv 2408.16673; official code liziniu/GEM): entropy-regularised distribution matching,

    sum_v sg(a_v) (log p_v - log p_t) = -A_t * log p_t - X_t,   a_v = q_v * w_v,
    q = softmax(logits / beta),   A_t = sum_v a_v,   X_t = -sum_v a_v log p_v.

  Gradient wrt logits: a - A_t * onehot (SFT's is softmax - onehot): the model is pulled towards
  its own tempered distribution q instead of its softmax, which keeps the distribution flatter;
  beta = 1 with h = linear has exactly SFT's gradient. w_v = 1 (h=linear: A_t = 1, no
  tempered_mass) or sigmoid(0.01 (z_v - z_t)) (h=logsigmoid). tempered_xent (X_t, differentiable)
  and tempered_mass (A_t, no gradient) are GEM's own LM-head statistics (gem_inputs: X with its
  closed-form gradient A p - a, A as a gate). Defaults beta = 0.7, h = linear: official train.py
  (its released scripts pass gem_h=logsigmoid).
  """
  mass = 1.0 if tempered_mass is None else jax.lax.stop_gradient(_f32(tempered_mass))
  return -mass * _f32(logp) - _f32(tempered_xent)


def gem_metrics(logp, *, tempered_xent, tempered_mass=None):
  mass = jnp.ones_like(logp) if tempered_mass is None else tempered_mass
  return {"tempered_xent": tempered_xent, "tempered_mass": mass}


def gem_inputs(hparams):
  """X_t (with its closed-form gradient) and, for h=logsigmoid, A_t (a gate; 1 for h=linear)."""
  beta, h = float(hparams["beta"]), hparams["h"]
  params = f"{beta!r}:{h}"
  inputs = {"tempered_xent": lm_head.Statistic(
      f"gem_cross_entropy:{params}",
      lambda logp_xV, targets_x: gem_cross_entropy(logp_xV, targets_x, beta, h),
      logits_grad=lambda logp_xV, targets_x, _: gem_cross_entropy_grad(logp_xV, targets_x, beta,
                                                                       h))}
  if h != "linear":
    inputs["tempered_mass"] = lm_head.Statistic(
        f"gem_mass:{params}", lambda logp_xV, targets_x: gem_mass(logp_xV, targets_x, beta, h),
        gradient=False)
  return inputs


def deft_alpha(renyi2):
  """DEFT's per-token q-log exponent alpha_t = sg(exp(-H2_t)) = sg(sum_v p_v**2), in [1/V, 1]."""
  return jnp.exp(-jax.lax.stop_gradient(_f32(renyi2)))


def deft(logp, *, renyi2):
  """DEFT, Dynamic Entropy Fine-Tuning (arXiv 2602.11424; official code luludus/DEFT, verl trainer
  main_verl/trainer/fsdp_sft_trainer.py, objective_trans=DEFT): the power family's q-log with
  alpha set per token by the prediction's concentration, parameter-free,

    -(p_t**a_t - 1) / (a_t + 1e-6),   a_t = sg(sum_v p_v**2) = sg(exp(-H2_t)),

  with the official code's epsilon in the divisor only (DEFT_EPSILON). Gradient wrt logits:
  a_t / (a_t + 1e-6) * p_t**a_t * (softmax - onehot), the "gate" ~ p_t**a_t: NLL-like (gate -> 1)
  when the distribution is flat, DFT-like (gate -> p_t) when it is concentrated. renyi2: H2_t,
  DEFT's gate statistic (deft_inputs, no gradient).
  """
  alpha = deft_alpha(renyi2)
  return -jnp.expm1(alpha * _f32(logp)) / (alpha + DEFT_EPSILON)


def deft_inputs(hparams):
  """DEFT's gate statistic H2_t = -log sum_v p_v**2 (no gradient)."""
  del hparams
  return {"renyi2": lm_head.Statistic(
      "renyi2_entropy", lambda logp_xV, _: lm_head.renyi2_entropy(logp_xV), gradient=False)}


def deft_metrics(logp, *, renyi2):
  alpha = deft_alpha(renyi2)
  return {"alpha": alpha, **gate_metrics(jnp.exp(alpha * _f32(logp)))}


def asft(logp, *, kl_from_ref, kl_weight):
  """ASFT, Anchored SFT (arXiv 2509.23753; authors' code zhuchichi56/ASFT `train_v2.py`
  EnhancedTrainer.compute_loss, and LLaMA-Factory `asft_loss_func` in trainer_utils.py,
  `use_asft_loss` / `asft_alpha`): DFT's token weighting plus a KL anchor to the frozen starting
  model over the FULL vocabulary at every loss token,

    -sg(p_t) * log p_t + kl_weight * KL(pi_ref || pi_theta)_t,
    KL_t = sum_v q_v (log q_v - log p_v),   q = the reference's next-token distribution.

  Gradient wrt logits: p_t (softmax - onehot) + kl_weight (softmax - q): the whole distribution is
  pulled towards the reference, not only the target token (the k3 anchor, kl_coef, is a
  one-sample estimate of the other direction at the target alone). Both implementations take the
  KL in this direction (F.kl_div(log p, q)), summed over the vocabulary, token-mean like the DFT
  term; kl_weight = 0.1 is asft_alpha's default and the authors' train() default (their README
  example uses 0.05). kl_from_ref: the LM-head statistic "kl_from_ref", from the reference's own
  hidden states chunk by chunk (never the [tokens, vocab] logits).
  """
  return dft(logp) + kl_weight * _f32(kl_from_ref)


def asft_metrics(logp, *, kl_from_ref, kl_weight):
  """The per-token KL to the reference, the anchor's share of the loss and DFT's gate p_t."""
  loss = asft(logp, kl_from_ref=kl_from_ref, kl_weight=kl_weight)
  anchor = kl_weight * _f32(kl_from_ref)
  share = jnp.where(loss > 0, anchor / jnp.where(loss > 0, loss, 1.0), 0.0)
  return {"kl": kl_from_ref, "kl_share": share, **gate_metrics(jnp.exp(_f32(logp)))}


def chord_phi(logp, *, cutoff):
  """CHORD's token weighting phi as an objective of its own (arXiv 2508.11408; Trinity-RFT
  `sft_phi`, SFTPhiLossFn in trinity/algorithm/policy_loss_fn/chord_policy_loss.py; ms-swift
  compute_chord_loss):

    -sg(p_t (1 - p_t)) * min(log p_t, log cutoff).

  Gradient wrt logits: p_t (1 - p_t) (softmax - onehot) for p_t <= cutoff, else 0: tokens the model
  finds unlikely AND tokens it already knows get little update, uncertain ones (p_t near 1/2) the
  most (phi <= 1/4). The weight uses the unclamped p_t; cutoff = 1 (the default) is no cutoff.
  Its gradient equals that of (1 - p_t)**2 / 2 (no stop-gradient).
  """
  logp = _f32(logp)
  p = jax.lax.stop_gradient(jnp.exp(logp))
  return -(p * (1.0 - p)) * jnp.minimum(logp, jnp.log(cutoff))


def chord_phi_metrics(logp, *, cutoff):
  """phi; the share of tokens past phi's peak (p_t > 1/2: more probability, less weight); the
  share cut by the cutoff (no gradient)."""
  p = jnp.exp(_f32(logp))
  return {"phi": p * (1.0 - p), "past_peak": p > 0.5, "cut": p > cutoff}


def prob_threshold(logp, *, base, side, tau):
  """The thresholded probability-based objectives of "Beyond Log Likelihood" (arXiv 2510.00526;
  authors' code GaotangLi/Beyond-Log-Likelihood, main_verl/trainer/fsdp_sft_trainer.py
  _compute_loss_and_backward, objective_trans OnlyTopP / OnlyBottomP / OnlyTopLogP /
  OnlyBottomLogP-tau): a loss on the selected tokens only,

    f(p_t) * s_t,   f = 1 - p_t (base="p") or -log p_t (base="logp"),
    s_t = 1[p_t >= tau] (side="top": only tokens the model already finds likely, prior-leaning)
       or 1[p_t <= tau] (side="bottom").

  Gradient wrt logits: s_t p_t (softmax - onehot) (p) or s_t (softmax - onehot) (logp); s_t has none.
  The authors divide by the number of SELECTED loss tokens of each micro-batch; here the
  objective's aggregation applies (token_mean: all loss tokens), which scales the gradient by the
  batch's selected share (metric prob_threshold/selected) -- under Adam mostly a change of the
  effective step size.
  """
  logp = _f32(logp)
  p = jnp.exp(logp)
  chosen = jax.lax.stop_gradient(p >= tau if side == "top" else p <= tau)
  return jnp.where(chosen, 1.0 - p if base == "p" else -logp, 0.0)


def prob_threshold_metrics(logp, *, base, side, tau):
  del base
  p = jnp.exp(_f32(logp))
  return {"selected": p >= tau if side == "top" else p <= tau}


def iw_weight_log(logp, ref_logp, loss_mask, segment_ids, temp, w_max):
  """log w_s = min(temp * mean_{t in s} (logp_t - ref_logp_t), log w_max) per sequence s (the
  segment of each token; masked tokens excluded), without gradient."""
  mask = _f32(loss_mask) > 0
  diff = jnp.where(mask, jax.lax.stop_gradient(_f32(logp) - _f32(ref_logp)), 0.0)
  tokens = segment_totals(mask.astype(jnp.float32), segment_ids)
  mean = segment_totals(diff, segment_ids) / jnp.maximum(tokens, 1.0)
  return jnp.minimum(temp * mean, math.log(w_max)), mean


def iw_sft_gate(logp, *, ref_logp, loss_mask, segment_ids, temp, w_max):
  """iw-SFT, importance-weighted SFT (arXiv 2507.12856; authors' code emmyqin/iw_sft,
  bounding_trainers.py IwSFTLoss with the call site's temp=1.0, sum_over_time=True):

    -sg(w_s) * log p_t,   w_s = min(exp(temp * mean_{t in s}(log p_t - log p_ref,t)), w_max),

  (gated_nll with this gate w_s) a per-sequence weight: the length-normalised ratio of the
  current policy to the frozen initial model (the reference, not a lagging snapshot) on the
  sequence's tokens, clipped at w_max = 16. Gradient wrt logits: w_s (softmax - onehot).
  Sequences are segments of packed rows (rows without segment ids); the authors' code has one
  sequence a row. ref_logp may be precomputed once (objective.ref_logp='precomputed').
  """
  log_w, _ = iw_weight_log(logp, ref_logp, loss_mask, segment_ids, temp, w_max)
  return jnp.exp(log_w)


def iw_sft_metrics(logp, *, ref_logp, loss_mask, segment_ids, temp, w_max):
  """The weight w_s, its log-ratio mean, the share clipped at w_max and the share below 1/2."""
  log_w, mean = iw_weight_log(logp, ref_logp, loss_mask, segment_ids, temp, w_max)
  return {"weight": jnp.exp(log_w), "log_ratio": mean,
          "clipped": log_w >= math.log(w_max), **gate_metrics(jnp.exp(log_w))}


# TALR: p_t is clamped below at this before the power, and the weight at TALR's floor (both from
# the re-implementation in shankarp8/distillation-retains-capabilities, objectives.talr_loss).
TALR_MIN_PROB = 1e-6


def talr_weight(logp, tau, floor):
  """TALR's token weight sg(max(p_t ** (1 / tau), floor)), p_t clamped at TALR_MIN_PROB."""
  logp = jnp.maximum(jax.lax.stop_gradient(_f32(logp)), math.log(TALR_MIN_PROB))
  return jnp.maximum(jnp.exp(logp / tau), floor)


def talr(logp, *, tau, floor):
  """TALR, Token-Adaptive Loss Reweighting (arXiv 2509.20758, "SFT Doesn't Always Hurt General
  Capabilities"): cross-entropy with each token weighted by its own probability under a
  temperature, so that hard (low-probability) tokens do not dominate the update,

    -sg(w_t) * log p_t,   w_t = max(p_t ** (1 / tau), floor).

  Gradient wrt logits: w_t (softmax - onehot). Where it comes from: the paper's abstract (arXiv
  listing: TALR reweights tokens by their loss); the weight, its floor 0.01 and the clamp of p_t
  at 1e-6 from the re-implementation in shankarp8/distillation-retains-capabilities
  (src/disc/objectives.py talr_loss, normalize="mean": the token mean, aggregation token_mean
  here). The paper body could not be read here; that re-implementation and a reader's note of the
  paper's v3 both set tau per batch to the median over sequences of their mean token loss. A
  batch statistic of the current policy would need the whole batch's forward before any
  gradient (one more forward pass under microbatching), so tau is a fixed hyperparameter here:
  set it near the run's per-token loss (metric nll). tau = 1 weights by p_t (DFT's weight with a
  floor); smaller tau down-weights hard tokens more.
  """
  return -talr_weight(logp, tau, floor) * _f32(logp)


def talr_metrics(logp, *, tau, floor):
  """The weight, the share of tokens at the floor and the gate metrics (the weight is the gate)."""
  weight = talr_weight(logp, tau, floor)
  return {"weight": weight, "floored": weight <= floor, **gate_metrics(weight)}


def otr_samples(logp_xV, token_key_x, num, temperature):
  """OTR's K candidate tokens of each position, [x, K], from softmax(logits / temperature)."""
  uniforms_xK = lm_head.token_uniforms(token_key_x, num)
  return lm_head.sample_tokens(jax.lax.stop_gradient(logp_xV), uniforms_xK, temperature)


def otr_return(logp_xV, targets_x, token_key, num, temperature, penalty):
  """(1/K) sum_k r_k log p(a_k): the candidates a_k (otr_samples) rewarded r_k = 1 when a_k is
  the target and -penalty otherwise; differentiable in logp."""
  samples_xK = otr_samples(logp_xV, token_key, num, temperature)
  targets_x = jnp.clip(targets_x, 0, logp_xV.shape[-1] - 1)
  reward_xK = jnp.where(samples_xK == targets_x[..., None], 1.0, -penalty)
  return jnp.mean(reward_xK * jnp.take_along_axis(logp_xV, samples_xK, axis=-1), axis=-1)


def otr_return_grad(logp_xV, targets_x, token_key, num, temperature, penalty):
  """d otr_return / d logits = (1/K) sum_k r_k (onehot(a_k) - softmax)."""
  samples_xK = otr_samples(logp_xV, token_key, num, temperature)
  targets_x = jnp.clip(targets_x, 0, logp_xV.shape[-1] - 1)
  reward_xK = jnp.where(samples_xK == targets_x[..., None], 1.0, -penalty)
  chosen_xV = jnp.sum(reward_xK[..., None] * (
      samples_xK[..., None] == jnp.arange(logp_xV.shape[-1])), axis=-2)
  return (chosen_xV - jnp.sum(reward_xK, axis=-1, keepdims=True) * jnp.exp(logp_xV)) / num


def otr_hits(logp_xV, targets_x, token_key, num, temperature):
  """The share of the K candidates equal to the target (no gradient)."""
  samples_xK = otr_samples(logp_xV, token_key, num, temperature)
  targets_x = jnp.clip(targets_x, 0, logp_xV.shape[-1] - 1)
  return jnp.mean(samples_xK == targets_x[..., None], axis=-1).astype(jnp.float32)


def otr_inputs(hparams):
  """OTR's sampled return (with its closed-form gradient) and the candidates' hit rate (a gate),
  both from the same per-token keys: the same candidates."""
  num, temperature = int(hparams["samples"]), float(hparams["temperature"])
  penalty = float(hparams["penalty"])
  params = f"{num}:{temperature!r}"
  return {
      "sampled_return": lm_head.Statistic(
          f"otr_return:{params}:{penalty!r}",
          lambda logp_xV, targets_x, *, token_key: otr_return(
              logp_xV, targets_x, token_key, num, temperature, penalty),
          logits_grad=lambda logp_xV, targets_x, _, *, token_key: otr_return_grad(
              logp_xV, targets_x, token_key, num, temperature, penalty),
          side=("token_key",)),
      "hit_rate": lm_head.Statistic(
          f"otr_hits:{params}", lambda logp_xV, targets_x, *, token_key: otr_hits(
              logp_xV, targets_x, token_key, num, temperature),
          gradient=False, side=("token_key",))}


def otr(logp, *, sampled_return, hit_rate):
  """OTR, One-Token Rollout (arXiv 2509.26313): each position a one-step RL episode. K candidate
  tokens a_k are sampled from the current policy at that position (softmax(z / temperature)),
  the ground-truth token rewards the candidate that equals it and the others are penalised, and
  the update is the policy gradient:

    -(1/K) sum_k r_k log p(a_k),   r_k = 1 if a_k = y_t else -penalty.

  Gradient wrt logits: -(1/K) sum_k r_k (onehot(a_k) - softmax), whose expectation over the
  draws is -sum_v q_v r_v (onehot(v) - softmax), q = softmax(z / temperature); at temperature 1
  that is (1 + penalty) p_t (softmax - onehot): DFT's gradient scaled, the samples adding the
  on-policy noise. The draws come from per-token keys of the run's seed and step (need
  token_key), sampled from the head's chunk by inverse CDF over vocabulary blocks
  (lm_head.sample_tokens): never the [tokens, vocab] logits, the same draws however the batch
  is split, and again on resume. Where it comes from: the paper's abstract (arXiv listing:
  candidates sampled from the current policy, the ground-truth token gives the reward, policy
  gradient) and published reviews of it (a second term penalising the sampled incorrect tokens,
  a sampling temperature). The paper body and the authors' code could not be read here: the
  reward of an incorrect candidate (-penalty), K and the temperature are this project's
  defaults, not the paper's.
  """
  del logp, hit_rate
  return -_f32(sampled_return)


def otr_metrics(logp, *, sampled_return, hit_rate):
  """The share of candidates that hit the target, and the sampled return."""
  del logp
  return {"hit_rate": hit_rate, "return": sampled_return}


def k3(logp, ref_logp):
  """k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = sg(ref_logp) - logp (>= 0).

  d/dlogp = 1 - exp(d). d is clamped at MAX_LOG_RATIO (no gradient beyond it) to stay finite.
  """
  d = jnp.minimum(jax.lax.stop_gradient(_f32(ref_logp)) - _f32(logp), MAX_LOG_RATIO)
  return jnp.expm1(d) - d


def entropy_bonus(logp, *, entropy):
  """-H_t: minimising it raises the entropy of the next-token distribution."""
  del logp
  return -_f32(entropy)


OBJECTIVES = {
    "sft": Objective(sft, "-log p_t (cross-entropy)"),
    "dft": Objective(dft, "-sg(p_t) log p_t (DFT, arXiv 2508.05629, token level)"),
    "dft_seq": Objective(
        gated_nll, "-sg(pi(y|x)) log p_t (DFT, arXiv 2508.05629, sequence level)",
        needs=("segments",), metrics=dft_seq_metrics, sequence_gate=dft_seq_gate),
    "power": Objective(
        power, "-(p_t^alpha - 1) / alpha: alpha -> 0 is SFT, alpha = 1 has DFT's gradient",
        hparams=dict(alpha=positive(0.5, "q-log exponent (this project's default: halfway)"))),
    "psft": Objective(
        psft, "-min(r_t, clip(r_t, 1-eps_low, 1+eps_high)), r_t = p_t / p_old,t (PSFT, "
        "arXiv 2508.17784)",
        hparams=dict(eps_low=unit_interval(0.2, "lower clip (official run script)"),
                     eps_high=unit_interval(0.28, "upper clip (official run script)")),
        needs=("old_logp",), metrics=psft_metrics),
    "eaft": Objective(
        eaft, "-sg((H_t / norm)^alpha) log p_t (EAFT, arXiv 2601.02151; LLaMA-Factory defaults)",
        hparams=dict(
            alpha=positive(1.0, "gate exponent"),
            entropy=choice("topk", ("topk", "full"), "gate entropy: over the top-k logits or "
                           "the full vocabulary", fn_arg=False),
            k=integer(20, 2, "top-k size (references: 20)", fn_arg=False),
            norm=positive(3.0, "entropy divisor (~ln 20 for top-20; full: ~ln(vocab))")),
        inputs=eaft_inputs, metrics=eaft_metrics),
    "gem": Objective(
        gem, "sum_v sg(q_v w_v)(log p_v - log p_t), q = softmax(z / beta) (GEM, arXiv 2408.16673)",
        hparams=dict(
            beta=positive(0.7, "temperature of q (1: SFT's gradient; official train.py: 0.7)",
                          fn_arg=False),
            h=choice("linear", ("linear", "logsigmoid"), "class weights w_v (released scripts: "
                     "logsigmoid)", fn_arg=False)),
        inputs=gem_inputs, metrics=gem_metrics),
    "deft": Objective(
        deft, "-(p_t^a_t - 1) / a_t, a_t = sg(sum_v p_v^2) (DEFT, arXiv 2602.11424)",
        inputs=deft_inputs, metrics=deft_metrics),
    "asft": Objective(
        asft, "-sg(p_t) log p_t + kl_weight KL(pi_ref || pi)_t over the full vocabulary (ASFT, "
        "arXiv 2509.23753)",
        hparams=dict(kl_weight=nonnegative(0.1, "weight of the full-vocabulary KL to the starting "
                                                "model (LLaMA-Factory asft_alpha: 0.1)")),
        inputs=lambda hparams: {"kl_from_ref": lm_head.KL_FROM_REF}, metrics=asft_metrics),
    "chord_phi": Objective(
        chord_phi, "-sg(p_t (1 - p_t)) min(log p_t, log cutoff) (CHORD's phi, arXiv 2508.11408; "
        "Trinity-RFT sft_phi)",
        hparams=dict(cutoff=Hparam(1.0, "a number in (0, 1]", lambda v: _real(v) and 0 < v <= 1,
                                   "tokens with p_t above it get no gradient (1: none)")),
        metrics=chord_phi_metrics),
    "prob_threshold": Objective(
        prob_threshold, "(1 - p_t or -log p_t) on tokens with p_t >= tau (top) or <= tau "
        "(bottom) only (Beyond Log Likelihood, arXiv 2510.00526)",
        hparams=dict(
            base=choice("logp", ("logp", "p"), "the loss on selected tokens: -log p_t or 1 - p_t"),
            side=choice("top", ("top", "bottom"), "top: p_t >= tau (prior-leaning); bottom: <="),
            tau=unit_interval(0.1, "the probability threshold (this project's default: the "
                                   "authors' code has none)")),
        metrics=prob_threshold_metrics),
    "iw_sft": Objective(
        gated_nll, "-sg(w_s) log p_t, w_s = min(exp(temp mean_s(log p - log p_ref)), w_max) per "
        "sequence (iw-SFT, arXiv 2507.12856)",
        hparams=dict(temp=positive(1.0, "temperature of the log-ratio (the authors' call: 1.0)"),
                     w_max=positive(16.0, "upper clip of the weight (authors' code: 16)")),
        needs=("ref_logp", "segments"), metrics=iw_sft_metrics, sequence_gate=iw_sft_gate),
    "talr": Objective(
        talr, "-sg(max(p_t^(1/tau), floor)) log p_t: tokens weighted by their probability "
        "(TALR, arXiv 2509.20758)",
        hparams=dict(tau=positive(1.0, "temperature of the weight p_t^(1/tau) (the paper: the "
                                       "batch's median sequence loss; here fixed)"),
                     floor=Hparam(0.01, "a number in [0, 1)", lambda v: _real(v) and 0 <= v < 1,
                                  "lowest weight (re-implementation's default)")),
        metrics=talr_metrics),
    "otr": Objective(
        otr, "-(1/K) sum_k r_k log p(a_k), a_k ~ softmax(z/T), r_k = 1 if a_k = y_t else "
        "-penalty (OTR, arXiv 2509.26313)",
        hparams=dict(
            samples=integer(8, 1, "candidate tokens K sampled per position", fn_arg=False),
            temperature=positive(1.0, "sampling temperature T", fn_arg=False),
            penalty=nonnegative(1.0, "reward -penalty of a candidate that is not the target",
                                fn_arg=False)),
        inputs=otr_inputs, metrics=otr_metrics),
}

# Extra terms any objective can add: coefficient field -> (term name, record); on when > 0.
TERMS = {
    "entropy_coef": ("entropy_bonus", Objective(
        entropy_bonus, "-H_t, the full-vocabulary entropy (entropy bonus)",
        inputs=lambda hparams: {"entropy": lm_head.ENTROPY})),
    "kl_coef": ("kl_anchor", Objective(
        k3, "k3(logp_t, ref_logp_t) = exp(d) - d - 1, d = sg(ref_logp_t) - logp_t (KL anchor to "
        "the starting model)", needs=("ref_logp",),
        metrics=lambda logp, *, ref_logp: {"k3": k3(logp, ref_logp)})),
}
AGGREGATIONS = ("token_mean", "seq_mean", "sum_norm")
REF_LOGP = ("forward", "precomputed")
# Fields of config.objective shared by every objective (besides `name`).
GENERIC = dict(
    aggregation=choice("token_mean", AGGREGATIONS, "how per-token losses become one number"),
    norm_constant=positive(1.0, "sum_norm's divisor"),
    entropy_coef=nonnegative(0.0, "entropy bonus coefficient (-entropy_coef * H_t)"),
    kl_coef=nonnegative(0.0, "KL anchor coefficient (kl_coef * k3 to the starting model)"),
    ref_logp=choice("forward", REF_LOGP, "the reference's log-probability of the targets (iw_sft, "
                    "the KL anchor): a forward pass of the starting model every step, or "
                    "precomputed once over the data (no reference model in memory)"),
)


# ---------------------------------------------------------------------------------------------
# The config edge: one validation, generic over the records.


@dataclasses.dataclass(frozen=True)
class Term:
  """One active per-token term of a Setting, resolved: the objective itself or an extra term."""
  key: str         # its loss is "loss/<key>": "objective" or the extra term's name
  prefix: str      # its metrics are "<prefix>/<name>": the objective's name or the term's
  record: Objective
  hparams: dict    # every hyperparameter of the record
  coef: float
  inputs: dict     # keyword of fn -> name of the lm_head.Statistic (in Setting.stats)

  def arguments(self, values, batch):
    """Keyword arguments of the record's fn and metrics: its inputs, needs and fn hyperparameters
    (values: statistics and needs by name; batch: loss_mask and segment_ids)."""
    kwargs = {k: v for k, v in self.hparams.items() if self.record.hparams[k].fn_arg}
    kwargs.update({key: values[stat] for key, stat in self.inputs.items()})
    for need in self.record.needs:
      if need == "segments":
        kwargs.update(loss_mask=batch["loss_mask"], segment_ids=batch.get("segment_ids"))
      else:
        kwargs[need] = values[need]
    return kwargs


@dataclasses.dataclass(frozen=True)
class Setting:
  """A validated config.objective, resolved once: the chosen record with its hyperparameters, the
  generic fields, the active terms (the objective first, then each extra term that is on), the
  LM-head statistics they read (logp and entropy first) and what else they need (NEEDS)."""
  name: str
  aggregation: str
  norm_constant: float
  terms: tuple
  stats: tuple       # lm_head.Statistic
  needs: frozenset
  ref_logp: str = "forward"  # REF_LOGP: how the need ref_logp is met

  @property
  def objective(self):
    return self.terms[0].record

  @property
  def hparams(self):
    return self.terms[0].hparams

  @property
  def needs_reference(self):
    """Whether the step runs the frozen reference (starting) model: for its target logp (need
    ref_logp, unless precomputed) or its whole distribution (a statistic with side input
    "reference")."""
    return (("ref_logp" in self.needs and self.ref_logp == "forward")
            or lm_head.needs_reference(self.stats))

  @property
  def sequence_gated(self):
    """Whether a term scales its per-token loss by a factor of its whole sequence."""
    return any(term.record.sequence_gate is not None for term in self.terms)


def _term(key, prefix, record, hparams, coef):
  """A Term with the record's inputs resolved; and the statistics it reads."""
  inputs = record.inputs(hparams)
  return (Term(key, prefix, record, hparams, coef, {k: s.name for k, s in inputs.items()}),
          tuple(inputs.values()))


def _setting(name, hparams, generic):
  """The Setting of a validated objective and generic fields."""
  terms = [_term("objective", name, OBJECTIVES[name], hparams, 1.0)]
  terms += [_term(term, term, record, {}, generic[coef]) for coef, (term, record) in TERMS.items()
            if generic[coef] > 0]
  stats = tuple(dict.fromkeys(
      [lm_head.LOGP, lm_head.ENTROPY] + [s for _, term_stats in terms for s in term_stats]))
  needs = {n for term, _ in terms for n in term.record.needs}
  needs |= {n for stat in stats for n in stat.side if n != "reference"}  # e.g. token_key
  setting = Setting(name, generic["aggregation"], generic["norm_constant"],
                    tuple(term for term, _ in terms), stats, frozenset(needs), generic["ref_logp"])
  if setting.ref_logp == "precomputed":
    if lm_head.needs_reference(stats):
      raise ConfigError(f"objective.ref_logp='precomputed': objective.name={name!r} compares "
                        "whole distributions with the reference model every step; allowed: "
                        "'forward'")
    if "ref_logp" not in setting.needs:
      raise ConfigError(f"objective.ref_logp='precomputed': objective.name={name!r} reads no "
                        "reference log-probability (iw_sft and the KL anchor, kl_coef > 0, do)")
  return setting


def _check(field, value, hparam):
  if not hparam.ok(value):
    raise ConfigError(f"objective.{field}={value!r} is out of range; allowed: {hparam.allowed}")


def _fields(cfg):
  return dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)


def validate(cfg):
  """config.objective (a ConfigDict or nested dict) -> Setting; ConfigError naming the field and
  what is allowed. Missing fields take the records' defaults."""
  fields = _fields(cfg)
  name = fields.get("name")
  if name not in OBJECTIVES:
    raise ConfigError(f"objective.name={name!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
  unknown = sorted(set(fields) - {"name", *GENERIC, *OBJECTIVES})
  if unknown:
    raise ConfigError(f"objective.{unknown[0]} is not a field; fields: name, "
                      f"{', '.join(GENERIC)}, and one block per objective with hyperparameters "
                      f"(e.g. objective.psft.eps_high)")
  generic = {k: fields.get(k, hp.default) for k, hp in GENERIC.items()}
  for field, value in generic.items():
    _check(field, value, GENERIC[field])
  blocks = {objective: _hparams(objective, fields.get(objective)) for objective in OBJECTIVES}
  return _setting(name, blocks[name], generic)


def _hparams(name, block):
  """objective.<name> checked against the record: unknown keys and bad values are ConfigErrors
  (every block is checked, not only the chosen objective's); missing values take defaults."""
  record = OBJECTIVES[name]
  block = _fields(block or {})
  extra = sorted(set(block) - set(record.hparams))
  if extra:
    raise ConfigError(f"objective.{name}.{extra[0]} is not a hyperparameter of {name}; allowed: "
                      f"{', '.join(record.hparams) or 'none'}")
  hparams = {k: block.get(k, hp.default) for k, hp in record.hparams.items()}
  for field, value in hparams.items():
    _check(f"{name}.{field}", value, record.hparams[field])
  return hparams


def config_block(name="dft"):
  """config.objective as a nested dict of defaults: name, the generic fields, one block per
  objective with hyperparameters."""
  block = {"name": name, **{k: hp.default for k, hp in GENERIC.items()}}
  for objective, record in OBJECTIVES.items():
    if record.hparams:
      block[objective] = {k: hp.default for k, hp in record.hparams.items()}
  return block


def metric_names(setting=None):
  """Names of the scalar metrics (finalize_metrics' keys, histograms left out) the train step
  reports for `setting`; None: for every objective and extra term at its defaults, what any
  setting may report (the study's history keys)."""
  terms = setting.terms if setting is not None else (
      [_term("objective", name, record, _hparams(name, None), 1.0)[0]
       for name, record in OBJECTIVES.items()]
      + [_term(term, term, record, {}, 1.0)[0] for term, record in TERMS.values()])
  names = ["loss", "num_tokens", *TOKEN_METRICS]
  for term in terms:
    names.append(f"loss/{term.key}")
    names += [f"{term.prefix}/{k}" for k in _own_metric_keys(term)]
  return tuple(dict.fromkeys(names))


def _own_metric_keys(term):
  """The keys of a term's own metrics, read off their shapes (no computation)."""
  if term.record.metrics is None:
    return ()
  one = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  values = {name: one for name in (*term.inputs.values(), *NEEDS)}
  values["token_key"] = jax.ShapeDtypeStruct((1, 1, 2), jnp.uint32)
  batch = {"loss_mask": one, "segment_ids": jax.ShapeDtypeStruct((1, 1), jnp.int32)}
  own = jax.eval_shape(lambda v, b: term.record.metrics(v["logp"], **term.arguments(v, b)),
                       dict(values, logp=one), batch)
  return tuple(own)


# ---------------------------------------------------------------------------------------------
# Aggregation.


def _nonzero(x):
  return jnp.where(x > 0, x, 1.0)


def global_denominators(loss_mask_BxT, segment_ids_BxT=None):
  """Denominators of the whole global batch, computed before it is split over microbatches:
  num_tokens = sum(loss_mask); num_sequences = segments (rows if no segment_ids) with a loss token.
  """
  mask = _f32(loss_mask_BxT).reshape(-1, loss_mask_BxT.shape[-1])
  if segment_ids_BxT is None:
    seq_tokens = mask.sum(-1)
  else:
    seq_tokens = _segment_sums(mask, jnp.asarray(segment_ids_BxT).reshape(mask.shape))
  return dict(num_tokens=mask.sum(), num_sequences=jnp.sum(seq_tokens > 0).astype(jnp.float32))


def token_weights(loss_mask, mode="token_mean", *, segment_ids=None, num_tokens=None,
                  num_sequences=None, norm_constant=1.0):
  """Per-token weights w such that the aggregated loss is sum(w * loss):

    token_mean  mask / num_tokens                       (verl's token-mean)
    seq_mean    mask / tokens_of_segment / num_sequences
    sum_norm    mask / norm_constant

  num_tokens / num_sequences: of the GLOBAL batch (global_denominators); default: this batch's.
  """
  mask = _f32(loss_mask)
  if mode == "token_mean":
    denominator = mask.sum() if num_tokens is None else num_tokens
    return mask / _nonzero(_f32(denominator))
  if mode == "seq_mean":
    if num_sequences is None:
      num_sequences = global_denominators(mask, segment_ids)["num_sequences"]
    seq_tokens = segment_totals(mask, segment_ids)
    return mask / _nonzero(seq_tokens) / _nonzero(_f32(num_sequences))
  assert mode == "sum_norm", mode
  return mask / norm_constant


def _weighted_sum(per_token, weights):
  return jnp.sum(jnp.where(weights > 0, _f32(per_token), 0.0) * weights)


def aggregate(per_token_loss, loss_mask, mode="token_mean", **denominators):
  """Scalar loss: sum over tokens of loss * token_weights(loss_mask, mode, **denominators).

  Masked positions contribute exactly 0 even where the loss is inf/NaN. Summing this over
  microbatches (or devices) given the global denominators equals the whole batch's value.
  """
  return _weighted_sum(per_token_loss, token_weights(loss_mask, mode, **denominators))


# ---------------------------------------------------------------------------------------------
# The composite loss of the train step and its metrics.


def gate_key(term):
  """The values' key of a term's sequence gate."""
  return f"sequence_gate/{term.key}"


def with_sequence_gates(values, batch, setting):
  """values with the sequence gate of every gated term that they lack ("sequence_gate/<key>",
  [B, T]), computed without gradient from whole rows (values: logp and the needs of the batch
  `batch`, loss_mask and segment_ids)."""
  missing = [term for term in setting.terms
             if term.record.sequence_gate is not None and gate_key(term) not in values]
  if not missing:
    return values
  fixed = {k: jax.lax.stop_gradient(v) for k, v in values.items()}
  gates = {gate_key(term): term.record.sequence_gate(fixed["logp"],
                                                     **term.arguments(fixed, batch))
           for term in missing}
  return {**values, **gates}


def per_token_terms(values, batch, setting):
  """{term key: coefficient * per-token loss} of every active term ("objective" first).

  values: {name: [B, T]} of the setting's statistics and needs (the sequence gates they lack are
  computed: with_sequence_gates); batch: loss_mask and segment_ids.
  """
  values = with_sequence_gates(values, batch, setting)
  terms = {}
  for term in setting.terms:
    if term.record.sequence_gate is not None:
      value = term.record.fn(values["logp"], sequence_gate=values[gate_key(term)])
    else:
      value = term.record.fn(values["logp"], **term.arguments(values, batch))
    terms[term.key] = value if term.coef == 1.0 else term.coef * value
  return terms


def token_metrics(values, batch, setting):
  """Masked per-token sums ("tok/..."), the target-probability histogram and num_tokens; no
  gradient."""
  values = {k: jax.lax.stop_gradient(v) for k, v in values.items()}
  mask = _f32(batch["loss_mask"])
  logp = _f32(values["logp"])
  prob = jnp.exp(logp)
  per_token = {"target_prob": prob, "p_below_0.1": prob < 0.1, "p_above_0.9": prob > 0.9,
               "nll": -logp}
  if "entropy" in values:
    per_token["entropy"] = values["entropy"]
  for term in setting.terms:
    if term.record.metrics is not None:
      own = term.record.metrics(logp, **term.arguments(values, batch))
      per_token.update({f"{term.prefix}/{k}": v for k, v in own.items()})
  metrics = {f"tok/{k}": _weighted_sum(_f32(v), mask) for k, v in per_token.items()}
  num_bins = len(HIST_EDGES) - 1
  bins = jnp.clip(jnp.floor(prob * num_bins), 0, num_bins - 1).astype(jnp.int32)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)
  metrics["hist/target_prob"] = jnp.sum(jnp.where(mask > 0, mask, 0.0)[..., None] * onehot,
                                        axis=tuple(range(mask.ndim)))
  metrics["num_tokens"] = mask.sum()
  return metrics


def source_sums(per_token_loss, batch, names):
  """A mixture's per-source sums over a (micro)batch, by each token's source (batch["source_ids"],
  a segment sum over the `names` of data.sources): source/NAME/loss = sum over NAME's tokens of
  mask * loss, source/NAME/loss_tokens = sum of its mask, source/NAME/tokens = its real tokens
  (segment_ids > 0). finalize_metrics turns the loss into a mean per loss token."""
  mask = _f32(batch["loss_mask"]).reshape(-1)
  loss = jnp.where(mask > 0, _f32(per_token_loss).reshape(-1), 0.0) * mask
  real = (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32).reshape(-1)
  ids = jnp.asarray(batch["source_ids"]).reshape(-1)
  sums = [jax.ops.segment_sum(v, ids, num_segments=len(names)) for v in (loss, mask, real)]
  return {f"source/{name}/{what}": total[s] for s, name in enumerate(names)
          for what, total in zip(("loss", "loss_tokens", "tokens"), sums)}


def objective_loss(values, batch, setting, *, denominators=None, sources=()):
  """The train step's loss: per-token objective (+ active extra terms), aggregated.

  values: dict of [B, T] arrays (any float dtype, computed in float32): the statistics of
    setting.stats (by name: logp, entropy, ...) and what setting.needs names (old_logp,
    ref_logp, token_key).
  batch: dict with loss_mask [B, T] and optionally segment_ids [B, T] (other keys ignored).
  setting: validate(config.objective), resolved at the config edge.
  denominators: global_denominators() of the whole global batch when `batch` is a microbatch or
    a device's shard; None means `batch` is the global batch.
  sources: a mixture's source names (batch then holds source_ids [B, T]): adds source_sums.
  Returns (loss, metrics): metrics as sums (module docstring), combine with + then
  finalize_metrics.
  """
  mask, segment_ids = batch["loss_mask"], batch.get("segment_ids")
  if denominators is None:
    denominators = global_denominators(mask, segment_ids)
  weights = token_weights(mask, setting.aggregation, segment_ids=segment_ids,
                          norm_constant=setting.norm_constant, **denominators)
  per_token = per_token_terms(values, batch, setting)
  term_losses = {k: _weighted_sum(v, weights) for k, v in per_token.items()}
  loss = sum(term_losses.values())
  metrics = {"loss": loss, **{f"loss/{k}": v for k, v in term_losses.items()}}
  metrics.update(token_metrics(values, batch, setting))
  if sources:
    metrics.update(source_sums(sum(per_token.values()), batch, sources))
  return loss, metrics


def finalize_metrics(summed):
  """Summed metrics -> reportable values: "tok/x" -> "x" = sum / num_tokens (0 if no tokens);
  "source/NAME/loss" -> its mean per loss token of NAME; "hist/..." stay bin counts; the rest
  (losses, num_tokens, token counts) stay as they are."""
  num_tokens = _nonzero(jnp.asarray(summed["num_tokens"], jnp.float32))
  final = {}
  for key, value in summed.items():
    if key.startswith("tok/"):
      final[key[len("tok/"):]] = value / num_tokens
    elif key.startswith("source/") and key.endswith("/loss"):
      final[key] = value / _nonzero(summed[f"{key}_tokens"])
    else:
      final[key] = value
  return final
