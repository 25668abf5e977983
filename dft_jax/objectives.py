"""Per-token objectives of the SFT family, their aggregation and their metrics.

An objective maps per-token log-probabilities of the target tokens to a per-token loss of the same
shape. Objectives are pure, elementwise (dft_seq: per segment) and compute in float32 whatever the
input dtype; no model inside. Aggregation (a weighted sum over the batch) is separate, and takes the
denominators of the GLOBAL batch so that microbatches and devices can each contribute
`sum(loss * mask) / global_denominator` and the caller only sums.

  sft      -logp                                      cross-entropy
  dft      -sg(p) * logp                              arXiv 2508.05629, token level
  dft_seq  -sg(exp(sum_seg logp)) * logp              arXiv 2508.05629, sequence level
  power    -(p**alpha - 1) / alpha                    alpha->0: SFT; alpha=1: DFT's gradient
  psft     -min(r, clip(r, 1-eps_low, 1+eps_high))    arXiv 2508.17784, r = exp(logp - old_logp)

with p = exp(logp) and sg = stop_gradient; plus `-entropy_coef * H_t` (entropy bonus) and
`kl_coef * k3(logp, ref_logp)` (KL anchor to a frozen reference), which combine with any objective.

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
# Defaults of config.objective fields (configs/default.py); `name` has none.
DEFAULTS = dict(alpha=0.5, eps_low=0.2, eps_high=0.28, entropy_coef=0.0, kl_coef=0.0,
                aggregation="token_mean", norm_constant=1.0)
# Allowed ranges of the numeric fields: (description, predicate on a finite float).
RANGES = dict(
    alpha=("a finite number > 0 (alpha -> 0 is SFT: use objective.name=sft)", lambda x: x > 0),
    eps_low=("a number in the open interval (0, 1)", lambda x: 0 < x < 1),
    eps_high=("a number in the open interval (0, 1)", lambda x: 0 < x < 1),
    entropy_coef=("a finite number >= 0", lambda x: x >= 0),
    kl_coef=("a finite number >= 0", lambda x: x >= 0),
    norm_constant=("a finite number > 0", lambda x: x > 0),
)


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


def power(logp, *, alpha=0.5, **unused):
  """Power family: -(p_t**alpha - 1) / alpha; d/dlogp = -p_t**alpha.

  alpha -> 0 recovers SFT (-log p_t); alpha = 1 has DFT's gradient (loss 1 - p_t).
  """
  del unused
  _check("alpha", alpha, *RANGES["alpha"])
  return -jnp.expm1(alpha * _f32(logp)) / alpha


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


OBJECTIVES = {"sft": sft, "dft": dft, "dft_seq": dft_seq, "power": power, "psft": psft}


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
  if fields["aggregation"] not in AGGREGATIONS:
    raise ConfigError(f"objective.aggregation={fields['aggregation']!r} is unknown; "
                      f"allowed: {', '.join(AGGREGATIONS)}")
  for field, (allowed, ok) in RANGES.items():
    _check(f"objective.{field}", fields[field], allowed, ok)
  return fields


def needs_old_logp(cfg):
  """True if stats must carry old_logp (the policy snapshot's logp): PSFT."""
  return validate(cfg)["name"] == "psft"


def needs_ref_logp(cfg):
  """True if stats must carry ref_logp (the frozen reference's logp): KL anchor on."""
  return validate(cfg)["kl_coef"] > 0


def _token_metrics(stats, loss_mask, segment_ids, hp):
  """Masked per-token sums ("tok/..."), histogram counts and num_tokens; no gradient."""
  stats = {k: jax.lax.stop_gradient(v) for k, v in stats.items()}
  mask = _f32(loss_mask)
  prob = jnp.exp(_f32(stats["logp"]))
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
    ref_logp (kl_coef > 0); any float dtype, computed in float32.
  batch: dict with loss_mask [B, T] and optionally segment_ids [B, T] (other keys ignored).
  cfg: config.objective (ConfigDict or dict): name, alpha, eps_low, eps_high, entropy_coef,
    kl_coef, aggregation, norm_constant.
  denominators: global_denominators() of the whole global batch when `batch` is a microbatch or
    a device's shard; None means `batch` is the global batch.
  Returns (loss, metrics): metrics as sums (module docstring), combine with + then
  finalize_metrics. Raises ConfigError at trace time on a bad cfg or missing stats.
  """
  hp = validate(cfg)
  for key, needed, reason in (
      ("old_logp", hp["name"] == "psft", "objective.name='psft'"),
      ("ref_logp", hp["kl_coef"] > 0, f"objective.kl_coef={hp['kl_coef']}"),
      ("entropy", hp["entropy_coef"] > 0, f"objective.entropy_coef={hp['entropy_coef']}")):
    if needed and stats.get(key) is None:
      raise ConfigError(f"{reason} needs stats[{key!r}]; allowed: a [B, T] array like logp")
  mask, segment_ids = batch["loss_mask"], batch.get("segment_ids")
  if denominators is None:
    denominators = global_denominators(mask, segment_ids)
  weights = token_weights(mask, hp["aggregation"], segment_ids=segment_ids,
                          norm_constant=hp["norm_constant"], **denominators)
  logp = _f32(stats["logp"])
  terms = {"objective": OBJECTIVES[hp["name"]](
      logp, old_logp=stats.get("old_logp"), loss_mask=mask, segment_ids=segment_ids,
      alpha=hp["alpha"], eps_low=hp["eps_low"], eps_high=hp["eps_high"])}
  if hp["entropy_coef"] > 0:
    terms["entropy_bonus"] = -hp["entropy_coef"] * _f32(stats["entropy"])
  if hp["kl_coef"] > 0:
    terms["kl_anchor"] = hp["kl_coef"] * k3(logp, stats["ref_logp"])
  term_losses = {k: _weighted_sum(v, weights) for k, v in terms.items()}
  loss = sum(term_losses.values())
  metrics = {"loss": loss, **{f"loss/{k}": v for k, v in term_losses.items()}}
  metrics.update(_token_metrics(stats, mask, segment_ids, hp))
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
