"""The reference's target log-probabilities, computed once over the data
(objective.ref_logp='precomputed').

iw-SFT's weight and the KL anchor read only log p_ref(target) of each token, a function of the
document that holds it (attention stays within a document and positions restart at each one), not
of the packed row: one forward-only pass of the reference (starting) model over one epoch of the
packed rows gives every document's values. They are stored in the run folder (FILE, keyed by each
document's tokens), and the train iterator's batches then carry `ref_logp` beside the tokens,
every epoch (each packs the documents anew). The train step runs no reference model: none is kept
in memory and no forward per step. The pass runs before the first step, from the starting
parameters; a resumed run reads the stored values, and the iterator's state is the data
iterator's own, so a resume is exact.
"""
import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dft_jax import data
from dft_jax import step as step_lib
from dft_jax.errors import DataError

FILE = "reference_logp.npz"


def document_key(tokens):
  """The 16-byte digest of a document's token ids: its key in the table."""
  return hashlib.blake2b(np.ascontiguousarray(tokens, np.int32).tobytes(), digest_size=16).digest()


def documents(segment_ids_BxT):
  """(row, start, end) of every document (a run of one segment id > 0) of the rows."""
  for row, ids in enumerate(segment_ids_BxT):
    starts = np.flatnonzero(np.diff(ids, prepend=0) != 0)
    ends = np.append(starts[1:], len(ids))
    for a, b in zip(starts, ends):
      if ids[a] > 0:
        yield row, a, b


def compute(batches):
  """{document key: float32 log p_ref of its tokens' targets} over host batches of tokens,
  segment_ids and ref_logp [rows, T]."""
  table = {}
  for batch in batches:
    for row, a, b in documents(batch["segment_ids"]):
      table[document_key(batch["tokens"][row, a:b])] = np.asarray(batch["ref_logp"][row, a:b],
                                                                  np.float32)
  return table


def save(path, table, fingerprint):
  keys = list(table)
  lengths = np.array([len(table[k]) for k in keys], np.int64)
  np.savez(path + ".tmp.npz", keys=np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16),
           offsets=np.concatenate([[0], np.cumsum(lengths)]),
           values=np.concatenate([table[k] for k in keys]) if keys else np.zeros(0, np.float32),
           fingerprint=np.array(fingerprint))
  os.replace(path + ".tmp.npz", path)


def load(path, fingerprint):
  """The table stored at `path`, or None when there is none or it was made for other data or
  another model (another fingerprint)."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if str(f["fingerprint"]) != fingerprint:
      return None
    offsets, values = f["offsets"], f["values"]
    return {bytes(k): values[offsets[i]:offsets[i + 1]] for i, k in enumerate(f["keys"])}


def fingerprint(config):
  """What the stored values depend on: the data, the reference model and its dtypes."""
  fields = {k: config.to_dict()[k] for k in ("data", "lora")}
  fields["model"] = {k: config.model[k] for k in ("name", "param_dtype", "compute_dtype")}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class WithReferenceLogp:
  """The train iterator with `ref_logp` [rows, T] in every batch, assembled from the table like
  the tokens (0 on padding); state, restore, stats and summary are the data iterator's."""

  def __init__(self, data_iter, table):
    self.data_iter, self.table = data_iter, table
    self.stats = data_iter.stats

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.data_iter)
    ref_logp = np.zeros(batch["tokens"].shape, np.float32)
    for row, a, b in documents(batch["segment_ids"]):
      values = self.table.get(document_key(batch["tokens"][row, a:b]))
      if values is None:
        raise DataError(f"a document of {b - a} tokens (batch row {row}) has no precomputed "
                        f"reference log-probabilities in {FILE}: delete it to compute them again")
      ref_logp[row, a:b] = values
    return dict(batch, ref_logp=ref_logp)

  def state(self):
    return self.data_iter.state()

  def restore(self, state):
    self.data_iter.restore(state)

  def summary(self):
    return self.data_iter.summary()


def one_epoch(config, tokenizer):
  """This process's batches of the data's first epoch (the last may reach into the second)."""
  t = config.train
  it = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                global_batch_size=t.global_batch_size, seed=t.seed,
                                max_segments=config.model.max_segments)
  while True:
    yield next(it)
    if it.state()["epoch"] > 0:
      return


def attach(data_iter, config, workdir, tokenizer, graphdef, state, frozen, mesh):
  """data_iter with `ref_logp` in its batches: the stored table of the run folder, or one pass of
  the reference model over an epoch (state: the starting parameters; with LoRA the base, its
  adapters off, is the reference) whose table is stored there first."""
  path, key = os.path.join(workdir, FILE), fingerprint(config)
  table = load(path, key)
  if table is None:
    started = time.time()
    forward = step_lib.make_reference_logp(graphdef, config, mesh)
    starting = step_lib.Frozen(base=frozen.base,
                               reference=state.params if frozen.base is None else None)

    def gathered(local):  # every process's rows with their reference log-probs, on the host
      logp = forward(state.params, starting, step_lib.global_batch(local, mesh))
      rows = {k: multihost_utils.process_allgather(local[k], tiled=True)
              for k in ("tokens", "segment_ids")}
      return dict(rows, ref_logp=np.asarray(multihost_utils.process_allgather(logp, tiled=True)))
    table = compute(map(gathered, one_epoch(config, tokenizer)))
    if jax.process_index() == 0:
      save(path, table, key)
    logging.info("reference log-probabilities of %d documents precomputed in %.1f s (%s)",
                 len(table), time.time() - started, path)
  return WithReferenceLogp(data_iter, table)

