"""Per-token objectives of the SFT family, their aggregation and their metrics.

An objective maps per-token log-probabilities of the target tokens to a per-token loss of the same
shape. Objectives are pure, elementwise (dft_seq: per segment) and compute in float32 whatever the
input dtype; no model inside. Aggregation (a weighted sum over the batch) is separate, and takes the
denominators of the GLOBAL batch so that microbatches and devices can each contribute
`sum(loss * mask) / global_denominator` and the caller only sums.

  sft      -logp                                      cross-entropy
  dft      -sg(p) * logp                              arXiv 2508.05629, token level
  dft_seq  -sg(exp(sum_seg logp)) * logp              arXiv 2508.05629, sequence level
  power    -ln_q(p) = -(p**alpha - 1) / alpha         q-log, q = 1 - alpha; 0: SFT, 1: DFT's grad
  psft     -min(r, clip(r, 1-eps_low, 1+eps_high))    arXiv 2508.17784, r = exp(logp - old_logp)
  eaft     -sg((H_t / norm)**eaft_alpha) * logp       arXiv 2601.02151, H_t: top-k (or full) entropy
  gem      sum_v sg(q_v w_v) (logp_v - logp)          arXiv 2408.16673, q = softmax(logits/gem_beta)
  deft     -ln_q(p) with alpha_t = sg(sum_v p_v**2)   arXiv 2602.11424, = exp(-Renyi-2 entropy)

with p = exp(logp) and sg = stop_gradient; plus `-entropy_coef * H_t` (entropy bonus) and
`kl_coef * k3(logp, ref_logp)` (KL anchor to a frozen reference), which combine with any objective.
eaft, gem and deft need per-token statistics of the whole next-token distribution beyond logp;
`required_stats(cfg)` names them for the fused LM head (lm_head.STATISTICS), which computes them
chunk by chunk; the math of each is a function of full log-probs below (the reference path).

Metrics convention: `objective_loss` returns metrics as SUMS, so that microbatches and devices are
combined by adding them; `finalize_metrics` then divides. Keys:
  "loss", "loss/<term>", "num_tokens"   additive as they are (losses already carry the global
                                        denominator; num_tokens = sum of loss_mask)
  "tok/<name>"                          loss_mask-weighted sum of a per-token value; finalize
                                        divides by num_tokens and drops the "tok/" prefix
  "hist/<name>"                         bin counts over HIST_EDGES; finalize keeps them as counts
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from dft_jax.errors import ConfigError

AGGREGATIONS = ("token_mean", "seq_mean", "sum_norm")
HIST_EDGES = np.linspace(0.0, 1.0, 21)  # bins of the target-probability histogram
# Log-ratios are clamped to this before exp (PSFT ratio, k3) so that float32 stays finite; PSFT is
# unchanged by it (its loss is flat above log(1 + eps_high)), k3 loses its gradient beyond it.
MAX_LOG_RATIO = 20.0
# A token is "gated down" (metrics eaft/gated_down, deft/gated_down) when its gate, the factor on
# SFT's gradient (softmax - onehot), is below this: it gets less than half of SFT's update.
GATED_DOWN_BELOW = 0.5
# Scale of the logit gap in GEM's h = logsigmoid weights sigmoid(0.01 (z_v - z_y)): a constant of
# the official code (liziniu/GEM, sft_trainer.py gem_loss), not one of its options.
GEM_LOGSIGMOID_SCALE = 0.01
# Defaults of config.objective fields (configs/default.py); `name` has none. Sources: psft: the
# official run script; eaft: LLaMA-Factory `_eaft_cross_entropy` (alpha 1, top-20, entropy / 3.0);
# gem: the official train.py (gem_beta 0.7, gem_h linear).
DEFAULTS = dict(alpha=0.5, eps_low=0.2, eps_high=0.28, entropy_coef=0.0, kl_coef=0.0,
                aggregation="token_mean", norm_constant=1.0, eaft_alpha=1.0, eaft_k=20,
                eaft_entropy="topk", eaft_norm=3.0, gem_beta=0.7, gem_h="linear")
# Allowed ranges of the numeric fields: (description, predicate on a finite float).
RANGES = dict(
    alpha=("a finite number > 0 (alpha -> 0 is SFT: use objective.name=sft)", lambda x: x > 0),
    eps_low=("a number in the open interval (0, 1)", lambda x: 0 < x < 1),
    eps_high=("a number in the open interval (0, 1)", lambda x: 0 < x < 1),
    entropy_coef=("a finite number >= 0", lambda x: x >= 0),
    kl_coef=("a finite number >= 0", lambda x: x >= 0),
    norm_constant=("a finite number > 0", lambda x: x > 0),
    eaft_alpha=("a finite number > 0", lambda x: x > 0),
    eaft_k=("an integer >= 2 (and <= the vocabulary size)", lambda x: x >= 2 and x == int(x)),
    eaft_norm=("a finite number > 0", lambda x: x > 0),
    gem_beta=("a finite number > 0 (1 gives SFT's gradient; official default 0.7)",
              lambda x: x > 0),
)
# Allowed values of the string fields.
CHOICES = dict(aggregation=AGGREGATIONS, eaft_entropy=("topk", "full"),
               gem_h=("linear", "logsigmoid"))


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _check(field, value, allowed, ok):
  """Raises ConfigError unless `value` is a finite real with ok(value); traced values pass."""
  try:
    x = float(value)
  except jax.errors.ConcretizationTypeError:
    return  # a traced hyperparameter; config values are checked by validate() at the edge
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r} is not a number; allowed: {allowed}") from None
  if isinstance(value, bool) or not (math.isfinite(x) and ok(x)):
    raise ConfigError(f"{field}={value!r} is out of range; allowed: {allowed}")


# ---------------------------------------------------------------------------------------------
# Logits -> per-token statistics.


def log_softmax(logits_xV):
  """log softmax over the last axis, in float32 (stable: max-shifted)."""
  return jax.nn.log_softmax(_f32(logits_xV), axis=-1)


def target_log_prob(logp_xV, targets_x):
  """log p(target) from full log-probs. Out-of-range targets (e.g. -100 on padding) are clipped
  into the vocabulary: finite, meaningless, and must be masked."""
  targets_x = jnp.clip(targets_x, 0, logp_xV.shape[-1] - 1)
  return jnp.take_along_axis(logp_xV, targets_x[..., None], axis=-1)[..., 0]


def entropy(logp_xV):
  """H = -sum_v p_v log p_v of the full next-token distribution (logits must be finite)."""
  return -jnp.sum(jnp.exp(logp_xV) * logp_xV, axis=-1)


def logp_and_entropy(logits_BxTxV, targets_BxT):
  """(logp_BxT, entropy_BxT) in float32 from full logits; reference path of lm_head.token_stats."""
  logp_BxTxV = log_softmax(logits_BxTxV)
  return target_log_prob(logp_BxTxV, targets_BxT), entropy(logp_BxTxV)


def topk_entropy(logp_xV, k):
  """Entropy of the softmax over the k largest log-probs (= logits, up to a shift): EAFT's gate
  statistic, k = 20 in the reference implementations (which take it from the logits, no_grad)."""
  vocab = logp_xV.shape[-1]
  _check("topk_entropy k", k, f"an integer in [2, vocabulary size {vocab}]",
         lambda x: 2 <= x <= vocab and x == int(x))
  top_xK = jax.lax.top_k(logp_xV, int(k))[0]
  return entropy(jax.nn.log_softmax(top_xK, axis=-1))


def renyi2_entropy(logp_xV):
  """Renyi-2 (collision) entropy H2 = -log sum_v p_v**2, in [0, log V]; DEFT's gate statistic."""
  return -jax.nn.logsumexp(2.0 * logp_xV, axis=-1)


