"""Evaluation: answer checking, pass@k, KL / entropy / perplexity against float64 numpy, the suites
scored on replies whose answers are known, and the CLI, on the tiny Llama fixture
(tests/fixtures/tiny_llama) with its real tokenizer."""
import itertools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dft_jax import data, evaluate, lm_head, models, objectives, sampling
from dft_jax.data import testing
from dft_jax.errors import ConfigError, DataError
from dft_jax.evaluate import answers, cli, evaluator, teacher_forced
from test_data import write_jsonl

TINY = str(pathlib.Path(__file__).parent / "fixtures" / "tiny_llama")
SMALL = dict(num_examples=4, num_general=4, num_factual=3, num_hist=4, max_new_tokens=6,
             factual_max_new_tokens=4, batch_size=4, forced_batch_size=3, progress=False)


@pytest.fixture(scope="module")
def tiny():
  model, tokenizer = models.load(TINY)
  graphdef, params = nnx.split(model)
  return model, tokenizer, graphdef, params


def eval_cfg(**overrides):
  """configs/default.py's eval block (the only defaults), made small, with overrides."""
  c = dict(testing.default_config().eval)
  c.update(SMALL)
  c.update(overrides)
  return c


def data_cfg():
  return testing.default_config().data


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
  assert answers.is_math_correct(reply, answer) is expected


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 2),
                                   (4, 4, 2)])
def test_pass_at_k_counts_subsets(n, c, k):
  """pass@k = share of the k-subsets of n samples (c right) that hold a right one."""
  outcomes = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(outcomes, k))
  assert answers.pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]))


def test_accuracy_metrics():
  assert answers.accuracy_metrics([[True], [False], [True], [True]], "x_") == {
      "x_n": 4, "x_accuracy": 0.75}
  out = answers.accuracy_metrics([[True, False, False], [False, False, False]], "x_")
  assert out == {"x_n": 2, "x_avg@3": pytest.approx(1 / 6), "x_pass@3": 0.5}


def test_histogram_matches_numpy():
  rng = np.random.default_rng(0)
  logp = np.log(np.concatenate([rng.uniform(size=500), [1e-30, 1.0, 0.5, 0.25]]))
  counts = teacher_forced.target_prob_histogram(logp)
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
    lp = lm_head.target_log_prob(lm_head.log_softmax(logits), batch["targets"])
    return -jnp.sum(lp * batch["loss_mask"]) / batch["loss_mask"].sum()
  grads = jax.grad(loss)(params)
  return jax.tree.map(lambda w, g: w - lr * g, params, grads)


def small_batch(tokenizer):
  prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
  replies = [tokenizer(" 2 + 3 = 5. #### 5")["input_ids"],
             tokenizer(" Blue, like the sky")["input_ids"]]
  return teacher_forced.teacher_forced_batch(prompts, replies, sampling.pad_id(tokenizer))


