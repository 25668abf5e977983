"""Truncation, best-fit packing and batch assembly: pure numpy on token counts and token arrays.

A packed row of T tokens holds whole examples (segments) one after another, then padding:
  tokens[t]       the example's token ids
  targets[t]      tokens[t + 1] inside the segment; pad id on its last token and on padding
  loss_mask[t]    trained[t + 1] inside the segment; 0 on its last token and on padding
  segment_ids[t]  1..n for the row's n segments, 0 on padding
  positions[t]    0, 1, ... restarting at each segment; 0 on padding
so no target and no loss crosses a segment boundary, and attention masked by segment_ids (the
model's job) never crosses one either.

cuDNN attention describes a row by its runs of equal segment ids (documents, then the padding)
with a static bound, model.max_segments; past it, runs would merge and documents see each other.
The packer therefore puts at most max_segments - 1 documents in a row, and `check_segment_runs`
refuses any batch (evaluation's, a user's) with more runs than the bound before it reaches the
model.
"""
import heapq

import numpy as np

from dft_jax.errors import ConfigError, DataError

TRUNCATION = ("drop", "truncate_response", "truncate_prompt")
KEPT, EMPTY, NO_TRAINED, TOO_LONG, PROMPT_TOO_LONG, RESPONSE_TOO_LONG = range(6)
REASONS = {EMPTY: "empty", NO_TRAINED: "with no trained token",
           TOO_LONG: "longer than the limit", PROMPT_TOO_LONG: "whose prompt fills the limit",
           RESPONSE_TOO_LONG: "whose response alone exceeds the limit"}


def crop(num_tokens_N, first_trained_N, num_trained_N, limit, policy):
  """Which tokens of each example are kept -> (start_N, length_N, reason_N); reason KEPT or why
  the example is dropped.

  drop               examples longer than `limit` are dropped;
  truncate_response  the first `limit` tokens are kept (the response's tail and EOS are lost);
  truncate_prompt    the last `limit` tokens are kept, cutting the prompt from the left, as long
                     as at least one token of context stays before the first trained token.
  """
  n = np.asarray(num_tokens_N, np.int64)
  first = np.asarray(first_trained_N, np.int64)
  start = np.zeros_like(n)
  length = np.minimum(n, limit)
  reason = np.full(n.shape, KEPT, np.int8)
  long = n > limit
  if policy == "drop":
    reason[long] = TOO_LONG
  elif policy == "truncate_response":
    reason[long & (first >= limit)] = PROMPT_TOO_LONG
  elif policy == "truncate_prompt":
    start = np.where(long, n - limit, 0)
    reason[long & (start >= first)] = RESPONSE_TOO_LONG
  else:
    raise ValueError(policy)
  reason[np.asarray(num_trained_N) == 0] = NO_TRAINED
  reason[n == 0] = EMPTY
  return start, length, reason


def best_fit(lengths_N, capacity, max_items):
  """Best-fit decreasing bin packing: each item, longest first (ties in input order), goes into
  the open bin with the least room that still fits it (the earliest opened of those), else into
  a new bin. A bin holding max_items items is closed.

  Returns a list of bins, each a list of item indices. O(N log capacity): open bins are indexed
  by their free room in a segment tree of counts over 0..capacity.
  """
  lengths = np.asarray(lengths_N, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
    raise ValueError(f"item lengths must lie in [1, {capacity}]")
  size = 1 << int(capacity).bit_length()
  counts = [0] * (2 * size)
  by_room = [[] for _ in range(capacity + 1)]
  bins, room = [], []

  def add(r, delta):
    i = r + size
    while i:
      counts[i] += delta
      i //= 2

  def tightest(need):  # the smallest free room >= need with an open bin, or None
    i = need + size
    if counts[i]:
      return need
    while True:
      if i % 2 == 0 and counts[i + 1]:
        i += 1
        break
      i //= 2
      if i <= 1:
        return None
    while i < size:
      i = 2 * i if counts[2 * i] else 2 * i + 1
    return i - size

  for item in np.argsort(-lengths, kind="stable").tolist():
    need = int(lengths[item])
    r = tightest(need)
    if r is None:
      b, r = len(bins), capacity
      bins.append([])
      room.append(capacity)
    else:
      b = heapq.heappop(by_room[r])
      add(r, -1)
    bins[b].append(item)
    room[b] = r - need
    if room[b] and len(bins[b]) < max_items:
      heapq.heappush(by_room[room[b]], b)
      add(room[b], 1)
  return bins


def plan_epoch(lengths_N, seq_len, rng, packing, max_segments):
  """The rows of one epoch as lists of item indices: items shuffled by `rng`, then best-fit
  packed, at most max_segments - 1 per row (one run is left for the padding), and the rows
  shuffled again (packing=True), or one item per row (packing=False)."""
  order = rng.permutation(len(lengths_N))
  if not packing:
    return [[i] for i in order.tolist()]
  bins = best_fit(np.asarray(lengths_N)[order], seq_len, max_segments - 1)
  return [order[bins[j]].tolist() for j in rng.permutation(len(bins)).tolist()]


def assemble(rows, seq_len, pad_id, max_segments, sources=None):
  """rows: per row a list of (ids, trained) int arrays -> the batch dict of [B, T] arrays
  (check_segment_runs against max_segments). sources: per row the source index of each example
  (a mixture's): adds `source_ids` [B, T], each token's source (0 on padding, which no loss or
  token count reads)."""
  shape = (len(rows), seq_len)
  batch = {"tokens": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
           "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32)}
  if sources is not None:
    batch["source_ids"] = np.zeros(shape, np.int32)
  for b, row in enumerate(rows):
    o = 0
    for s, (ids, trained) in enumerate(row, 1):
      n = len(ids)
      if o + n > seq_len:
        raise ValueError(f"row {b} overflows seq_len={seq_len}")
      batch["tokens"][b, o:o + n] = ids
      batch["targets"][b, o:o + n - 1] = ids[1:]
      batch["loss_mask"][b, o:o + n - 1] = trained[1:]
      batch["segment_ids"][b, o:o + n] = s
      batch["positions"][b, o:o + n] = np.arange(n)
      if sources is not None:
        batch["source_ids"][b, o:o + n] = sources[b][s - 1]
      o += n
  check_segment_runs(batch["segment_ids"], max_segments)
  return batch


def check_max_segments(max_segments):
  """ConfigError unless model.max_segments is an integer >= 2 (a document and its padding)."""
  if not isinstance(max_segments, int) or isinstance(max_segments, bool) or max_segments < 2:
    raise ConfigError(f"model.max_segments={max_segments!r}: must be an integer >= 2")


def segment_runs_per_row(segment_ids_BxT):
  """Maximal runs of equal segment ids in each row (documents, and padding once per gap)."""
  seg_BxT = np.asarray(segment_ids_BxT)
  return 1 + np.count_nonzero(seg_BxT[:, 1:] != seg_BxT[:, :-1], axis=1)


def check_segment_runs(segment_ids_BxT, max_segments):
  """DataError naming the first row with more runs of segment ids than max_segments: attention
  (cuDNN's packed layout) would merge its last documents and let them see each other."""
  runs_B = segment_runs_per_row(segment_ids_BxT)
  over = np.flatnonzero(runs_B > max_segments)
  if over.size:
    b = int(over[0])
    raise DataError(
        f"batch row {b} holds {runs_B[b]} runs of segment ids (documents and padding), more than "
        f"model.max_segments={max_segments}, the most that attention keeps apart: raise "
        "model.max_segments or put fewer documents in a row")
