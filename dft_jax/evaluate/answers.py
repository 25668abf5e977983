"""Answer scoring: math answers by math-verify, accuracy, avg@k and unbiased pass@k over replies.

In-domain replies (`#### N`, `\\boxed{N}`, 'answer is N') are checked by `dft_jax.data.is_correct`,
facts by `dft_jax.data.matches_fact`; this module adds the MATH500-style check and the metrics.
"""
import numpy as np

from dft_jax.data.answers import extract_answer


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


def final_answer(text):
  """The final answer a solution states: the content of its last `\\boxed{...}` (nested braces
  kept), else what follows its last `#### ` on that line; None when it states neither."""
  start = text.rfind("\\boxed{")
  if start >= 0:
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      if depth == 0:
        return text[i + 1:j].strip() or None
    return None
  hashes = text.rfind("####")
  if hashes >= 0:
    return text[hashes + 4:].strip().split("\n")[0].strip() or None
  return None


def stated_answer(text):
  """What a reply states as its final answer: final_answer's \\boxed{} or `#### N`, else the
  number after its last 'answer is' (data.extract_answer); None when it states none."""
  return final_answer(text) or extract_answer(text)


def _parsed(text):
  """math-verify's parse of a final answer (final_answer's, read as LaTeX), else of the text."""
  stated = final_answer(text)
  return (math_answer(f"${stated}$") if stated else []) or math_answer(text)


def is_math_correct(reply, answer):
  """Whether the reply's final answer equals `answer` (a MATH500 answer, LaTeX without $) up to
  symbolic equivalence, as math-verify decides (e.g. \\frac12 = 0.5; x^2+2x+1 = (x+1)^2). The
  reply's final answer is its last \\boxed{} or `#### N` (final_answer), else what math-verify
  finds in it."""
  from math_verify import verify  # pylint: disable=g-import-not-at-top
  gold = math_answer(f"${answer}$") or math_answer(str(answer))
  predicted = _parsed(reply)
  return bool(gold) and bool(predicted) and bool(verify(gold, predicted))


def accuracy_metrics(correct_NxK, prefix):
  """{prefix}n and {prefix}accuracy (k = 1 reply per row), or, with k > 1 replies per row,
  {prefix}avg@k = mean over all replies and {prefix}pass@k = mean over rows of pass_at_k (prefix
  ends in its separator: "math_", "NAME/")."""
  c = np.asarray(correct_NxK, bool)
  n, k = c.shape
  out = {f"{prefix}n": n}
  if k == 1:
    out[f"{prefix}accuracy"] = float(c[:, 0].mean())
  else:
    out[f"{prefix}avg@{k}"] = float(c.mean())
    out[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(k, int(r.sum()), k) for r in c]))
  return out