@pytest.mark.slow
def test_kl_zero_against_itself_and_positive_after_a_step(tiny):
  model, tokenizer, graphdef, params = tiny
  batch = small_batch(tokenizer)
  same = teacher_forced.forced_stats(graphdef, params, params, batch, batch_size=2)
  assert np.all(same["kl_from_ref"] == 0.0)
  moved = sgd_step(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
  stats = teacher_forced.forced_stats(graphdef, moved, params, batch, batch_size=1)
  target, entropy, kl = numpy_stats(nnx.merge(graphdef, moved), model, batch)
  assert kl.min() > 0 and stats["kl_from_ref"].mean() > 1e-3
  np.testing.assert_allclose(stats["kl_from_ref"], kl, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-4)
  np.testing.assert_allclose(stats["logp"], target, rtol=1e-4, atol=1e-5)
  assert stats["logp"].mean() > same["logp"].mean()  # the step raised the trained tokens' logp


def test_padding_rows_and_length_do_not_change_stats(tiny):
  _, tokenizer, graphdef, params = tiny
  batch = small_batch(tokenizer)
  one = teacher_forced.forced_stats(graphdef, params, params, batch, batch_size=2)
  split = teacher_forced.forced_stats(graphdef, params, params, batch, batch_size=1)
  for key in one:
    np.testing.assert_allclose(one[key], split[key], rtol=1e-5, atol=1e-6)
  assert len(one["logp"]) == batch["loss_mask"].sum()
  alone = teacher_forced.forced_stats(graphdef, params, None, batch, batch_size=2)
  assert set(alone) == {"logp", "entropy"}
  np.testing.assert_allclose(alone["logp"], one["logp"], rtol=1e-6)


def packed_row(batch):
  """The rows of a teacher-forced batch packed one after another into a single row."""
  real = batch["segment_ids"] > 0
  packed = {k: v[real][None] for k, v in batch.items()}
  packed["segment_ids"] = np.repeat(np.arange(1, len(real) + 1, dtype=np.int32), real.sum(1))[None]
  return packed


def test_packed_documents_score_as_separate_rows_up_to_max_segments(tiny):
  """Two documents in one row give the stats they give apart (attention keeps them apart); a
  model whose max_segments is below the row's runs refuses the row."""
  _, tokenizer, graphdef, params = tiny
  batch = small_batch(tokenizer)
  apart = teacher_forced.forced_stats(graphdef, params, None, batch, batch_size=2)
  packed = packed_row(batch)
  together = teacher_forced.forced_stats(graphdef, params, None, packed, batch_size=1)
  np.testing.assert_allclose(together["logp"], apart["logp"], rtol=1e-5, atol=1e-6)
  bounded, _ = nnx.split(models.load(TINY, max_segments=2)[0])
  teacher_forced.forced_stats(bounded, params, None, batch, batch_size=2)  # 2 runs a row: fine
  with pytest.raises(DataError, match="batch row 0 holds 3 runs .* model.max_segments=2"):
    padded = {k: np.pad(v, [(0, 0), (0, 1)]) for k, v in packed.items()}
    teacher_forced.forced_stats(bounded, params, None, padded, batch_size=1)


# ----------------------------------------------------------------------------- suites


def answering_model(tokenizer, replies):
  """The fixture's architecture with weights that answer deterministically: replies maps a
  prompt's last token id to the reply text that follows it (then EOS; "" answers EOS at once).

  Attention and MLP outputs are zero, so the hidden state is the final-normed embedding of the
  current token; each token of a reply chain gets its own basis vector as embedding, and the head
  column of its successor that vector (logit 8 * 50 against 0: greedy and T = 1 sampling agree)."""
  model = models.load(TINY)[0]
  successor = {}
  for start, text in replies.items():
    chain = [start] + tokenizer(text, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    for token, after in zip(chain, chain[1:]):
      assert successor.setdefault(token, after) == after, f"token {token} has two successors"
  vocab, dim = model.embed.shape
  embed, head = np.zeros((vocab, dim), np.float32), np.zeros((dim, vocab), np.float32)
  for i, (token, after) in enumerate(successor.items()):
    embed[token, i] = 1.0
    head[i, after] = 50.0
  model.embed[...], model.lm_head[...] = jnp.asarray(embed), jnp.asarray(head)
  model.final_norm[...] = jnp.ones(dim)
  model.layers["wo"][...] = jnp.zeros(model.layers["wo"].shape)
  model.layers["w_down"][...] = jnp.zeros(model.layers["w_down"].shape)
  return model


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # perplexity: logp ~ -400
def test_suites_score_replies_whose_answers_are_known(tmp_path):
  """Prompts ending in A get '\\boxed{7}', in B 'The answer is 8', in C nothing; the math prompt
  (ending in the system prompt's '.') gets '\\boxed{7}'. Every expected figure is counted by
  hand from the rows below."""
  tokenizer = models.load(TINY)[1]
  last = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][-1]
  model = answering_model(tokenizer, {last("? A"): "\\boxed{7}", last("? B"): "The answer is 8",
                                      last("? C"): "", last("{}."): "\\boxed{7}"})
  q = "Tom has 3 apples and buys 4 more. How many does he have?"
  in_domain = write_jsonl(tmp_path / "in_domain.jsonl", [
      {"prompt": f"{q} A", "answer": 7},       # right
      {"prompt": f"{q} B", "answer": 8},       # right ('answer is 8')
      {"prompt": f"{q} B", "answer": 7},       # wrong
      {"prompt": f"{q} C", "answer": 7},       # no answer
      {"prompt": f"{q} A", "answer": "7.00"},  # right
  ])
  math_file = write_jsonl(tmp_path / "math.jsonl", [
      {"problem": "p", "answer": a} for a in ("7", "\\frac{14}{2}", "8", "x", "7.0")])
  factual = write_jsonl(tmp_path / "facts.jsonl", [
      {"prompt": "Which? A", "aliases": ["7"]},      # right: the reply's words are 'boxed 7'
      {"prompt": "Which? B", "aliases": ["answer"]},  # right
      {"prompt": "Which? B", "aliases": ["7"]},      # wrong
      {"prompt": "Which? C", "aliases": ["7"]},      # wrong (empty reply)
  ])
  data = data_cfg()
  data.chat_template = "none"  # the prompt's own last token is the one the model answers
  graphdef, params = nnx.split(model)
  ev = evaluator.RunEvaluator(
      eval_cfg(suites="in_domain,math,forgetting", in_domain=in_domain, num_examples=5,
               math_file=math_file, factual_qa=factual, num_factual=4, max_new_tokens=12,
               math_max_new_tokens=12, factual_max_new_tokens=12, samples=2, temperature=1.0),
      data, tokenizer, graphdef, params)
  out = ev(params)
  assert {k: out[k] for k in ("in_domain_n", "in_domain_accuracy", "in_domain_answered",
                              "in_domain_avg@2", "in_domain_pass@2")} == {
      "in_domain_n": 5, "in_domain_accuracy": 0.6, "in_domain_answered": 0.8,
      "in_domain_avg@2": 0.6, "in_domain_pass@2": 0.6}
  assert {k: out[k] for k in ("math_n", "math_accuracy", "math_avg@2", "math_pass@2")} == {
      "math_n": 5, "math_accuracy": 0.6, "math_avg@2": 0.6, "math_pass@2": 0.6}
  assert out["factual_accuracy"] == 0.5 and out["kl_to_base"] == 0.0
  assert [s["reply"] for s in out["samples"]] == ["\\boxed{7}"] + ["The answer is 8"] * 2


def test_holdout_suite_scores_the_held_out_rows_of_the_training_file(tmp_path):
  """Rows ending in A have a \\boxed{7} solution and the model answers \\boxed{7} (right), in B
  a '#### 7' one and the model says 'The answer is 8' (wrong), in C no final answer (left out of
  the accuracy); data.eval_holdout=6 of the 40 rows are held out (holdout.heldout_indices)."""
  from dft_jax.data import holdout
  tokenizer = models.load(TINY)[1]
  last = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][-1]
  model = answering_model(tokenizer, {last("? A"): "\\boxed{7}", last("? B"): "The answer is 8",
                                      last("? C"): ""})
  q = "Tom has 3 apples and buys 4 more. How many does he have?"
  kinds = [("A", "3 + 4 = 7, so \\boxed{7}"), ("B", "3 + 4 = 7.\n#### 7"), ("C", "Seven apples.")]
  rows = [{"prompt": f"{q} {kinds[i % 3][0]}", "response": kinds[i % 3][1]} for i in range(40)]
  d = data_cfg()
  d.update(source=write_jsonl(tmp_path / "train.jsonl", rows), chat_template="none",
           eval_holdout=6)
  graphdef, params = nnx.split(model)
  ev = evaluator.RunEvaluator(eval_cfg(math_max_new_tokens=12), d, tokenizer, graphdef, params)
  assert ev.suites == ("holdout", "forgetting")  # eval.suites=auto, a file: no arithmetic set
  out = ev(params, suites="holdout")
  held = [i % 3 for i in holdout.heldout_indices(40, 6)]
  answered = [k for k in held if k != 2]
  assert out["holdout_rows"] == 6 and out["holdout_n"] == len(answered)
  assert out["holdout_accuracy"] == pytest.approx(answered.count(0) / len(answered))
  assert out["sets"]["holdout"] == (f"held-out rows of {d.source} (6 rows, {len(answered)} with "
                                    "a final answer: math-verify)")
  # Teacher-forced on the responses and EOS, as trained (chat_template none), against float64.
  batch = ev.forced_batch("holdout")
  assert batch["loss_mask"].sum() == sum(
      len(tokenizer(kinds[k][1], add_special_tokens=False)["input_ids"]) + 1 for k in held)
  target, _, _ = numpy_stats(model, model, batch)
  assert out["holdout_nll"] == pytest.approx(-target.mean(), rel=1e-4)
  assert out["holdout_target_prob"] == pytest.approx(np.exp(target).mean(), rel=1e-4)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # perplexity: logp ~ -400
