"""Built-in multi-step arithmetic word problems with several valid reasoning paths.

Each problem kind (ten of them, 2-3 operations on small numbers) has several phrasings of the
question and several correct solutions that differ in the order and grouping of the steps (e.g.
p * a + p * b versus (a + b) * p; cost first versus subtracting item by item), each step in
several wordings. A training row samples one of them, so the target distribution has many
paths per prompt; the terse variant answers the same problems with the final line only, a
near-deterministic single-path target. Every step is written `x op y = z`; the final line is
`#### N` (checked by answers.extract_answer / is_correct).
"""
import random
import re

FULL_INSTRUCTION = "Think step by step and end with the line '#### <number>'."
TERSE_INSTRUCTION = "Reply with only the line '#### <number>'."

NAMES = ("Ava", "Ben", "Maya", "Leo", "Sara", "Omar", "Lina", "Noah", "Zoe", "Ravi", "Emma", "Kofi",
         "Nora", "Ivan", "Mei", "Tom", "Aisha", "Jonas", "Priya", "Diego", "Hana", "Sam")


def _pick(r, *options):
  return r.choice(options)


def _name_pair(r):
  a, b = r.sample(NAMES, 2)
  return a, b


# Each kind: (r) -> (key numbers, question, answer, {path name: [steps]}, closing sentence); a path
# is only offered when its steps stay in whole numbers and short enough to write out.


def _groups_plus(r):
  name = r.choice(NAMES)
  item, one, many = r.choice([("pencils", "box", "boxes"), ("stickers", "sheet", "sheets"),
                              ("marbles", "bag", "bags"), ("cookies", "tray", "trays"),
                              ("cards", "pack", "packs"), ("apples", "basket", "baskets")])
  a, b, c = r.randint(2, 30), r.randint(2, 6), r.randint(2, 12)
  bc, ans = b * c, a + b * c
  q = _pick(r, f"{name} has {a} {item}. Then {name} buys {b} {many} of {item} with {c} {item} "
               f"in each {one}. How many {item} does {name} have now?",
            f"{name} already owns {a} {item} and gets {b} more {many}, each holding {c} {item}. "
            f"How many {item} does {name} have in total?",
            f"There are {b} {many} with {c} {item} in every {one}, and {a} loose {item}. How "
            f"many {item} are there altogether?")
  paths = {
      "multiply_first": [
          _pick(r, f"The {many} hold {b} * {c} = {bc} {item}.",
                f"First, {b} {many} of {c} {item} each make {b} * {c} = {bc} {item}.",
                f"Each {one} has {c} {item}, so {b} {many} have {c} * {b} = {bc} {item}."),
          _pick(r, f"Adding the {a} {item} from before gives {a} + {bc} = {ans}.",
                f"Together with the other {a}, that is {bc} + {a} = {ans} {item}."),
      ],
      "expression": [
          f"The total is {a} + {b} * {c}.",
          f"Multiplication comes first: {b} * {c} = {bc}.",
          f"Then {a} + {bc} = {ans}.",
      ],
  }
  if b <= 4:
    steps, total = [], a
    for _ in range(b):
      steps.append(f"{total} + {c} = {total + c}")
      total += c
    paths["one_at_a_time"] = [
        _pick(r, f"Start from the {a} {item} and add {c} for each of the {b} {many}.",
              f"Count up from {a}, adding {c} {item} per {one}."),
        ", ".join(steps) + ".",
    ]
  return (a, b, c), q, ans, paths, f"So there are {ans} {item} in total."


