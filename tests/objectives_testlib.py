"""Shared by the objective and LM-head tests: packed batches with known logits, and references
computed independently of dft_jax.lm_head (float64 numpy, or full logits through the objectives'
own math)."""
import numpy as np

from dft_jax import lm_head
from dft_jax import objectives


def packed_logits(segments, vocab, hidden_size, *, seed, scale, argmax_frac):
  """hidden [B, T, D], w [D, V], logits = hidden @ w, targets (the argmax on `argmax_frac` of the
  tokens, so probabilities spread over (0, 1); -100 on padding), loss_mask (0 on padding and on
  each segment's last token) for the packed rows `segments` [B, T]."""
  rng = np.random.default_rng(seed)
  b, t = segments.shape
  hidden = rng.normal(size=(b, t, hidden_size)).astype(np.float32)
  w = (scale * rng.normal(size=(hidden_size, vocab)) / np.sqrt(hidden_size)).astype(np.float32)
  logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), w).astype(np.float32)
  targets = np.where(rng.random((b, t)) < argmax_frac, logits.argmax(-1),
                     rng.integers(0, vocab, (b, t))).astype(np.int32)
  last = np.append(segments[:, 1:] != segments[:, :-1], np.ones((b, 1), bool), axis=1)
  mask = ((segments > 0) & ~last).astype(np.float32)
  targets[segments == 0] = -100  # HF-style padding targets: must stay harmless
  return dict(hidden=hidden, w=w, logits=logits, targets=targets, loss_mask=mask,
              segment_ids=segments), rng


def ref_logsoftmax(z):
  """float64 log-softmax over the last axis."""
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def stats_from_logits(logits, targets, stats, ref_logits=None, extra=None):
  """The LM-head statistics `stats` (lm_head.Statistic, e.g. objectives.validate(cfg).stats) from
  full logits through their own math, all differentiable as written (the heads stop the gates'
  gradient themselves); ref_logits: the reference model's, for "kl_from_ref"; extra: per-token
  side inputs (token_key)."""
  logp_all = lm_head.log_softmax(logits)
  ref = None if ref_logits is None else lm_head.log_softmax(ref_logits)
  out = {}
  for stat in stats:
    side = {n: ref if n == "reference" else extra[n] for n in stat.side}
    out[stat.name] = stat.fn(logits if stat.from_logits else logp_all, targets, **side)
  return out


def logp_and_entropy(logits, targets):
  """(logp, entropy) [B, T] in float32 from full logits (lm_head's reference math)."""
  logp_all = lm_head.log_softmax(logits)
  return lm_head.target_log_prob(logp_all, targets), lm_head.entropy(logp_all)


def setting_for(name, **fields):
  """objectives.validate(objective_cfg(name, **fields))."""
  return objectives.validate(objective_cfg(name, **fields))


def objective_cfg(name, **fields):
  """A config.objective dict: the generic fields (objectives.GENERIC) at the top, the given
  hyperparameters of `name` in its block; hyperparameters of other objectives are dropped, so one
  set of test settings fits every objective."""
  own = objectives.OBJECTIVES[name].hparams
  cfg = {"name": name, **{k: v for k, v in fields.items() if k in objectives.GENERIC}}
  cfg[name] = {k: v for k, v in fields.items() if k in own}
  return cfg