def test_eval_sets_score_each_set_under_its_own_name(tmp_path):
  """Three sets of eval.sets with their own field names: answers (prompts ending in A are
  answered '\\boxed{7}', in B 'The answer is 8'), forced, and kl on a text file. Accuracy is
  counted by hand; the teacher-forced figures come from float64 numpy on the rows encoded
  independently (data.Encoder with the set's fields)."""
  tokenizer = models.load(TINY)[1]
  last = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][-1]
  model = answering_model(tokenizer, {last("? A"): "\\boxed{7}", last("? B"): "The answer is 8"})
  q = "Tom has 3 apples and buys 4 more. How many?"
  quiz = write_jsonl(tmp_path / "quiz.jsonl", [
      {"question": f"{q} A", "final": "7"}, {"question": f"{q} B", "final": "8"},
      {"question": f"{q} B", "final": "7"}, {"question": f"{q} A", "final": "7.0"}])
  solved = write_jsonl(tmp_path / "solved.jsonl", [
      {"task": "Add 2 and 3.", "solution": "2 + 3 = 5"}, {"task": "Name a colour.", "solution": "Blue"}])
  prose = write_jsonl(tmp_path / "prose.jsonl", [{"body": "The sky is blue."}])
  d = data_cfg()
  d.chat_template = "none"
  graphdef, params = nnx.split(model)
  ev = evaluator.RunEvaluator(eval_cfg(suites="none", sets=(
      f"quiz={quiz},kind=answers,prompt_field=question,answer_field=final,max_new_tokens=12",
      f"solved={solved},kind=forced,prompt_field=task,response_field=solution",
      dict(name="prose", source=prose, kind="kl", format="text", text_field="body"))),
      d, tokenizer, graphdef, params)
  out = ev(params)
  assert out["quiz/accuracy"] == 0.75 and out["quiz/answered"] == 1.0 and out["quiz/n"] == 4
  assert out["quiz/correct"] == [1, 1, 0, 1]
  encoder = data.Encoder(ml_collections.ConfigDict(dict(d, prompt_field="task",
                                                        response_field="solution")), tokenizer)
  rows = [json.loads(line) for line in open(solved)]
  batch = teacher_forced.encoded_batch([encoder.encode(r, i) for i, r in enumerate(rows)],
                                       sampling.pad_id(tokenizer))
  target, _, _ = numpy_stats(model, model, batch)
  assert out["solved/nll"] == pytest.approx(-target.mean(), rel=1e-4)
  assert out["solved/target_prob"] == pytest.approx(np.exp(target).mean(), rel=1e-4)
  assert sum(out["solved/target_prob_hist"]) == target.size
  assert out["prose/kl_to_base"] == 0.0 and out["prose/rows"] == 1 and out["prose/perplexity"] > 1
  assert out["sets"]["quiz"] == f"set quiz: {quiz} (4 problems, math-verify)"
  assert out["sets"]["prose"] == f"set prose: {prose} (1 rows, KL to the base)"
  # The in_domain suite's file lacks 'prompt' / 'answer': named before anything runs.
  with pytest.raises(DataError, match="eval.in_domain reads the prompt from prompt_field='prompt'"):
    evaluator.check_sets(eval_cfg(suites="in_domain", in_domain=quiz), d)
  # Each set is a section of the table, under its description.
  lines = evaluate.format_sections(["before"], evaluate.table_sections([out]))
  assert lines[lines.index(out["sets"]["quiz"]) + 1].split() == [
      "accuracy", "(greedy,", "math-verify)", "0.750"]
  assert lines[lines.index(out["sets"]["solved"]) + 1].split()[:3] == [
      "target", "prob", "(teacher-forced)"]


