"""Weighted mixtures of sources (`data.sources`): the config side and the seeded sampler.

  data.sources = (
      dict(source="math.jsonl", weight=3, prompt_field="question", response_field="solution"),
      dict(source="builtin:arith_train", weight=1, name="arith"),
      dict(source="chat/*.parquet", weight=1, format="messages", streaming=True),
  )

Each source is `data.source`'s kind of spec with a weight > 0 and, optionally, a `name` (metric
names: `source/NAME/loss`; default: the file's or set's name) and its own reading fields
(SOURCE_FIELDS); fields it leaves out are data.*'s. The chat template and system prompt are the
run's (data.chat_template, data.system_prompt): every source's prompts are rendered one way, as
evaluation renders them. With data.sources set, data.source is not read.

Sampling: the mixture is a stream of examples drawn one by one: example j comes from source s with
probability w_s / sum(w), from a categorical draw seeded by (seed, window) for each window of
data.pack_window examples (`draws`), and is that source's next usable example (its own endless,
per-epoch shuffled order, or its stream). The window is best-fit packed like a stream's window.
So each source's share of examples is its weight's share, a small source is repeated more often
than a large one, and a checkpoint's position (window, row, each source's position at the window's
start) resumes the mixture exactly (pipeline.MixtureIterator).
"""
import os
import re

import numpy as np

from dft_jax.errors import ConfigError, check_number

SOURCE_FIELDS = ("format", "prompt_field", "response_field", "messages_field", "text_field",
                 "split", "subset", "max_rows", "loss_on", "streaming")
RUN_FIELDS = ("chat_template", "system_prompt")  # one for the whole run
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DRAW_TAG = 0x6D6978  # keeps the draws' random stream apart from the packing's


def is_mixture(data_cfg):
  return bool(data_cfg.get("sources"))


def default_name(spec):
  """A source's name from its spec: builtin:arith_train -> arith_train, data/math.jsonl -> math."""
  base = spec.removeprefix("builtin:").rstrip("/")
  base = os.path.basename(base) or base
  base = re.sub(r"\.(jsonl|json|parquet|csv|txt)$", "", base)
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "source"


def source_names(data_cfg):
  """The mixture's source names in order; () for a single data.source."""
  if not is_mixture(data_cfg):
    return ()
  return tuple(entry.get("name") or default_name(entry["source"]) for entry in data_cfg.sources)


def validate(data_cfg):
  """ConfigError naming the entry and field: data.sources must be a list of dicts, each with a
  source and a weight > 0, known fields only, no run-wide field, unique names."""
  entries = data_cfg.get("sources")
  if not entries:
    return
  if not isinstance(entries, (list, tuple)):
    raise ConfigError(f"data.sources={entries!r}: expected a list of dict(source=..., weight=...)")
  allowed = ("source", "weight", "name") + SOURCE_FIELDS
  for i, entry in enumerate(entries):
    where = f"data.sources[{i}]"
    if not isinstance(entry, dict):
      raise ConfigError(f"{where}={entry!r}: expected dict(source=..., weight=...)")
    for key in entry:
      if key in RUN_FIELDS:
        raise ConfigError(
            f"{where}.{key}: the {key.replace('_', ' ')} is the run's, shared by every source "
            f"(every prompt is rendered one way, as evaluation renders it); set data.{key} instead")
      if key not in allowed:
        raise ConfigError(f"{where} has no field {key!r}; a source takes {', '.join(allowed)}")
    if not isinstance(entry.get("source"), str) or not entry["source"].strip():
      raise ConfigError(f"{where}.source={entry.get('source')!r}: expected builtin:NAME, a file, a "
                        "glob, a folder or a hub dataset name")
    if "weight" not in entry:
      raise ConfigError(f"{where} ({entry['source']}) has no weight; give weight=W > 0 (its share "
                        "of the examples is W / the sum of the weights)")
    check_number(f"{where}.weight", entry["weight"], above=0)
    name = entry.get("name") or default_name(entry["source"])
    if not NAME.match(name):
      raise ConfigError(f"{where}.name={name!r}: use letters, digits, '_', '.' and '-' (it names "
                        "the source's metrics)")
  names = source_names(data_cfg)
  for i, name in enumerate(names):
    if name in names[:i]:
      raise ConfigError(f"data.sources[{names.index(name)}] and data.sources[{i}] are both named "
                        f"{name!r}; give one of them name=...")
  if data_cfg.get("eval_holdout"):
    raise ConfigError(f"data.eval_holdout={data_cfg.eval_holdout} holds out rows of data.source, "
                      "which a mixture (data.sources) does not read; evaluate on held-out files")


def source_config(data_cfg, entry):
  """data_cfg with `entry`'s source and reading fields: the config a single-source reader takes."""
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.source = entry["source"]
    cfg.sources = ()
    cfg.eval_holdout = 0
    for key in SOURCE_FIELDS:
      if key in entry:
        cfg[key] = entry[key]
  return cfg


def weights_of(data_cfg):
  """The sources' probabilities w / sum(w), float64."""
  w = np.asarray([float(entry["weight"]) for entry in data_cfg.sources], np.float64)
  return w / w.sum()


def draws(seed, window, size, probabilities):
  """The source of each of the `size` examples of window `window`: independent categorical draws
  with the given probabilities, from a generator seeded by (seed, window) alone."""
  rng = np.random.default_rng([seed, DRAW_TAG, window])
  return rng.choice(len(probabilities), size=size, p=probabilities).astype(np.int32)
