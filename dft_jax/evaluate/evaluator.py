"""The RunEvaluator: the configured suites on one set of parameters, against a fixed base model;
the sets it scores, the checks of config.eval, and the results table."""
import os
import time

import ml_collections
import numpy as np
from flax import nnx

from dft_jax import data as data_lib
from dft_jax import sampling
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError, check_number
from dft_jax.evaluate import answers
from dft_jax.evaluate import generation
from dft_jax.evaluate import teacher_forced

SUITES = ("in_domain", "math", "forgetting", "target_probs")
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
NUM_SAMPLES_KEPT = 3  # example replies kept per suite in the results
POSITIVE_FIELDS = ("num_examples", "num_general", "num_factual", "num_hist", "batch_size",
                   "forced_batch_size", "max_new_tokens", "factual_max_new_tokens",
                   "math_max_new_tokens")


def settings(eval_cfg):
  """config.eval (a ConfigDict or dict with every field of configs/default.py's eval block) as a
  plain dict with `suites` parsed to a tuple; ConfigError naming the field if a value is bad."""
  s = dict(eval_cfg)
  s["suites"] = parse_suites(s["suites"])
  if not isinstance(s["samples"], int) or s["samples"] < 1:
    raise ConfigError(f"eval.samples={s['samples']!r}: must be an integer >= 1")
  if s["samples"] > 1 and not s["temperature"] > 0:
    raise ConfigError(f"eval.temperature={s['temperature']!r}: sampling k > 1 replies needs a "
                      "temperature > 0")
  for name in POSITIVE_FIELDS:
    if not isinstance(s[name], int) or s[name] < 1:
      raise ConfigError(f"eval.{name}={s[name]!r}: must be a positive integer")
  check_number("eval.temperature", s["temperature"], minimum=0)
  check_number("eval.top_p", s["top_p"], above=0, maximum=1)
  check_number("eval.seed", s["seed"], integer=True, minimum=0)
  check_number("eval.num_math", s["num_math"], integer=True, minimum=1, optional=True)
  if "math" in s["suites"] and not s["math_file"]:
    raise ConfigError("the math suite needs eval.math_file: MATH500-format rows {problem, answer} "
                      "in a .jsonl / .json / .parquet file or a hub name")
  return s


def parse_suites(value):
  """"in_domain,forgetting" (or a sequence of names) -> ("in_domain", "forgetting")."""
  names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
  unknown = [n for n in names if n not in SUITES]
  if unknown or not names:
    raise ConfigError(f"eval suites {value!r}: allowed names are {', '.join(SUITES)}")
  return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------- sets


def load_rows(spec, split="train"):
  """Rows of an evaluation set: builtin:NAME, a local file / folder or a hub name (data.source)."""
  cfg = ml_collections.ConfigDict(dict(source=spec, split=split, subset=None, max_rows=None,
                                       cache_dir=None))
  return list(sources.load_source(cfg).dataset)


def is_hub_name(spec):
  """ORG/NAME that is no local path: a hub dataset (MATH-500 there has only a 'test' split)."""
  return (not spec.startswith(("builtin:", ".", "/", "~")) and not os.path.exists(spec)
          and not any(c in spec for c in "*?[") and spec.count("/") == 1)


def require_fields(rows, fields, spec):
  for i, row in enumerate(rows):
    missing = [f for f in fields if row.get(f) is None]
    if missing:
      raise DataError(f"{spec}: row {i} has no field(s) {', '.join(map(repr, missing))}; expected "
                      f"rows with {', '.join(fields)}")
  return rows


# ----------------------------------------------------------------------------- the evaluator