def test_suite_sets_take_their_own_field_names(tiny, tmp_path):
  """eval.in_domain with the user's field names serves both the in_domain suite (prompt, answer)
  and target_probs (prompt, response), which no longer reads it with the training fields."""
  _, tokenizer, graphdef, params = tiny
  rows = [{"question": r["prompt"], "final": r["answer"], "worked": r["response"]}
          for r in data.load_builtin("arith_test")[:3]]
  path = write_jsonl(tmp_path / "mine.jsonl", rows)
  ev = evaluator.RunEvaluator(
      eval_cfg(suites="in_domain,target_probs", num_examples=3, num_hist=3, max_new_tokens=2,
               in_domain=f"{path},prompt_field=question,answer_field=final,response_field=worked"),
      data_cfg(), tokenizer, graphdef, params)
  out = ev(params)
  assert out["in_domain_n"] == 3 and out["sets"]["in_domain"] == f"in-domain set {path} (3 problems)"
  reference = evaluator.RunEvaluator(eval_cfg(suites="target_probs", num_hist=3), data_cfg(),
                                     tokenizer, graphdef, params)(params)
  assert out["target_prob_hist"] == reference["target_prob_hist"]  # the same rows, renamed


@pytest.mark.parametrize("sets,message", [
    (("quiz",), r"eval.sets\[0\]='quiz': expected NAME=SOURCE"),
    (("quiz=q.jsonl,kind=exam",), r"eval.sets\[0\] \(quiz\): kind='exam'; expected one of answers"),
    (("quiz=q.jsonl,kind=answers,prompt=question",), r"unknown field\(s\) prompt"),
    (("q=a.jsonl,kind=kl", "q=b.jsonl,kind=kl"), r"eval.sets\[0\]: name='q' is used twice"),
    (("math=a.jsonl,kind=kl",), r"name='math' is a suite's name"),
    (("q=a.jsonl,kind=answers,format=text",), "format must be prompt_response"),
    (("q=a.jsonl,kind=kl,num=0",), r"eval.sets\[0\]: num='0' must be a positive integer"),
])
def test_eval_sets_errors_name_the_entry(sets, message):
  with pytest.raises(ConfigError, match=message):
    evaluate.settings(eval_cfg(sets=sets))


