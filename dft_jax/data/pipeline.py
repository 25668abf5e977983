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
import functools
import hashlib
import itertools
import json

import datasets
import datasets.distributed
import numpy as np
from absl import logging

from dft_jax.data import formats
from dft_jax.data import holdout
from dft_jax.data import mixture
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
  mixture.validate(data_cfg)
  packing.check_max_segments(max_segments)
  if not isinstance(data_cfg.get("allow_changed", False), bool):
    raise ConfigError(f"data.allow_changed={data_cfg.allow_changed!r}: must be True or False")
  if seq_len < 2:
    raise ConfigError(f"train.seq_len={seq_len}: must be >= 2")
  if data_cfg.max_length > seq_len:
    raise ConfigError(f"data.max_length={data_cfg.max_length} exceeds train.seq_len={seq_len}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"train.global_batch_size={global_batch_size} must be a positive multiple "
                      f"of the process count ({process_count})")


def make_train_iterator(data_cfg, tokenizer, *, seq_len, global_batch_size, seed, max_segments,
                        process_index=None, process_count=None):
  """The endless iterator of this process's batches (see the module docstring).

  `next(it)` -> {tokens, targets, loss_mask, segment_ids, positions}, numpy [G / P, seq_len], at
  most max_segments - 1 documents a row (config.model.max_segments: the attention's bound);
  `it.state()` -> a small JSON-serialisable dict; `it.restore(state)`; `it.stats`; `it.summary()`.
  The shuffle seed is `data.shuffle_seed`, or `seed` when that is None.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  validate(data_cfg, seq_len=seq_len, global_batch_size=global_batch_size,
           process_count=process_count, max_segments=max_segments)
  kwargs = dict(seq_len=seq_len, global_batch_size=global_batch_size,
                seed=seed if data_cfg.shuffle_seed is None else data_cfg.shuffle_seed,
                max_segments=max_segments, process_index=process_index,
                process_count=process_count,
                pad_id=_pad_id(tokenizer))
  if mixture.is_mixture(data_cfg):
    it = MixtureIterator([_open_part(data_cfg, entry, tokenizer, i, kwargs)
                          for i, entry in enumerate(data_cfg.sources)], data_cfg, **kwargs)
    logging.info("%s", it.summary())
    return it
  source = sources.load_source(data_cfg, streaming=data_cfg.streaming)
  source, _, held_out = holdout.split(source, data_cfg)
  source, encoder = _reader(source, data_cfg, tokenizer, process_count)
  if data_cfg.streaming:
    it = StreamingIterator(source, encoder, data_cfg, **kwargs)
  else:
    it = PackedIterator(tokenize(source, encoder, data_cfg), source, data_cfg, **kwargs)
  it.stats["held_out"] = held_out
  logging.info("%s", it.summary())
  return it


def _reader(source, data_cfg, tokenizer, stream_readers, whose="this process's"):
  """(source, its Encoder) with the columns checked; a stream whose rows arrive reordered (shuffled,
  or split over `stream_readers` processes) names rows by their place in `whose` stream."""
  if data_cfg.streaming and (data_cfg.shuffle_buffer or stream_readers > 1):
    source = dataclasses.replace(source, locate=sources.RowLocator(
        f"{whose} shuffled stream of {source.locate.source}"))
  encoder = formats.Encoder(data_cfg, tokenizer, source.locate)
  _check_columns(source, data_cfg)
  return source, encoder


def tokenize(source, encoder, data_cfg):
  """Map-style source -> Dataset of formats.COLUMNS (batched `datasets.map`, cached on disk for
  file-backed sources under a fingerprint of the data, the tokenizer and the format fields)."""
  ds = source.dataset
  fingerprint = hashlib.sha256(json.dumps([
      ds._fingerprint, source.digests,  # pylint: disable=protected-access
      STATE_VERSION, formats.VERSION, encoder.tokenizer.backend_tokenizer.to_str(),
      encoder.template, encoder.eos_id, sorted(encoder.special_ids), data_cfg.format,
      formats.fields_of(data_cfg), data_cfg.system_prompt, data_cfg.loss_on]).encode()).hexdigest()
  # the JSON-lines reader keeps bytes that are not UTF-8; they fail when a row becomes Python
  with source.reading(UnicodeDecodeError):
    return ds.map(encoder, batched=True, with_indices=True, remove_columns=ds.column_names,
                  features=_FEATURES, num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 else None,
                  new_fingerprint=fingerprint[:32], desc="tokenising")


def new_stats():
  return {"rows": 0, "kept": 0, "dropped": {}, "tokens": 0, "loss_tokens": 0, "packed_rows": 0,
          "most_docs_per_row": 0}


def crop_rows(meta, first_index, limit, data_cfg, locate, stats):
  """The truncation policy over a block of examples (rows first_index, ...), counting rows read
  and dropped in `stats`; -> (kept, start, length)."""
  start, length, reason = packing.crop(meta["num_tokens"], meta["first_trained"],
                                       meta["num_trained"], limit, data_cfg.truncation)
  stats["rows"] += len(reason)
  for code in np.unique(reason[reason != packing.KEPT]).tolist():
    key = packing.REASONS[code]
    stats["dropped"][key] = stats["dropped"].get(key, 0) + int((reason == code).sum())
    if data_cfg.error_on_dropped:
      first = first_index + int(np.flatnonzero(reason == code)[0])
      raise DataError(f"{locate(first)} is {key} (max_length={limit}, "
                      f"truncation={data_cfg.truncation!r}) and data.error_on_dropped=True")
  kept = np.flatnonzero(reason == packing.KEPT)
  return kept, start[kept], length[kept]


def dropped_note(stats, limit, data_cfg):
  """'N dropped (why; max_length=..., truncation=...)' of a stats dict."""
  dropped = sum(stats["dropped"].values())
  why = ", ".join(f"{n} {k}" for k, n in stats["dropped"].items())
  if dropped:
    why = f" ({why}; max_length={limit}, truncation={data_cfg.truncation})"
  return f"{dropped} dropped{why}"


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
    self.stats = new_stats()

  def __iter__(self):
    return self

  def _crop(self, meta, first_index):
    return crop_rows(meta, first_index, self.limit, self.cfg, self.source.locate, self.stats)

  def _count(self, lengths, loss_tokens, rows):
    self.stats["kept"] += len(lengths)
    self.stats["tokens"] += int(np.sum(lengths))
    self.stats["loss_tokens"] += int(np.sum(loss_tokens))
    self.stats["packed_rows"] += len(rows)
    self.stats["most_docs_per_row"] = max([self.stats["most_docs_per_row"], *map(len, rows)])

  def summary(self):
    s = self.stats
    held = (f" ({s['held_out']} more held out for evaluation: data.eval_holdout)"
            if s.get("held_out") else "")
    return (f"data {self.cfg.source}: {s['rows']} rows read{held}, {s['kept']} kept, "
            f"{dropped_note(s, self.limit, self.cfg)}; {self._packing_note()}")

  def _packing_note(self):
    s = self.stats
    slots = max(s["packed_rows"], 1) * self.seq_len
    return (f"{s['packed_rows']} {'packed' if self.cfg.packing else 'padded'} rows of "
            f"{self.seq_len} tokens{self._scope}: {100 * s['tokens'] / slots:.1f}% real tokens, "
            f"{100 * s['loss_tokens'] / slots:.1f}% loss tokens, most documents in a row: "
            f"{s['most_docs_per_row']} (model.max_segments={self.max_segments})")

  def _batch(self, rows):
    return packing.assemble(rows, self.seq_len, self.pad_id, self.max_segments)

  def _pack(self, lengths, rng):
    return packing.plan_epoch(lengths, self.seq_len, rng, self.cfg.packing, self.max_segments)


class _Examples:
  """A map-style source's tokenised examples under the truncation policy: `index` (rows kept),
  `start` and `length` (their kept tokens); `read(ks)` -> (ids, trained) of kept examples `ks`,
  from the Arrow table."""

  def __init__(self, tokenized, crop):
    self._tokens = tokenized.select_columns(["input_ids", "trained"]).with_format("arrow")
    self._meta = tokenized.select_columns(
        ["num_tokens", "num_trained", "first_trained"]).with_format("numpy")[:]
    self.index, self.start, self.length = crop(self._meta, 0)

  def loss_tokens(self):
    """Loss tokens of every kept example (a cropped one recounted from its kept tokens)."""
    loss = self._meta["num_trained"][self.index]
    cut = np.flatnonzero(self.length < self._meta["num_tokens"][self.index])
    for k, (_, trained) in zip(cut, self.read(cut)):
      loss[k] = trained[1:].sum()
    return loss

  def read(self, ks):
    if not len(ks):
      return []
    table = self._tokens[self.index[np.asarray(ks)]]
    columns = [table.column(c).combine_chunks() for c in ("input_ids", "trained")]
    (ids_off, ids), (tr_off, tr) = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in columns]
    out = []
    for j, k in enumerate(ks):
      a, b = self.start[k], self.start[k] + self.length[k]
      out.append((ids[ids_off[j] + a:ids_off[j] + b], tr[tr_off[j] + a:tr_off[j] + b]))
    return out


class PackedIterator(_Batches):
  """Endless batches over map-style data; the state is (epoch, row) in the stream of rows."""

  _scope = " per epoch"

  def __init__(self, tokenized, source, data_cfg, **kwargs):
    super().__init__(source, data_cfg, **kwargs)
    self._all = _Examples(tokenized, self._crop)
    self._index, self._start, self._length = self._all.index, self._all.start, self._all.length
    if not len(self._index):
      raise DataError(f"no usable rows in {data_cfg.source}: {self.summary()}")
    self._plans = {}
    self._count(self._length, self._all.loss_tokens(), self._plan(0))
    self.stats["batches_per_epoch"] = self.stats["packed_rows"] / self.global_batch_size
    _warn_if_a_batch_repeats(self.global_batch_size, self.stats["packed_rows"], data_cfg)
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
    examples = iter(self._all.read([k for row in mine for k in row]))
    return self._batch([[next(examples) for _ in row] for row in mine])

  def state(self):
    return {"kind": "map", "version": STATE_VERSION, "epoch": self.epoch, "row": self.row,
            "seed": self.seed, "fingerprint": self._fingerprint, "content": self.source.digests}

  def restore(self, state):
    """Continues at `state`'s position; with data.allow_changed and changed data, at the same
    (epoch, row) of the changed data's plan (the next epoch if the row is past its end)."""
    changed = _content_change(state, self.source.digests, self.cfg)
    expected = {"kind": "map", "version": STATE_VERSION, "seed": self.seed}
    if not changed:
      expected["fingerprint"] = self._fingerprint
    _check_state(state, expected)
    epoch, row = int(state["epoch"]), int(state["row"])
    if not 0 <= row < len(self._plan(epoch)):
      if not changed:
        raise DataError(f"iterator state row={row} is outside epoch {epoch}")
      epoch, row = epoch + 1, 0
    self.epoch, self.row = epoch, row


