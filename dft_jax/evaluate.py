"""Evaluation: in-domain accuracy, math answers (math-verify), forgetting, target probabilities.

  python -m dft_jax.evaluate --checkpoint WORKDIR [--suite in_domain,forgetting] [--samples 8]
  python -m dft_jax.evaluate --model smollm2-135m-instruct --suite math --math_file math500.jsonl
  python -m dft_jax.evaluate --model tuned.gguf --base smollm2-135m-instruct --out results.json

Suites (`--suite` / config.eval.suites, comma-separated):
  in_domain     the held-out built-in problems (eval.in_domain, default builtin:arith_test): greedy
                accuracy (the reply's final `#### N`, else `\\boxed{N}`, else 'answer is N', equals
                the reference number); with samples k > 1, k replies per problem at `temperature`:
                avg@k = mean accuracy over all replies, pass@k = share of problems with a right
                reply among the k (unbiased estimator, arXiv 2107.03374).
  math          rows in MATH500 format {problem, answer} (eval.math_file): the reply's boxed / LaTeX
                answer checked against `answer` by math-verify (symbolic equivalence), under the
                system prompt both the DFT (arXiv 2508.05629) and PSFT (arXiv 2508.17784) papers
                evaluate with (MATH_SYSTEM_PROMPT); greedy, plus avg@k / pass@k as above.
  forgetting    KL(base || model) = mean_t sum_v pi_base(v|.) [log pi_base(v|.) - log pi(v|.)]
                and the model's entropy H = mean_t -sum_v pi(v|.) log pi(v|.), both teacher-forced
                on the base model's greedy replies to the general prompts; factual QA accuracy (an
                alias of the answer appears in the greedy reply); perplexity
                exp(mean_t -log pi(x_t|x_<t)) on held-out prose (and KL to the base there).
  target_probs  pi(y_t | y_<t, x) teacher-forced on the held-out in-domain reference responses: its
                histogram over objectives.HIST_EDGES, mean and mean NLL -- the before / after
                picture of the DFT paper, on data the run never trained on.

A model evaluated against itself has KL 0. Results are one flat dict of numbers (plus "samples"):
`RunEvaluator(eval_cfg, data_cfg, tokenizer, graphdef, base_params)(params)`, which the train job
calls before and after training and the scanner study once per run.
"""
import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dft_jax import data as data_lib
from dft_jax import lm_head
from dft_jax import objectives
from dft_jax import sampling
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError, cli_entry

SUITES = ("in_domain", "math", "forgetting", "target_probs")
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
LENGTH_BUCKET = 64  # teacher-forced rows are padded to a multiple of this (fewer recompiles)
NUM_SAMPLES_KEPT = 3  # example replies kept per suite in the results
# Evaluation settings; config.eval of a train run overrides any of them.
DEFAULTS = dict(
    suites="in_domain,forgetting",
    in_domain="builtin:arith_test", num_examples=200, max_new_tokens=256,
    samples=1, temperature=1.0, top_p=1.0, seed=0,
    math_file=None, math_split=None, num_math=None, math_max_new_tokens=1024,
    general_prompts="builtin:general_prompts", num_general=64,
    factual_qa="builtin:factual_qa", num_factual=70, factual_max_new_tokens=48,
    heldout_text="builtin:heldout_text",
    num_hist=200,
    batch_size=64,          # rows per generation batch
    forced_batch_size=8,    # rows per teacher-forced batch (full [rows, T, vocab] logits)
    progress=True,
)
# The data fields the Encoder reads, for a model evaluated outside a train run.
DATA_DEFAULTS = dict(format="prompt_response", prompt_field="prompt", response_field="response",
                     messages_field="messages", text_field="text", loss_on="assistant",
                     system_prompt=None, chat_template=None)