def test_eval_sets_from_the_command_line():
  """--config.eval.sets takes entries joined by ';' (a tuple field would refuse the commas)."""
  from absl import flags
  from dft_jax import cli as common
  argv = ["dft_jax.evaluate", "--config.eval.sets=quiz=q.jsonl,kind=answers,prompt_field=question;"
          "prose=p.txt,kind=kl,format=text"]
  common.define_config(argv)
  common.parse_flags(argv)
  resolved = evaluate.settings(flags.FLAGS.config.eval)["sets"]
  assert [(s.name, s.source, s.kind, s.prompt_field, s.format) for s in resolved] == [
      ("quiz", "q.jsonl", "answers", "question", "prompt_response"),
      ("prose", "p.txt", "kl", "prompt", "text")]


def test_eval_set_file_errors_name_file_row_and_field(tmp_path):
  """A held-out file with the wrong field names fails before any model is loaded: the message
  names the file, the row, the field it lacks, the entry of eval.sets and what to add."""
  path = write_jsonl(tmp_path / "held.jsonl", [{"question": "1+1?", "answer": "2"},
                                                 {"problem": "2+2?", "answer": "4"}])
  with pytest.raises(DataError) as e:
    evaluator.check_sets(eval_cfg(suites="forgetting", sets=(
        f"held={path},kind=answers,prompt_field=question",)), data_cfg())
  assert str(e.value).startswith(f"row 1 of {path} has no field 'question': eval.sets[0] reads "
                                 "the prompt from prompt_field='question'; the row's fields are "
                                 "'answer', 'problem'; name the prompt's field: "
                                 f"'held={path},prompt_field=NAME' in eval.sets")
  with pytest.raises(DataError, match=r"eval.sets\[0\]='/no/such.jsonl': no such file"):
    evaluator.check_sets(eval_cfg(sets=("held=/no/such.jsonl,kind=kl",)), data_cfg())


