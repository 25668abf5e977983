"""The RunEvaluator: the configured suites and eval.sets on one set of parameters, against a fixed
base model; the sets it scores, the checks of config.eval, the results table and the figures the
metric writers get."""
import logging
import numbers
import time

import ml_collections
import numpy as np
from flax import nnx

from dft_jax import data as data_lib
from dft_jax import objectives
from dft_jax import sampling
from dft_jax.data import formats
from dft_jax.data import holdout as holdout_lib
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError, check_number
from dft_jax.evaluate import answers
from dft_jax.evaluate import generation
from dft_jax.evaluate import sets as sets_lib
from dft_jax.evaluate import teacher_forced

SUITES = ("holdout", "in_domain", "math", "forgetting", "target_probs")
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
NUM_SAMPLES_KEPT = 3  # example replies kept per suite in the results
HOLDOUT_REPLY_SLACK = 32  # held-out replies may run this many tokens past the longest reference
TITLES = {  # progress-bar titles of the sets: suite prefixes and teacher-forced batches
    "holdout": "held-out rows", "in_domain": "in-domain", "math": "math",
    "drift": "general prompts", "heldout": "prose", "hist": "reference responses"}
POSITIVE_FIELDS = ("num_examples", "num_general", "num_factual", "num_hist", "batch_size",
                   "forced_batch_size", "max_new_tokens", "factual_max_new_tokens",
                   "math_max_new_tokens")
SET_DEFAULTS = {  # config.eval fields naming one set -> the fields their rows have by default
    "in_domain": dict(prompt_field="prompt", answer_field="answer", response_field="response"),
    "math_file": dict(prompt_field="problem", answer_field="answer"),
    "general_prompts": dict(prompt_field="prompt"),
    "factual_qa": dict(prompt_field="prompt", aliases_field="aliases"),
    "heldout_text": dict(format="text", text_field="text"),
}
SUITE_SETS = {  # a suite's rows -> (the eval field naming the set, its count field, fields read)
    "in_domain": ("in_domain", "num_examples", ("prompt", "answer")),
    "hist": ("in_domain", "num_hist", ("prompt", "response")),
    "math": ("math_file", "num_math", ("prompt", "answer")),
    "general": ("general_prompts", "num_general", ("prompt",)),
    "factual": ("factual_qa", "num_factual", ("prompt", "aliases")),
    "heldout": ("heldout_text", None, ("text",)),
}
SUITE_ROWS = {"in_domain": ("in_domain",), "math": ("math",),  # the SUITE_SETS each suite reads
              "forgetting": ("general", "factual", "heldout"), "target_probs": ("hist",)}


def settings(eval_cfg):
  """config.eval (a ConfigDict or dict with every field of configs/default.py's eval block) as a
  plain dict with `suites` parsed to a tuple (or "auto", see auto_suites); ConfigError naming the
  field if a value is bad."""
  s = dict(eval_cfg)
  special = {"auto": "auto", "none": ()}  # none: eval.sets only
  s["suites"] = special[s["suites"]] if s["suites"] in special else parse_suites(s["suites"])
  check_number("eval.every_steps", s["every_steps"], integer=True, minimum=0)
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
  for field, defaults in SET_DEFAULTS.items():
    if field == "math_file":
      defaults = dict(defaults, split=s["math_split"])
    s[field] = s[field] and sets_lib.resolve(s[field], f"eval.{field}", defaults)
  s["sets"] = sets_lib.resolve_list(s["sets"], reserved=SUITES)
  return s


def parse_suites(value):
  """"in_domain,forgetting" (or a sequence of names) -> ("in_domain", "forgetting")."""
  names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
  unknown = [n for n in names if n not in SUITES]
  if unknown or not names:
    raise ConfigError(f"eval.suites={value!r}: allowed names are auto, none (eval.sets only) or "
                      f"{', '.join(SUITES)}")
  return tuple(dict.fromkeys(names))


def auto_suites(eval_settings, data_cfg, has_holdout):
  """eval.suites=auto: holdout (when rows of the training data are held out), in_domain (when
  training on a builtin:arith set, eval.in_domain's family), math (when eval.math_file is set),
  forgetting. The built-in arithmetic set is scored only when it is the training data or asked
  for."""
  names = (["holdout"] if has_holdout else [])
  names += ["in_domain"] if str(data_cfg.source).startswith("builtin:arith") else []
  names += ["math"] if eval_settings["math_file"] else []
  return tuple(names + ["forgetting"])


