"""Built-in reading problems: the model-strong regime of the study, and its out-of-distribution sets.

A problem states how many things some people have and asks for one of the counts:

  prompt:   "Ava has 12 apples. Ben has 7 pears. How many pears does Ben have?
             End your reply with 'The answer is <number>.'"
  response: "Ben has 7 pears.\nThe answer is 7."

No arithmetic: the answer is copied from the prompt, which SmolLM2-135M-Instruct already does on
a real fraction of the problems, and the response is written the way that model replies to such
a prompt (it restates the fact, then the answer line), so most target tokens are likely under it
(the study measures both: base accuracy and mean base target probability per regime). Every
answer is checkable by answers.extract_answer ('answer is N').

Variants (`generate`'s arguments): how many people a problem names (`people`: more people, more
facts to pick the asked one from), and two out-of-distribution forms of the same skill for test
sets -- the facts as a list under unseen question wordings (`layout="list"`), and a question that
composes two lookups with an addition (`question="sum"`: how many do two people have together).
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
# Out of distribution: a list of facts, asked in words training never uses.
LIST_FACT = "- {name}: {n} {item}"
LIST_HEADERS = ("Inventory:", "Here is who owns what:", "Records:")
LIST_QUESTIONS = ("Tell me the count of {item} that belongs to {name}.",
                  "According to the list, {name}'s {item} number how many?",
                  "Looking at the records, report how many {item} {name} holds.")
SUM_QUESTIONS = ("How many {item} do {a} and {b} have together?",
                 "What is the total number of {item} that {a} and {b} have?")


def _facts(r, names, counts, items, layout):
  if layout == "list":
    lines = [LIST_FACT.format(name=name, n=n, item=item)
             for name, n, item in zip(names, counts, items)]
    return "\n".join([r.choice(LIST_HEADERS), *lines])
  return " ".join(r.choice(FACTS).format(name=name, n=n, item=item)
                  for name, n, item in zip(names, counts, items))


def problem(r, people=PEOPLE, layout="sentences", question="one"):
  """One problem: ((key), prompt, response, answer, number of people). layout: "sentences" (the
  training form) or "list"; question: "one" (one person's count) or "sum" (two people's, of the
  same thing)."""
  k = r.choice(people)
  names = r.sample(arith.NAMES, k)
  different = question != "sum" and r.random() < 0.5  # else one thing for all, told apart by name
  items = r.sample(ITEMS, k) if different else [r.choice(ITEMS)] * k
  counts = r.sample(range(2, 60), k)
  asked = sorted(r.sample(range(k), 2)) if question == "sum" else [r.randrange(k)]
  facts = _facts(r, names, counts, items, layout)
  item = items[asked[0]]
  if question == "sum":
    a, b = (names[i] for i in asked)
    text = r.choice(SUM_QUESTIONS).format(item=item, a=a, b=b)
    answer = counts[asked[0]] + counts[asked[1]]
    response = (f"{a} has {counts[asked[0]]} {item} and {b} has {counts[asked[1]]} {item}: "
                f"{counts[asked[0]]} + {counts[asked[1]]} = {answer}.\nThe answer is {answer}.")
  else:
    name = names[asked[0]]
    text = r.choice(LIST_QUESTIONS if layout == "list" else QUESTIONS).format(name=name, item=item)
    answer = counts[asked[0]]
    response = f"{name} has {answer} {item}.\nThe answer is {answer}."
  key = (tuple(names), tuple(items), tuple(counts), tuple(asked))
  separator = "\n" if layout == "list" else " "
  return key, f"{facts}{separator}{text}\n{INSTRUCTION}", response, str(answer), k


def draw(*sizes, seed=0, people=PEOPLE, layout="sentences", question="one", exclude=frozenset()):
  """(splits, keys): splits of the given sizes (train, test, val, ...) of rows {prompt, response,
  answer, kind, path, numbers}, drawn in that order from one generator, and the problem keys
  (people, things, counts, question) drawn; no problem is in two splits, nor in `exclude`."""
  r = random.Random(seed)
  seen, rows = set(exclude), []
  while len(rows) < sum(sizes):
    key, prompt, response, answer, k = problem(r, people, layout, question)
    if key in seen:
      continue
    seen.add(key)
    rows.append({"prompt": prompt, "response": response, "answer": answer,
                 "kind": f"lookup_{k}" if question == "one" else f"lookup_sum_{k}",
                 "path": "restate", "numbers": list(key[2])})
  bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  return [rows[a:b] for a, b in zip(bounds, bounds[1:])], frozenset(seen - set(exclude))


def generate(num_train, num_test, num_val, seed=0):
  """(train, test, val) rows of the training form (1 to 3 people, facts in sentences)."""
  return tuple(draw(num_train, num_test, num_val, seed=seed)[0])