class RunEvaluator:
  """Evaluates parameters of one model architecture against a fixed base model.

  eval_cfg: config.eval (see `settings`); data_cfg: config.data (chat template, system prompt:
  prompts are rendered exactly as in training); graphdef / base_params: nnx.split of the model.
  Sets are loaded and teacher-forced batches built once (the base model's replies to the general
  prompts are generated once) and reused by every call. `__call__(params)` runs the configured
  suites and returns a flat dict of numbers plus "samples" (a few replies).
  """

  def __init__(self, eval_cfg, data_cfg, tokenizer, graphdef, base_params):
    self.cfg = settings(eval_cfg)
    self.tokenizer, self.graphdef, self.base_params = tokenizer, graphdef, base_params
    self.encoder = data_lib.Encoder(data_cfg, tokenizer)
    self.data_cfg = data_cfg
    self._cache = {}

  def rows(self, name):
    if name not in self._cache:
      self._cache[name] = self._load(name)
    return self._cache[name]

  def _load(self, name):
    c = self.cfg
    if name == "in_domain":
      return require_fields(load_rows(c["in_domain"])[:c["num_examples"]], ("prompt", "answer"),
                            c["in_domain"])
    if name == "math":
      split = c["math_split"] or ("test" if is_hub_name(c["math_file"]) else "train")
      return require_fields(load_rows(c["math_file"], split)[:c["num_math"]],
                            ("problem", "answer"), c["math_file"])
    if name == "general":
      return [r["prompt"] for r in require_fields(
          load_rows(c["general_prompts"])[:c["num_general"]], ("prompt",), c["general_prompts"])]
    if name == "factual":
      return require_fields(load_rows(c["factual_qa"])[:c["num_factual"]], ("prompt", "aliases"),
                            c["factual_qa"])
    if name == "heldout":
      return [r["text"] for r in require_fields(load_rows(c["heldout_text"]), ("text",),
                                                c["heldout_text"])]
    if name == "hist":
      return require_fields(load_rows(c["in_domain"])[:c["num_hist"]], ("prompt", "response"),
                            c["in_domain"])
    raise KeyError(name)

  # -- helpers

  def _label(self, label):
    return label if self.cfg["progress"] else None

  def _texts(self, model, prompt_ids, label, *, max_new_tokens, sampled=False):
    c = self.cfg
    kw = (dict(samples=c["samples"], temperature=c["temperature"], top_p=c["top_p"])
          if sampled else {})
    return generation.sample_texts(model, self.tokenizer, prompt_ids,
                                   max_new_tokens=max_new_tokens, batch_size=c["batch_size"],
                                   seed=c["seed"], label=self._label(label), **kw)

  def _forced(self, params, batch, against_base=True):
    return teacher_forced.forced_stats(self.graphdef, params,
                                       self.base_params if against_base else None, batch,
                                       batch_size=self.cfg["forced_batch_size"])

  def _scored(self, model, prompt_ids, check, prefix, max_new_tokens, extract=None):
    """Greedy (and, with samples > 1, sampled) replies scored by check(text, i); with
    extract(text) -> answer or None, also the fraction of greedy replies that give an answer."""
    greedy = self._texts(model, prompt_ids, f"{prefix} greedy", max_new_tokens=max_new_tokens)
    correct = [[check(t, i) for t in texts] for i, texts in enumerate(greedy)]
    out = answers.accuracy_metrics(correct, prefix)
    out[f"{prefix}_correct"] = [int(c[0]) for c in correct]  # per problem: intervals over problems
    if extract is not None:
      out[f"{prefix}_answered"] = float(np.mean([extract(g[0]) is not None for g in greedy]))
    if self.cfg["samples"] > 1:
      sampled = self._texts(model, prompt_ids, f"{prefix} sampled", max_new_tokens=max_new_tokens,
                            sampled=True)
      out.update(answers.accuracy_metrics(
          [[check(t, i) for t in texts] for i, texts in enumerate(sampled)], prefix))
    examples = [{"reply": g[0], "correct": c[0]}
                for g, c in zip(greedy, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def forced_batch(self, name):
    """The teacher-forced batch of a set, built once: "drift" (the base model's greedy replies to
    the general prompts), "heldout" (prose, every token after the first), "hist" (the held-out
    in-domain reference responses)."""
    if ("batch", name) not in self._cache:
      self._cache[("batch", name)] = teacher_forced.teacher_forced_batch(
          *self._forced_rows(name), sampling.pad_id(self.tokenizer))
    return self._cache[("batch", name)]

  def _forced_rows(self, name):
    """(prompt ids, reply ids) per row of a teacher-forced set."""
    if name == "drift":
      base = nnx.merge(self.graphdef, self.base_params)
      prompt_ids = [self.encoder.prompt_ids(p) for p in self.rows("general")]
      return prompt_ids, generation.generate_ids(
          base, self.tokenizer, prompt_ids, max_new_tokens=self.cfg["max_new_tokens"],
          batch_size=self.cfg["batch_size"], label=self._label("base model replies"))
    if name == "heldout":
      texts = [self.tokenizer(t)["input_ids"] for t in self.rows("heldout")]
      return [t[:1] for t in texts], [t[1:] for t in texts]
    prompts, replies = [], []
    for i, row in enumerate(self.rows("hist")):
      ids, trained = self.encoder.encode(row, i)
      first, last = trained.index(1), len(trained) - 1 - trained[::-1].index(1)
      prompts.append(ids[:first])
      replies.append(ids[first:last + 1])
    return prompts, replies

  # -- suites: (model, params) -> (metrics, example replies)

  def in_domain(self, model, params):
    del params
    rows = self.rows("in_domain")
    prompt_ids = [self.encoder.prompt_ids(r["prompt"]) for r in rows]
    out, examples = self._scored(model, prompt_ids,
                                 lambda t, i: data_lib.is_correct(t, rows[i]["answer"]),
                                 "in_domain", self.cfg["max_new_tokens"],
                                 extract=data_lib.extract_answer)
    for e, r in zip(examples, rows):
      e.update(prompt=r["prompt"], answer=r["answer"])
    return out, examples

  def math(self, model, params):
    del params
    rows = self.rows("math")
    prompt_ids = [self.math_prompt_ids(r["problem"]) for r in rows]
    out, examples = self._scored(model, prompt_ids,
                                 lambda t, i: answers.is_math_correct(t, rows[i]["answer"]),
                                 "math", self.cfg["math_max_new_tokens"])
    for e, r in zip(examples, rows):
      e.update(prompt=r["problem"], answer=r["answer"])
    return out, examples

  def math_prompt_ids(self, problem):
    """The problem under MATH_SYSTEM_PROMPT (appended to the problem when there is no template)."""
    if self.encoder.template is None:
      return self.encoder.prompt_ids(f"{problem}\n{MATH_SYSTEM_PROMPT}")
    if "math_encoder" not in self._cache:
      cfg = ml_collections.ConfigDict(dict(self.data_cfg))
      cfg.system_prompt = MATH_SYSTEM_PROMPT
      self._cache["math_encoder"] = data_lib.Encoder(cfg, self.tokenizer)
    return self._cache["math_encoder"].prompt_ids(problem)

  def forgetting(self, model, params):
    general = self._forced(params, self.forced_batch("drift"))
    out = {"kl_to_base": float(general["kl_from_ref"].mean()),
           "kl_per_prompt": teacher_forced.per_row_means(
               general["kl_from_ref"], self.forced_batch("drift")["loss_mask"]),
           "entropy_general": float(general["entropy"].mean())}
    facts = self.rows("factual")
    prompt_ids = [self.encoder.prompt_ids(r["prompt"]) for r in facts]
    replies = self._texts(model, prompt_ids, "factual",
                          max_new_tokens=self.cfg["factual_max_new_tokens"])
    correct = [data_lib.matches_fact(t[0], r["aliases"]) for t, r in zip(replies, facts)]
    out["factual_accuracy"] = float(np.mean(correct))
    out["factual_correct"] = [int(c) for c in correct]
    heldout = self._forced(params, self.forced_batch("heldout"))
    out["perplexity_heldout"] = float(np.exp(-heldout["logp"].mean()))
    out["kl_heldout"] = float(heldout["kl_from_ref"].mean())
    examples = [{"prompt": r["prompt"], "reply": t[0], "correct": ok}
                for r, t, ok in zip(facts, replies, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def target_probs(self, model, params):
    del model
    stats = self._forced(params, self.forced_batch("hist"), against_base=False)
    return {"target_prob_mean": float(np.exp(stats["logp"]).mean()),
            "target_nll": float(-stats["logp"].mean()),
            "target_prob_hist": teacher_forced.target_prob_histogram(stats["logp"]).tolist()}, []

  def __call__(self, params, suites=None):
    model = nnx.merge(self.graphdef, params)
    results, examples = {}, {}
    for name in parse_suites(suites or self.cfg["suites"]):
      started = time.time()
      out, ex = getattr(self, name)(model, params)
      results.update(out)
      results[f"seconds/{name}"] = round(time.time() - started, 2)
      if ex:
        examples[name] = ex
    results["samples"] = examples.get("in_domain") or next(iter(examples.values()), [])
    return results


# ----------------------------------------------------------------------------- results table

ROWS = (  # (key, label, format) of the printed table, in order
    ("in_domain_accuracy", "in-domain accuracy (greedy)", "{:.3f}"),
    ("in_domain_answered", "in-domain replies with a final answer", "{:.3f}"),
    ("math_accuracy", "math accuracy (greedy, math-verify)", "{:.3f}"),
    ("kl_to_base", "KL(base || model), general prompts", "{:.4f}"),
    ("entropy_general", "entropy, general prompts", "{:.4f}"),
    ("factual_accuracy", "factual QA accuracy", "{:.3f}"),
    ("perplexity_heldout", "perplexity, held-out prose", "{:.3f}"),
    ("kl_heldout", "KL(base || model), held-out prose", "{:.4f}"),
    ("target_prob_mean", "target prob, held-out responses", "{:.4f}"),
    ("target_nll", "target NLL, held-out responses", "{:.4f}"),
)


def table_rows(results):
  """(label, formatted value) for every reported number, fixed rows first, then avg@k / pass@k."""
  rows = [(label, fmt.format(results[key])) for key, label, fmt in ROWS if key in results]
  rows += [(k, f"{v:.3f}") for k, v in results.items() if "@" in k]
  return rows


def format_table(results, title=""):
  rows = table_rows(results)
  width = max([len(label) for label, _ in rows] + [10])
  lines = [title] if title else []
  lines += [f"{label:{width}s}  {value:>10s}" for label, value in rows]
  return "\n".join(lines)
