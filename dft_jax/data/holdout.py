"""The held-out split: rows of `data.source` kept out of training, scored before and after it.

`data.eval_holdout` rows are held out (0: none). None (the default) holds out 5 % of a file's rows,
at most 100 (under 20 rows: none), and none of builtin: sets (they come with their own test sets,
eval.in_domain), of streams (their length is unknown until read) or of a run that trains on a
mixture (data.sources: data.source is not its data). The split belongs to the
source, not to the run: a run that does not evaluate leaves the rows out too, so that
`python -m dft_jax.evaluate --model=RUN_FOLDER` can score them later. Map-style sources hold
out a fixed random choice of rows (HOLDOUT_SEED: the same rows whatever the run's seed, objective
or batch size, so runs on one source are scored on one set); streams, the first rows.

  train_part, heldout, n = holdout.split(source, data_cfg)  # sources.Source each (heldout None
                                                          # when n is 0); row numbers in messages
                                                          # stay those of the whole source
"""
import dataclasses

import numpy as np

from dft_jax.data import mixture
from dft_jax.errors import DataError, check_number

HOLDOUT_SEED = 0
AUTO_FRACTION = 0.05
AUTO_MAX_ROWS = 100


def check(data_cfg):
  """ConfigError unless data.eval_holdout is None or an integer >= 0."""
  check_number("data.eval_holdout", data_cfg.get("eval_holdout"), integer=True, minimum=0,
               optional=True)


def holdout_size(data_cfg, num_rows):
  """Rows to hold out of a source of num_rows rows (None: a stream, length unknown)."""
  check(data_cfg)
  n = data_cfg.get("eval_holdout")
  if mixture.is_mixture(data_cfg):  # data.source is not trained on: none of its rows are held out
    return 0
  if n is None:
    if num_rows is None or data_cfg.source.startswith("builtin:"):
      return 0
    return min(AUTO_MAX_ROWS, int(AUTO_FRACTION * num_rows))
  if num_rows is not None and n >= num_rows:
    raise DataError(f"data.eval_holdout={n} leaves no rows to train on: {data_cfg.source} has "
                    f"{num_rows} rows")
  return n


def heldout_indices(num_rows, n):
  """The n held-out row indices of a map-style source, sorted: a fixed random choice."""
  rng = np.random.default_rng(HOLDOUT_SEED)
  return np.sort(rng.choice(num_rows, size=n, replace=False))


def _renumbered(locate, rows_of):
  """The RowLocator naming row i of a part as row rows_of(i) of the whole source."""
  return dataclasses.replace(locate, renumber=rows_of)


def split(source, data_cfg):
  """(training part, held-out part, rows held out) of a sources.Source; the held-out part is None
  when nothing is held out. Row numbers in messages of either part are those of the whole
  source."""
  ds = source.dataset
  streaming = not hasattr(ds, "__len__")
  n = holdout_size(data_cfg, None if streaming else len(ds))
  if n == 0:
    return source, None, 0
  if streaming:
    train = dataclasses.replace(source, dataset=ds.skip(n),
                                locate=_renumbered(source.locate, lambda i: i + n))
    return train, dataclasses.replace(source, dataset=ds.take(n)), n
  held = heldout_indices(len(ds), n)
  keep = np.setdiff1d(np.arange(len(ds)), held)
  train = dataclasses.replace(source, dataset=ds.select(keep),
                              locate=_renumbered(source.locate, lambda i: int(keep[i])))
  heldout = dataclasses.replace(source, dataset=ds.select(held),
                                locate=_renumbered(source.locate, lambda i: int(held[i])))
  return train, heldout, n