def settings(eval_cfg=None, **overrides):
  """DEFAULTS updated by eval_cfg (a ConfigDict or dict; unknown keys kept) and overrides."""
  s = dict(DEFAULTS)
  s.update(dict(eval_cfg or {}))
  s.update({k: v for k, v in overrides.items() if v is not None})
  s["suites"] = parse_suites(s["suites"])
  if not isinstance(s["samples"], int) or s["samples"] < 1:
    raise ConfigError(f"eval.samples={s['samples']!r}: must be an integer >= 1")
  if s["samples"] > 1 and not s["temperature"] > 0:
    raise ConfigError(f"eval.temperature={s['temperature']!r}: sampling k > 1 replies needs a "
                      "temperature > 0")
  for name in ("num_examples", "num_general", "num_factual", "num_hist", "batch_size",
               "forced_batch_size", "max_new_tokens", "factual_max_new_tokens",
               "math_max_new_tokens"):
    if not isinstance(s[name], int) or s[name] < 1:
      raise ConfigError(f"eval.{name}={s[name]!r}: must be a positive integer")
  if "math" in s["suites"] and not s["math_file"]:
    raise ConfigError("the math suite needs eval.math_file (--math_file): MATH500-format rows "
                      "{problem, answer} in a .jsonl / .json / .parquet file or a hub name")
  return s


def parse_suites(value):
  names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
  unknown = [n for n in names if n not in SUITES]
  if unknown or not names:
    raise ConfigError(f"eval suites {value!r}: allowed names are {', '.join(SUITES)}")
  return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------- answers