class _RowStream:
  """An IterableDataset read epoch by epoch: `open(epoch, skip)` positions it at row `skip` of
  `epoch` (re-reading the rows before it; set_epoch reshuffles a shuffled stream), `read(n)` gives
  its next n rows (library errors become one DataError naming the source's file)."""

  def __init__(self, dataset, source):
    self._dataset, self._source, self._rows = dataset, source, iter(())

  def open(self, epoch, skip):
    self._dataset.set_epoch(epoch)
    self._rows = iter(self._dataset)
    self.read(skip)

  def read(self, n):
    with self._source.reading():
      return list(itertools.islice(self._rows, n))


class StreamingIterator(_Batches):
  """Endless batches over an IterableDataset, packed window by window (see the module docstring)."""

  _scope = " so far"

  def __init__(self, source, encoder, data_cfg, **kwargs):
    super().__init__(source, data_cfg, **kwargs)
    ds = source.dataset
    if self.process_count > 1:
      ds = datasets.distributed.split_dataset_by_node(ds, self.process_index, self.process_count)
    if data_cfg.shuffle_buffer:
      ds = ds.shuffle(seed=self.seed, buffer_size=data_cfg.shuffle_buffer)
    self._stream, self._encoder = _RowStream(ds, source), encoder
    settings = [data_cfg.source, self.seq_len, data_cfg.packing, self.max_segments, self.limit,
                data_cfg.truncation, data_cfg.pack_window, data_cfg.shuffle_buffer]
    self._settings = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    self._start_epoch(0, 0)

  def _start_epoch(self, epoch, skip):
    """Positions the stream at row `skip` of `epoch` (re-reading the rows before it) and packs the
    window that starts there."""
    self.epoch, self.consumed, self.row = epoch, skip, 0
    self._usable = skip > 0  # any usable row this epoch? (an epoch entered mid-way is not judged)
    self._stream.open(epoch, skip)
    self._next_window()

  def _next_window(self):
    """Reads, tokenises, crops and packs the next `data.pack_window` rows of this epoch."""
    raw = self._stream.read(self.cfg.pack_window)
    self._window, self._window_size = [], len(raw)
    if not raw:
      return
    examples = encode_rows(self._encoder, raw, self.consumed, self._crop)
    length = np.asarray([len(ids) for ids, _ in examples], np.int64)
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
            "settings": self._settings, "content": self.source.digests}

  def restore(self, state):
    _content_change(state, self.source.digests, self.cfg)
    _check_state(state, {"kind": "streaming", "version": STATE_VERSION, "seed": self.seed,
                         "process_index": self.process_index, "process_count": self.process_count,
                         "settings": self._settings})
    self._start_epoch(int(state["epoch"]), int(state["consumed"]))
    self.row = int(state["row"])