def _shared_cost(r):
  name = r.choice(NAMES)
  thing = r.choice(["pizzas", "movie tickets", "board games", "books", "cakes", "kites"])
  x = r.randint(2, 5)
  if r.random() < 0.5:
    c, p = x * r.randint(1, 6), r.randint(2, 8)
  else:
    c, p = r.randint(2, 15), x * r.randint(1, 4)
  total, ans = p * c, p * c // x
  q = _pick(r, f"{name} and {x - 1} friends buy {p} {thing} for ${c} each and split the cost "
               f"equally. How many dollars does each person pay?",
            f"A group of {x} friends shares the cost of {p} {thing}. Each of the {thing} costs "
            f"${c}. If they pay equal amounts, how much does each friend pay in dollars?")
  paths = {"total_first": [
      _pick(r, f"The {thing} cost {p} * {c} = {total} dollars in total.",
            f"All together: {p} * {c} = {total} dollars."),
      _pick(r, f"Split among {x} people: {total} / {x} = {ans} dollars each.",
            f"Each of the {x} friends pays {total} / {x} = {ans}."),
  ]}
  if c % x == 0:
    paths["split_each_price"] = [
        f"Each of the {thing} costs ${c}, so every person's share of one is "
        f"{c} / {x} = {c // x}.",
        f"For {p} of them that is {c // x} * {p} = {ans} dollars.",
    ]
  if p % x == 0:
    paths["split_the_items"] = [
        f"Sharing the {p} {thing} equally is like each person paying for "
        f"{p} / {x} = {p // x} of them.",
        f"That costs {p // x} * {c} = {ans} dollars.",
    ]
  return (x, p, c), q, ans, paths, f"So each person pays {ans} dollars."


def _distributive(r):
  n1, n2 = _name_pair(r)
  item = r.choice(["pens", "notebooks", "oranges", "stamps", "candles", "rulers"])
  p, a, b = r.randint(2, 12), r.randint(2, 9), r.randint(2, 9)
  ans = p * (a + b)
  q = _pick(r, f"A shop sells {item} for ${p} each. {n1} buys {a} {item} and {n2} buys {b} "
               f"{item}. How many dollars do they spend together?",
            f"{item.capitalize()} cost ${p} apiece. If {n1} gets {a} and {n2} gets {b}, what is "
            f"the total cost in dollars?")
  paths = {
      "each_buyer": [
          _pick(r, f"{n1} pays {a} * {p} = {a * p} dollars.",
                f"{n1} spends {p} * {a} = {a * p}."),
          _pick(r, f"{n2} pays {b} * {p} = {b * p} dollars.",
                f"{n2} spends {p} * {b} = {b * p}."),
          _pick(r, f"Together: {a * p} + {b * p} = {ans}.",
                f"In total {a * p} + {b * p} = {ans} dollars."),
      ],
      "items_first": [
          _pick(r, f"They buy {a} + {b} = {a + b} {item} in all.",
                f"The two of them get {a} + {b} = {a + b} {item}."),
          _pick(r, f"At ${p} each, that costs {a + b} * {p} = {ans} dollars.",
                f"So the cost is {p} * {a + b} = {ans}."),
      ],
  }
  return (p, a, b), q, ans, paths, f"So they spend {ans} dollars together."


def _diff_times(r):
  name = r.choice(NAMES)
  made, used, thing = r.choice([("bakes", "sells", "cookies"), ("bakes", "sells", "muffins"),
                                ("picks", "eats", "strawberries"), ("picks", "eats", "plums"),
                                ("collects", "gives away", "shells"),
                                ("grows", "gives away", "flowers")])
  b = r.randint(1, 12)
  a, d = b + r.randint(1, 9), r.randint(2, 7)
  ans = (a - b) * d
  q = _pick(r, f"Every day {name} {made} {a} {thing} and {used} {b} of them. How many {thing} "
               f"does {name} keep after {d} days?",
            f"{name} {made} {a} {thing} a day and {used} {b} a day. After {d} days, how many "
            f"{thing} are left?")
  paths = {
      "net_per_day": [
          _pick(r, f"Each day {name} keeps {a} - {b} = {a - b} {thing}.",
                f"Per day, {a} - {b} = {a - b} {thing} are left over."),
          _pick(r, f"Over {d} days: {a - b} * {d} = {ans}.",
                f"After {d} days that is {d} * {a - b} = {ans} {thing}."),
      ],
      "totals_first": [
          f"In {d} days {name} {made} {a} * {d} = {a * d} {thing}.",
          f"In the same time {name} {used} {b} * {d} = {b * d}.",
          _pick(r, f"So {a * d} - {b * d} = {ans} are left.",
                f"That leaves {a * d} - {b * d} = {ans} {thing}."),
      ],
  }
  return (a, b, d), q, ans, paths, f"So {name} keeps {ans} {thing}."


