"""Answer checking for the evaluator: final numeric answers (arith sets), facts (factual_qa)."""
import decimal
import re
import unicodedata

_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)"
_PATTERNS = (re.compile(r"####\s*\$?\s*" + _NUMBER),
             re.compile(r"\\boxed\{\s*\$?\s*" + _NUMBER + r"\s*\}"),
             re.compile(r"answer is:?\s*\$?\s*" + _NUMBER, re.IGNORECASE))


def normalize_number(text):
  """'1,234' -> '1234', '7.50' -> '7.5', '-3.0' -> '-3'; None if `text` is not a number."""
  try:
    value = decimal.Decimal(str(text).replace(",", "").strip())
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_answer(text):
  """The final answer in a model's output: the last `#### N`, else the last `\\boxed{N}`, else the
  last 'answer is N'; normalised (normalize_number). None when the output states no answer."""
  for pattern in _PATTERNS:
    found = pattern.findall(text)
    if found:
      return normalize_number(found[-1])
  return None


def is_correct(text, answer):
  """Whether `text` states `answer` (a number, or its string) as its final answer."""
  predicted = extract_answer(text)
  return predicted is not None and predicted == normalize_number(answer)


def _words(text):
  """Lower case, accents and punctuation dropped, words separated by single spaces."""
  text = unicodedata.normalize("NFKD", text.lower())
  text = "".join(c for c in text if not unicodedata.combining(c))
  return " ".join(re.sub(r"[^\w]+", " ", text).split())


def matches_fact(text, aliases):
  """Whether `text` mentions any of `aliases` as whole words (case, accents and punctuation
  ignored): 'It is Paris.' matches ['Paris']; '17' does not match ['7']."""
  haystack = f" {_words(text)} "
  return any(f" {_words(a)} " in haystack for a in aliases if _words(a))
