"""A population: one arm of the study trained at every (learning rate, data seed) at once.

The study compares objectives at every rate of one shared grid and over several data orders. Those
runs differ only in their learning rate and their batches, so they are members of one program:
their TrainStates are stacked on a leading member axis [R, ...] and the train job's step
(step.step_function) is vmapped over it. A 135M model leaves most of a GPU idle; R runs in one
program cost far less than R runs one after the other (the study records both). Evaluation does
the same: every member's greedy replies (sampling.greedy_tokens) and teacher-forced statistics
(teacher_forced.token_stats) come from one vmapped program per set.

Member m trains at its own peak rate lr_m: the optimizer is the train job's (step.make_optimizer)
at a peak rate of 1, followed by a multiplication by lr_m kept in the member's optimizer state
(`scale_by_member_lr`). AdamW's update -lr s(t) (m_hat / (sqrt(v_hat) + eps) + wd p) is linear in
the peak rate lr, so member m follows the train job's optimizer at rate lr_m exactly.
"""
import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dft_jax import sampling
from dft_jax import step as step_lib
from dft_jax.data import answers
from dft_jax.data import formats
from dft_jax.evaluate import teacher_forced


@dataclasses.dataclass(frozen=True)
class Member:
  lr: float
  seed: int  # train.seed: the data order


def members(rates, seeds):
  """Every (rate, seed), rate-major: the population of one arm."""
  return tuple(Member(float(lr), int(s)) for lr, s in itertools.product(rates, seeds))


# ----------------------------------------------------------------------------- training


class MemberRate(NamedTuple):
  lr: jax.Array  # this member's peak learning rate