def _change(r):
  name = r.choice(NAMES)
  item = r.choice(["sandwiches", "notebooks", "toy cars", "bottles of juice", "tickets"])
  n, p = r.randint(2, 6), r.randint(2, 15)
  m = r.choice([b for b in (20, 50, 100) if b > n * p])
  cost, ans = n * p, m - n * p
  q = _pick(r, f"{name} buys {n} {item} at ${p} each and pays with a ${m} bill. How much "
               f"change, in dollars, does {name} get?",
            f"{item.capitalize()} cost ${p} each. {name} pays for {n} of them with ${m}. How many "
            f"dollars come back as change?")
  paths = {"cost_first": [
      _pick(r, f"The {item} cost {n} * {p} = {cost} dollars.",
            f"{n} {item} at ${p}: {n} * {p} = {cost}."),
      _pick(r, f"The change is {m} - {cost} = {ans} dollars.",
            f"{m} - {cost} = {ans} comes back."),
  ]}
  if n <= 3:
    steps, left = [], m
    for _ in range(n):
      steps.append(f"{left} - {p} = {left - p}")
      left -= p
    paths["one_at_a_time"] = [
        f"Take ${p} from the ${m} for each of the {n} {item}:",
        ", ".join(steps) + ".",
    ]
  return (m, n, p), q, ans, paths, f"So {name} gets {ans} dollars in change."


def _three_groups(r):
  name = r.choice(NAMES)
  x, y, z = r.choice([("cows", "sheep", "goats"), ("red beads", "blue beads", "green beads"),
                      ("novels", "comics", "atlases"), ("roses", "tulips", "daisies")])
  a, b, c = r.randint(3, 25), r.randint(5, 25), r.randint(3, 25)
  d = r.randint(1, b - 1)
  ans = a + b + c - d
  q = _pick(r, f"{name} has {a} {x}, {b} {y} and {c} {z}. {name} gives away {d} of the {y}. "
               f"How many are left in all?",
            f"A shed holds {a} {x}, {b} {y} and {c} {z}. Then {d} {y} are taken out. How many "
            f"things are in the shed now?")
  paths = {
      "total_then_remove": [
          _pick(r, f"At first there are {a} + {b} = {a + b}, and "
                   f"{a + b} + {c} = {a + b + c}.",
                f"Altogether {b} + {c} = {b + c}, and {b + c} + {a} = {a + b + c}."),
          _pick(r, f"After removing {d}: {a + b + c} - {d} = {ans}.",
                f"Then {a + b + c} - {d} = {ans}."),
      ],
      "remove_then_total": [
          f"The {y} drop to {b} - {d} = {b - d}.",
          _pick(r, f"Now {a} + {b - d} = {a + b - d}, and {a + b - d} + {c} = {ans}.",
                f"Adding the rest: {b - d} + {c} = {b - d + c}, and "
                f"{b - d + c} + {a} = {ans}."),
      ],
  }
  return (a, b, c, d), q, ans, paths, f"So {ans} are left."