def pass_at_k(n, c, k):
  """Unbiased pass@k from n samples with c right (arXiv 2107.03374): 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def math_answer(text):
  """The final answer math-verify reads in `text` (boxed first, then LaTeX, then an expression):
  a list of parsed forms, empty when there is none."""
  from math_verify import parse  # pylint: disable=g-import-not-at-top
  return parse(text)


def is_math_correct(reply, answer):
  """Whether the reply's final answer equals `answer` (a MATH500 answer, LaTeX without $) up to
  symbolic equivalence, as math-verify decides (e.g. \\frac12 = 0.5; x^2+2x+1 = (x+1)^2)."""
  from math_verify import verify  # pylint: disable=g-import-not-at-top
  gold = math_answer(f"${answer}$") or math_answer(str(answer))
  predicted = math_answer(reply)
  return bool(gold) and bool(predicted) and bool(verify(gold, predicted))


def accuracy_metrics(correct_NxK, prefix):
  """{prefix}_accuracy from the first reply of each row; with k > 1 replies also avg@k, pass@k."""
  c = np.asarray(correct_NxK, bool)
  n, k = c.shape
  out = {f"{prefix}_n": n}
  if k == 1:
    out[f"{prefix}_accuracy"] = float(c[:, 0].mean())
  else:
    out[f"{prefix}_avg@{k}"] = float(c.mean())
    out[f"{prefix}_pass@{k}"] = float(np.mean([pass_at_k(k, int(r.sum()), k) for r in c]))
  return out


# ----------------------------------------------------------------------------- generation


class Progress:
  """`label: done/total` on stderr, redrawn in place on a terminal; one closing line otherwise."""

  def __init__(self, label, total, enabled=True):
    self.label, self.total, self.done, self.start = label, total, 0, time.time()
    self.enabled, self.tty = enabled, sys.stderr.isatty()

  def advance(self, n=1):
    self.done += n
    if self.enabled and self.tty:
      bar = "#" * int(20 * self.done / max(self.total, 1))
      sys.stderr.write(f"\r\033[K{self.label} [{bar:20s}] {self.done}/{self.total} "
                       f"{time.time() - self.start:.0f}s")
      sys.stderr.flush()

  def close(self):
    if self.enabled:
      sys.stderr.write("\n" if self.tty else
                       f"{self.label}: {self.total} batches in {time.time() - self.start:.1f}s\n")
      sys.stderr.flush()


def generate_ids(model, tokenizer, prompt_ids, *, max_new_tokens, batch_size, temperature=0.0,
                 top_p=1.0, seed=0, progress=None):
  """Replies (token ids, EOS cut) for each prompt, in batches of batch_size; a short last batch is
  filled up with copies of its last prompt so every batch has one shape (one compiled program)."""
  replies = []
  for start in range(0, len(prompt_ids), batch_size):
    part = prompt_ids[start:start + batch_size]
    filled = part + [part[-1]] * (min(batch_size, len(prompt_ids)) - len(part))
    replies += sampling.generate(
        model, filled, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        eos_ids=sampling.stop_ids(model, tokenizer), pad_id=sampling.pad_id(tokenizer),
        seed=seed + start)[:len(part)]
    if progress:
      progress.advance()
  return replies


def sample_texts(model, tokenizer, prompt_ids, *, max_new_tokens, batch_size, samples=1,
                 temperature=0.0, top_p=1.0, seed=0, label="generate", show=True):
  """Decoded replies [len(prompt_ids)][samples]: greedy when temperature is 0, else `samples`
  independent draws per prompt at (temperature, top_p)."""
  expanded = [p for p in prompt_ids for _ in range(samples)]
  progress = Progress(label, -(-len(expanded) // batch_size), show)
  ids = generate_ids(model, tokenizer, expanded, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
                     progress=progress)
  progress.close()
  texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
  return [texts[i * samples:(i + 1) * samples] for i in range(len(prompt_ids))]


# ----------------------------------------------------------------------------- teacher forcing


def teacher_forced_batch(prompt_ids, reply_ids, pad):
  """Rows prompt + reply, right-padded; loss_mask marks the positions whose target is a reply
  token. Returns the Batch-contract dict (numpy, one segment per row)."""
  length = max(len(p) + len(r) for p, r in zip(prompt_ids, reply_ids))
  n = len(prompt_ids)
  tokens = np.full((n, length), pad, np.int32)
  targets = np.full((n, length), pad, np.int32)
  loss_mask = np.zeros((n, length), np.float32)
  segment_ids = np.zeros((n, length), np.int32)
  positions = np.zeros((n, length), np.int32)
  for i, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
    seq = list(p) + list(r)
    tokens[i, :len(seq)] = seq
    targets[i, :len(seq) - 1] = seq[1:]
    loss_mask[i, len(p) - 1:len(seq) - 1] = 1.0
    segment_ids[i, :len(seq)] = 1
    positions[i, :len(seq)] = np.arange(len(seq))
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
              positions=positions)


def _padded(batch, rows, length):
  """The batch padded with masked-out rows / positions to [rows, length]."""
  n, t = batch["tokens"].shape
  return {k: np.pad(v, [(0, rows - n), (0, length - t)]) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnames="graphdef")
def _forced_token_stats(graphdef, params, base_params, batch):
  """float32 [B, T]: log pi(target), entropy of pi and, if base_params is given, KL(pi_base || pi)
  at every position."""

  def log_probs(p):
    model = nnx.merge(graphdef, p)
    logits = model(batch["tokens"], positions_BxT=batch["positions"],
                   segment_ids_BxT=batch["segment_ids"])
    return lm_head.log_softmax(logits)

  logp_BxTxV = log_probs(params)
  out = dict(logp=lm_head.target_log_prob(logp_BxTxV, batch["targets"]),
             entropy=lm_head.entropy(logp_BxTxV))
  if base_params is not None:
    base_logp_BxTxV = log_probs(base_params)
    out["kl"] = jnp.sum(jnp.exp(base_logp_BxTxV) * (base_logp_BxTxV - logp_BxTxV), axis=-1)
  return out


def forced_stats(graphdef, params, base_params, batch, *, batch_size):
  """Per-token logp, entropy and (base_params given) KL to the base at the batch's loss_mask
  positions (flat numpy), batch_size rows at a time, rows and length padded to fixed buckets."""
  n, t = batch["tokens"].shape
  length = -(-t // LENGTH_BUCKET) * LENGTH_BUCKET
  out = {}
  for start in range(0, n, batch_size):
    part = _padded({k: v[start:start + batch_size] for k, v in batch.items()},
                   min(batch_size, n), length)
    stats = jax.device_get(_forced_token_stats(graphdef, params, base_params, part))
    mask = part["loss_mask"] > 0
    for key, value in stats.items():
      out.setdefault(key, []).append(np.asarray(value)[mask])
  return {k: np.concatenate(v) for k, v in out.items()}


def per_row_means(values, loss_mask_NxT):
  """forced_stats' flat per-token values (row-major over loss_mask) -> the mean of each row that has
  loss tokens, as a list."""
  counts = np.asarray(loss_mask_NxT > 0).sum(axis=1)
  rows = np.split(np.asarray(values, np.float64), np.cumsum(counts)[:-1])
  return [float(r.mean()) for r in rows if r.size]


def target_prob_histogram(logp):
  """Counts of exp(logp) over objectives.HIST_EDGES (the last bin includes 1.0)."""
  bins = len(objectives.HIST_EDGES) - 1
  index = np.clip(np.floor(np.exp(logp) * bins), 0, bins - 1).astype(int)
  return np.bincount(index, minlength=bins)


# ----------------------------------------------------------------------------- rows


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

  eval_cfg: config.eval (any DEFAULTS key); data_cfg: config.data (chat template, system prompt:
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

  def _texts(self, model, prompt_ids, label, *, max_new_tokens, sampled=False):
    c = self.cfg
    kw = (dict(samples=c["samples"], temperature=c["temperature"], top_p=c["top_p"])
          if sampled else {})
    return sample_texts(model, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        batch_size=c["batch_size"], seed=c["seed"], label=label,
                        show=c["progress"], **kw)

  def _forced(self, params, batch, against_base=True):
    return forced_stats(self.graphdef, params, self.base_params if against_base else None, batch,
                        batch_size=self.cfg["forced_batch_size"])

  def _scored(self, model, prompt_ids, check, prefix, max_new_tokens, extract=None):
    """Greedy (and, with samples > 1, sampled) replies scored by check(text, i); with
    extract(text) -> answer or None, also the fraction of greedy replies that give an answer."""
    greedy = self._texts(model, prompt_ids, f"{prefix} greedy", max_new_tokens=max_new_tokens)
    correct = [[check(t, i) for t in texts] for i, texts in enumerate(greedy)]
    out = accuracy_metrics(correct, prefix)
    out[f"{prefix}_correct"] = [int(c[0]) for c in correct]  # per problem: intervals over problems
    if extract is not None:
      out[f"{prefix}_answered"] = float(np.mean([extract(g[0]) is not None for g in greedy]))
    if self.cfg["samples"] > 1:
      sampled = self._texts(model, prompt_ids, f"{prefix} sampled", max_new_tokens=max_new_tokens,
                            sampled=True)
      out.update(accuracy_metrics([[check(t, i) for t in texts] for i, texts in enumerate(sampled)],
                                  prefix))
    examples = [{"reply": g[0], "correct": c[0]}
                for g, c in zip(greedy, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def forced_batch(self, name):
    """The teacher-forced batch of a set, built once: "drift" (the base model's greedy replies to
    the general prompts), "heldout" (prose, every token after the first), "hist" (the held-out
    in-domain reference responses)."""
    if ("batch", name) not in self._cache:
      self._cache[("batch", name)] = teacher_forced_batch(*self._forced_rows(name),
                                                          sampling.pad_id(self.tokenizer))
    return self._cache[("batch", name)]

  def _forced_rows(self, name):
    """(prompt ids, reply ids) per row of a teacher-forced set."""
    if name == "drift":
      base = nnx.merge(self.graphdef, self.base_params)
      prompt_ids = [self.encoder.prompt_ids(p) for p in self.rows("general")]
      return prompt_ids, generate_ids(base, self.tokenizer, prompt_ids,
                                      max_new_tokens=self.cfg["max_new_tokens"],
                                      batch_size=self.cfg["batch_size"])
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
                                 lambda t, i: is_math_correct(t, rows[i]["answer"]),
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
    out = {"kl_to_base": float(general["kl"].mean()),
           "kl_per_prompt": per_row_means(general["kl"], self.forced_batch("drift")["loss_mask"]),
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
    out["kl_heldout"] = float(heldout["kl"].mean())
    examples = [{"prompt": r["prompt"], "reply": t[0], "correct": ok}
                for r, t, ok in zip(facts, replies, correct)][:NUM_SAMPLES_KEPT]
    return out, examples

  def target_probs(self, model, params):
    del model
    stats = self._forced(params, self.forced_batch("hist"), against_base=False)
    return {"target_prob_mean": float(np.exp(stats["logp"]).mean()),
            "target_nll": float(-stats["logp"].mean()),
            "target_prob_hist": target_prob_histogram(stats["logp"]).tolist()}, []

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


# ----------------------------------------------------------------------------- report

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


# ----------------------------------------------------------------------------- command line


def load_for_eval(args):
  """(model, tokenizer, base_model, data_cfg, eval_cfg, names) from --checkpoint or --model."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  from dft_jax import train  # pylint: disable=g-import-not-at-top
  from dft_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  if bool(args.checkpoint) == bool(args.model):
    raise ConfigError("give exactly one of --checkpoint WORKDIR (a dft_jax.train run) and "
                      "--model SPEC (alias, HF folder, .gguf file)")
  kw = {} if args.dtype is None else {"compute_dtype": args.dtype}
  if args.checkpoint:
    config = ckpt.read_config(args.checkpoint)
    model, tokenizer = train.restore_model(args.checkpoint, args.step)
    base_cfg = ml_collections.ConfigDict(dict(config.model))
    base_cfg.name = args.base or config.model.name
    base = train.load_model(base_cfg)[0]
    base_spec = base_cfg.name
    return model, tokenizer, base, config.data, dict(config.eval), (args.checkpoint, base_spec)
  model, tokenizer = models.load(args.model, **kw)
  if tokenizer is None:
    raise ConfigError(f"--model={args.model!r} has no tokenizer; evaluation needs one")
  base = models.load(args.base, **kw)[0] if args.base else model
  return (model, tokenizer, base, ml_collections.ConfigDict(DATA_DEFAULTS), {},
          (args.model, args.base or args.model))


