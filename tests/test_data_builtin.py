"""Built-in data sets and the answer checkers the evaluator uses."""
import collections
import re

import pytest

from dft_jax import data
from dft_jax.data import arith
from dft_jax.data import builtin_lookup
from dft_jax.data import inspect as data_inspect
from dft_jax.data import testing

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
CHAIN = re.compile(r"\d+ [-+*/] \d+ [-+*/] \d+ =")  # a step with two operations
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a / b}


def test_sizes_and_fields():
  sizes = {name: len(data.load_builtin(name)) for name in data.BUILTINS}
  assert sizes == {"arith_train": 2000, "arith_test": 300, "arith_val": 200,
                   "arith_terse_train": 2000,
                   "arith_terse_test": 300, "arith_ood_longer": 300,
                   "arith_ood_expressions": 300, "lookup_train": 2000, "lookup_test": 300,
                   "lookup_val": 200, "lookup_hard_train": 2000, "lookup_hard_test": 300,
                   "lookup_hard_val": 200, "lookup_ood_list": 300, "lookup_ood_sum": 300,
                   "general_prompts": 80, "factual_qa": 70, "heldout_text": 8}
  for name in ("arith_train", "arith_test", "arith_terse_train", "lookup_train", "factual_qa",
               "general_prompts"):
    assert {"prompt", "response", "answer"} <= set(data.load_builtin(name)[0])
  assert data.load_builtin("builtin:heldout_text") == data.load_builtin("heldout_text")


def test_generation_is_deterministic_and_test_is_held_out():
  assert arith.generate(50, 10, seed=3) == arith.generate(50, 10, seed=3)
  assert arith.generate(50, 10, seed=3) != arith.generate(50, 10, seed=4)
  key = lambda r: (r["kind"], tuple(r["numbers"]))  # noqa: E731
  train, test, val = (data.load_builtin(f"arith_{split}") for split in ("train", "test", "val"))
  splits = [{key(r) for r in rows} for rows in (train, test, val)]
  assert not splits[0] & splits[1] and not splits[0] & splits[2] and not splits[1] & splits[2]
  # the validation split is drawn after the others: it leaves train and test as they were
  assert arith.generate(50, 10, seed=3, num_val=5)[:2] == arith.generate(50, 10, seed=3)[:2]
  assert len({r["prompt"] for r in train}) == len(train)


@pytest.mark.parametrize("name", ["arith_train", "arith_test", "arith_val"])
def test_every_step_is_correct_and_the_answer_is_checkable(name):
  for row in data.load_builtin(name):
    steps = EQUATION.findall(row["response"])
    assert len(steps) >= 2 and not CHAIN.search(row["response"]), row
    for a, op, b, c in steps:
      assert OPS[op](int(a), int(b)) == int(c), (row["response"], a, op, b)
    assert row["response"].splitlines()[-1] == f"#### {row['answer']}"
    assert data.extract_answer(row["response"]) == row["answer"]
    assert len(row["prompt"]) < 300 and len(row["response"]) < 400


def test_several_reasoning_paths_and_phrasings_per_kind():
  train = data.load_builtin("arith_train")
  paths, openings = collections.defaultdict(set), collections.defaultdict(set)
  for r in train:
    paths[r["kind"]].add(r["path"])
    openings[r["kind"]].add(r["response"].splitlines()[0])
  assert len(paths) == 10
  assert all(len(p) >= 2 for p in paths.values()), paths
  assert all(len(o) >= 20 for o in openings.values())
  # the same problem kind reaches its answer through differently ordered steps
  ops = {tuple(op for _, op, _, _ in EQUATION.findall(r["response"])) for r in train
         if r["kind"] == "distributive"}
  assert {("*", "*", "+"), ("+", "*")} <= ops


def test_terse_variant_answers_the_same_problems():
  full, terse = data.load_builtin("arith_train"), data.load_builtin("arith_terse_train")
  for f, t in zip(full, terse):
    assert t["response"] == f"#### {f['answer']}" and t["answer"] == f["answer"]
    assert t["prompt"].split("\n")[0] == f["prompt"].split("\n")[0]
    assert data.is_correct(t["response"], f["answer"])


LOOKUP_FACT = re.compile(r"(\w+) (?:has|owns|keeps) (\d+) ([\w ]+?)(?: in a box)?\.|"
                         r"There are (\d+) ([\w ]+?) in (\w+)'s bag\.")
LOOKUP_QUESTION = re.compile(r"(?:How many ([\w ]+) does (\w+) (?:have|own)|"
                             r"What is the number of ([\w ]+) that (\w+) has)\?")


def lookup_facts(prompt):
  """{(name, thing): count} of a lookup prompt, and the (name, thing) it asks about."""
  facts = {}
  for m in LOOKUP_FACT.finditer(prompt):
    name, n, thing = (m[1], m[2], m[3]) if m[1] else (m[6], m[4], m[5])
    facts[(name, thing)] = int(n)
  q = LOOKUP_QUESTION.search(prompt)
  return facts, ((q[2], q[1]) if q[1] else (q[4], q[3]))