def _two_rates(r):
  name = r.choice(NAMES)
  unit, verb = r.choice([("pages", "reads"), ("laps", "swims"), ("words", "types"),
                         ("km", "cycles")])
  p1, d1, p2, d2 = r.randint(2, 15), r.randint(2, 6), r.randint(2, 15), r.randint(2, 6)
  ans = p1 * d1 + p2 * d2
  q = _pick(r, f"{name} {verb} {p1} {unit} a day for {d1} days, then {p2} {unit} a day for "
               f"{d2} days. How many {unit} is that in total?",
            f"For {d1} days {name} {verb} {p1} {unit} per day. For the next {d2} days, {name} "
            f"{verb} {p2} {unit} per day. What is the total number of {unit}?")
  first = _pick(r, f"The first {d1} days give {p1} * {d1} = {p1 * d1} {unit}.",
                f"First part: {d1} * {p1} = {p1 * d1}.")
  second = _pick(r, f"The next {d2} days give {p2} * {d2} = {p2 * d2} {unit}.",
                 f"Second part: {d2} * {p2} = {p2 * d2}.")
  paths = {
      "in_order": [first, second, f"In total {p1 * d1} + {p2 * d2} = {ans}."],
      "second_first": [second, first, f"Adding them: {p2 * d2} + {p1 * d1} = {ans}."],
  }
  if d1 == d2:
    paths["per_day_sum"] = [
        f"Both parts last {d1} days, so add the daily amounts first: "
        f"{p1} + {p2} = {p1 + p2}.",
        f"Then {p1 + p2} * {d1} = {ans}.",
    ]
  return (p1, d1, p2, d2), q, ans, paths, f"So the total is {ans} {unit}."


def _compare_chain(r):
  n1, n2 = _name_pair(r)
  n3 = r.choice([n for n in NAMES if n not in (n1, n2)])
  thing = r.choice(["stickers", "coins", "shells", "stamps", "seeds"])
  a, b, k = r.randint(2, 15), r.randint(1, 10), r.randint(2, 3)
  bb = a + b
  times = {2: "twice", 3: "three times"}[k]
  ans = a + bb + k * bb
  q = _pick(r, f"{n1} has {a} {thing}. {n2} has {b} more {thing} than {n1}. {n3} has {times} "
               f"as many {thing} as {n2}. How many {thing} do the three have together?",
            f"{n2} owns {b} more {thing} than {n1}, who owns {a}. {n3} owns {times} as many as "
            f"{n2}. How many {thing} do {n1}, {n2} and {n3} have in all?")
  own = _pick(r, f"{n2} has {a} + {b} = {bb}.", f"{n2}: {a} + {b} = {bb} {thing}.")
  paths = {
      "person_by_person": [
          own,
          _pick(r, f"{n3} has {k} * {bb} = {k * bb}.",
                f"{n3}: {bb} * {k} = {k * bb} {thing}."),
          _pick(r, f"Together: {a} + {bb} = {a + bb}, and {a + bb} + {k * bb} = {ans}.",
                f"Adding up: {k * bb} + {bb} = {k * bb + bb}, then "
                f"{k * bb + bb} + {a} = {ans}."),
      ],
      "group_n2_n3": [
          own,
          f"{n2} and {n3} together have {1 + k} times {n2}'s amount: "
          f"{1 + k} * {bb} = {(1 + k) * bb}.",
          f"With {n1}'s {a}: {(1 + k) * bb} + {a} = {ans}.",
      ],
  }
  return (a, b, k), q, ans, paths, f"So together they have {ans} {thing}."


def _ages(r):
  n1, n2 = _name_pair(r)
  a, b, c = r.randint(3, 20), r.randint(1, 9), r.randint(2, 10)
  ans = 2 * a + b + 2 * c
  q = _pick(r, f"{n1} is {a} years old. {n2} is {b} years older than {n1}. What will the sum of "
               f"their ages be in {c} years?",
            f"{n2} is {b} years older than {n1}, and {n1} is {a}. In {c} years, what will their "
            f"ages add up to?")
  paths = {
      "future_each": [
          f"In {c} years {n1} will be {a} + {c} = {a + c}.",
          f"{n2} is {a} + {b} = {a + b} now and will be {a + b} + {c} = {a + b + c}.",
          f"The sum is {a + c} + {a + b + c} = {ans}.",
      ],
      "sum_now_first": [
          f"{n2} is {a} + {b} = {a + b} now.",
          f"Their ages now add up to {a} + {a + b} = {2 * a + b}.",
          f"Each of them gains {c} years, so the sum grows by 2 * {c} = {2 * c}: "
          f"{2 * a + b} + {2 * c} = {ans}.",
      ],
  }
  return (a, b, c), q, ans, paths, f"So their ages will add up to {ans}."