# ----------------------------------------------------------------------------- sets


def set_rows(eval_settings, name):
  """(rows, locate) of a suite's set (a SUITE_SETS name) or of an eval.sets entry (an EvalSet),
  every row checked for the fields it is read for (DataError naming file, row, field and the
  config field to set)."""
  if isinstance(name, sets_lib.EvalSet):
    s, num, roles = name, None, sets_lib.required_roles(name)
  else:
    field, count, roles = SUITE_SETS[name]
    s, num = eval_settings[field], eval_settings[count] if count else None
  rows, locate = sets_lib.load(s, num)
  return sets_lib.check_rows(s, rows, locate, roles), locate


def check_sets(eval_cfg, data_cfg):
  """Reads and checks every set the evaluation will score (the configured suites' and eval.sets),
  before a model is loaded; the held-out rows of the training data are the data's to check."""
  s = settings(eval_cfg)
  suites = auto_suites(s, data_cfg, has_holdout=False) if s["suites"] == "auto" else s["suites"]
  names = [name for suite in suites for name in SUITE_ROWS.get(suite, ())]
  for name in names + list(s["sets"]):
    set_rows(s, name)


# ----------------------------------------------------------------------------- the evaluator


class RunEvaluator:
  """Evaluates parameters of one model architecture against a fixed base model.

  eval_cfg: config.eval (see `settings`); data_cfg: config.data (chat template, system prompt:
  prompts are rendered exactly as in training; the source and data.eval_holdout: the held-out
  split, holdout.split); graphdef / base_params: nnx.split of the model. Sets are loaded and
  teacher-forced batches built once (the base model's replies to the general prompts are
  generated once) and reused by every call. `__call__(params)` runs the configured suites, then
  every set of eval.sets, and returns a flat dict of numbers (a set's under `NAME/`), "sets" (what
  each suite and set scored, with its size) and "samples" (a few replies).
  """

  def __init__(self, eval_cfg, data_cfg, tokenizer, graphdef, base_params):
    self.cfg = settings(eval_cfg)
    self.tokenizer, self.graphdef, self.base_params = tokenizer, graphdef, base_params
    self.encoder = data_lib.Encoder(data_cfg, tokenizer)
    self.data_cfg = data_cfg
    self._cache = {}

  @property
  def suites(self):
    """The suites to run: eval.suites, or auto_suites for "auto"."""
    if self.cfg["suites"] == "auto":
      return auto_suites(self.cfg, self.data_cfg, bool(self.rows("holdout")))
    if "holdout" in self.cfg["suites"] and not self.rows("holdout"):
      raise ConfigError(f"the holdout suite has no rows: data.eval_holdout="
                        f"{self.data_cfg.get('eval_holdout')!r} holds none out of "
                        f"{self.data_cfg.source}; set it to a number of rows")
    return self.cfg["suites"]

  def rows(self, name):
    if name not in self._cache:
      self._cache[name] = self._load(name)
    return self._cache[name]

  def _load(self, name):
    """The rows of a suite's set (holdout: its examples), or of an eval.sets entry (an EvalSet),
    each checked for the fields it is read for."""
    if name == "holdout":
      return self._holdout_examples()
    rows, self._cache[("locate", name)] = set_rows(self.cfg, name)
    return rows

  def set_encoder(self, s):
    """data.Encoder of an evaluation set's rows: the training data's template and system prompt,
    the set's format and fields; errors name the set's rows and file."""
    if ("encoder", s) not in self._cache:
      name = s if s.named else "hist"  # the set's rows were read under this name
      self.rows(name)
      self._cache[("encoder", s)] = data_lib.Encoder(sets_lib.data_config(s, self.data_cfg),
                                                     self.tokenizer, self._cache[("locate", name)])
    return self._cache[("encoder", s)]

  def _holdout_examples(self):
    """The held-out rows of the training data (data/holdout.py), encoded as in training; rows
    training would drop (empty, longer than data.max_length) are left out."""
    d = self.data_cfg
    _, heldout, _ = holdout_lib.split(sources.load_source(d, streaming=d.streaming), d)
    if heldout is None:
      return []
    encoder = data_lib.Encoder(d, self.tokenizer, heldout.locate)
    with heldout.reading():
      rows = list(heldout.dataset)
    examples = []
    for i, row in enumerate(rows):
      ids, trained = encoder.encode(row, i)
      if ids and len(ids) <= d.max_length:
        examples.append(self._held_out_example(row, ids, trained, heldout.locate(i)))
    return examples

  def _held_out_example(self, row, ids, trained, where):
    """{ids, trained, prompt (ids before the last trained span; empty for text), reply_len,
    answer}: the answer is row[data.answer_field], else the final answer the reference reply
    states (answers.final_answer: \\boxed{} or #### N), else None."""
    last = len(trained) - 1 - trained[::-1].index(1)
    first = last
    while first > 0 and trained[first - 1]:
      first -= 1
    reference = self.tokenizer.decode(ids[first:last + 1], skip_special_tokens=True)
    if self.data_cfg.get("answer_field"):
      answer = formats.get_field(row, self.data_cfg.answer_field)
      if answer is None:
        raise DataError(f"{where} has no field {self.data_cfg.answer_field!r} "
                        "(data.answer_field)")
      answer = str(answer)
    else:
      answer = answers.final_answer(reference)
    prompt = [] if self.data_cfg.format == "text" else list(ids[:first])
    return dict(ids=ids, trained=trained, prompt=prompt, reply_len=last + 1 - first,
                answer=answer)

  def describe(self, suite):
    """What a suite scores, with its size, for the results table."""
    c = self.cfg
    if suite == "holdout":
      examples = self.rows("holdout")
      answered = sum(e["answer"] is not None and bool(e["prompt"]) for e in examples)
      return (f"held-out rows of {self.data_cfg.source} ({len(examples)} rows"
              + (f", {answered} with a final answer: math-verify)" if answered else ")"))
    if isinstance(suite, sets_lib.EvalSet):
      what = {"answers": "problems, math-verify", "forced": "rows, teacher-forced p(y_t)",
              "kl": "rows, KL to the base"}[suite.kind]
      return f"set {suite.name}: {suite.source} ({len(self.rows(suite))} {what})"
    if suite == "in_domain":
      return f"in-domain set {c['in_domain'].source} ({len(self.rows('in_domain'))} problems)"
    if suite == "math":
      return f"math set {c['math_file'].source} ({len(self.rows('math'))} problems, math-verify)"
    if suite == "forgetting":
      return (f"forgetting ({len(self.rows('general'))} general prompts, "
              f"{len(self.rows('factual'))} questions, {len(self.rows('heldout'))} prose texts)")
    return (f"target probabilities ({len(self.rows('hist'))} responses of "
            f"{c['in_domain'].source})")

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

  def _forced(self, params, name, against_base=True):
    title = name.name if isinstance(name, sets_lib.EvalSet) else TITLES[name]
    return teacher_forced.forced_stats(self.graphdef, params,
                                       self.base_params if against_base else None,
                                       self.forced_batch(name),
                                       batch_size=self.cfg["forced_batch_size"],
                                       label=self._label(f"{title}, teacher-forced"))

  def _scored(self, model, prompt_ids, check, prefix, max_new_tokens, extract=None, title=None):
    """Greedy (and, with samples > 1, sampled) replies scored by check(text, i); with
    extract(text) -> answer or None, also the fraction of greedy replies that give an answer.
    Keys start with `prefix` ("in_domain_", "NAME/"); progress bars say `title`."""
    title = title or TITLES[prefix.rstrip("_")]
    greedy = self._texts(model, prompt_ids, f"{title}, greedy", max_new_tokens=max_new_tokens)
    correct = [[check(t, i) for t in texts] for i, texts in enumerate(greedy)]
    out = answers.accuracy_metrics(correct, prefix)
    out[f"{prefix}correct"] = [int(c[0]) for c in correct]  # per problem: intervals over problems
    if extract is not None:
      out[f"{prefix}answered"] = float(np.mean([extract(g[0]) is not None for g in greedy]))
    if self.cfg["samples"] > 1:
      sampled = self._texts(model, prompt_ids, f"{title}, sampled",
                            max_new_tokens=max_new_tokens, sampled=True)
      out.update(answers.accuracy_metrics(
          [[check(t, i) for t in texts] for i, texts in enumerate(sampled)], prefix))
    examples = [{"reply": g[0], "correct": c[0]}
                for g, c in zip(greedy, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def forced_batch(self, name):
    """The teacher-forced batch of a set, built once: "drift" (the base model's greedy replies to
    the general prompts), "heldout" (prose, every token after the first), "hist" (the in-domain
    reference responses), "holdout" (the held-out rows of the training data, trained tokens as in
    training), an EvalSet (its rows encoded as training would, with the set's fields)."""
    if ("batch", name) not in self._cache:
      self._cache[("batch", name)] = teacher_forced.encoded_batch(
          self._forced_examples(name), sampling.pad_id(self.tokenizer))
    return self._cache[("batch", name)]

  def _forced_examples(self, name):
    """(ids, trained flags) per row of a teacher-forced set."""
    if name == "drift":
      base = nnx.merge(self.graphdef, self.base_params)
      s = self.cfg["general_prompts"]
      prompt_ids = [self.prompt_ids(str(formats.get_field(r, s.prompt_field)))
                    for r in self.rows("general")]
      replies = generation.generate_ids(
          base, self.tokenizer, prompt_ids, max_new_tokens=self.cfg["max_new_tokens"],
          batch_size=self.cfg["batch_size"], label=self._label("base model replies"))
      return [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompt_ids, replies)]
    if name == "heldout":
      field = self.cfg["heldout_text"].text_field
      texts = [self.tokenizer(str(formats.get_field(r, field)))["input_ids"]
               for r in self.rows("heldout")]
      return [(t, [0] + [1] * (len(t) - 1)) for t in texts]
    if name == "holdout":
      return [(e["ids"], e["trained"]) for e in self.rows("holdout")]
    s, rows = ((name, self.rows(name)) if isinstance(name, sets_lib.EvalSet)
               else (self.cfg["in_domain"], self.rows("hist")))
    encoder = self.set_encoder(s)
    return [encoder.encode(row, i) for i, row in enumerate(rows)]

  # -- suites: (model, params) -> (metrics, example replies)

  def holdout(self, model, params):
    examples = self.rows("holdout")
    stats = self._forced(params, "holdout", against_base=False)
    out = {"holdout_rows": len(examples), "holdout_target_prob": float(np.exp(stats["logp"]).mean()),
           "holdout_nll": float(-stats["logp"].mean())}
    answered = [e for e in examples if e["answer"] is not None and e["prompt"]]
    if not answered:
      return out, []
    max_new_tokens = min(self.cfg["math_max_new_tokens"],
                         max(e["reply_len"] for e in answered) + HOLDOUT_REPLY_SLACK)
    scored, shown = self._scored(
        model, [e["prompt"] for e in answered],
        lambda t, i: answers.is_math_correct(t, answered[i]["answer"]), "holdout_",
        max_new_tokens, extract=answers.stated_answer)
    for e, row in zip(shown, answered):
      e.update(prompt=self.tokenizer.decode(row["prompt"], skip_special_tokens=True),
               answer=row["answer"])
    return {**out, **scored}, shown

  def _answered(self, model, s, rows, check, prefix, max_new_tokens, system_prompt=None,
                extract=None, title=None):
    """Greedy replies to the set's prompts (rendered as in training, under `system_prompt` when
    given), each checked by check(reply, answer) against the row's answer."""
    prompts = [str(formats.get_field(r, s.prompt_field)) for r in rows]
    golds = [formats.get_field(r, s.answer_field) for r in rows]
    prompt_ids = [self.prompt_ids(p, system_prompt) for p in prompts]
    out, examples = self._scored(model, prompt_ids, lambda t, i: check(t, golds[i]), prefix,
                                 max_new_tokens, extract=extract, title=title)
    for e, prompt, gold in zip(examples, prompts, golds):
      e.update(prompt=prompt, answer=gold)
    return out, examples

  def prompt_ids(self, prompt, system_prompt=None):
    """The prompt rendered as training renders its prompts; a system prompt, when given, goes in
    the system turn (appended to the prompt when there is no template)."""
    if not system_prompt:
      return self.encoder.prompt_ids(prompt)
    if self.encoder.template is None:
      return self.encoder.prompt_ids(f"{prompt}\n{system_prompt}")
    if ("system", system_prompt) not in self._cache:
      cfg = ml_collections.ConfigDict(dict(self.data_cfg))
      cfg.system_prompt = system_prompt
      self._cache[("system", system_prompt)] = data_lib.Encoder(cfg, self.tokenizer)
    return self._cache[("system", system_prompt)].prompt_ids(prompt)

  def math_prompt_ids(self, problem):
    """The problem under MATH_SYSTEM_PROMPT, as the math suite asks it."""
    return self.prompt_ids(problem, MATH_SYSTEM_PROMPT)

  def in_domain(self, model, params):
    del params
    return self._answered(model, self.cfg["in_domain"], self.rows("in_domain"),
                          data_lib.is_correct, "in_domain_", self.cfg["max_new_tokens"],
                          extract=data_lib.extract_answer)

  def math(self, model, params):
    del params
    return self._answered(model, self.cfg["math_file"], self.rows("math"),
                          lambda t, gold: answers.is_math_correct(t, str(gold)), "math_",
                          self.cfg["math_max_new_tokens"], MATH_SYSTEM_PROMPT)

  def forgetting(self, model, params):
    rows = lambda name, stats: {k: teacher_forced.per_row(  # noqa: E731
        v, self.forced_batch(name)["loss_mask"]) for k, v in stats.items()}
    out = teacher_forced.forgetting_measures(rows("drift", self._forced(params, "drift")),
                                             rows("heldout", self._forced(params, "heldout")))
    s, facts = self.cfg["factual_qa"], self.rows("factual")
    questions = [str(formats.get_field(r, s.prompt_field)) for r in facts]
    replies = self._texts(model, [self.prompt_ids(q) for q in questions], "questions",
                          max_new_tokens=self.cfg["factual_max_new_tokens"])
    correct = [data_lib.matches_fact(t[0], formats.get_field(r, s.aliases_field))
               for t, r in zip(replies, facts)]
    out["factual_accuracy"] = float(np.mean(correct))
    out["factual_correct"] = [int(c) for c in correct]
    examples = [{"prompt": q, "reply": t[0], "correct": ok}
                for q, t, ok in zip(questions, replies, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def target_probs(self, model, params):
    del model
    stats = self._forced(params, "hist", against_base=False)
    return {"target_prob_mean": float(np.exp(stats["logp"]).mean()),
            "target_nll": float(-stats["logp"].mean()),
            "target_prob_hist": teacher_forced.target_prob_histogram(stats["logp"]).tolist()}, []

  def eval_set(self, model, params, s):
    """One eval.sets entry, its metrics under `NAME/`: answers (n problems, accuracy, answered,
    avg@k / pass@k, correct per problem), forced (rows, target_prob, nll, target_prob_hist), kl
    (rows, kl_to_base, entropy, perplexity)."""
    rows, prefix = self.rows(s), f"{s.name}/"
    if s.kind == "answers":
      out, examples = self._answered(
          model, s, rows, lambda t, gold: answers.is_math_correct(t, str(gold)), prefix,
          s.max_new_tokens or self.cfg["math_max_new_tokens"], s.system_prompt,
          extract=answers.stated_answer, title=s.name)
      return out, examples
    stats = self._forced(params, s, against_base=s.kind == "kl")
    if s.kind == "forced":
      return {f"{prefix}rows": len(rows), f"{prefix}target_prob": float(np.exp(stats["logp"]).mean()),
              f"{prefix}nll": float(-stats["logp"].mean()),
              f"{prefix}target_prob_hist": teacher_forced.target_prob_histogram(
                  stats["logp"]).tolist()}, []
    return {f"{prefix}rows": len(rows), f"{prefix}kl_to_base": float(stats["kl_from_ref"].mean()),
            f"{prefix}entropy": float(stats["entropy"].mean()),
            f"{prefix}perplexity": float(np.exp(-stats["logp"].mean()))}, []

  def __call__(self, params, suites=None):
    """The suites (`suites`, else the configured ones) and, unless `suites` is given, every set of
    eval.sets."""
    model = nnx.merge(self.graphdef, params)
    results, examples, sets = {}, {}, {}
    chosen = parse_suites(suites) if suites else self.suites + self.cfg["sets"]
    for name in chosen:
      key = name.name if isinstance(name, sets_lib.EvalSet) else name
      sets[key] = self.describe(name)
      if self.cfg["progress"]:
        logging.info("scoring %s", sets[key])
      started = time.time()
      out, ex = (self.eval_set(model, params, name) if isinstance(name, sets_lib.EvalSet)
                 else getattr(self, name)(model, params))
      results.update(out)
      results[f"seconds/{key}"] = round(time.time() - started, 2)
      if ex:
        examples[key] = ex
    results["sets"] = sets
    results["samples"] = examples.get("in_domain") or next(iter(examples.values()), [])
    return results


# ----------------------------------------------------------------------------- results table

ROWS = (  # (suite, key, label, format) of the printed table, in order
    ("holdout", "holdout_target_prob", "target prob (teacher-forced)", "{:.4f}"),
    ("holdout", "holdout_nll", "target NLL (teacher-forced)", "{:.4f}"),
    ("holdout", "holdout_accuracy", "accuracy (greedy, math-verify)", "{:.3f}"),
    ("holdout", "holdout_answered", "replies with a final answer", "{:.3f}"),
    ("in_domain", "in_domain_accuracy", "accuracy (greedy)", "{:.3f}"),
    ("in_domain", "in_domain_answered", "replies with a final answer", "{:.3f}"),
    ("math", "math_accuracy", "accuracy (greedy, math-verify)", "{:.3f}"),
    ("forgetting", "kl_to_base", "KL(base || model), general prompts", "{:.4f}"),
    ("forgetting", "entropy_general", "entropy, general prompts", "{:.4f}"),
    ("forgetting", "factual_accuracy", "factual QA accuracy", "{:.3f}"),
    ("forgetting", "perplexity_heldout", "perplexity, held-out prose", "{:.3f}"),
    ("forgetting", "kl_heldout", "KL(base || model), held-out prose", "{:.4f}"),
    ("target_probs", "target_prob_mean", "target prob, reference responses", "{:.4f}"),
    ("target_probs", "target_nll", "target NLL, reference responses", "{:.4f}"),
)
SET_ROWS = (  # (metric, label, format) of an eval.sets entry, under NAME/, in order
    ("accuracy", "accuracy (greedy, math-verify)", "{:.3f}"),
    ("answered", "replies with a final answer", "{:.3f}"),
    ("target_prob", "target prob (teacher-forced)", "{:.4f}"),
    ("nll", "target NLL (teacher-forced)", "{:.4f}"),
    ("kl_to_base", "KL(base || model)", "{:.4f}"),
    ("entropy", "entropy", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
)


def table_sections(columns):
  """[(set title, [(label, [cell per column])])]: for each suite any of the results dicts
  `columns` scored, in ROWS order, then each eval.sets entry (SET_ROWS), titled by what it scored
  (results["sets"]); avg@k / pass@k after the fixed rows; "-" where a column lacks a number."""
  sets = {}
  for results in columns:
    sets.update({k: v for k, v in (results.get("sets") or {}).items() if k not in sets})
  cell = lambda results, key, fmt: fmt.format(results[key]) if key in results else "-"  # noqa: E731
  layout = [(suite, f"{suite}_", [(key, label, fmt) for s, key, label, fmt in ROWS if s == suite])
            for suite in SUITES]
  layout += [(name, f"{name}/", [(f"{name}/{m}", label, fmt) for m, label, fmt in SET_ROWS])
             for name in sets if name not in SUITES]
  sections = []
  for name, prefix, fixed in layout:
    rows = [(label, [cell(r, key, fmt) for r in columns])
            for key, label, fmt in fixed if any(key in r for r in columns)]
    sampled = sorted({k for r in columns for k in r if k.startswith(prefix) and "@" in k})
    rows += [(k.removeprefix(prefix), [cell(r, k, "{:.3f}") for r in columns]) for k in sampled]
    if rows:
      sections.append((sets.get(name, name), rows))
  return sections


def writer_metrics(results):
  """An evaluation's results as the metric writers take them: (scalars, histograms), every name
  under eval/ (eval/in_domain_accuracy, eval/NAME/accuracy; histograms eval/.../target_prob_hist
  over objectives.HIST_EDGES); per-problem lists, timings and texts left out."""
  scalars = {f"eval/{k}": float(v) for k, v in results.items()
             if isinstance(v, numbers.Real) and not isinstance(v, bool)
             and not k.startswith("seconds/")}
  histograms = {f"eval/{k}": (objectives.HIST_EDGES, np.asarray(v)) for k, v in results.items()
                if k.endswith("target_prob_hist")}
  return scalars, histograms


def format_sections(headers, sections):
  """Lines of a table: a header row (when headers has a non-empty name), then each section's
  title and its indented rows, one right-aligned column per header."""
  width = max([len(label) + 2 for _, rows in sections for label, _ in rows] + [36])
  lines = []
  if any(headers):
    lines.append(" " * width + "".join(f"{h:>11s}" for h in headers))
  for title, rows in sections:
    lines.append(title)
    lines += [f"  {label:{width - 2}s}" + "".join(f"{c:>11s}" for c in cells)
              for label, cells in rows]
  return lines


def format_table(results, title=""):
  """The results of one evaluation, suite by suite, each under what it scored."""
  return "\n".join(([title] if title else []) + format_sections([""],
                                                                 table_sections([results])))
