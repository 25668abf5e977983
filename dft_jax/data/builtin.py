"""Built-in data sets, generated or written for dft_jax; no network. `data.source=builtin:NAME`.

  arith_train / arith_test / arith_val  2000 / 300 / 200 multi-step word problems, several
                                        reasoning paths each; {prompt, response, answer, kind,
                                        path, numbers}; val is for choosing hyperparameters (the
                                        study's learning rates), test for reporting
  arith_terse_train / arith_terse_test  the same problems answered by the line `#### N` only
  arith_ood_longer / arith_ood_expressions
                                        300 each, out of distribution for arith_*: the same
                                        stories with numbers one digit longer; the operations
                                        without a story ('What is 12 + 3 * 7?', no response)
  lookup_train / lookup_test / lookup_val
                                        2000 / 300 / 200 single-step reading problems (a count
                                        copied from the prompt, 1 to 3 people) answered the way
                                        SmolLM2-135M-Instruct replies (builtin_lookup.py); same
                                        fields as arith_*
  lookup_hard_train / _test / _val      2000 / 300 / 200 the same with 2 to 4 people: the study's
                                        model-strong regime
  lookup_ood_list / lookup_ood_sum      300 each, out of distribution for lookup_hard_*: the
                                        facts as a list asked in unseen words; two people's
                                        counts added
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
HARD_PEOPLE = (2, 3, 4)  # people per lookup_hard problem
OOD_SIZE = 300
OOD_SEEDS = dict(arith_longer=1, arith_expressions=2, lookup_list=3, lookup_sum=4)


@functools.cache
def _arith():
  train, test, val = ARITH_SIZES
  return arith.generate(train, test, seed=ARITH_SEED, num_val=val)


@functools.cache
def _lookup():
  train, test, val = LOOKUP_SIZES
  return builtin_lookup.generate(train, test, val, seed=LOOKUP_SEED)


@functools.cache
def _lookup_hard():
  """(train, test, val) of lookup_hard and the problem keys drawn (no OOD problem repeats one)."""
  return builtin_lookup.draw(*LOOKUP_SIZES, seed=LOOKUP_SEED, people=HARD_PEOPLE)


@functools.cache
def _lookup_ood(question, layout, seed):
  _, keys = _lookup_hard()
  return builtin_lookup.draw(OOD_SIZE, seed=seed, people=HARD_PEOPLE, layout=layout,
                             question=question, exclude=keys)[0][0]


@functools.cache
def _arith_longer():
  train, test, val = _arith()
  keys = frozenset((r["kind"], tuple(r["numbers"])) for r in train + test + val)
  return arith.generate_longer_numbers(OOD_SIZE, seed=OOD_SEEDS["arith_longer"], exclude=keys)


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
    "arith_ood_longer": lambda: arith.as_full(_arith_longer()),
    "arith_ood_expressions": lambda: arith.as_full(
        arith.generate_expressions(OOD_SIZE, seed=OOD_SEEDS["arith_expressions"])),
    "lookup_train": lambda: _copies(_lookup()[0]),
    "lookup_test": lambda: _copies(_lookup()[1]),
    "lookup_val": lambda: _copies(_lookup()[2]),
    "lookup_hard_train": lambda: _copies(_lookup_hard()[0][0]),
    "lookup_hard_test": lambda: _copies(_lookup_hard()[0][1]),
    "lookup_hard_val": lambda: _copies(_lookup_hard()[0][2]),
    "lookup_ood_list": lambda: _copies(_lookup_ood("one", "list", OOD_SEEDS["lookup_list"])),
    "lookup_ood_sum": lambda: _copies(_lookup_ood("sum", "sentences", OOD_SEEDS["lookup_sum"])),
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
