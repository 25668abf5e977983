"""Evaluation sets: where an evaluation's rows come from and which of their fields hold what, as
data.* says it for the training data.

A set is written `SOURCE[,FIELD=VALUE...]` (eval.in_domain, eval.math_file, eval.general_prompts,
eval.factual_qa, eval.heldout_text) or, as an entry of eval.sets, `NAME=SOURCE[,FIELD=VALUE...]`;
in a config file an entry may also be a dict of the same fields (`dict(name=..., source=...)`).
Fields:
  source          builtin:NAME | a file or glob | a save_to_disk folder | a hub name (data.source's)
  split, subset   the split (default: test for a hub name, train for files), the hub config name
  format          prompt_response | messages | text (data.format's)
  prompt_field, response_field, answer_field, messages_field, text_field, aliases_field
                  the row fields holding each part (dotted keys reach nested fields: a.b)
  num             rows used (default: all, or the count field of eval.* that reads the set)
  kind            eval.sets only: answers (greedy replies, the final answer checked against the
                  answer field by math-verify), forced (teacher-forced target probability, NLL and
                  their histogram on the reference replies), kl (KL(base || model), entropy and
                  perplexity teacher-forced on the set's text or replies)
  max_new_tokens  answers: reply length (default eval.math_max_new_tokens)
  system_prompt   answers: system turn of the prompts (default data.system_prompt)

  eval.sets=("test=my_test.jsonl,kind=answers,prompt_field=question",
             "chat=ultrachat.jsonl,kind=kl,format=messages")
  --config.eval.sets='test=my_test.jsonl,kind=answers,prompt_field=question;chat=...'
  --config.eval.in_domain='my_test.jsonl,prompt_field=question,response_field=solution'

Errors name the config field that gave the set, the file and row, and what to set.
"""
import dataclasses
import os
import re

import ml_collections

from dft_jax.data import formats
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError

