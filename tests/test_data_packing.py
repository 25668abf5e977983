"""dft_jax.data packing and iteration: the Batch contract, no token lost, deterministic resume."""
import collections
import json

import numpy as np
import pytest

from dft_jax import data
from dft_jax.data import formats
from dft_jax.data import packing
from dft_jax.errors import ConfigError, DataError

T = 256


@pytest.fixture
def cfg(cfg):  # conftest's data config, on the first 120 rows
  cfg.max_rows = 120
  return cfg


def make_iter(c, tokenizer, batch=8, seed=0, process_index=0, process_count=1, seq_len=T,
              max_segments=64):
  return data.make_train_iterator(c, tokenizer, seq_len=seq_len, global_batch_size=batch, seed=seed,
                                  max_segments=max_segments, process_index=process_index,
                                  process_count=process_count)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def segments(batch):
  """Every segment of a batch as (tokens, loss_mask, targets, positions) rows, checking that
  segment ids are contiguous 1..n runs followed only by padding."""
  out = []
  for r in range(len(batch["tokens"])):
    seg = batch["segment_ids"][r]
    n = seg.max()
    real = seg > 0
    assert real.sum() == 0 or real[:real.sum()].all(), "padding only at the end of a row"
    assert (np.diff(seg[real]) >= 0).all() and set(seg[real].tolist()) == set(range(1, n + 1))
    for s in range(1, n + 1):
      idx = np.flatnonzero(seg == s)
      out.append(tuple(batch[k][r][idx] for k in ("tokens", "loss_mask", "targets", "positions")))
  return out


def reference_examples(c, tokenizer, limit):
  """(ids, trained) of every usable row, straight from the Encoder (independent of packing)."""
  from dft_jax.data import sources  # pylint: disable=g-import-not-at-top
  enc = formats.Encoder(c, tokenizer)
  out = [enc.encode(row, i) for i, row in enumerate(sources.load_source(c).dataset)]
  return [(ids, tr) for ids, tr in out if 0 < len(ids) <= limit and sum(tr)]


# ----------------------------------------------------------------------------- best fit