def gem_weights(logp_xV, targets_x, beta, h="linear"):
  """GEM's per-class weights sg(a_v) = sg(q_v * w_v) (arXiv 2408.16673, official code):
  q = softmax(logits / beta) (= softmax(logp / beta)); w_v = 1 (h=linear) or
  sigmoid(0.01 * (z_v - z_y)) (h=logsigmoid; z_v - z_y = logp_v - logp_y, y the target)."""
  _check("gem beta", beta, *RANGES["gem_beta"])
  if h not in CHOICES["gem_h"]:
    raise ConfigError(f"gem h={h!r} is unknown; allowed: {', '.join(CHOICES['gem_h'])}")
  a_xV = jax.nn.softmax(logp_xV / beta, axis=-1)
  if h == "logsigmoid":
    gap_xV = logp_xV - target_log_prob(logp_xV, targets_x)[..., None]
    a_xV = a_xV * jax.nn.sigmoid(GEM_LOGSIGMOID_SCALE * gap_xV)
  return jax.lax.stop_gradient(a_xV)


def gem_cross_entropy(logp_xV, targets_x, beta, h="linear"):
  """X = -sum_v sg(a_v) log p_v (gem_weights): cross-entropy of the model against its own
  tempered distribution; differentiable in logp (d X / d logits = A * softmax - a)."""
  return -jnp.sum(gem_weights(logp_xV, targets_x, beta, h) * logp_xV, axis=-1)


