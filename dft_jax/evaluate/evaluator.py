"""The RunEvaluator: the configured suites on one set of parameters, against a fixed base model;
the sets it scores, the checks of config.eval, and the results table."""
import logging
import os
import time

import ml_collections
import numpy as np
from flax import nnx

from dft_jax import data as data_lib
from dft_jax import sampling
from dft_jax.data import formats
from dft_jax.data import holdout as holdout_lib
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError, check_number
from dft_jax.evaluate import answers
from dft_jax.evaluate import generation
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


def settings(eval_cfg):
  """config.eval (a ConfigDict or dict with every field of configs/default.py's eval block) as a
  plain dict with `suites` parsed to a tuple (or "auto", see auto_suites); ConfigError naming the
  field if a value is bad."""
  s = dict(eval_cfg)
  s["suites"] = "auto" if s["suites"] == "auto" else parse_suites(s["suites"])
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
    raise ConfigError(f"eval.suites={value!r}: allowed names are auto or {', '.join(SUITES)}")
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


def load_rows(spec, split="train", field="data.source"):
  """Rows of an evaluation set: builtin:NAME, a local file / folder or a hub name (as
  data.source); errors name `field`, the config field that gave `spec`."""
  cfg = ml_collections.ConfigDict(dict(source=spec, split=split, subset=None, max_rows=None,
                                       cache_dir=None))
  try:
    return list(sources.load_source(cfg).dataset)
  except DataError as e:
    raise DataError(str(e).replace("data.source=", f"{field}=", 1)) from None


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
  prompts are rendered exactly as in training; the source and data.eval_holdout: the held-out
  split, holdout.split); graphdef / base_params: nnx.split of the model. Sets are loaded and
  teacher-forced batches built once (the base model's replies to the general prompts are
  generated once) and reused by every call. `__call__(params)` runs the configured suites and
  returns a flat dict of numbers, "sets" (what each suite scored, with its size) and "samples" (a
  few replies).
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
    c = self.cfg
    if name == "holdout":
      return self._holdout_examples()
    if name == "in_domain":
      return require_fields(load_rows(c["in_domain"], field="eval.in_domain")[:c["num_examples"]], ("prompt", "answer"),
                            c["in_domain"])
    if name == "math":
      split = c["math_split"] or ("test" if is_hub_name(c["math_file"]) else "train")
      return require_fields(load_rows(c["math_file"], split, "eval.math_file")[:c["num_math"]],
                            ("problem", "answer"), c["math_file"])
    if name == "general":
      return [r["prompt"] for r in require_fields(
          load_rows(c["general_prompts"], field="eval.general_prompts")[:c["num_general"]], ("prompt",), c["general_prompts"])]
    if name == "factual":
      return require_fields(load_rows(c["factual_qa"], field="eval.factual_qa")[:c["num_factual"]], ("prompt", "aliases"),
                            c["factual_qa"])
    if name == "heldout":
      return [r["text"] for r in require_fields(load_rows(c["heldout_text"], field="eval.heldout_text"), ("text",),
                                                c["heldout_text"])]
    if name == "hist":
      return require_fields(load_rows(c["in_domain"], field="eval.in_domain")[:c["num_hist"]], ("prompt", "response"),
                            c["in_domain"])
    raise KeyError(name)

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
    if suite == "in_domain":
      return f"in-domain set {c['in_domain']} ({len(self.rows('in_domain'))} problems)"
    if suite == "math":
      return f"math set {c['math_file']} ({len(self.rows('math'))} problems, math-verify)"
    if suite == "forgetting":
      return (f"forgetting ({len(self.rows('general'))} general prompts, "
              f"{len(self.rows('factual'))} questions, {len(self.rows('heldout'))} prose texts)")
    return f"target probabilities ({len(self.rows('hist'))} responses of {c['in_domain']})"

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
    return teacher_forced.forced_stats(self.graphdef, params,
                                       self.base_params if against_base else None,
                                       self.forced_batch(name),
                                       batch_size=self.cfg["forced_batch_size"],
                                       label=self._label(f"{TITLES[name]}, teacher-forced"))

  def _scored(self, model, prompt_ids, check, prefix, max_new_tokens, extract=None):
    """Greedy (and, with samples > 1, sampled) replies scored by check(text, i); with
    extract(text) -> answer or None, also the fraction of greedy replies that give an answer."""
    greedy = self._texts(model, prompt_ids, f"{TITLES[prefix]}, greedy",
                         max_new_tokens=max_new_tokens)
    correct = [[check(t, i) for t in texts] for i, texts in enumerate(greedy)]
    out = answers.accuracy_metrics(correct, prefix)
    out[f"{prefix}_correct"] = [int(c[0]) for c in correct]  # per problem: intervals over problems
    if extract is not None:
      out[f"{prefix}_answered"] = float(np.mean([extract(g[0]) is not None for g in greedy]))
    if self.cfg["samples"] > 1:
      sampled = self._texts(model, prompt_ids, f"{TITLES[prefix]}, sampled",
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
    training)."""
    if ("batch", name) not in self._cache:
      self._cache[("batch", name)] = teacher_forced.encoded_batch(
          self._forced_examples(name), sampling.pad_id(self.tokenizer))
    return self._cache[("batch", name)]

  def _forced_examples(self, name):
    """(ids, trained flags) per row of a teacher-forced set."""
    if name == "drift":
      base = nnx.merge(self.graphdef, self.base_params)
      prompt_ids = [self.encoder.prompt_ids(p) for p in self.rows("general")]
      replies = generation.generate_ids(
          base, self.tokenizer, prompt_ids, max_new_tokens=self.cfg["max_new_tokens"],
          batch_size=self.cfg["batch_size"], label=self._label("base model replies"))
      return [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompt_ids, replies)]
    if name == "heldout":
      texts = [self.tokenizer(t)["input_ids"] for t in self.rows("heldout")]
      return [(t, [0] + [1] * (len(t) - 1)) for t in texts]
    if name == "holdout":
      return [(e["ids"], e["trained"]) for e in self.rows("holdout")]
    return [self.encoder.encode(row, i) for i, row in enumerate(self.rows("hist"))]

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
        lambda t, i: answers.is_math_correct(t, answered[i]["answer"]), "holdout", max_new_tokens,
        extract=answers.stated_answer)
    for e, row in zip(shown, answered):
      e.update(prompt=self.tokenizer.decode(row["prompt"], skip_special_tokens=True),
               answer=row["answer"])
    return {**out, **scored}, shown

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
    general = self._forced(params, "drift")
    out = {"kl_to_base": float(general["kl_from_ref"].mean()),
           "kl_per_prompt": teacher_forced.per_row_means(
               general["kl_from_ref"], self.forced_batch("drift")["loss_mask"]),
           "entropy_general": float(general["entropy"].mean())}
    facts = self.rows("factual")
    prompt_ids = [self.encoder.prompt_ids(r["prompt"]) for r in facts]
    replies = self._texts(model, prompt_ids, "questions",
                          max_new_tokens=self.cfg["factual_max_new_tokens"])
    correct = [data_lib.matches_fact(t[0], r["aliases"]) for t, r in zip(replies, facts)]
    out["factual_accuracy"] = float(np.mean(correct))
    out["factual_correct"] = [int(c) for c in correct]
    heldout = self._forced(params, "heldout")
    out["perplexity_heldout"] = float(np.exp(-heldout["logp"].mean()))
    out["kl_heldout"] = float(heldout["kl_from_ref"].mean())
    examples = [{"prompt": r["prompt"], "reply": t[0], "correct": ok}
                for r, t, ok in zip(facts, replies, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def target_probs(self, model, params):
    del model
    stats = self._forced(params, "hist", against_base=False)
    return {"target_prob_mean": float(np.exp(stats["logp"]).mean()),
            "target_nll": float(-stats["logp"].mean()),
            "target_prob_hist": teacher_forced.target_prob_histogram(stats["logp"]).tolist()}, []

  def __call__(self, params, suites=None):
    model = nnx.merge(self.graphdef, params)
    results, examples, sets = {}, {}, {}
    for name in (parse_suites(suites) if suites else self.suites):
      sets[name] = self.describe(name)
      if self.cfg["progress"]:
        logging.info("scoring %s", sets[name])
      started = time.time()
      out, ex = getattr(self, name)(model, params)
      results.update(out)
      results[f"seconds/{name}"] = round(time.time() - started, 2)
      if ex:
        examples[name] = ex
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


def table_sections(columns):
  """[(set title, [(label, [cell per column])])]: for each suite any of the results dicts
  `columns` scored, in ROWS order, titled by what it scored (results["sets"]); avg@k / pass@k
  after the suite's fixed rows; "-" where a column lacks a number."""
  sets = {}
  for results in columns:
    sets.update({k: v for k, v in (results.get("sets") or {}).items() if k not in sets})
  cell = lambda results, key, fmt: fmt.format(results[key]) if key in results else "-"  # noqa: E731
  sections = []
  for suite in SUITES:
    rows = [(label, [cell(r, key, fmt) for r in columns])
            for s, key, label, fmt in ROWS if s == suite and any(key in r for r in columns)]
    sampled = sorted({k for r in columns for k in r if k.startswith(f"{suite}_") and "@" in k})
    rows += [(k.removeprefix(f"{suite}_"), [cell(r, k, "{:.3f}") for r in columns])
             for k in sampled]
    if rows:
      sections.append((sets.get(suite, suite), rows))
  return sections


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