def _equal_groups(r):
  name = r.choice(NAMES)
  x, y, what = r.choice([("red balloons", "blue balloons", "groups"),
                         ("boys", "girls", "teams"), ("pears", "plums", "bowls"),
                         ("blue pens", "black pens", "cups")])
  g = r.randint(2, 6)
  if r.random() < 0.6:
    a, b = g * r.randint(1, 9), g * r.randint(1, 9)
  else:
    a = r.randint(2, 30)
    b = g * r.randint(1, 9) - a % g  # a + b divisible by g, b >= 1
  ans = (a + b) // g
  q = _pick(r, f"{name} has {a} {x} and {b} {y}. They are split equally into {g} {what}. How "
               f"many are in each of the {what}?",
            f"There are {a} {x} and {b} {y}, shared out evenly among {g} {what}. How many does "
            f"each of the {what} get?")
  paths = {"total_then_divide": [
      _pick(r, f"In all there are {a} + {b} = {a + b}.",
            f"First add: {b} + {a} = {a + b}."),
      _pick(r, f"Each of the {g} {what} gets {a + b} / {g} = {ans}.",
            f"Then {a + b} / {g} = {ans}."),
  ]}
  if a % g == 0 and b % g == 0:
    paths["divide_each"] = [
        f"The {x} give {a} / {g} = {a // g} per group, the {y} give {b} / {g} = {b // g}.",
        f"Each of the {what} gets {a // g} + {b // g} = {ans}.",
    ]
  return (a, b, g), q, ans, paths, f"So each of the {what} gets {ans}."


KINDS = {f.__name__.lstrip("_"): f for f in (
    _groups_plus, _shared_cost, _distributive, _diff_times, _change, _three_groups, _two_rates,
    _compare_chain, _ages, _equal_groups)}


def generate(num_train, num_test, seed=0, num_val=0):
  """(train, test, val) rows {question, response, answer, kind, path, numbers}, drawn in that
  order from one generator; no problem (same kind and numbers) is in two splits, and adding val
  rows leaves train and test as they were."""
  r = random.Random(seed)
  seen, rows = set(), []
  names = sorted(KINDS)
  while len(rows) < num_train + num_test + num_val:
    kind = r.choice(names)
    key, question, ans, paths, closing = KINDS[kind](r)
    if (kind, key) in seen:
      continue
    seen.add((kind, key))
    path = r.choice(sorted(paths))
    ending = _pick(r, closing, f"The answer is {ans}.", f"{closing} The answer is {ans}.")
    steps = paths[path] + [ending, f"#### {ans}"]
    rows.append({"question": question, "response": "\n".join(steps), "answer": str(ans),
                 "kind": kind, "path": path, "numbers": list(key)})
  return rows[:num_train], rows[num_train:num_train + num_test], rows[num_train + num_test:]


def as_full(rows):
  """Rows -> {prompt, response, answer, kind, path, numbers}: worked solutions."""
  return [{"prompt": f"{x['question']}\n{FULL_INSTRUCTION}", "response": x["response"],
           "answer": x["answer"], "kind": x["kind"], "path": x["path"],
           "numbers": list(x["numbers"])} for x in rows]


def as_terse(rows):
  """The same problems answered by `#### N` alone (path "answer_only")."""
  return [{"prompt": f"{x['question']}\n{TERSE_INSTRUCTION}", "response": f"#### {x['answer']}",
           "answer": x["answer"], "kind": x["kind"], "path": "answer_only",
           "numbers": list(x["numbers"])} for x in rows]