def gem_mass(logp_xV, targets_x, beta, h="linear"):
  """A = sum_v sg(a_v) (gem_weights): 1 for h=linear, in (0, 1) for h=logsigmoid; no gradient."""
  return jnp.sum(gem_weights(logp_xV, targets_x, beta, h), axis=-1)


# ---------------------------------------------------------------------------------------------
# Segments (packed sequences): per-row sums over segment ids.


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


# ---------------------------------------------------------------------------------------------
# Objectives. Signature: fn(logp, *, old_logp=None, **hparams) -> per-token loss (float32).
# Hyperparameters of other objectives are accepted and ignored, so one dict fits every objective.


def sft(logp, **unused):
  """SFT / cross-entropy: -log p_t. Gradient wrt logits: softmax - onehot."""
  del unused
  return -_f32(logp)


def dft(logp, **unused):
  """DFT, token level (arXiv 2508.05629): -sg(p_t) * log p_t.

  Gradient wrt logits: p_t * (softmax - onehot); without the stop-gradient it would differ.
  """
  del unused
  logp = _f32(logp)
  return -jax.lax.stop_gradient(jnp.exp(logp)) * logp


def neg_qlog(logp, alpha):
  """-ln_q(p) = -(p**alpha - 1) / alpha, the Tsallis q-logarithm with alpha = 1 - q (> 0), from
  logp (float32). d/dlogp = -p**alpha for a constant alpha: the "gate" p**alpha times SFT's -1."""
  return -jnp.expm1(alpha * logp) / alpha


def power(logp, *, alpha=0.5, **unused):
  """Power family: -ln_q(p_t) = -(p_t**alpha - 1) / alpha with a fixed alpha = 1 - q.

  d/dlogp = -p_t**alpha: alpha -> 0 recovers SFT (-log p_t); alpha = 1 has DFT's gradient
  (loss 1 - p_t). DEFT is the same q-log with alpha set per token.
  """
  del unused
  _check("alpha", alpha, *RANGES["alpha"])
  return neg_qlog(_f32(logp), alpha)


def _log_ratio(logp, other_logp):
  """logp - sg(other_logp) in float32, clamped above at MAX_LOG_RATIO."""
  return jnp.minimum(_f32(logp) - jax.lax.stop_gradient(_f32(other_logp)), MAX_LOG_RATIO)


def psft(logp, *, old_logp=None, eps_low=0.2, eps_high=0.28, **unused):
  """PSFT (arXiv 2508.17784): PPO's clipped surrogate with advantage 1,

    -min(r, clip(r, 1 - eps_low, 1 + eps_high)),   r = exp(logp - sg(old_logp)).

  With A = 1 this is -r for r <= 1 + eps_high (gradient r * (softmax - onehot)) and the constant
  -(1 + eps_high) above (gradient 0); eps_low never binds (the min picks r below 1 - eps_low).
  Defaults 0.2 / 0.28 are clip_ratio_low / clip_ratio_high of the official run script
  (verl/recipe/psft/run_psft.sh). old_logp: the policy snapshot's logp, fixed over the minibatch
  updates of one global batch.
  """
  del unused
  if old_logp is None:
    raise ConfigError("psft needs old_logp (per-token log-probs of the policy snapshot); "
                      "allowed: an array shaped like logp")
  _check("eps_low", eps_low, *RANGES["eps_low"])
  _check("eps_high", eps_high, *RANGES["eps_high"])
  ratio = jnp.exp(_log_ratio(logp, old_logp))
  return -jnp.minimum(ratio, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))