@pytest.mark.parametrize("source,math_file,expected", [
    ("builtin:arith_train", None, ("in_domain", "forgetting")),
    ("builtin:arith_train", "math.jsonl", ("in_domain", "math", "forgetting")),
    ("builtin:general_prompts", None, ("forgetting",)),
])
def test_auto_suites_follow_the_data(source, math_file, expected):
  d = data_cfg()
  d.source = source
  assert evaluator.auto_suites(eval_cfg(math_file=math_file), d, has_holdout=False) == expected
  assert evaluator.auto_suites(eval_cfg(math_file=math_file), d, True)[0] == "holdout"


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{x^{2}}", "x^{2}"),
    ("3 + 4 = 7.\n#### 7\n", "7"),
    ("#### 1,234", "1,234"),
    ("no answer", None),
    ("\\boxed{unclosed", None),
])
def test_final_answer(text, expected):
  assert answers.final_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("3 + 4 = 7.\n#### 7\n", "7"),
    ("The count is 3, so the answer is 12.", "12"),
    ("The answer is: 1,234", "1234"),
    ("no answer", None),
])
def test_stated_answer_also_reads_answer_is(text, expected):
  """holdout's "replies with a final answer": a reply scored by math-verify as "The answer is N."
  states an answer too."""
  assert answers.stated_answer(text) == expected


def test_results_table_names_each_set_and_its_size():
  before = {"sets": {"holdout": "held-out rows of t.jsonl (5 rows)", "forgetting": "forgetting"},
            "holdout_nll": 1.5, "kl_to_base": 0.0, "holdout_avg@4": 0.25}
  after = {**before, "holdout_nll": 1.0, "kl_to_base": 0.5, "holdout_avg@4": 0.5}
  lines = evaluate.format_sections(["before", "after"], evaluate.table_sections([before, after]))
  assert lines[1] == "held-out rows of t.jsonl (5 rows)"
  assert lines[2].split() == ["target", "NLL", "(teacher-forced)", "1.5000", "1.0000"]
  assert lines[3].split() == ["avg@4", "0.250", "0.500"] and lines[4] == "forgetting"


def test_run_evaluator_forgetting_and_target_probs(tiny):
  model, tokenizer, graphdef, params = tiny
  ev = evaluator.RunEvaluator(eval_cfg(suites="forgetting,target_probs"), data_cfg(), tokenizer,
                              graphdef, params)
  out = ev(params)
  assert out["kl_to_base"] == 0.0 and out["kl_heldout"] == 0.0
  # Perplexity: exp of the mean NLL over every held-out token after the first (float64 reference).
  texts = [tokenizer(r["text"])["input_ids"] for r in data.load_builtin("heldout_text")]
  batch = teacher_forced.teacher_forced_batch([t[:1] for t in texts], [t[1:] for t in texts],
                                              sampling.pad_id(tokenizer))
  target, _, _ = numpy_stats(model, model, batch)
  assert out["perplexity_heldout"] == pytest.approx(math.exp(-target.mean()), rel=1e-4)
  # Histogram: every reference response token of the held-out problems is counted once.
  rows = data.load_builtin("arith_test")[:4]
  encoder = data.Encoder(data_cfg(), tokenizer)
  expected = 0
  for i, r in enumerate(rows):
    _, trained = encoder.encode(r, i)
    last = len(trained) - 1 - trained[::-1].index(1)
    expected += last - trained.index(1) + 1
  assert sum(out["target_prob_hist"]) == expected
  assert out["target_prob_mean"] >= np.exp(-out["target_nll"])  # Jensen, on the same tokens


def test_math_prompt_carries_the_papers_system_prompt(tiny):
  _, tokenizer, graphdef, params = tiny
  ev = evaluator.RunEvaluator(eval_cfg(), data_cfg(), tokenizer, graphdef, params)
  prompt = tokenizer.decode(ev.math_prompt_ids("Simplify."))
  assert prompt.startswith("<|im_start|>system\n" + evaluator.MATH_SYSTEM_PROMPT)
  assert prompt.endswith("<|im_start|>user\nSimplify.<|im_end|>\n<|im_start|>assistant\n")