# ----------------------------------------------------------------------------- mixtures


def _open_part(data_cfg, entry, tokenizer, index, kwargs):
  """Source `index` of data.sources, opened as a mixture part (its own reading fields)."""
  cfg = mixture.source_config(data_cfg, entry)
  source, encoder = _reader(sources.load_source(cfg, streaming=cfg.streaming), cfg, tokenizer, 1,
                            "the")  # every process reads a mixture's whole stream
  limit = min(cfg.max_length, kwargs["seq_len"])
  if cfg.streaming:
    return _StreamPart(source, encoder, cfg, limit, kwargs["seed"])
  return _MapPart(source, tokenize(source, encoder, cfg), cfg, limit, kwargs["seed"], index)


class _MapPart:
  """A map-style source of a mixture: its kept examples one after another without end, each epoch
  in the order of a permutation seeded by (seed, source index, epoch). Position: [epoch, next]."""

  def __init__(self, source, tokenized, data_cfg, limit, seed, index):
    self.source, self.cfg, self.limit, self.stats = source, data_cfg, limit, new_stats()
    self._examples = _Examples(tokenized, functools.partial(
        crop_rows, limit=limit, data_cfg=data_cfg, locate=source.locate, stats=self.stats))
    if not len(self._examples.index):
      raise DataError(f"no usable rows in {data_cfg.source}: {self.stats['rows']} rows read, "
                      f"{dropped_note(self.stats, limit, data_cfg)}")
    self.stats["kept"] = len(self._examples.index)
    self._seed, self._source_index = seed, index
    self._order_of = (None, None)
    self.epoch, self.next = 0, 0

  def position(self):
    return [self.epoch, self.next]

  def seek(self, position):
    self.epoch, self.next = (int(p) for p in position)

  def _order(self):
    if self._order_of[0] != self.epoch:
      rng = np.random.default_rng([self._seed, self._source_index, self.epoch])
      self._order_of = (self.epoch, rng.permutation(len(self._examples.index)))
    return self._order_of[1]

  def take(self, n):
    """The next n examples, (ids, trained) each."""
    ks = []
    while len(ks) < n:
      order = self._order()
      more = order[self.next:self.next + n - len(ks)]
      ks += more.tolist()
      self.next += len(more)
      if self.next == len(order):
        self.epoch, self.next = self.epoch + 1, 0
    return self._examples.read(ks)