def dft_seq(logp, *, loss_mask=None, segment_ids=None, **unused):
  """DFT, sequence level (arXiv 2508.05629): -sg(pi(y|x)) * log p_t, pi(y|x) = exp(sum of logp over
  the loss tokens of t's segment). Rows are the sequences if segment_ids is None.

  Unstable by design (kept to show it): pi(y|x) underflows in float32 once the response's summed
  logp is below about -87 (-104 counting subnormals), and such segments then get loss and
  gradient exactly 0 (finite): long responses stop training.
  """
  del unused
  logp = _f32(logp)
  seq_logp = sequence_log_prob(logp, loss_mask, segment_ids)
  return -jax.lax.stop_gradient(jnp.exp(seq_logp)) * logp


def _missing(name, keyword, value):
  if value is None:
    raise ConfigError(f"{name} needs {keyword} (per-token, shaped like logp; objectives."
                      "required_stats(cfg) names the LM-head statistic); allowed: an array")


def eaft_gate(gate_entropy, eaft_alpha=1.0, eaft_norm=3.0):
  """EAFT's gate (H_t / eaft_norm) ** eaft_alpha, without gradient (H_t >= 0 is clamped at 0)."""
  _check("eaft_alpha", eaft_alpha, *RANGES["eaft_alpha"])
  _check("eaft_norm", eaft_norm, *RANGES["eaft_norm"])
  h = jnp.maximum(jax.lax.stop_gradient(_f32(gate_entropy)), 0.0)
  return jnp.power(h / eaft_norm, eaft_alpha)


def eaft(logp, *, gate_entropy=None, eaft_alpha=1.0, eaft_norm=3.0, **unused):
  """EAFT, Entropy-Adaptive Fine-Tuning (arXiv 2601.02151): cross-entropy under an entropy gate,

    -sg(g_t) * log p_t,   g_t = (H_t / eaft_norm) ** eaft_alpha.

  Gradient wrt logits: g_t * (softmax - onehot). Low-entropy tokens ("confident conflicts" when the
  target is unlikely) are gated down. H_t: `gate_entropy`, the entropy of the softmax over the
  top-k logits (statistic "topk_entropy:K", objective.eaft_entropy="topk") or the exact
  full-vocabulary entropy ("entropy", eaft_entropy="full"). Defaults k = 20, eaft_norm = 3.0
  (~ ln 20: the top-20 entropy's maximum), eaft_alpha = 1 are those of the authors' code merged in
  LLaMA-Factory (`_eaft_cross_entropy`; also their ms-swift port); axolotl's port has eaft_k and
  eaft_alpha but no divisor (eaft_norm = 1). With the full entropy, g_t can exceed 1 unless
  eaft_norm >= ln(vocab size).
  """
  del unused
  _missing("eaft", "gate_entropy", gate_entropy)
  return -eaft_gate(gate_entropy, eaft_alpha, eaft_norm) * _f32(logp)


def gem(logp, *, tempered_xent=None, tempered_mass=None, **unused):
  """GEM (arXiv 2408.16673; official code liziniu/GEM): entropy-regularised distribution matching,

    sum_v sg(a_v) (log p_v - log p_t) = -A_t * log p_t - X_t,   a_v = q_v * w_v,
    q = softmax(logits / gem_beta),   A_t = sum_v a_v,   X_t = -sum_v a_v log p_v.

  Gradient wrt logits: a - A_t * onehot (SFT's is softmax - onehot): the model is pulled towards
  its own tempered distribution q instead of its softmax, which keeps the distribution flatter;
  gem_beta = 1 with h = linear has exactly SFT's gradient. w_v = 1 (gem_h=linear: A_t = 1, then
  pass tempered_mass=None) or sigmoid(0.01 (z_v - z_t)) (gem_h=logsigmoid). tempered_xent (X_t,
  differentiable) and tempered_mass (A_t, no gradient) are the statistics
  "gem_cross_entropy:BETA:H" and "gem_mass:BETA:H" (objectives.gem_cross_entropy / gem_mass).
  Defaults gem_beta = 0.7, gem_h = linear: official train.py (its released scripts pass
  gem_h=logsigmoid).
  """
  del unused
  _missing("gem", "tempered_xent", tempered_xent)
  mass = 1.0 if tempered_mass is None else jax.lax.stop_gradient(_f32(tempered_mass))
  return -mass * _f32(logp) - _f32(tempered_xent)


