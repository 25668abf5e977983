"""The train iterator: source -> tokenised examples -> per-epoch shuffled, packed rows -> batches.

Map-style data (the default): every process tokenises the whole source (`datasets.map`, batched,
cached), applies the truncation policy, and computes the same plan for each epoch from
(seed, epoch) alone: shuffle, best-fit pack, shuffle the rows. The epochs' rows form one endless
stream; global batch k is its rows [k G, (k + 1) G), and process p assembles only its rows
[p G / P, (p + 1) G / P) of it, reading only those examples' tokens. The state is the stream
position (epoch, row): tiny, exact, and independent of the process count and batch size.

Streaming (`data.streaming=True`): each process reads its own share of an `IterableDataset`
(`split_dataset_by_node`), shuffled with a buffer (`data.shuffle_buffer`, reseeded each epoch),
and packs windows of `data.pack_window` rows as they arrive. The state is (epoch, rows consumed
before the current window, rows of that window emitted), per process; restoring re-reads and skips
the consumed rows, so a resume is exact but costs a pass over the epoch's consumed prefix.
"""
import dataclasses
import hashlib
import itertools
import json

import datasets
import datasets.distributed
import numpy as np
from absl import logging

from dft_jax.data import formats
from dft_jax.data import holdout
from dft_jax.data import packing
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError, check_number

STATE_VERSION = 1
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "trained": datasets.List(datasets.Value("int8")),
    "num_tokens": datasets.Value("int32"),
    "num_trained": datasets.Value("int32"),
    "first_trained": datasets.Value("int32"),
})


