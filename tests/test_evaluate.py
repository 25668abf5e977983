"""Evaluation: answer checking, pass@k, KL / entropy / perplexity against float64 numpy, the suites
and the CLI, on the tiny Llama fixture (tests/fixtures/tiny_llama) with its real tokenizer."""
import itertools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dft_jax import data, evaluate, models, objectives, sampling
from dft_jax.errors import ConfigError, DataError
from test_data import write_jsonl

TINY = str(pathlib.Path(__file__).parent / "fixtures" / "tiny_llama")
SMALL = dict(num_examples=4, num_general=4, num_factual=3, num_hist=4, max_new_tokens=6,
             factual_max_new_tokens=4, batch_size=4, forced_batch_size=3, progress=False)


@pytest.fixture(scope="module")
def tiny():
  model, tokenizer = models.load(TINY)
  graphdef, params = nnx.split(model)
  return model, tokenizer, graphdef, params


def data_cfg():
  return ml_collections.ConfigDict(evaluate.DATA_DEFAULTS)


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("text,answer,expected", [
    ("3 + 4 = 7.\n#### 7", 7, True),                   # right
    ("So the total is 1,250.\n#### 1,250", "1250", True),
    ("The answer is 12.5", "12.50", True),
    ("\\boxed{42}", "42", True),
    ("#### 8", "7", False),                            # wrong
    ("#### 7\n#### 8", "7", False),                    # the last answer counts
    ("7 apples", "7", False),                          # no final-answer marker
    ("#### seven", "7", False),                        # malformed
    ("####", "7", False),
    ("", "7", False),
])
def test_arith_answers(text, answer, expected):
  assert data.is_correct(text, answer) is expected


@pytest.mark.parametrize("reply,answer,expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),          # right
    ("The answer is \\boxed{0.5}", "\\frac12", True),                    # equivalent forms
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{3}", "4", False),                                          # wrong
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{", "4", False),                                            # malformed
    ("I cannot solve this.", "4", False),                                # no answer
    ("", "\\frac{1}{2}", False),
])
def test_math_answers(reply, answer, expected):
  assert evaluate.is_math_correct(reply, answer) is expected


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 2),
                                   (4, 4, 2)])
def test_pass_at_k_counts_subsets(n, c, k):
  """pass@k = share of the k-subsets of n samples (c right) that hold a right one."""
  outcomes = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(outcomes, k))
  assert evaluate.pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]))


def test_accuracy_metrics():
  assert evaluate.accuracy_metrics([[True], [False], [True], [True]], "x") == {
      "x_n": 4, "x_accuracy": 0.75}
  out = evaluate.accuracy_metrics([[True, False, False], [False, False, False]], "x")
  assert out == {"x_n": 2, "x_avg@3": pytest.approx(1 / 6), "x_pass@3": 0.5}


def test_histogram_matches_numpy():
  rng = np.random.default_rng(0)
  logp = np.log(np.concatenate([rng.uniform(size=500), [1e-30, 1.0, 0.5, 0.25]]))
  counts = evaluate.target_prob_histogram(logp)
  np.testing.assert_array_equal(counts, np.histogram(np.exp(logp), bins=objectives.HIST_EDGES)[0])
  assert counts[-1] >= 1 and counts[0] >= 1  # p = 1 falls in the last bin, p ~ 0 in the first


# ----------------------------------------------------------------------------- teacher forcing


