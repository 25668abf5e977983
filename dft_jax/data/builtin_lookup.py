"""Built-in single-step reading problems: the model-strong regime of the study.

A problem states how many things one to three people have and asks for one of the counts:

  prompt:   "Ava has 12 apples. Ben has 7 pears. How many pears does Ben have?
             End your reply with 'The answer is <number>.'"
  response: "Ben has 7 pears.\nThe answer is 7."

No arithmetic: the answer is copied from the prompt, which SmolLM2-135M-Instruct already does on
a real fraction of the problems, and the response is written the way that model replies to such
a prompt (it restates the fact, then the answer line), so most target tokens are likely under it
(the study measures both: base accuracy and mean base target probability per regime). Every
answer is checkable by answers.extract_answer ('answer is N').
"""
import random

from dft_jax.data import arith

INSTRUCTION = "End your reply with 'The answer is <number>.'"
ITEMS = ("apples", "pears", "books", "coins", "shells", "stamps", "cards", "pens", "marbles",
         "stickers", "cookies", "buttons", "candles", "kites", "plums", "rulers", "beads",
         "feathers", "postcards", "seeds")
FACTS = ("{name} has {n} {item}.", "{name} owns {n} {item}.", "{name} keeps {n} {item} in a box.",
         "There are {n} {item} in {name}'s bag.")
QUESTIONS = ("How many {item} does {name} have?", "How many {item} does {name} own?",
             "What is the number of {item} that {name} has?")
PEOPLE = (1, 2, 3)  # people per problem, drawn uniformly


def problem(r):
  """One problem: ((key), prompt, response, answer, number of people)."""
  k = r.choice(PEOPLE)
  names = r.sample(arith.NAMES, k)
  items = r.sample(ITEMS, k) if r.random() < 0.5 else [r.choice(ITEMS)] * k  # same thing: by name
  counts = r.sample(range(2, 60), k)
  asked = r.randrange(k)
  facts = " ".join(r.choice(FACTS).format(name=name, n=n, item=item)
                   for name, n, item in zip(names, counts, items))
  question = r.choice(QUESTIONS).format(name=names[asked], item=items[asked])
  answer = counts[asked]
  response = f"{names[asked]} has {answer} {items[asked]}.\nThe answer is {answer}."
  key = (tuple(names), tuple(items), tuple(counts), asked)
  return key, f"{facts} {question}\n{INSTRUCTION}", response, str(answer), k


def generate(num_train, num_test, num_val, seed=0):
  """(train, test, val) rows {prompt, response, answer, kind, path, numbers}, drawn in that order
  from one generator; no problem (same people, things, counts and question) is in two splits."""
  r = random.Random(seed)
  seen, rows = set(), []
  while len(rows) < num_train + num_test + num_val:
    key, prompt, response, answer, k = problem(r)
    if key in seen:
      continue
    seen.add(key)
    rows.append({"prompt": prompt, "response": response, "answer": answer,
                 "kind": f"lookup_{k}", "path": "restate", "numbers": list(key[2])})
  return rows[:num_train], rows[num_train:num_train + num_test], rows[num_train + num_test:]