def validate(data_cfg, *, seq_len, global_batch_size, process_count, max_segments):
  """Checks the data fields, the batch geometry and model.max_segments (the documents a packed row
  may hold, fewer than this); raises ConfigError naming the field."""
  if data_cfg.truncation not in packing.TRUNCATION:
    raise ConfigError(f"data.truncation={data_cfg.truncation!r}: expected one of "
                      f"{', '.join(packing.TRUNCATION)}")
  for name in ("max_length", "num_proc", "pack_window"):
    check_number(f"data.{name}", data_cfg[name], integer=True, minimum=1)
  check_number("data.shuffle_buffer", data_cfg.shuffle_buffer, integer=True, minimum=0)
  check_number("data.max_rows", data_cfg.max_rows, integer=True, minimum=1, optional=True)
  check_number("data.shuffle_seed", data_cfg.shuffle_seed, integer=True, minimum=0, optional=True)
  holdout.check(data_cfg)
  packing.check_max_segments(max_segments)
  if seq_len < 2:
    raise ConfigError(f"seq_len={seq_len}: must be >= 2")
  if data_cfg.max_length > seq_len:
    raise ConfigError(f"data.max_length={data_cfg.max_length} exceeds train.seq_len={seq_len}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                      f"process count ({process_count})")


def make_train_iterator(data_cfg, tokenizer, *, seq_len, global_batch_size, seed, max_segments,
                        process_index=None, process_count=None):
  """The endless iterator of this process's batches (see the module docstring).

  `next(it)` -> {tokens, targets, loss_mask, segment_ids, positions}, numpy [G / P, seq_len], at
  most max_segments - 1 documents a row (config.model.max_segments: the attention's bound; None:
  the data's, packing.data_bound, or a stream's DEFAULT_MAX_SEGMENTS; `it.max_segments` says it);
  `it.state()` -> a small JSON-serialisable dict; `it.restore(state)`; `it.stats`; `it.summary()`.
  The shuffle seed is `data.shuffle_seed`, or `seed` when that is None.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  validate(data_cfg, seq_len=seq_len, global_batch_size=global_batch_size,
           process_count=process_count, max_segments=max_segments)
  source = sources.load_source(data_cfg, streaming=data_cfg.streaming)
  source, _, held_out = holdout.split(source, data_cfg)
  if data_cfg.streaming and (data_cfg.shuffle_buffer or process_count > 1):
    # rows arrive reordered: name their place in this process's stream, not in the file
    source = dataclasses.replace(source, locate=sources.RowLocator(
        f"this process's shuffled stream of {source.locate.source}"))
  encoder = formats.Encoder(data_cfg, tokenizer, source.locate)
  _check_columns(source, data_cfg)
  kwargs = dict(seq_len=seq_len, global_batch_size=global_batch_size,
                seed=seed if data_cfg.shuffle_seed is None else data_cfg.shuffle_seed,
                max_segments=max_segments, process_index=process_index,
                process_count=process_count,
                pad_id=_pad_id(tokenizer))
  if data_cfg.streaming:
    it = StreamingIterator(source, encoder, data_cfg, **kwargs)
  else:
    it = PackedIterator(tokenize(source, encoder, data_cfg), source, data_cfg, **kwargs)
  it.stats["held_out"] = held_out
  logging.info("%s", it.summary())
  return it


def tokenize(source, encoder, data_cfg):
  """Map-style source -> Dataset of formats.COLUMNS (batched `datasets.map`, cached on disk for
  file-backed sources under a fingerprint of the data, the tokenizer and the format fields)."""
  ds = source.dataset
  fingerprint = hashlib.sha256(json.dumps([
      ds._fingerprint,  # pylint: disable=protected-access
      STATE_VERSION, formats.VERSION, encoder.tokenizer.backend_tokenizer.to_str(),
      encoder.template, encoder.eos_id, sorted(encoder.special_ids), data_cfg.format,
      formats.fields_of(data_cfg), data_cfg.system_prompt, data_cfg.loss_on]).encode()).hexdigest()
  # the JSON-lines reader keeps bytes that are not UTF-8; they fail when a row becomes Python
  with source.reading(UnicodeDecodeError):
    return ds.map(encoder, batched=True, with_indices=True, remove_columns=ds.column_names,
                  features=_FEATURES, num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 else None,
                  new_fingerprint=fingerprint[:32], desc="tokenising")


class _Batches:
  """Shared by both iterators: batch assembly, stats and the summary line."""

  def __init__(self, source, data_cfg, *, seq_len, global_batch_size, seed, max_segments,
               process_index, process_count, pad_id):
    self.source, self.cfg = source, data_cfg
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
    self.max_segments = max_segments
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.pad_id = pad_id
    self.limit = min(data_cfg.max_length, seq_len)
    self.stats = {"rows": 0, "kept": 0, "dropped": {}, "tokens": 0, "loss_tokens": 0,
                  "packed_rows": 0, "most_docs_per_row": 0}

  def __iter__(self):
    return self

  def _crop(self, meta, first_index):
    """Truncation policy over a block of examples; counts drops; -> (kept, start, length)."""
    start, length, reason = packing.crop(meta["num_tokens"], meta["first_trained"],
                                         meta["num_trained"], self.limit, self.cfg.truncation)
    self.stats["rows"] += len(reason)
    for code in np.unique(reason[reason != packing.KEPT]).tolist():
      key = packing.REASONS[code]
      self.stats["dropped"][key] = self.stats["dropped"].get(key, 0) + int((reason == code).sum())
      if self.cfg.error_on_dropped:
        first = first_index + int(np.flatnonzero(reason == code)[0])
        raise DataError(f"{self.source.locate(first)} is {key} (max_length={self.limit}, "
                        f"truncation={self.cfg.truncation!r}) and data.error_on_dropped=True")
    kept = np.flatnonzero(reason == packing.KEPT)
    return kept, start[kept], length[kept]

  def _count(self, lengths, loss_tokens, rows):
    self.stats["kept"] += len(lengths)
    self.stats["tokens"] += int(np.sum(lengths))
    self.stats["loss_tokens"] += int(np.sum(loss_tokens))
    self.stats["packed_rows"] += len(rows)
    self.stats["most_docs_per_row"] = max([self.stats["most_docs_per_row"], *map(len, rows)])

  def summary(self):
    s = self.stats
    dropped = sum(s["dropped"].values())
    why = ", ".join(f"{n} {k}" for k, n in s["dropped"].items())
    if dropped:
      why = f" ({why}; max_length={self.limit}, truncation={self.cfg.truncation})"
    slots = max(s["packed_rows"], 1) * self.seq_len
    held = (f" ({s['held_out']} more held out for evaluation: data.eval_holdout)"
            if s.get("held_out") else "")
    return (f"data {self.cfg.source}: {s['rows']} rows read{held}, {s['kept']} kept, {dropped} "
            f"dropped{why}; {s['packed_rows']} {'packed' if self.cfg.packing else 'padded'} rows of "
            f"{self.seq_len} tokens{self._scope}: {100 * s['tokens'] / slots:.1f}% real tokens, "
            f"{100 * s['loss_tokens'] / slots:.1f}% loss tokens, most documents in a row: "
            f"{s['most_docs_per_row']} (model.max_segments={self.max_segments})")

  def _batch(self, rows):
    return packing.assemble(rows, self.seq_len, self.pad_id, self.max_segments)

  def _pack(self, lengths, rng):
    return packing.plan_epoch(lengths, self.seq_len, rng, self.cfg.packing, self.max_segments)


class PackedIterator(_Batches):
  """Endless batches over map-style data; the state is (epoch, row) in the stream of rows."""

  _scope = " per epoch"

  def __init__(self, tokenized, source, data_cfg, **kwargs):
    super().__init__(source, data_cfg, **kwargs)
    self._tokens = tokenized.select_columns(["input_ids", "trained"]).with_format("arrow")
    meta = tokenized.select_columns(["num_tokens", "num_trained", "first_trained"]).with_format(
        "numpy")[:]
    self._index, self._start, self._length = self._crop(meta, 0)
    if not len(self._index):
      raise DataError(f"no usable rows in {data_cfg.source}: {self.summary()}")
    if self.max_segments is None:  # model.max_segments None: the data's bound
      self.max_segments = packing.data_bound(self._length, self.seq_len, data_cfg.packing)
    loss = meta["num_trained"][self._index]
    cut = np.flatnonzero(self._length < meta["num_tokens"][self._index])
    for k, (_, trained) in zip(cut, self._examples(cut)):
      loss[k] = trained[1:].sum()
    self._plans = {}
    self._count(self._length, loss, self._plan(0))
    self.stats["batches_per_epoch"] = self.stats["packed_rows"] / self.global_batch_size
    self._fingerprint = hashlib.sha256(b"".join(
        np.ascontiguousarray(a, np.int64).tobytes()
        for a in (self._index, self._start, self._length,
                  [self.seq_len, self.cfg.packing, self.max_segments])
    )).hexdigest()[:16]
    self.epoch, self.row = 0, 0

  def _plan(self, epoch):
    if epoch not in self._plans:
      self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
      rng = np.random.default_rng([self.seed, epoch])
      self._plans[epoch] = self._pack(self._length, rng)
    return self._plans[epoch]

  def _examples(self, ks):
    """(ids, trained) of kept examples `ks`, cropped, read from the tokenised Arrow table."""
    if not len(ks):
      return []
    table = self._tokens[self._index[np.asarray(ks)]]
    columns = [table.column(c).combine_chunks() for c in ("input_ids", "trained")]
    (ids_off, ids), (tr_off, tr) = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in columns]
    out = []
    for j, k in enumerate(ks):
      a, b = self._start[k], self._start[k] + self._length[k]
      out.append((ids[ids_off[j] + a:ids_off[j] + b], tr[tr_off[j] + a:tr_off[j] + b]))
    return out

  def __next__(self):
    rows = []
    while len(rows) < self.global_batch_size:
      plan = self._plan(self.epoch)
      take = plan[self.row:self.row + self.global_batch_size - len(rows)]
      rows += take
      self.row += len(take)
      if self.row == len(plan):
        self.epoch, self.row = self.epoch + 1, 0
    mine = rows[self.process_index * self.local_batch_size:
                (self.process_index + 1) * self.local_batch_size]
    examples = iter(self._examples([k for row in mine for k in row]))
    return self._batch([[next(examples) for _ in row] for row in mine])

  def state(self):
    return {"kind": "map", "version": STATE_VERSION, "epoch": self.epoch, "row": self.row,
            "seed": self.seed, "fingerprint": self._fingerprint}

  def restore(self, state):
    _check_state(state, {"kind": "map", "version": STATE_VERSION, "seed": self.seed,
                         "fingerprint": self._fingerprint})
    if not 0 <= state["row"] < len(self._plan(state["epoch"])):
      raise DataError(f"iterator state row={state['row']} is outside epoch {state['epoch']}")
    self.epoch, self.row = int(state["epoch"]), int(state["row"])


class StreamingIterator(_Batches):
  """Endless batches over an IterableDataset, packed window by window (see the module docstring)."""

  _scope = " so far"

  def __init__(self, source, encoder, data_cfg, **kwargs):
    super().__init__(source, data_cfg, **kwargs)
    if self.max_segments is None:  # a stream's lengths are not known before it is read
      self.max_segments = packing.DEFAULT_MAX_SEGMENTS
    ds = source.dataset
    if self.process_count > 1:
      ds = datasets.distributed.split_dataset_by_node(ds, self.process_index, self.process_count)
    if data_cfg.shuffle_buffer:
      ds = ds.shuffle(seed=self.seed, buffer_size=data_cfg.shuffle_buffer)
    self._ds, self._encoder = ds, encoder
    settings = [data_cfg.source, self.seq_len, data_cfg.packing, self.max_segments, self.limit,
                data_cfg.truncation, data_cfg.pack_window, data_cfg.shuffle_buffer]
    self._settings = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    self._start_epoch(0, 0)

  def _start_epoch(self, epoch, skip):
    """Positions the stream at row `skip` of `epoch` (re-reading the rows before it) and packs the
    window that starts there."""
    self.epoch, self.consumed, self.row = epoch, skip, 0
    self._usable = skip > 0  # any usable row this epoch? (an epoch entered mid-way is not judged)
    self._ds.set_epoch(epoch)
    self._rows_it = iter(self._ds)
    self._read(skip)
    self._next_window()

  def _read(self, n):
    with self.source.reading():
      return list(itertools.islice(self._rows_it, n))

  def _next_window(self):
    """Reads, tokenises, crops and packs the next `data.pack_window` rows of this epoch."""
    raw = self._read(self.cfg.pack_window)
    self._window, self._window_size = [], len(raw)
    if not raw:
      return
    columns = {k: [r[k] for r in raw] for k in raw[0]}
    encoded = self._encoder(columns, list(range(self.consumed, self.consumed + len(raw))))
    meta = {k: np.asarray(encoded[k]) for k in ("num_tokens", "num_trained", "first_trained")}
    kept, start, length = self._crop(meta, self.consumed)
    examples = [(np.asarray(encoded["input_ids"][k][a:a + n], np.int32),
                 np.asarray(encoded["trained"][k][a:a + n], np.int32))
                for k, a, n in zip(kept.tolist(), start.tolist(), length.tolist())]
    rng = np.random.default_rng([self.seed, self.epoch, self.consumed])
    self._window = [[examples[i] for i in row] for row in self._pack(length, rng)]
    self._usable |= bool(self._window)
    self._count(length, [t[1:].sum() for _, t in examples], self._window)

  def __next__(self):
    rows = []
    while len(rows) < self.local_batch_size:
      if self.row == len(self._window):
        if not self._window_size:  # the epoch is over
          if not self._usable:
            raise DataError(f"no usable rows in {self.cfg.source}: {self.summary()}")
          self._start_epoch(self.epoch + 1, 0)
        else:
          self.consumed, self.row = self.consumed + self._window_size, 0
          self._next_window()
        continue
      take = self._window[self.row:self.row + self.local_batch_size - len(rows)]
      rows += take
      self.row += len(take)
    return self._batch(rows)

  def state(self):
    return {"kind": "streaming", "version": STATE_VERSION, "epoch": self.epoch,
            "consumed": self.consumed, "row": self.row, "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "settings": self._settings}

  def restore(self, state):
    _check_state(state, {"kind": "streaming", "version": STATE_VERSION, "seed": self.seed,
                         "process_index": self.process_index, "process_count": self.process_count,
                         "settings": self._settings})
    self._start_epoch(int(state["epoch"]), int(state["consumed"]))
    self.row = int(state["row"])


def _check_state(state, expected):
  """DataError unless `state` matches this iterator on every key of `expected`."""
  if not isinstance(state, dict):
    raise DataError(f"iterator state must be a dict, got {type(state).__name__}")
  for key, value in expected.items():
    if state.get(key) != value:
      raise DataError(f"iterator state has {key}={state.get(key)!r} but this iterator has "
                      f"{value!r}: the checkpoint was written for other data or settings")


def _check_columns(source, data_cfg):
  names = source.dataset.column_names
  if names is None:  # a stream whose columns are only known once read
    return
  for field in formats.fields_of(data_cfg):
    if not formats.has_column(names, field):
      flag = next(k for k in ("prompt_field", "response_field", "messages_field", "text_field")
                  if data_cfg[k] == field)
      raise DataError(f"field {field!r} not found in {source.locate.source} (columns: "
                      f"{', '.join(names)}); set data.{flag} to one of them")


def _pad_id(tokenizer):
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