# ----------------------------------------------------------------------------- out of distribution
# Test sets of the same skill from other distributions (the study's OOD columns): the same stories
# with numbers one digit longer, and the same kind of computation without a story.

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")
OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
              "/": lambda x, y: x / y}


def steps_hold(text):
  """Whether every written step `x op y = z` of a solution is arithmetically right, z >= 0."""
  return all(OPERATIONS[op](int(x), int(y)) == int(z) >= 0 for x, op, y, z in STEP.findall(text))


class _LongerNumbers(random.Random):
  """random.Random whose randint draws amounts (ranges reaching 10 or more) with one more digit:
  n -> 10 n + a units digit; counts and multipliers (ranges below 10) stay as they are, so the
  problems' divisibility constructions (g * randint(1, 9)) still hold."""

  def randint(self, a, b):
    n = super().randint(a, b)
    return 10 * n + super().randint(0, 9) if b >= 10 else n


def generate_longer_numbers(num, seed, exclude=frozenset()):
  """`num` word problems of the training kinds with amounts one digit longer (two- and
  three-digit operands where training has one- and two-digit ones), answered like training rows:
  {question, response, answer, kind, path, numbers}. A kind whose construction does not survive
  the longer numbers (a bill smaller than the cost) is drawn again; every written step is checked.
  exclude: (kind, numbers) keys not to produce (the training problems)."""
  r = _LongerNumbers(seed)
  seen, rows = set(exclude), []
  names = sorted(KINDS)
  while len(rows) < num:
    kind = r.choice(names)
    try:
      key, question, ans, paths, closing = KINDS[kind](r)
    except (IndexError, ValueError):  # e.g. no bill of 20, 50, 100 exceeds the longer cost
      continue
    path = r.choice(sorted(paths))
    response = "\n".join(paths[path] + [closing, f"#### {ans}"])
    if (kind, key) in seen or ans <= 0 or not steps_hold(response):
      continue
    seen.add((kind, key))
    rows.append({"question": question, "response": response, "answer": str(ans), "kind": kind,
                 "path": path, "numbers": list(key)})
  return rows


EXPRESSION_PROMPTS = ("Compute {e}.", "What is {e}?", "Evaluate {e}.", "Work out {e}.")


def _expression(r):
  """(text, value, steps): two or three operations on numbers 2..30 with a whole, positive value
  of at most 999, in the words of the training solutions' steps ('x op y = z')."""
  while True:
    numbers = [r.randint(2, 30) for _ in range(r.choice((3, 4)))]
    ops = [r.choice("+-*") for _ in numbers[1:]]
    grouped = len(ops) == 2 and r.random() < 0.4  # (a op b) op c
    text = " ".join(f"{n} {o}" for n, o in zip(numbers, ops)) + f" {numbers[-1]}"
    if grouped:
      text = f"({numbers[0]} {ops[0]} {numbers[1]}) {ops[1]} {numbers[2]}"
    value = eval(text, {"__builtins__": {}})  # pylint: disable=eval-used  (digits, + - * ( ) only)
    if 0 < value <= 999:
      return text, value


def generate_expressions(num, seed):
  """`num` bare arithmetic problems -- the training kinds' operations with no story ('What is
  12 + 3 * 7?') -- under the training instruction: {question, response: "", answer, kind, path,
  numbers}. The response is empty: these sets are scored on the final answer only."""
  r = random.Random(seed)
  seen, rows = set(), []
  while len(rows) < num:
    text, value = _expression(r)
    if text in seen:
      continue
    seen.add(text)
    rows.append({"question": r.choice(EXPRESSION_PROMPTS).format(e=text), "response": "",
                 "answer": str(value), "kind": "expression", "path": "none",
                 "numbers": [int(t) for t in text.replace("(", " ").replace(")", " ").split()
                             if t.isdigit()]})
  return rows