def best_fit_reference(lengths, capacity, max_items):
  """Plain O(N * bins) best-fit decreasing, written independently of packing.best_fit."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
  bins, room = [], []
  for i in order:
    fits = [b for b in range(len(bins)) if room[b] >= lengths[i] and len(bins[b]) < max_items]
    if fits:
      least = min(room[b] for b in fits)
      b = min(b for b in fits if room[b] == least)  # the earliest opened of the tightest
    else:
      b = len(bins)
      bins.append([])
      room.append(capacity)
    bins[b].append(i)
    room[b] -= lengths[i]
  return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_places_every_item_once_within_capacity(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 200, size=300)
  bins = packing.best_fit(lengths, 256, max_items=300)
  assert sorted(i for b in bins for i in b) == list(range(300))
  assert max(lengths[b].sum() for b in bins) <= 256
  lower = -(-lengths.sum() // 256)
  assert len(bins) <= 11 * lower // 9 + 1  # BFD's worst-case bound (Johnson, 1973)
  assert sorted(map(sorted, bins)) == sorted(map(sorted, best_fit_reference(
      lengths.tolist(), 256, 300)))


@pytest.mark.parametrize("max_items", [1, 2, 5])
def test_best_fit_closes_a_bin_at_max_items(max_items):
  """Short items would fill a bin 20 at a time; the cap closes it at max_items."""
  lengths = np.random.default_rng(0).integers(1, 12, size=200)
  bins = packing.best_fit(lengths, 256, max_items)
  assert max(map(len, bins)) == max_items and len(bins) == -(-200 // max_items)
  assert sorted(i for b in bins for i in b) == list(range(200))
  assert sorted(map(sorted, bins)) == sorted(map(sorted, best_fit_reference(
      lengths.tolist(), 256, max_items)))


def test_crop_policies():
  n, first, num = [10, 10, 10, 3, 0, 4], [6, 2, 9, 1, -1, -1], [4, 8, 1, 2, 0, 0]
  start, length, reason = packing.crop(n, first, num, 8, "drop")
  assert reason.tolist() == [packing.TOO_LONG] * 3 + [packing.KEPT, packing.EMPTY,
                                                      packing.NO_TRAINED]
  start, length, reason = packing.crop(n, first, num, 8, "truncate_response")
  assert reason[:4].tolist() == [packing.KEPT, packing.KEPT, packing.PROMPT_TOO_LONG, packing.KEPT]
  assert start[:2].tolist() == [0, 0] and length[:4].tolist() == [8, 8, 8, 3]
  start, length, reason = packing.crop(n, first, num, 8, "truncate_prompt")
  assert reason[:4].tolist() == [packing.KEPT, packing.RESPONSE_TOO_LONG, packing.KEPT,
                                 packing.KEPT]
  assert start[[0, 2, 3]].tolist() == [2, 2, 0] and length[[0, 2, 3]].tolist() == [8, 8, 3]


# ----------------------------------------------------------------------------- batch contract


def check_contract(batch):
  seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
  same_next = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
  # targets: the next token inside the segment; loss never on a segment's last token or padding
  np.testing.assert_array_equal(np.where(same_next, batch["targets"][:, :-1], 0),
                                np.where(same_next, batch["tokens"][:, 1:], 0))
  assert not mask[:, :-1][~same_next].any() and not mask[:, -1].any()
  assert not mask[seg == 0].any() and not pos[seg == 0].any()
  # positions restart at 0 per segment and count up by one inside it
  starts = np.ones_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  assert not pos[starts & (seg > 0)].any()
  inside = ~starts[:, 1:] & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(pos[:, 1:][inside], pos[:, :-1][inside] + 1)
  # attention: a token may see exactly the tokens of its own segment up to itself
  for r in range(len(seg)):
    causal = np.tril(np.ones((T, T), bool))
    allowed = causal & (seg[r][:, None] == seg[r][None, :]) & (seg[r][:, None] > 0)
    t = np.arange(T)
    expected = causal & (t[None, :] >= (t - pos[r])[:, None]) & (seg[r][:, None] > 0)
    np.testing.assert_array_equal(allowed, expected)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "tokens": ((8, T), "int32"), "targets": ((8, T), "int32"),
      "loss_mask": ((8, T), "float32"), "segment_ids": ((8, T), "int32"),
      "positions": ((8, T), "int32")}


@pytest.mark.parametrize("packed", [True, False])
def test_one_epoch_holds_every_example_once_with_exact_masks(tok, cfg, packed):
  cfg.packing = packed
  it = make_iter(cfg, tok)
  rows_per_epoch = it.stats["packed_rows"]
  batches = take(it, -(-rows_per_epoch // 8))
  for b in batches:
    check_contract(b)
  rows = [{k: b[k][r] for k in b} for b in batches for r in range(8)][:rows_per_epoch]
  got = collections.Counter()
  for row in rows:
    one = {k: v[None] for k, v in row.items()}
    if not packed:
      assert row["segment_ids"].max() == 1
    for tokens, loss, _, _ in segments(one):
      got[(tuple(tokens.tolist()), tuple(loss.tolist()))] += 1
  want = collections.Counter(
      (tuple(ids), tuple(float(x) for x in tr[1:]) + (0.0,))
      for ids, tr in reference_examples(cfg, tok, cfg.max_length))
  assert got == want and len(want) == it.stats["kept"] == 120
  eff = sum(len(k[0]) for k in got.elements()) / (rows_per_epoch * T)
  assert eff == pytest.approx(float(it.summary().split("% real")[0].split()[-1]) / 100, abs=1e-3)


def test_trained_spans_decode_to_responses(tok, cfg):
  rows = data.load_builtin("arith_train")[:cfg.max_rows]
  it = make_iter(cfg, tok)
  decoded = set()
  for b in take(it, 6):
    for tokens, loss, targets, _ in segments(b):
      decoded.add(tok.decode(targets[loss > 0]))
  assert decoded and decoded <= {r["response"] + "<|im_end|>" for r in rows}


@pytest.mark.parametrize("streaming", [False, True])
def test_rows_hold_fewer_documents_than_max_segments(tok, cfg, streaming):
  """~12 built-in examples fit a 1024-token row; with max_segments=4 a row holds at most 3
  (attention keeps 4 runs apart: 3 documents and the padding)."""
  cfg.streaming, cfg.pack_window = streaming, 120
  it = make_iter(cfg, tok, seq_len=1024, max_segments=4)
  seg = np.concatenate([b["segment_ids"] for b in take(it, 5)])
  assert seg.max() == 3 and packing.segment_runs_per_row(seg).max() == 4
  assert it.stats["packed_rows"] == 40  # the 120 examples, 3 a row
  assert it.stats["most_docs_per_row"] == 3
  assert "most documents in a row: 3 (model.max_segments=4)" in it.summary()


def test_max_segments_must_leave_room_for_a_document(tok, cfg):
  with pytest.raises(ConfigError, match="model.max_segments=1: must be an integer >= 2"):
    make_iter(cfg, tok, max_segments=1)


@pytest.mark.parametrize("segment_ids,max_segments,row,runs", [
    ([[1, 1, 2, 3, 0, 0], [1, 2, 3, 4, 5, 0]], 5, 1, 6),   # 5 documents + padding
    ([[1, 1, 0, 0, 2, 2], [1, 1, 1, 1, 1, 1]], 2, 0, 3),   # padding between documents is a run
    ([[7, 7, 7, 7], [7, 8, 7, 8]], 3, 1, 4),               # a repeated id starts a new run
])
def test_check_segment_runs_names_the_row_and_the_limit(segment_ids, max_segments, row, runs):
  seg = np.asarray(segment_ids, np.int32)
  packing.check_segment_runs(seg, runs)  # exactly at the limit: accepted
  with pytest.raises(DataError, match=f"batch row {row} holds {runs} runs of segment ids .* "
                                      f"more than model.max_segments={max_segments}"):
    packing.check_segment_runs(seg, max_segments)


def test_assemble_refuses_a_row_over_max_segments():
  doc = (np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.int32))
  batch = packing.assemble([[doc] * 3], seq_len=13, pad_id=0, max_segments=4)
  assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0, 0]
  with pytest.raises(DataError, match="batch row 0 holds 5 runs .* model.max_segments=4"):
    packing.assemble([[doc] * 4], seq_len=13, pad_id=0, max_segments=4)


def test_packing_is_efficient_on_builtin_data(tok, cfg):
  cfg.max_rows = None
  s = make_iter(cfg, tok, seq_len=1024).stats
  assert s["tokens"] / (s["packed_rows"] * 1024) > 0.95


# ----------------------------------------------------------------------------- order and resume


def test_shuffle_is_deterministic_per_seed_and_epoch(tok, cfg):
  cfg.max_rows = 24
  a, b, c = make_iter(cfg, tok), make_iter(cfg, tok), make_iter(cfg, tok, seed=1)
  rows = a.stats["packed_rows"]
  n = -(-2 * rows // 8)
  first_a, first_b, first_c = take(a, n), take(b, n), take(c, n)
  assert_same(first_a, first_b)
  assert not all((x["tokens"] == y["tokens"]).all() for x, y in zip(first_a, first_c))
  stream = {k: np.concatenate([x[k] for x in first_a]) for k in first_a[0]}
  epochs = [{k: v[e * rows:(e + 1) * rows] for k, v in stream.items()} for e in range(2)]
  assert not np.array_equal(epochs[0]["tokens"], epochs[1]["tokens"])  # reshuffled ...
  contents = [collections.Counter(tuple(s[0].tolist()) for s in segments(e)) for e in epochs]
  assert contents[0] == contents[1] and sum(contents[0].values()) == 24  # ... the same examples


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("skip", [0, 5, 13])
def test_resume_yields_the_same_batches(tok, cfg, streaming, skip):
  cfg.max_rows, cfg.streaming, cfg.pack_window, cfg.shuffle_buffer = 30, streaming, 16, 8
  it = make_iter(cfg, tok)
  take(it, skip)
  state = json.loads(json.dumps(it.state()))
  expected = take(it, 8)  # crosses epoch boundaries (about 4 batches per epoch)
  resumed = make_iter(cfg, tok)
  resumed.restore(state)
  assert_same(take(resumed, 8), expected)
  assert it.state()["epoch"] >= 2


@pytest.mark.parametrize("streaming", [False, True])
def test_streaming_and_map_batches_obey_the_contract(tok, cfg, streaming):
  cfg.streaming, cfg.pack_window = streaming, 50
  it = make_iter(cfg, tok)
  for b in take(it, 3):
    check_contract(b)
    assert all(loss.sum() > 0 for _, loss, _, _ in segments(b))


def test_processes_share_the_global_batch(tok, cfg):
  whole = take(make_iter(cfg, tok), 4)
  parts = [take(make_iter(cfg, tok, process_index=p, process_count=2), 4) for p in range(2)]
  for k, global_batch in enumerate(whole):
    for key in global_batch:
      np.testing.assert_array_equal(
          global_batch[key], np.concatenate([parts[0][k][key], parts[1][k][key]]))
      assert parts[0][k][key].shape == (4, T)


def test_state_survives_a_change_of_process_count(tok, cfg):
  it = make_iter(cfg, tok)
  take(it, 3)
  state, expected = it.state(), take(it, 2)
  halves = []
  for p in range(2):
    part = make_iter(cfg, tok, process_index=p, process_count=2)
    part.restore(state)
    halves.append(take(part, 2))
  for k in range(2):
    np.testing.assert_array_equal(
        expected[k]["tokens"], np.concatenate([halves[0][k]["tokens"], halves[1][k]["tokens"]]))


def test_streaming_processes_read_disjoint_rows(tok, cfg):
  cfg.streaming, cfg.max_rows = True, 40
  seen = []
  for p in range(2):
    it = make_iter(cfg, tok, process_index=p, process_count=2)
    next(it)
    seen.append(it.stats["rows"])
  assert seen == [20, 20]


def test_restore_refuses_a_state_from_other_data(tok, cfg):
  state = make_iter(cfg, tok).state()
  cfg.max_rows = 60
  with pytest.raises(DataError, match="iterator state has fingerprint=.* the checkpoint was "
                                      "written for other data or settings"):
    make_iter(cfg, tok).restore(state)
  with pytest.raises(DataError, match="iterator state has seed=0 but this iterator has 1"):
    make_iter(cfg, tok, seed=1).restore(state)
  cfg.max_rows = 120
  with pytest.raises(DataError, match="iterator state has fingerprint="):
    make_iter(cfg, tok, max_segments=3).restore(state)  # another plan of rows


@pytest.mark.parametrize("policy", ["truncate_prompt", "truncate_response"])
def test_truncation_policies_keep_rows_at_the_limit(tok, cfg, policy):
  cfg.truncation, cfg.max_length = policy, 60
  it = make_iter(cfg, tok)
  responses = {r["response"] + "<|im_end|>" for r in data.load_builtin("arith_train")}
  assert it.stats["kept"] > 0
  for b in take(it, 3):
    check_contract(b)
    for tokens, loss, targets, positions in segments(b):
      assert len(tokens) <= 60
      text = tok.decode(targets[loss > 0])
      if policy == "truncate_prompt":
        assert text in responses  # the whole response and EOS survive
        assert not tok.decode(tokens).startswith("<|im_start|>system")
      else:
        assert tok.decode(tokens).startswith("<|im_start|>user\n")


def test_streaming_restore_refuses_other_settings_or_process(tok, cfg):
  cfg.streaming = True
  state = make_iter(cfg, tok).state()
  with pytest.raises(DataError, match="iterator state has settings="):
    make_iter(cfg, tok, seq_len=512).restore(state)
  with pytest.raises(DataError, match="iterator state has process_count=1 but this iterator has 2"):
    make_iter(cfg, tok, process_index=0, process_count=2).restore(state)
  with pytest.raises(DataError, match="iterator state has kind='streaming' but this iterator has "
                                      "'map'"):
    cfg.streaming = False
    make_iter(cfg, tok).restore(state)


def test_a_batch_larger_than_an_epoch_says_how_many_epochs_it_spans(tok, cfg, caplog):
  """24 examples pack into fewer rows than a batch of 16: every batch repeats examples; said with
  the epochs a batch spans, and nothing when a batch fits in an epoch."""
  import logging  # pylint: disable=g-import-not-at-top
  cfg.max_rows = 24
  with caplog.at_level(logging.WARNING):
    rows = make_iter(cfg, tok, batch=16).stats["packed_rows"]
  assert rows < 16
  assert (f"train.global_batch_size=16 is more than the {rows} packed rows of one epoch of "
          f"builtin:arith_train: every batch spans {16 / rows:.2f} epochs, so examples repeat "
          f"within a batch; lower train.global_batch_size to {rows} or less") in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    make_iter(cfg, tok, batch=rows)
  assert "global_batch_size" not in caplog.text