def scale_by_member_lr(lr=1.0):
  """Multiplies the updates by the member's peak learning rate, kept in the optimizer state (so a
  vmapped population gives each member its own)."""

  def init(params):
    del params
    return MemberRate(jnp.asarray(lr, jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: (u * state.lr).astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def unit_rate_config(config):
  """The config with optimizer.learning_rate = 1: the shape of every member's schedule. FINCH's
  cap (optimizer.finch.max_learning_rate) is kept as the same multiple of the peak rate (the
  paper code's 5e-5 over 2e-5: 2.5), so its rate min(lr / sqrt(L), cap) stays linear in lr."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.optimizer.schedule == "finch":
    c.optimizer.finch.max_learning_rate /= c.optimizer.learning_rate
  c.optimizer.learning_rate = 1.0
  return c


STATE_AXES = step_lib.TrainState(step=None, params=0, opt_state=0)  # the step count is shared


@dataclasses.dataclass
class Population:
  """The stacked state of R members and what their step reads."""
  graphdef: object
  state: step_lib.TrainState   # params and opt_state [R, ...]; step shared
  frozen: step_lib.Frozen      # the same for every member (the reference model, if any)
  tx: optax.GradientTransformation
  unit_schedule: object        # the learning rate at peak 1: member m's is lr_m * unit_schedule
  members: tuple


def population_tx(base_tx):
  """The members' optimizer: the train job's at peak rate 1, then each member's rate."""
  return optax.chain(base_tx, scale_by_member_lr())


def population_state(params, base_tx, rates):
  """TrainState [R, ...]: R copies of params, each with a fresh optimizer state at rates[m]."""
  opt_state = jax.vmap(lambda lr: optax.chain(base_tx, scale_by_member_lr(lr)).init(params))(
      rates)
  stacked = jax.tree.map(lambda p: jnp.repeat(p[None], rates.shape[0], axis=0), params)
  return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=stacked, opt_state=opt_state)


def init_population(model, config, setting, population_members, mesh):
  """Every member starts from `model`'s parameters (copied) with a fresh optimizer at its rate;
  setting: the resolved objective (objectives.validate)."""
  graphdef, state, frozen, base_tx, unit_schedule = step_lib.init_train_state(
      model, unit_rate_config(config), mesh, setting=setting)
  rates = jnp.asarray([m.lr for m in population_members], jnp.float32)
  stacked = jax.jit(lambda p, r: population_state(p, base_tx, r))(state.params, rates)
  return Population(graphdef, stacked, frozen, population_tx(base_tx), unit_schedule,
                    tuple(population_members))


def make_population_step(graphdef, tx, config, setting):
  """The train job's step vmapped over the members: (state [R], batch [R, G, T], frozen) ->
  (state, metrics [R]); the state is donated."""
  step = step_lib.step_function(graphdef, tx, config, setting=setting, lora=False)
  return jax.jit(jax.vmap(step, in_axes=(STATE_AXES, 0, None), out_axes=(STATE_AXES, 0)),
                 donate_argnums=(0,))


def member_batches(batches_by_seed, population_members):
  """(batch [R, G, T], None) per step: member m reads the batches of its data seed."""
  num_steps = len(next(iter(batches_by_seed.values())))
  for i in range(num_steps):
    yield ({k: np.stack([batches_by_seed[m.seed][i][k] for m in population_members])
            for k in step_lib.BATCH_KEYS}, None)


class History:
  """The loop's `record`: each member's metrics per step (the keys of `keys` a step has), and its
  learning rate lr_m * unit_schedule at the step's last update."""

  def __init__(self, population, keys, minibatches):
    self.population, self.keys, self.minibatches = population, keys, minibatches
    self.rows = [[] for _ in population.members]

  def __call__(self, step, metrics, position=None):
    del position
    values = jax.device_get({k: v for k, v in metrics.items()
                             if k in self.keys or k == "learning_rate"})
    # the step reports a data-dependent rate (FINCH's, at peak 1); a schedule's is known
    unit = values.pop("learning_rate", None)
    if unit is None:
      unit = np.full(len(self.population.members),
                     float(self.population.unit_schedule(step * self.minibatches - 1)))
    for m, member in enumerate(self.population.members):
      row = {"step": step, **{k: float(v[m]) for k, v in values.items()}}
      self.rows[m].append(dict(row, learning_rate=member.lr * float(unit[m])))


# ----------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_replies(graphdef, states, tokens_BxP, valid_BxP, eos_E, pad_id, *, max_new_tokens):
  """[R, B, max_new_tokens] greedy new tokens of every member."""
  return jax.vmap(lambda state: sampling.greedy_tokens(
      graphdef, state, tokens_BxP, valid_BxP, eos_E, pad_id, max_new_tokens=max_new_tokens))(
          states)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forced(graphdef, states, base_params, batch):
  """Every member's teacher_forced.token_stats [R, B, T] (KL against base_params, if given)."""
  return jax.vmap(lambda s: teacher_forced.token_stats(graphdef, s, base_params, batch))(states)


def stack(params_list):
  """Parameters of several models -> one state [R, ...] (e.g. the base alone: R = 1)."""
  return jax.tree.map(lambda *p: jnp.stack(p), *params_list)


@dataclasses.dataclass(frozen=True)
class AnswerSet:
  """Problems scored on the final answer of a greedy reply: prompts (ids) and reference answers."""
  prompt_ids: list
  answers: list
  max_new_tokens: int


class PopulationEvaluator:
  """Scores every member of a population on the study's sets.

  answer_sets: {name: AnswerSet} scored by answers.is_correct on the reply's final answer
  (in-domain test, out-of-distribution tests, validation); run_evaluator: an evaluate.RunEvaluator
  whose sets give the forgetting measures (factual questions; teacher-forced: the base model's
  replies to general prompts, held-out prose, the in-domain reference responses). One vmapped
  program per set and batch of batch_size rows.
  """

  def __init__(self, run_evaluator, answer_sets, *, batch_size, forced_batch_size):
    self.ev, self.answer_sets = run_evaluator, answer_sets
    self.graphdef, self.base_params = run_evaluator.graphdef, run_evaluator.base_params
    self.batch_size, self.forced_batch_size = batch_size, forced_batch_size
    self.eos = sampling.eos_array(sampling.stop_ids(nnx.merge(self.graphdef, self.base_params),
                                                    run_evaluator.tokenizer))
    self.pad = sampling.pad_id(run_evaluator.tokenizer)

  def replies(self, states, prompt_ids, max_new_tokens):
    """[R][N] decoded greedy replies of every member."""
    num_members = jax.tree.leaves(states)[0].shape[0]
    texts = [[] for _ in range(num_members)]
    for start in range(0, len(prompt_ids), self.batch_size):
      part = prompt_ids[start:start + self.batch_size]
      filled = part + [part[-1]] * (min(self.batch_size, len(prompt_ids)) - len(part))
      tokens, valid = sampling.prompt_arrays(filled, self.pad)
      out = np.asarray(_greedy_replies(self.graphdef, states, tokens, valid, self.eos,
                                       jnp.int32(self.pad), max_new_tokens=max_new_tokens))
      for m in range(num_members):
        ids = sampling.cut_at_eos(out[m, :len(part)], self.eos)
        texts[m] += self.ev.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts

  def forced(self, states, name, against_base=True):
    """[R] of {stat: per-row values [N][tokens]} on a teacher-forced set of the RunEvaluator."""
    batch = self.ev.forced_batch(name)
    n, t = batch["tokens"].shape
    length = -(-t // teacher_forced.LENGTH_BUCKET) * teacher_forced.LENGTH_BUCKET
    num_members = jax.tree.leaves(states)[0].shape[0]
    rows = [dict() for _ in range(num_members)]
    for start in range(0, n, self.forced_batch_size):
      part = teacher_forced.padded({k: v[start:start + self.forced_batch_size]
                                    for k, v in batch.items()},
                                   min(self.forced_batch_size, n), length)
      stats = jax.device_get(_forced(self.graphdef, states,
                                     self.base_params if against_base else None, part))
      mask = part["loss_mask"][:n - start] > 0
      for m in range(num_members):
        for key, value in stats.items():
          rows[m].setdefault(key, []).extend(
              v[k] for v, k in zip(np.asarray(value[m])[:n - start], mask))
    return rows

  def __call__(self, states, sets=None):
    """[R] of results dicts: for each answer set NAME, NAME_accuracy and NAME_correct (a string of
    0/1 per problem); the forgetting measures (token-weighted KL and entropy on the general
    prompts, with per-prompt KL sums and token counts; factual accuracy and per-question
    results; held-out perplexity); the target-probability statistics."""
    names = list(self.answer_sets) if sets is None else list(sets)
    num_members = jax.tree.leaves(states)[0].shape[0]
    out = [dict() for _ in range(num_members)]
    for name in names:
      s = self.answer_sets[name]
      for m, texts in enumerate(self.replies(states, s.prompt_ids, s.max_new_tokens)):
        out[m].update(score_answers(name, texts, s.answers))
    facts, s = self.ev.rows("factual"), self.ev.cfg["factual_qa"]
    prompts = [self.ev.prompt_ids(str(formats.get_field(r, s.prompt_field))) for r in facts]
    for m, texts in enumerate(self.replies(states, prompts, self.ev.cfg["factual_max_new_tokens"])):
      correct = [answers.matches_fact(t, formats.get_field(r, s.aliases_field))
                 for t, r in zip(texts, facts)]
      out[m].update(factual_accuracy=float(np.mean(correct)), factual_correct=bits(correct))
    for m, (drift, prose, hist) in enumerate(zip(self.forced(states, "drift"),
                                                 self.forced(states, "heldout"),
                                                 self.forced(states, "hist", against_base=False))):
      out[m].update(teacher_forced.forgetting_measures(drift, prose))
      out[m].update(target_measures(hist))
    return out


def bits(flags):
  """Per-item 0/1 results as a compact string ("0110...")."""
  return "".join("1" if f else "0" for f in flags)


def score_answers(name, texts, references):
  correct = [answers.is_correct(t, a) for t, a in zip(texts, references)]
  return {f"{name}_accuracy": float(np.mean(correct)), f"{name}_correct": bits(correct),
          f"{name}_answered": float(np.mean([answers.extract_answer(t) is not None
                                             for t in texts]))}


def target_measures(hist):
  logp = np.concatenate([np.asarray(r, np.float64) for r in hist["logp"]])
  return {"target_prob_mean": float(np.exp(logp).mean()), "target_nll": float(-logp.mean()),
          "target_prob_hist": teacher_forced.target_prob_histogram(logp).tolist()}