class _StreamPart:
  """A streamed source of a mixture: its usable examples in stream order, epoch after epoch (the
  stream shuffled by (seed, epoch) through data.shuffle_buffer), read data.pack_window rows at a
  time. Every process reads the whole stream (the mixture's plan is global). Position:
  [epoch, rows read before the current block, examples of the block taken]."""

  def __init__(self, source, encoder, data_cfg, limit, seed):
    self.source, self.cfg, self.limit, self.stats = source, data_cfg, limit, new_stats()
    ds = source.dataset
    if data_cfg.shuffle_buffer:
      ds = ds.shuffle(seed=seed, buffer_size=data_cfg.shuffle_buffer)
    self._stream, self._encoder = _RowStream(ds, source), encoder
    self._crop = functools.partial(crop_rows, limit=limit, data_cfg=data_cfg,
                                   locate=source.locate, stats=self.stats)
    self._open(0, 0)

  def position(self):
    return [self.epoch, self.consumed, self.taken]

  def seek(self, position):
    epoch, consumed, taken = (int(p) for p in position)
    self._open(epoch, consumed)
    self.taken = taken

  def _open(self, epoch, skip):
    """Positions the stream at row `skip` of `epoch` (re-reading the rows before it)."""
    self.epoch, self.consumed = epoch, skip
    self._usable = skip > 0  # an epoch entered mid-way is not judged
    self._stream.open(epoch, skip)
    self._next_block()

  def _next_block(self):
    raw = self._stream.read(self.cfg.pack_window)
    self._block_size, self.taken = len(raw), 0
    self._block = encode_rows(self._encoder, raw, self.consumed, self._crop) if raw else []
    self.stats["kept"] += len(self._block)
    self._usable |= bool(self._block)

  def take(self, n):
    """The next n examples, (ids, trained) each."""
    out = []
    while len(out) < n:
      if self.taken == len(self._block):
        if not self._block_size:  # the epoch is over
          if not self._usable:
            raise DataError(f"no usable rows in {self.cfg.source}: {self.stats['rows']} rows "
                            f"read, {dropped_note(self.stats, self.limit, self.cfg)}")
          self._open(self.epoch + 1, 0)
        else:
          self.consumed += self._block_size
          self._next_block()
        continue
      more = self._block[self.taken:self.taken + n - len(out)]
      out += more
      self.taken += len(more)
    return out


