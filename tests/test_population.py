"""A population (the study's arm at every learning rate and data seed, vmapped): each member trains
exactly as the train job's step would at its own rate and seed, and the population evaluator
scores each member as the RunEvaluator scores that member alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dft_jax import config_files
from dft_jax import evaluate
from dft_jax import loop
from dft_jax import models
from dft_jax import objectives
from dft_jax import sharding
from dft_jax import step as step_lib
from dft_jax.experiments import population as pop
from dft_jax.experiments import scanner


def tiny_study_config(objective="sft"):
  c = config_files.load(config_files.STUDY, "gpu,smoke")
  c.objective.name = objective
  c.train.update(num_steps=2, global_batch_size=8, seq_len=512, minibatches=2)
  c.optimizer.update(warmup_steps=1)
  c.data.max_rows = 96
  c.model.compute_dtype = "float32"  # bfloat16 rounding would hide a small difference
  return c


def one_device_mesh():
  return sharding.make_mesh(tiny_study_config().mesh, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny():
  config = tiny_study_config()
  model, tokenizer = models.load_from_config(config.model)
  return config, model, tokenizer


def solo_run(config, model, tokenizer, member, mesh):
  """The train job's path: one state at member.lr, data seed member.seed, the jitted step."""
  c = config.copy_and_resolve_references()
  ratio = c.optimizer.finch.max_learning_rate / c.optimizer.learning_rate
  c.optimizer.learning_rate, c.train.seed = member.lr, member.seed
  c.optimizer.finch.max_learning_rate = ratio * member.lr  # FINCH's cap, the same multiple
  graphdef, params = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the step donates its state
  setting = objectives.validate(c.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, c, mesh, setting=setting)
  train_step = step_lib.make_train_step(graphdef, tx, c, mesh, step_lib.shardings_of(state),
                                        step_lib.shardings_of(frozen), setting=setting)
  losses = []
  for batch in scanner.data_batches(c, tokenizer, member.seed):
    state, metrics = train_step(state, step_lib.global_batch(batch, mesh), frozen)
    losses.append(float(metrics["loss"]))
  return state.params, losses


@pytest.mark.parametrize("objective,schedule", [
    pytest.param("sft", "cosine", marks=pytest.mark.slow),
    pytest.param("psft", "finch", marks=pytest.mark.slow)])
def test_each_member_trains_as_a_run_of_its_own(tiny, objective, schedule):
  """Also PSFT (its snapshot under vmap) with FINCH (a rate that depends on the loss: its cap is
  the same multiple of every member's rate)."""
  config, model, tokenizer = tiny
  config = config.copy_and_resolve_references()
  config.objective.name, config.optimizer.schedule = objective, schedule
  config.optimizer.finch.max_learning_rate = 2.5 * config.optimizer.learning_rate
  mesh = one_device_mesh()
  chosen = pop.members((1e-3, 3e-3), (0, 1))
  setting = objectives.validate(config.objective)
  population = pop.init_population(model, config, setting, chosen, mesh)  # copies the parameters
  step = pop.make_population_step(population.graphdef, population.tx, config, setting)
  batches = {s: scanner.data_batches(config, tokenizer, s) for s in (0, 1)}
  history = pop.History(population, ("loss", "update_norm"), config.train.minibatches)
  state = loop.train_loop(population.state, step, pop.member_batches(batches, chosen),
                          num_steps=config.train.num_steps, record=history,
                          frozen=population.frozen)
  base = [np.asarray(p, np.float64) for p in jax.tree.leaves(nnx.state(model))]
  for m in (1, 2):  # (1e-3, seed 1), (3e-3, seed 0)
    params, losses = solo_run(config, model, tokenizer, chosen[m], mesh)
    # float32 sums in another order: the first loss agrees to ~1e-6, later ones to ~1e-5
    np.testing.assert_allclose([h["loss"] for h in history.rows[m]], losses, rtol=1e-4)
    mine = jax.tree.leaves(jax.tree.map(lambda p: p[m], state.params))
    theirs = jax.tree.leaves(params)
    moved = np.sqrt(sum(np.sum((np.float64(t) - b) ** 2) for t, b in zip(theirs, base)))
    apart = np.sqrt(sum(np.sum((np.float64(a) - t) ** 2) for a, t in zip(mine, theirs)))
    # Adam's first updates are ~lr * sign(g): float32 noise in a gradient near 0 can flip an
    # entry, so the copies drift apart by ~1e-3 of the distance moved; another member's rate or
    # data would put them as far apart as the distance moved
    assert apart < 1e-2 * moved, (apart, moved)
  lrs = [[h["learning_rate"] for h in rows] for rows in history.rows]
  if schedule != "finch":  # FINCH's rate follows each member's own losses
    assert lrs[0] == lrs[1] and lrs[2] == pytest.approx([3 * v for v in lrs[0]])
  assert all(h["update_norm"] > 0 for rows in history.rows for h in rows)


@pytest.mark.slow
def test_population_evaluator_scores_each_member_like_the_run_evaluator(tiny):
  config, model, tokenizer = tiny
  graphdef, base = nnx.split(model)
  moved = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), base)
  ev = evaluate.RunEvaluator(config.eval, config.data, tokenizer, graphdef, base)
  rows = ev.rows("in_domain")
  answer_set = pop.AnswerSet([ev.prompt_ids(r["prompt"]) for r in rows],
                             [r["answer"] for r in rows], config.eval.max_new_tokens)
  population = pop.PopulationEvaluator(ev, {"in_domain": answer_set}, batch_size=3,
                                       forced_batch_size=3)
  scored = population(pop.stack([base, moved]))
  for params, mine in zip((base, moved), scored):
    theirs = ev(params)
    for key in ("in_domain_accuracy", "factual_accuracy", "entropy_general",
                "perplexity_heldout", "kl_heldout", "target_prob_mean", "target_nll"):
      assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    assert mine["in_domain_correct"] == pop.bits(theirs["in_domain_correct"])
    assert mine["factual_correct"] == pop.bits(theirs["factual_correct"])
    assert mine["target_prob_hist"] == theirs["target_prob_hist"]
    assert mine["kl_sum_per_prompt"] == pytest.approx(theirs["kl_sum_per_prompt"], rel=1e-5,
                                                      abs=1e-9)
    assert mine["tokens_per_prompt"] == theirs["tokens_per_prompt"]
    assert mine["kl_to_base"] == pytest.approx(theirs["kl_to_base"], rel=1e-5, abs=1e-9)
  assert scored[0]["kl_to_base"] == 0.0 and scored[1]["kl_to_base"] > 0


def test_kl_is_token_weighted_with_per_prompt_sums():
  """Replies of 1 and 3 tokens with KL 1 and 0, 0, 0: token-weighted 1/4, not the mean of the
  per-prompt means (1/2); the per-prompt sums and counts carry the weighting."""
  from dft_jax.evaluate import teacher_forced  # pylint: disable=g-import-not-at-top
  drift = {"kl_from_ref": [[1.0], [0.0, 0.0, 0.0]], "entropy": [[2.0], [1.0, 1.0, 1.0]]}
  prose = {"logp": [[-1.0, -3.0]], "kl_from_ref": [[0.5, 0.5]]}
  m = teacher_forced.forgetting_measures(drift, prose)
  assert m["kl_to_base"] == 0.25 and m["entropy_general"] == 1.25
  assert (m["kl_sum_per_prompt"], m["tokens_per_prompt"]) == ([1.0, 0.0], [1, 3])
  assert m["perplexity_heldout"] == pytest.approx(np.exp(2.0)) and m["kl_heldout"] == 0.5