def deft_alpha(renyi2):
  """DEFT's per-token q-log exponent alpha_t = sg(exp(-H2_t)) = sg(sum_v p_v**2), in [1/V, 1]."""
  return jnp.exp(-jax.lax.stop_gradient(_f32(renyi2)))


def deft(logp, *, renyi2=None, **unused):
  """DEFT, Dynamic Entropy Fine-Tuning (arXiv 2602.11424; official code luludus/DEFT, verl trainer
  objective_trans=DEFT): the power family's q-log with alpha set per token by the prediction's
  concentration, parameter-free,

    -ln_q(p_t) = -(p_t**a_t - 1) / a_t,   a_t = sg(sum_v p_v**2) = sg(exp(-H2_t)).

  Gradient wrt logits: p_t**a_t * (softmax - onehot), the "gate" p_t**a_t: NLL-like (gate -> 1)
  when the distribution is flat, DFT-like (gate -> p_t) when it is concentrated. The official code
  divides by a_t + 1e-6 instead of a_t; a_t >= 1/V > 0, so this drops the epsilon: a relative
  change of 1e-6 / a_t, below 1e-4 once sum_v p_v**2 > 0.01 (only a near-uniform prediction over a
  large vocabulary feels it). renyi2: H2_t, the statistic "renyi2_entropy".
  """
  del unused
  _missing("deft", "renyi2", renyi2)
  return neg_qlog(_f32(logp), deft_alpha(renyi2))


OBJECTIVES = {"sft": sft, "dft": dft, "dft_seq": dft_seq, "power": power, "psft": psft,
              "eaft": eaft, "gem": gem, "deft": deft}


def k3(logp, ref_logp):
  """k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = sg(ref_logp) - logp (>= 0).

  d/dlogp = 1 - exp(d). d is clamped at MAX_LOG_RATIO (no gradient beyond it) to stay finite.
  """
  d = jnp.minimum(jax.lax.stop_gradient(_f32(ref_logp)) - _f32(logp), MAX_LOG_RATIO)
  return jnp.expm1(d) - d


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
  if mode == "sum_norm":
    _check("norm_constant", norm_constant, *RANGES["norm_constant"])
    return mask / norm_constant
  raise ConfigError(f"aggregation mode={mode!r} is unknown; allowed: {', '.join(AGGREGATIONS)}")


def _weighted_sum(per_token, weights):
  return jnp.sum(jnp.where(weights > 0, _f32(per_token), 0.0) * weights)


def aggregate(per_token_loss, loss_mask, mode="token_mean", **denominators):
  """Scalar loss: sum over tokens of loss * token_weights(loss_mask, mode, **denominators).

  Masked positions contribute exactly 0 even where the loss is inf/NaN. Summing this over
  microbatches (or devices) given the global denominators equals the whole batch's value.
  """
  return _weighted_sum(per_token_loss, token_weights(loss_mask, mode, **denominators))


# ---------------------------------------------------------------------------------------------
# Config edge and the composite loss of the train step.


def validate(cfg):
  """Checks config.objective; returns its fields as a dict, missing ones from DEFAULTS."""
  fields = dict(DEFAULTS)
  fields.update(cfg.items())
  if "name" not in fields or fields["name"] not in OBJECTIVES:
    raise ConfigError(f"objective.name={fields.get('name')!r} is unknown; "
                      f"allowed: {', '.join(OBJECTIVES)}")
  for field, allowed in CHOICES.items():
    if fields[field] not in allowed:
      raise ConfigError(f"objective.{field}={fields[field]!r} is unknown; "
                        f"allowed: {', '.join(allowed)}")
  for field, (allowed, ok) in RANGES.items():
    _check(f"objective.{field}", fields[field], allowed, ok)
  return fields