KINDS = ("answers", "forced", "kl")
ROLES = ("prompt", "response", "answer", "messages", "text", "aliases")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
RESERVED_NAMES = ("sets", "samples", "seconds")  # keys of an evaluation's results
INTEGER_FIELDS = ("num", "max_new_tokens")


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One evaluation set, resolved: `where` is the config field that gave it (eval.in_domain,
  eval.sets[1]); `named` whether it is an eval.sets entry (`NAME=SOURCE,...`)."""
  where: str
  source: str
  name: str = ""
  kind: str = ""
  named: bool = False
  split: str | None = None
  subset: str | None = None
  format: str = "prompt_response"
  prompt_field: str = "prompt"
  response_field: str = "response"
  answer_field: str = "answer"
  messages_field: str = "messages"
  text_field: str = "text"
  aliases_field: str = "aliases"
  num: int | None = None
  max_new_tokens: int | None = None
  system_prompt: str | None = None

  def field(self, role):
    """The row field holding `role` (prompt, response, answer, ...)."""
    return getattr(self, f"{role}_field")

  def how_to_set(self, role):
    """How to tell this set which field holds `role`: the spec with `ROLE_field=NAME` added (the
    training data, where="data": its data.ROLE_field)."""
    if self.where == "data":
      return f"--config.data.{role}_field=NAME"
    written = f"{self.name}={self.source}" if self.named else self.source
    spec = f"'{written},{role}_field=NAME'"
    return f"{spec} in eval.sets" if self.named else f"--config.{self.where}={spec}"

  @property
  def default_split(self):
    return self.split or ("test" if is_hub_name(self.source) else "train")


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(EvalSet) if f.name not in ("where", "named"))


def is_hub_name(spec):
  """ORG/NAME that is no local path: a hub dataset (MATH-500 there has only a 'test' split)."""
  return (not spec.startswith(("builtin:", ".", "/", "~")) and not os.path.exists(spec)
          and not any(c in spec for c in "*?[") and spec.count("/") == 1)


def parse(spec, where, named=False):
  """A set as written (`[NAME=]SOURCE[,FIELD=VALUE...]`, or a dict) -> {field: value}; ConfigError
  naming `where` when it cannot be read."""
  form = "NAME=SOURCE[,FIELD=VALUE...]" if named else "SOURCE[,FIELD=VALUE...]"
  if hasattr(spec, "items"):
    fields = dict(spec.items())
  elif isinstance(spec, str) and spec.strip():
    head, *rest = [part.strip() for part in spec.split(",")]
    fields = {}
    if named:
      name, equals, source = head.partition("=")
      if not equals:
        raise ConfigError(f"{where}={spec!r}: expected {form}, e.g. "
                          "'test=my_test.jsonl,kind=answers,prompt_field=question'")
      fields.update(name=name.strip(), source=source.strip())
    else:
      fields["source"] = head
    for item in rest:
      key, equals, value = item.partition("=")
      if not equals:
        raise ConfigError(f"{where}={spec!r}: {item!r} is not FIELD=VALUE (the form is {form})")
      fields[key.strip()] = None if value.strip().lower() == "none" else value.strip()
  else:
    raise ConfigError(f"{where}={spec!r}: expected {form}")
  unknown = sorted(set(fields) - set(SPEC_FIELDS))
  if unknown:
    raise ConfigError(f"{where}={spec!r}: unknown field(s) {', '.join(unknown)}; a set has "
                      f"{', '.join(SPEC_FIELDS)}")
  for key in INTEGER_FIELDS:
    if fields.get(key) is not None:
      value = fields[key]
      if not (isinstance(value, int) or str(value).isdigit()) or int(value) < 1:
        raise ConfigError(f"{where}: {key}={value!r} must be a positive integer")
      fields[key] = int(value)
  return fields


def resolve(spec, where, defaults=None, named=False):
  """A set as written -> EvalSet (fields not written take `defaults`, then EvalSet's)."""
  fields = {**(defaults or {}), **parse(spec, where, named)}
  s = EvalSet(where=where, named=named, **fields)
  if not s.source:
    raise ConfigError(f"{where}={spec!r}: no source")
  if s.format not in formats.FORMATS:
    raise ConfigError(f"{where}: format={s.format!r}; expected one of {', '.join(formats.FORMATS)}")
  if named:
    if not NAME_PATTERN.fullmatch(s.name or "") or s.name in RESERVED_NAMES:
      raise ConfigError(f"{where}: name={s.name!r}; a set's name is letters, digits, '_', '.' "
                        f"or '-' (not {', '.join(RESERVED_NAMES)}): it names the set's metrics")
    if s.kind not in KINDS:
      raise ConfigError(f"{where} ({s.name}): kind={s.kind!r}; expected one of "
                        f"{', '.join(KINDS)} (e.g. '{s.name}={s.source},kind=answers')")
    if s.kind == "answers" and s.format != "prompt_response":
      raise ConfigError(f"{where} ({s.name}): kind=answers reads a prompt and an answer per row: "
                        f"format must be prompt_response, not {s.format!r}")
  return s


def resolve_list(specs, where="eval.sets", reserved=()):
  """eval.sets (a tuple of entries, one dict, or entries joined by ';' as the command line gives
  them) -> tuple of EvalSet; ConfigError for a repeated name or one of `reserved` (the suites')."""
  if isinstance(specs, str):
    specs = [spec for spec in specs.split(";") if spec.strip()]
  elif hasattr(specs, "items"):
    specs = (specs,)
  out = tuple(resolve(spec, f"{where}[{i}]", named=True) for i, spec in enumerate(specs or ()))
  names = [s.name for s in out]
  for s in out:
    if names.count(s.name) > 1 or s.name in reserved:
      why = "a suite's name" if s.name in reserved else "used twice"
      raise ConfigError(f"{s.where}: name={s.name!r} is {why}; every set needs its own name (it "
                        "names the set's metrics)")
  return out


def required_roles(s):
  """The fields every row of a set must have, for its kind (eval.sets) or format."""
  if s.kind == "answers":
    return ("prompt", "answer")
  return {"prompt_response": ("prompt", "response"), "messages": ("messages",),
          "text": ("text",)}[s.format]


def load(s, num=None):
  """(rows, locate) of the set: its first `num` rows (s.num first), as dicts; locate(i) names row i
  and its file. DataError naming s.where when the source cannot be read."""
  cfg = ml_collections.ConfigDict(dict(source=s.source, split=s.default_split, subset=s.subset,
                                       max_rows=s.num or num, cache_dir=None))
  try:
    source = sources.load_source(cfg)
    with source.reading():
      rows = list(source.dataset)
  except DataError as e:
    message = str(e).replace("data.source=", f"{s.where}=", 1)
    raise DataError(message.replace("data.split=", f"{s.where}: split=", 1)) from None
  return rows, source.locate


def check_rows(s, rows, locate, roles):
  """DataError naming the row, its file, the missing field, the config field that gave the set and
  what to set, for the first row lacking one of `roles`' fields."""
  for i, row in enumerate(rows):
    for role in roles:
      if formats.get_field(row, s.field(role)) is None:
        present = ", ".join(repr(k) for k, v in row.items() if v is not None)  # a file's columns
        raise DataError(                                            # are every row's: None if absent
            f"{locate(i)} has no field {s.field(role)!r}: {s.where} reads the {role} from "
            f"{role}_field={s.field(role)!r}; the row's fields are {present}; name the {role}'s "
            f"field: {s.how_to_set(role)}")
  return rows


def data_config(s, data_cfg):
  """data_cfg (the training data's: chat template, system prompt) with the set's format and fields,
  for data.Encoder."""
  cfg = ml_collections.ConfigDict(dict(data_cfg))
  cfg.update(format=s.format, prompt_field=s.prompt_field, response_field=s.response_field,
             messages_field=s.messages_field, text_field=s.text_field)
  return cfg