class MixtureIterator(_Batches):
  """Endless batches over data.sources (mixture.py): windows of data.pack_window examples, each
  example's source drawn by weight (mixture.draws), best-fit packed; the rows of the windows form
  one global stream, process p assembling its share of each global batch. Batches carry
  `source_ids` [B, T]: each token's source (its index in data.sources). The state is (window, row,
  every source's position at the window's start): exact, independent of the process count."""

  _scope = " so far"

  def __init__(self, parts, data_cfg, **kwargs):
    super().__init__(None, data_cfg, **kwargs)
    self.parts, self.names = parts, mixture.source_names(data_cfg)
    self.probabilities = mixture.weights_of(data_cfg)
    self.stats["sources"] = {name: {"examples": 0, "tokens": 0} for name in self.names}
    settings = [self.names, self.probabilities.tolist(), list(data_cfg.sources), self.seq_len,
                data_cfg.packing, self.max_segments, self.limit, data_cfg.truncation,
                data_cfg.pack_window, data_cfg.shuffle_buffer]
    self._settings = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:16]
    self._build(0)

  def _build(self, window):
    """Draws, reads and packs window `window`: its rows as lists of (ids, trained, source)."""
    self.window, self.row = window, 0
    self._starts = [part.position() for part in self.parts]
    labels = mixture.draws(self.seed, window, self.cfg.pack_window, self.probabilities)
    examples = [None] * len(labels)
    for s, part in enumerate(self.parts):
      places = np.flatnonzero(labels == s)
      for place, example in zip(places.tolist(), part.take(len(places))):
        examples[place] = (*example, s)
    length = np.asarray([len(ids) for ids, _, _ in examples], np.int64)
    plan = self._pack(length, np.random.default_rng([self.seed, mixture.DRAW_TAG + 1, window]))
    self._rows = [[examples[i] for i in row] for row in plan]
    self._count(length, [t[1:].sum() for _, t, _ in examples], self._rows)
    for (ids, _, s) in examples:
      counts = self.stats["sources"][self.names[s]]
      counts["examples"] += 1
      counts["tokens"] += len(ids)

  def __next__(self):
    rows = []
    while len(rows) < self.global_batch_size:
      more = self._rows[self.row:self.row + self.global_batch_size - len(rows)]
      rows += more
      self.row += len(more)
      if self.row == len(self._rows):
        self._build(self.window + 1)
    mine = rows[self.process_index * self.local_batch_size:
                (self.process_index + 1) * self.local_batch_size]
    return packing.assemble([[(ids, trained) for ids, trained, _ in row] for row in mine],
                            self.seq_len, self.pad_id, self.max_segments,
                            sources=[[s for _, _, s in row] for row in mine])

  def content(self):
    return {name: digest for part in self.parts for name, digest in part.source.digests.items()}

  def state(self):
    return {"kind": "mixture", "version": STATE_VERSION, "window": self.window, "row": self.row,
            "starts": self._starts, "seed": self.seed, "settings": self._settings,
            "content": self.content()}

  def restore(self, state):
    changed = _content_change(state, self.content(), self.cfg)
    _check_state(state, {"kind": "mixture", "version": STATE_VERSION, "seed": self.seed,
                         "settings": self._settings})
    for part, position in zip(self.parts, state["starts"]):
      part.seek(position)
    self._build(int(state["window"]))
    row = int(state["row"])
    if not 0 <= row < len(self._rows):
      if not changed:
        raise DataError(f"iterator state row={row} is outside window {state['window']}")
      self._build(self.window + 1)
      row = 0
    self.row = row

  def summary(self):
    s, drawn = self.stats, max(self.stats["kept"], 1)
    tokens = max(s["tokens"], 1)
    parts = []
    for name, weight, part, entry in zip(self.names, self.probabilities, self.parts,
                                         self.cfg.sources):
      mine = s["sources"][name]
      parts.append(
          f"{name} = {part.cfg.source} (weight {entry['weight']:g} ({weight:.0%} of examples)): "
          f"{part.stats['rows']} rows read, "
          f"{part.stats['kept']} kept, {dropped_note(part.stats, self.limit, part.cfg)}; "
          f"{mine['examples'] / drawn:.1%} of the examples drawn, "
          f"{mine['tokens'] / tokens:.1%} of their tokens")
    return (f"data mixture of {len(self.parts)} sources (data.sources), {s['kept']} examples "
            f"drawn: {'; '.join(parts)}; {self._packing_note()}")