def numpy_stats(model, base, batch):
  """float64 reference of (logp, entropy, KL(base || model)) at the loss positions."""
  def logp(m):
    logits = np.asarray(m(jnp.asarray(batch["tokens"]), positions_BxT=jnp.asarray(
        batch["positions"]), segment_ids_BxT=jnp.asarray(batch["segment_ids"])), np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  lp, lb = logp(model), logp(base)
  mask = batch["loss_mask"] > 0
  target = np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
  entropy = -(np.exp(lp) * lp).sum(-1)
  kl = (np.exp(lb) * (lb - lp)).sum(-1)
  return target[mask], entropy[mask], kl[mask]


def sgd_step(graphdef, params, batch, lr=0.5):
  """One plain SFT gradient step (an independent way to move the model)."""
  def loss(p):
    logits = nnx.merge(graphdef, p)(batch["tokens"])
    lp = objectives.target_log_prob(objectives.log_softmax(logits), batch["targets"])
    return -jnp.sum(lp * batch["loss_mask"]) / batch["loss_mask"].sum()
  grads = jax.grad(loss)(params)
  return jax.tree.map(lambda w, g: w - lr * g, params, grads)


def small_batch(tokenizer):
  prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
  replies = [tokenizer(" 2 + 3 = 5. #### 5")["input_ids"],
             tokenizer(" Blue, like the sky")["input_ids"]]
  return evaluate.teacher_forced_batch(prompts, replies, sampling.pad_id(tokenizer))


def test_kl_zero_against_itself_and_positive_after_a_step(tiny):
  model, tokenizer, graphdef, params = tiny
  batch = small_batch(tokenizer)
  same = evaluate.forced_stats(graphdef, params, params, batch, batch_size=2)
  assert np.all(same["kl"] == 0.0)
  moved = sgd_step(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
  stats = evaluate.forced_stats(graphdef, moved, params, batch, batch_size=1)
  target, entropy, kl = numpy_stats(nnx.merge(graphdef, moved), model, batch)
  assert kl.min() > 0 and stats["kl"].mean() > 1e-3
  np.testing.assert_allclose(stats["kl"], kl, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-4)
  np.testing.assert_allclose(stats["logp"], target, rtol=1e-4, atol=1e-5)
  assert stats["logp"].mean() > same["logp"].mean()  # the step raised the trained tokens' logp


def test_padding_rows_and_length_do_not_change_stats(tiny):
  _, tokenizer, graphdef, params = tiny
  batch = small_batch(tokenizer)
  one = evaluate.forced_stats(graphdef, params, params, batch, batch_size=2)
  split = evaluate.forced_stats(graphdef, params, params, batch, batch_size=1)
  for key in one:
    np.testing.assert_allclose(one[key], split[key], rtol=1e-5, atol=1e-6)
  assert len(one["logp"]) == batch["loss_mask"].sum()
  alone = evaluate.forced_stats(graphdef, params, None, batch, batch_size=2)
  assert set(alone) == {"logp", "entropy"}
  np.testing.assert_allclose(alone["logp"], one["logp"], rtol=1e-6)


# ----------------------------------------------------------------------------- suites


def test_run_evaluator_suites(tiny, tmp_path):
  model, tokenizer, graphdef, params = tiny
  ev = evaluate.RunEvaluator(dict(SMALL, suites="in_domain,forgetting,target_probs", samples=2,
                                  temperature=1.0), data_cfg(), tokenizer, graphdef, params)
  out = ev(params)
  assert out["in_domain_n"] == 4 and 0 <= out["in_domain_accuracy"] <= 1
  assert {"in_domain_avg@2", "in_domain_pass@2", "factual_accuracy", "kl_heldout"} <= set(out)
  assert out["kl_to_base"] == 0.0 and out["kl_heldout"] == 0.0
  # Perplexity: exp of the mean NLL over every held-out token after the first (float64 reference).
  texts = [tokenizer(r["text"])["input_ids"] for r in evaluate.load_rows("builtin:heldout_text")]
  batch = evaluate.teacher_forced_batch([t[:1] for t in texts], [t[1:] for t in texts],
                                        sampling.pad_id(tokenizer))
  target, _, _ = numpy_stats(model, model, batch)
  assert out["perplexity_heldout"] == pytest.approx(math.exp(-target.mean()), rel=1e-4)
  # Histogram: every reference response token of the held-out problems is counted once.
  rows = evaluate.load_rows("builtin:arith_test")[:4]
  encoder = data.Encoder(data_cfg(), tokenizer)
  expected = 0
  for i, r in enumerate(rows):
    _, trained = encoder.encode(r, i)
    last = len(trained) - 1 - trained[::-1].index(1)
    expected += last - trained.index(1) + 1
  assert sum(out["target_prob_hist"]) == expected
  assert out["target_prob_mean"] >= np.exp(-out["target_nll"])  # Jensen, on the same tokens


def test_math_suite(tiny, tmp_path):
  _, tokenizer, graphdef, params = tiny
  path = write_jsonl(tmp_path / "math500.jsonl", [
      {"problem": "What is $1/2 + 1/2$?", "answer": "1"},
      {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}"}])
  ev = evaluate.RunEvaluator(dict(SMALL, suites="math", math_file=path, math_max_new_tokens=5),
                             data_cfg(), tokenizer, graphdef, params)
  out = ev(params)
  assert out["math_n"] == 2 and out["math_accuracy"] in (0.0, 0.5, 1.0)
  # The problem is asked under the papers' system prompt.
  prompt = tokenizer.decode(ev.math_prompt_ids("Simplify."))
  assert evaluate.MATH_SYSTEM_PROMPT in prompt and "Simplify." in prompt


def test_math_rows_need_problem_and_answer(tiny, tmp_path):
  _, tokenizer, graphdef, params = tiny
  path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"},
                                             {"question": "2+2?", "answer": "4"}])
  ev = evaluate.RunEvaluator(dict(SMALL, suites="math", math_file=path), data_cfg(), tokenizer,
                             graphdef, params)
  with pytest.raises(DataError, match="row 1 has no field.*'problem'"):
    ev(params)


@pytest.mark.parametrize("overrides,message", [
    (dict(suites="in_domain,nope"), "allowed names are in_domain, math"),
    (dict(suites="math"), "needs eval.math_file"),
    (dict(samples=0), "eval.samples=0"),
    (dict(samples=4, temperature=0.0), "needs a temperature > 0"),
    (dict(batch_size=0), "eval.batch_size=0"),
])
def test_settings_errors_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    evaluate.settings(overrides)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv,message", [
    (["--suite", "nope", "--model", TINY], "allowed names are"),
    (["--suite", "math", "--model", TINY], "needs eval.math_file"),
    (["--model", TINY, "--checkpoint", "/tmp"], "exactly one of --checkpoint"),
    ([], "exactly one of --checkpoint"),
    (["--checkpoint", "/no/such/run"], "no config.json"),
    (["--model", "/no/such/model"], "not found"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("dft_jax: error:") and message in err and "\n" not in err


def test_cli_on_a_checkpoint(tmp_path, capsys):
  from dft_jax import train
  from test_train import tiny_config
  config = tiny_config(tmp_path, train__num_steps=1)
  config.log.tensorboard = False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  out = tmp_path / "eval.json"
  evaluate.main(["--checkpoint", str(tmp_path / "run"), "--suite", "in_domain,forgetting",
                 "--num_examples", "3", "--max_new_tokens", "4", "--batch_size", "3",
                 "--out", str(out)])
  printed = capsys.readouterr().out
  assert "in-domain accuracy (greedy)" in printed and "KL(base || model)" in printed
  results = json.loads(out.read_text())
  assert results["base"] == TINY and results["model"] == str(tmp_path / "run")
  assert results["results"]["in_domain_n"] == 3
  assert results["results"]["kl_to_base"] > 0  # one step with lr 1e-3 moved the model