def test_math_rows_need_problem_and_answer(tiny, tmp_path):
  _, tokenizer, graphdef, params = tiny
  path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"},
                                             {"question": "2+2?", "answer": "4"}])
  ev = evaluator.RunEvaluator(eval_cfg(suites="math", math_file=path), data_cfg(), tokenizer,
                              graphdef, params)
  with pytest.raises(DataError, match=f"row 1 of {path} has no field 'problem': eval.math_file "
                     "reads the prompt from prompt_field='problem'.*--config.eval.math_file="):
    ev(params)


@pytest.mark.parametrize("overrides,message", [
    (dict(suites="in_domain,nope"), "allowed names are auto, none .* or holdout, in_domain"),
    (dict(suites="math"), "needs eval.math_file"),
    (dict(samples=0), "eval.samples=0"),
    (dict(samples=4, temperature=0.0), "needs a temperature > 0"),
    (dict(batch_size=0), "eval.batch_size=0"),
])
def test_settings_errors_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    evaluate.settings(eval_cfg(**overrides))


# ----------------------------------------------------------------------------- command line


def evaluate_cli(*argv):
  cli.cli_main(["dft_jax.evaluate", *argv])


@pytest.mark.parametrize("argv,message", [
    (["--config.eval.suites=nope", f"--model={TINY}"], "allowed names are"),
    (["--config.eval.suites=math", f"--model={TINY}"], "needs eval.math_file"),
    ([f"--model={TINY}", "--step=3"], "--step=3 needs a training run folder"),
    (["--model=/no/such/model"], "not found"),
    (["--config.eval.math_fil=x.jsonl"], "config.eval has no field 'math_fil'"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate_cli(*argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("dft_jax: error:") and message in err


@pytest.mark.slow
def test_cli_on_a_model_takes_its_settings_from_the_default_config(tmp_path, capsys):
  out = tmp_path / "eval.json"
  evaluate_cli(f"--model={TINY}", "--config.eval.suites=target_probs", f"--out={out}")
  assert "target NLL, reference responses" in capsys.readouterr().out
  written = json.loads(out.read_text())
  expected = json.loads(json.dumps(dict(testing.default_config().eval, suites="target_probs")))
  assert written["settings"] == expected and written["model"] == written["base"] == TINY
  assert sum(written["results"]["target_prob_hist"]) > 0


@pytest.mark.slow
def test_python_m_dft_jax_evaluate_runs_the_cli():
  done = subprocess.run([sys.executable, "-m", "dft_jax.evaluate", "--help"], capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0 and "--model" in done.stdout and "eval.math_file=None" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_cli_on_a_run_folder(tmp_path, capsys, lora):
  """--model=RUN: the run's checkpoint, scored with the run's config (its data file, so its
  held-out rows) and the fields the command line sets."""
  from dft_jax import train
  from test_train import lora_config, tiny_config
  config = (lora_config if lora else tiny_config)(tmp_path, train__num_steps=1)
  config.log.tensorboard = False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  out = tmp_path / "eval.json"
  evaluate_cli(f"--model={tmp_path / 'run'}", "--config.eval.suites=holdout,forgetting",
               "--config.eval.num_general=3", "--config.eval.max_new_tokens=4",
               "--config.eval.math_max_new_tokens=4", "--config.eval.batch_size=3",
               "--config.eval.num_factual=3", "--config.eval.factual_max_new_tokens=4",
               f"--out={out}")
  printed = capsys.readouterr().out
  assert f"held-out rows of {config.data.source} (3 rows, 3 with" in printed
  assert "KL(base || model), general prompts" in printed
  results = json.loads(out.read_text())
  assert results["base"] == TINY and results["model"] == str(tmp_path / "run")
  assert results["settings"]["num_general"] == 3 and results["results"]["holdout_rows"] == 3
  assert results["results"]["kl_to_base"] > 0  # one step with lr 1e-3 moved the model