def _warn_if_a_batch_repeats(global_batch_size, rows_per_epoch, data_cfg):
  """A batch larger than an epoch holds some examples twice: said, with the epochs it spans."""
  if global_batch_size > rows_per_epoch:
    logging.warning(
        "train.global_batch_size=%d is more than the %d %s rows of one epoch of %s: every batch "
        "spans %.2f epochs, so examples repeat within a batch; lower train.global_batch_size to "
        "%d or less to see each example at most once a step", global_batch_size,
        rows_per_epoch, "packed" if data_cfg.packing else "padded", data_cfg.source,
        global_batch_size / rows_per_epoch, rows_per_epoch)


def encode_rows(encoder, raw, first_index, crop):
  """Raw rows (dicts; rows first_index, ...) -> (ids, trained) int32 arrays of the kept examples,
  cropped by `crop(meta, first_index)`."""
  columns = {k: [r[k] for r in raw] for k in raw[0]}
  encoded = encoder(columns, list(range(first_index, first_index + len(raw))))
  meta = {k: np.asarray(encoded[k]) for k in ("num_tokens", "num_trained", "first_trained")}
  kept, start, length = crop(meta, first_index)
  return [(np.asarray(encoded["input_ids"][k][a:a + n], np.int32),
           np.asarray(encoded["trained"][k][a:a + n], np.int32))
          for k, a, n in zip(kept.tolist(), start.tolist(), length.tolist())]


def _content_change(state, digests, data_cfg):
  """What changed in the data's files (`digests`: Source.digests) since `state` was saved (None:
  nothing, or a state saved before states carried the content). Raises DataError naming the file
  and the ways on, unless data.allow_changed (then a warning says what the resume does)."""
  saved = state.get("content") if isinstance(state, dict) else None
  change = None if saved is None else sources.content_change(saved, digests)
  if change is None:
    return None
  if not data_cfg.get("allow_changed", False):
    raise DataError(
        f"{change} since the checkpoint was written: resuming would train on other rows than the "
        "run was trained on. Restore the file to resume, or start a new --workdir, or pass "
        "--config.data.allow_changed=True to resume on the data as it is now (from the "
        "checkpoint's position in the changed data's order)")
  logging.warning("data.allow_changed=True: %s since the checkpoint was written; resuming on the "
                  "data as it is now, from the checkpoint's position in its order", change)
  return change


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