def needs_old_logp(cfg):
  """True if stats must carry old_logp (the policy snapshot's logp): PSFT."""
  return validate(cfg)["name"] == "psft"


def _objective_inputs(hp):
  """{keyword of the objective: lm_head statistic name} of its per-token inputs beyond logp."""
  if hp["name"] == "eaft":
    full = hp["eaft_entropy"] == "full"
    return {"gate_entropy": "entropy" if full else f"topk_entropy:{int(hp['eaft_k'])}"}
  if hp["name"] == "gem":
    params = f"{float(hp['gem_beta'])!r}:{hp['gem_h']}"
    inputs = {"tempered_xent": f"gem_cross_entropy:{params}"}
    if hp["gem_h"] != "linear":  # A_t = 1 for h = linear
      inputs["tempered_mass"] = f"gem_mass:{params}"
    return inputs
  if hp["name"] == "deft":
    return {"renyi2": "renyi2_entropy"}
  return {}


def required_stats(cfg):
  """Per-token statistics the fused LM head must compute for this objective (lm_head.STATISTICS):
  logp always; entropy for the entropy bonus and the entropy metric; e.g. "topk_entropy:20" (eaft),
  "gem_cross_entropy:0.7:linear" (gem), "renyi2_entropy" (deft)."""
  hp = validate(cfg)
  return tuple(dict.fromkeys(("logp", "entropy", *_objective_inputs(hp).values())))


def needs_ref_logp(cfg):
  """True if stats must carry ref_logp (the frozen reference's logp): KL anchor on."""
  return validate(cfg)["kl_coef"] > 0


def _gate_metrics(name, gate):
  return {f"{name}/gate": gate, f"{name}/gated_down": gate < GATED_DOWN_BELOW}


def _token_metrics(stats, loss_mask, segment_ids, hp, inputs):
  """Masked per-token sums ("tok/..."), histogram counts and num_tokens; no gradient."""
  stats = {k: jax.lax.stop_gradient(v) for k, v in stats.items()}
  inputs = {k: jax.lax.stop_gradient(_f32(v)) for k, v in inputs.items()}
  mask = _f32(loss_mask)
  logp = _f32(stats["logp"])
  prob = jnp.exp(logp)
  values = {"target_prob": prob, "p_below_0.1": prob < 0.1, "p_above_0.9": prob > 0.9}
  if "entropy" in stats:
    values["entropy"] = stats["entropy"]
  if hp["name"] == "psft":
    ratio = jnp.exp(_log_ratio(stats["logp"], stats["old_logp"]))
    values["psft/clip_frac_high"] = ratio > 1.0 + hp["eps_high"]  # gradient zeroed
    values["psft/clip_frac_low"] = ratio < 1.0 - hp["eps_low"]    # reported; A=1 never clips it
    values["psft/ratio"] = ratio
    values["psft/approx_kl"] = k3(stats["old_logp"], stats["logp"])  # KL(old || new), k3
  if hp["name"] == "dft_seq":
    values["dft_seq/seq_prob"] = jnp.exp(sequence_log_prob(stats["logp"], mask, segment_ids))
  if hp["name"] == "eaft":
    values["eaft/gate_entropy"] = inputs["gate_entropy"]
    values.update(_gate_metrics("eaft", eaft_gate(inputs["gate_entropy"], hp["eaft_alpha"],
                                                  hp["eaft_norm"])))
  if hp["name"] == "deft":
    alpha = deft_alpha(inputs["renyi2"])
    values["deft/alpha"] = alpha
    values.update(_gate_metrics("deft", jnp.exp(alpha * logp)))
  if hp["name"] == "gem":
    values["gem/tempered_xent"] = inputs["tempered_xent"]
    values["gem/tempered_mass"] = inputs.get("tempered_mass", jnp.ones_like(logp))
  if hp["kl_coef"] > 0:
    values["kl_anchor/k3"] = k3(stats["logp"], stats["ref_logp"])
  metrics = {f"tok/{k}": _weighted_sum(_f32(v), mask) for k, v in values.items()}
  num_bins = len(HIST_EDGES) - 1
  bins = jnp.clip(jnp.floor(prob * num_bins), 0, num_bins - 1).astype(jnp.int32)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)
  metrics["hist/target_prob"] = jnp.sum(jnp.where(mask > 0, mask, 0.0)[..., None] * onehot,
                                        axis=tuple(range(mask.ndim)))
  metrics["num_tokens"] = mask.sum()
  return metrics


