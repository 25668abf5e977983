"""Shared by the objective and LM-head tests: packed batches with known logits, and references
computed independently of dft_jax.lm_head (float64 numpy, or full logits through the objectives'
own math); the golden fixture's train step for any objective."""
import importlib.util
import pathlib

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


def golden_fixture():
  """tests/fixtures/make_step_golden.py as a module (the tiny Llama and its packed rows)."""
  path = pathlib.Path(__file__).parent / "fixtures" / "make_step_golden.py"
  spec = importlib.util.spec_from_file_location("make_step_golden", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_train_steps(objective, *, steps=2, microbatches=1, devices=1, lm_head_impl="fused",
                    schedule="cosine", start_after=0):
  """The train step of tests/fixtures/make_step_golden.py (tiny Llama, 8 packed rows of 32 tokens)
  for `objective` (config.objective overrides, nested for hyperparameters): (per-step metrics,
  params on the host). schedule "finch" runs without its rate cap. start_after: steps run, then
  the state taken to the host and put back (what a restore does) before the rest."""
  import jax  # pylint: disable=g-import-not-at-top
  from dft_jax import models, sharding  # pylint: disable=g-import-not-at-top
  from dft_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from dft_jax.data.testing import default_config  # pylint: disable=g-import-not-at-top
  golden = golden_fixture()
  config = default_config()
  config.train.update(num_steps=steps, global_batch_size=8, seq_len=32, microbatches=microbatches,
                      seed=3)
  for key, value in objective.items():
    if isinstance(value, dict):
      config.objective[key].update(value)
    else:
      config.objective[key] = value
  config.model.update(name=golden.TINY, lm_head_chunk=96, remat="none", lm_head_impl=lm_head_impl)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=1, schedule=schedule)
  config.optimizer.finch.max_learning_rate = 1.0  # no cap: FINCH's rates follow the losses
  mesh = sharding.make_mesh(dict(data=devices, fsdp=1, tensor=1), jax.devices()[:devices])
  setting = objectives.validate(config.objective)
  model, _ = models.load(golden.TINY, compute_dtype="float32")
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh,
                                                             setting=setting)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  metrics = []
  for i, b in enumerate(golden.host_batches(model.config.vocab_size, num=steps)):
    if i == start_after and i:
      state = jax.device_put(jax.device_get(state), step_lib.shardings_of(state))
    state, m = step(state, step_lib.global_batch(b, mesh), frozen)
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params)
