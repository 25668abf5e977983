"""Built-in data sets, generated or written for dft_jax; no network. `data.source=builtin:NAME`.

  arith_train / arith_test / arith_val  2000 / 300 / 200 multi-step word problems, several
                                        reasoning paths each; {prompt, response, answer, kind,
                                        path, numbers}; val is for choosing hyperparameters (the
                                        study's learning rates), test for reporting
  arith_terse_train / arith_terse_test  the same problems answered by the line `#### N` only
  lookup_train / lookup_test / lookup_val
                                        2000 / 300 / 200 single-step reading problems (a count
                                        copied from the prompt) answered the way
                                        SmolLM2-135M-Instruct replies: the study's model-strong
                                        regime (builtin_lookup.py); same fields as arith_*
  general_prompts                       80 varied prompts for drift (KL, entropy) from the base
                                        model; {prompt, category, response: "", answer: ""}
  factual_qa                            70 short-answer questions for knowledge retention;
                                        {prompt, response, answer, aliases}
  heldout_text                          8 paragraphs of prose for perplexity; {text}

Rows are regenerated deterministically on first use (fixed seed) and returned as fresh copies.
"""
import functools

from dft_jax.data import arith
from dft_jax.data import builtin_lookup
from dft_jax.data import builtin_text
from dft_jax.errors import DataError

ARITH_SIZES = (2000, 300, 200)  # train, test, val
ARITH_SEED = 0
LOOKUP_SIZES = (2000, 300, 200)  # train, test, val
LOOKUP_SEED = 0


@functools.cache
def _arith():
  train, test, val = ARITH_SIZES
  return arith.generate(train, test, seed=ARITH_SEED, num_val=val)


@functools.cache
def _lookup():
  train, test, val = LOOKUP_SIZES
  return builtin_lookup.generate(train, test, val, seed=LOOKUP_SEED)


def _copies(rows):
  return [{**r, "numbers": list(r["numbers"])} for r in rows]


def _general_prompts():
  return [{"prompt": p, "category": c, "response": "", "answer": ""}
          for c, p in builtin_text.GENERAL_PROMPTS]


def _factual_qa():
  return [{"prompt": q, "response": a, "answer": a, "aliases": [a, *aliases]}
          for q, a, aliases in builtin_text.FACTUAL_QA]


BUILTINS = {
    "arith_train": lambda: arith.as_full(_arith()[0]),
    "arith_test": lambda: arith.as_full(_arith()[1]),
    "arith_val": lambda: arith.as_full(_arith()[2]),
    "arith_terse_train": lambda: arith.as_terse(_arith()[0]),
    "arith_terse_test": lambda: arith.as_terse(_arith()[1]),
    "lookup_train": lambda: _copies(_lookup()[0]),
    "lookup_test": lambda: _copies(_lookup()[1]),
    "lookup_val": lambda: _copies(_lookup()[2]),
    "general_prompts": _general_prompts,
    "factual_qa": _factual_qa,
    "heldout_text": lambda: [{"text": t} for t in builtin_text.HELDOUT_TEXT],
}


def load_builtin(name):
  """The rows of built-in set `name` (a `builtin:` prefix is accepted) as a list of dicts."""
  name = name.removeprefix("builtin:")
  if name not in BUILTINS:
    raise DataError(f"unknown built-in data set {name!r}; expected one of {', '.join(BUILTINS)}")
  return BUILTINS[name]()