def objective_loss(stats, batch, cfg, *, denominators=None):
  """The train step's loss: per-token objective (+ entropy bonus, + KL anchor), aggregated.

  stats: dict of [B, T] arrays: logp, entropy (needed if entropy_coef > 0), old_logp (psft),
    ref_logp (kl_coef > 0), and the statistics required_stats(cfg) names (eaft, gem, deft); any
    float dtype, computed in float32.
  batch: dict with loss_mask [B, T] and optionally segment_ids [B, T] (other keys ignored).
  cfg: config.objective (ConfigDict or dict): name, alpha, eps_low, eps_high, entropy_coef,
    kl_coef, aggregation, norm_constant, eaft_*, gem_* (DEFAULTS fills missing fields).
  denominators: global_denominators() of the whole global batch when `batch` is a microbatch or
    a device's shard; None means `batch` is the global batch.
  Returns (loss, metrics): metrics as sums (module docstring), combine with + then
  finalize_metrics. Raises ConfigError at trace time on a bad cfg or missing stats.
  """
  hp = validate(cfg)
  needed = [("old_logp", hp["name"] == "psft", "objective.name='psft'"),
            ("ref_logp", hp["kl_coef"] > 0, f"objective.kl_coef={hp['kl_coef']}"),
            ("entropy", hp["entropy_coef"] > 0, f"objective.entropy_coef={hp['entropy_coef']}")]
  input_names = _objective_inputs(hp)
  needed += [(key, True, f"objective.name={hp['name']!r}") for key in input_names.values()]
  for key, need, reason in needed:
    if need and stats.get(key) is None:
      raise ConfigError(f"{reason} needs stats[{key!r}]; allowed: a [B, T] array like logp "
                        "(lm_head.token_stats(..., stats=objectives.required_stats(cfg)))")
  inputs = {keyword: stats[key] for keyword, key in input_names.items()}
  mask, segment_ids = batch["loss_mask"], batch.get("segment_ids")
  if denominators is None:
    denominators = global_denominators(mask, segment_ids)
  weights = token_weights(mask, hp["aggregation"], segment_ids=segment_ids,
                          norm_constant=hp["norm_constant"], **denominators)
  logp = _f32(stats["logp"])
  hparams = {k: hp[k] for k in ("alpha", "eps_low", "eps_high", "eaft_alpha", "eaft_norm")}
  terms = {"objective": OBJECTIVES[hp["name"]](
      logp, old_logp=stats.get("old_logp"), loss_mask=mask, segment_ids=segment_ids, **hparams,
      **inputs)}
  if hp["entropy_coef"] > 0:
    terms["entropy_bonus"] = -hp["entropy_coef"] * _f32(stats["entropy"])
  if hp["kl_coef"] > 0:
    terms["kl_anchor"] = hp["kl_coef"] * k3(logp, stats["ref_logp"])
  term_losses = {k: _weighted_sum(v, weights) for k, v in terms.items()}
  loss = sum(term_losses.values())
  metrics = {"loss": loss, **{f"loss/{k}": v for k, v in term_losses.items()}}
  metrics.update(_token_metrics(stats, mask, segment_ids, hp, inputs))
  return loss, metrics


def finalize_metrics(summed):
  """Summed metrics -> reportable values: "tok/x" -> "x" = sum / num_tokens (0 if no tokens);
  "hist/..." stay bin counts; the rest (losses, num_tokens) stay as they are."""
  num_tokens = _nonzero(jnp.asarray(summed["num_tokens"], jnp.float32))
  final = {}
  for key, value in summed.items():
    if key.startswith("tok/"):
      final[key[len("tok/"):]] = value / num_tokens
    else:
      final[key] = value
  return final
