"""Checks before loading: the training data and every evaluation set a run reads are opened and
their rows checked for the fields the config names before any model is loaded, so a wrong path or
field name is one line naming the file, the row and the config field to set, within seconds.

  preflight.check(config)   # the train job, before loading the model
"""
import itertools

from dft_jax import evaluate
from dft_jax.data import sources
from dft_jax.evaluate import sets as sets_lib

FIRST_ROWS = 100  # rows of the training data checked (evaluation sets: every row used)


def training_set(data_cfg):
  """config.data as an EvalSet (where="data"): its source, format and field names."""
  return sets_lib.EvalSet(
      where="data", source=data_cfg.source, format=data_cfg.format,
      prompt_field=data_cfg.prompt_field, response_field=data_cfg.response_field,
      answer_field=data_cfg.get("answer_field"), messages_field=data_cfg.messages_field,
      text_field=data_cfg.text_field)


def check_data(data_cfg):
  """The training source opens and its first FIRST_ROWS rows have the fields data.format reads
  (and data.answer_field when set); DataError naming the file, row and data.* field."""
  source = sources.load_source(data_cfg, streaming=data_cfg.streaming)
  with source.reading():
    rows = list(itertools.islice(iter(source.dataset), FIRST_ROWS))
  s = training_set(data_cfg)
  roles = sets_lib.required_roles(s) + (("answer",) if s.answer_field else ())
  sets_lib.check_rows(s, rows, source.locate, roles)


def check(config):
  """The training data, then every evaluation set the run will score (when it evaluates)."""
  check_data(config.data)
  e = config.eval
  if e.before or e.after or e.get("every_steps"):
    evaluate.check_sets(e, config.data)