def test_lookup_generation_is_deterministic_and_splits_are_disjoint():
  assert builtin_lookup.generate(50, 10, 5, seed=3) == builtin_lookup.generate(50, 10, 5, seed=3)
  assert builtin_lookup.generate(50, 10, 5, seed=3) != builtin_lookup.generate(50, 10, 5, seed=4)
  splits = [data.load_builtin(f"lookup_{s}") for s in ("train", "test", "val")]
  prompts = [{r["prompt"] for r in rows} for rows in splits]
  assert [len(p) for p in prompts] == [len(rows) for rows in splits]  # no repeat within a split
  assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
  # the same problem (people, things, counts, question) in other words is the same problem
  problems = [{(tuple(sorted(lookup_facts(r["prompt"])[0].items())), lookup_facts(r["prompt"])[1])
               for r in rows} for rows in splits]
  assert not problems[0] & problems[1] and not problems[0] & problems[2]
  assert not problems[1] & problems[2]


@pytest.mark.parametrize("name", ["lookup_train", "lookup_test", "lookup_val"])
def test_lookup_answer_is_the_asked_count_and_the_reply_restates_it(name):
  rows = data.load_builtin(name)
  for row in rows:
    facts, (person, thing) = lookup_facts(row["prompt"])
    people = [p for p, _ in facts]
    assert len(facts) == len(row["numbers"]) == int(row["kind"][-1]), row
    assert len(set(people)) == len(people), row
    assert sorted(facts.values()) == sorted(row["numbers"])
    answer = row["answer"]
    assert answer == str(facts[(person, thing)])
    assert row["response"] == f"{person} has {answer} {thing}.\nThe answer is {answer}."
    assert data.is_correct(row["response"], row["answer"])
    assert row["prompt"].endswith(builtin_lookup.INSTRUCTION)
  kinds = collections.Counter(r["kind"] for r in rows)
  assert set(kinds) == {"lookup_1", "lookup_2", "lookup_3"}
  assert min(kinds.values()) > len(rows) / 4  # about a third each


def test_general_prompts_are_varied():
  rows = data.load_builtin("general_prompts")
  assert len({r["prompt"] for r in rows}) == len(rows) >= 64
  categories = collections.Counter(r["category"] for r in rows)
  assert {"instruction", "question", "chit-chat", "code", "facts"} <= set(categories)
  assert min(categories[c] for c in ("instruction", "question", "chit-chat", "code", "facts")) >= 8


def test_factual_qa_answers_match_their_aliases():
  rows = data.load_builtin("factual_qa")
  assert len({r["prompt"] for r in rows}) == len(rows) >= 60
  for r in rows:
    assert r["answer"] in r["aliases"]
    assert data.matches_fact(f"It is {r['response']}.", r["aliases"])


@pytest.mark.parametrize("text,answer,expected", [
    ("3 * 4 = 12\n#### 12", "12", True),
    ("#### 12", 12, True),
    ("#### 1,234", "1234", True),
    ("#### 7.0", "7", True),
    ("#### $15", "15", True),
    ("#### -3", "-3", True),
    ("So the answer is 42.", "42", True),
    ("The final result is \\boxed{9}.", "9", True),
    ("#### 5\n...\n#### 6", "6", True),        # the last marker counts
    ("#### 13", "12", False),                  # wrong
    ("#### 120", "12", False),
    ("The answer is 12 apples? #### 13", "12", False),  # the marker outranks prose
    ("twelve", "12", False),                   # malformed: no number stated
    ("####", "12", False),
    ("", "12", False),
    ("I think 12", "12", False),               # a bare number is not a stated answer
])
def test_is_correct(text, answer, expected):
  assert data.is_correct(text, answer) is expected


def test_extract_answer_malformed_is_none():
  assert data.extract_answer("no answer here") is None
  assert data.extract_answer("#### x") is None
  assert data.extract_answer("#### 0012") == "12"


@pytest.mark.parametrize("text,aliases,expected", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("PARIS", ["Paris"], True),
    ("It's Brasilia", ["Brasília"], True),
    ("Parisian cafes", ["Paris"], False),
    ("There are 17 of them", ["7", "seven"], False),
    ("Seven continents.", ["7", "seven"], True),
    ("Washington, D.C.", ["Washington, D.C."], True),
    ("", ["Paris"], False),
])
def test_matches_fact(text, aliases, expected):
  assert data.matches_fact(text, aliases) is expected


def test_inspect_report_marks_trained_spans():
  tok = testing.tiny_chat_tokenizer()
  config = testing.default_config()
  config.data.max_rows = 50
  row = data.load_builtin("arith_train")[0]
  plain = data_inspect.report(config, tok, num=2, color=False)
  assert f"[[{row['response']}<|im_end|>]]" in plain
  assert "--- row 0 of builtin:arith_train: " in plain and "50 rows read, 50 kept" in plain
  assert "first batch, row 0: segments of [" in plain
  colored = data_inspect.report(config, tok, num=1, color=True)
  assert f"\033[1;32m{row['response']}<|im_end|>\033[0m" in colored


def test_the_default_builtin_set_keeps_every_row():
  tok = testing.tiny_chat_tokenizer()
  config = testing.default_config()
  it = data.make_train_iterator(config.data, tok, seq_len=256, global_batch_size=8, seed=0,
                                max_segments=config.model.max_segments, process_index=0,
                                process_count=1)
  next(it)
  assert it.stats["kept"] == 2000