def check_same_architecture(model, base):
  if model.config != base.config:
    raise ConfigError("--base must have the model's architecture (KL needs the same vocabulary "
                      f"and shapes): {base.config} vs {model.config}")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dft_jax.evaluate",
                              description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", help="a dft_jax.train workdir (its latest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--model", help="alias, HF folder or .gguf file (e.g. the base model itself)")
  p.add_argument("--base", help="base model for KL (default: the checkpoint's model.name, or "
                 "--model itself, which gives KL 0)")
  p.add_argument("--suite", default=None, help=f"comma-separated: {', '.join(SUITES)}")
  p.add_argument("--math_file", help="MATH500-format rows {problem, answer} (jsonl/json/parquet)")
  p.add_argument("--math_split", help="split of a hub --math_file (default test; files: train)")
  p.add_argument("--in_domain", help="held-out set for in_domain (default builtin:arith_test)")
  p.add_argument("--samples", type=int, help="k replies per problem for avg@k / pass@k")
  p.add_argument("--temperature", type=float, help="sampling temperature for --samples > 1")
  p.add_argument("--top_p", type=float)
  p.add_argument("--num_examples", type=int, help="held-out problems (in_domain)")
  p.add_argument("--num_math", type=int, help="math rows (default: all)")
  p.add_argument("--max_new_tokens", type=int)
  p.add_argument("--math_max_new_tokens", type=int)
  p.add_argument("--batch_size", type=int, help="rows per generation batch")
  p.add_argument("--dtype", default=None, help="compute dtype for --model (default: bfloat16 on "
                 "accelerators, float32 on CPU)")
  p.add_argument("--out", help="write the results as JSON here")
  return p.parse_args(argv)


@cli_entry
def main(argv=None):
  args = parse_args(argv)
  overrides = {k: getattr(args, k) for k in (
      "math_file", "math_split", "in_domain", "samples", "temperature", "top_p", "num_examples",
      "num_math", "max_new_tokens", "math_max_new_tokens", "batch_size")}
  overrides["suites"] = args.suite
  settings(None, **overrides)  # flag errors before anything is loaded
  model, tokenizer, base, data_cfg, eval_cfg, (name, base_name) = load_for_eval(args)
  check_same_architecture(model, base)
  cfg = settings(eval_cfg, **overrides)
  graphdef, params = nnx.split(model)
  evaluator = RunEvaluator(cfg, data_cfg, tokenizer, graphdef, nnx.split(base)[1])
  results = evaluator(params)
  print(format_table(results, f"{name} (base: {base_name})"), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"model": name, "base": base_name, "settings": cfg, "results": results}, f,
                indent=2)
    print(f"results: {os.path.abspath(args.out)}", flush=True)


if __name__ == "__main__":
  main()
