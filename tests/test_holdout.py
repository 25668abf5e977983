"""The held-out split (dft_jax/data/holdout.py): which rows, that training never sees them, and that
errors name the rows of the file."""
import json

import numpy as np
import pytest

from dft_jax import data
from dft_jax.data import holdout
from dft_jax.data import sources
from dft_jax.errors import ConfigError, DataError


def write_rows(path, n):
  path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."})
                          + "\n" for i in range(n)))
  return str(path)


def trained_rows(cfg, tok):
  """The row numbers (from the prompt text) of the examples the train iterator yields until its
  second epoch starts (a batch may reach into it)."""
  cfg.max_length = 64
  it = data.make_train_iterator(cfg, tok, seq_len=64, global_batch_size=2, seed=0,
                                max_segments=64, process_index=0, process_count=1)
  seen = []
  while it.epoch < 1:
    for row in next(it)["tokens"]:
      seen += [int(n) for n in _numbers(tok.decode(row))]
  return seen


def _numbers(text):
  import re  # pylint: disable=g-import-not-at-top
  return re.findall(r"Question (\d+)\?", text)


@pytest.mark.parametrize("source,num_rows,expected", [
    ("rows.jsonl", 64, 3),       # 5 %
    ("rows.jsonl", 19, 0),       # under 20 rows: none
    ("rows.jsonl", 10_000, 100),  # at most 100
    ("builtin:arith_train", 2000, 0),  # builtin sets have their own test sets
    ("rows.jsonl", None, 0),     # a stream: its length is unknown
])
def test_automatic_size(cfg, source, num_rows, expected):
  cfg.source = source
  assert holdout.holdout_size(cfg, num_rows) == expected


def test_explicit_size_is_checked(cfg):
  cfg.source, cfg.eval_holdout = "rows.jsonl", 5
  assert holdout.holdout_size(cfg, 64) == 5
  cfg.eval_holdout = 64
  with pytest.raises(DataError, match="data.eval_holdout=64 leaves no rows to train on"):
    holdout.holdout_size(cfg, 64)
  cfg.eval_holdout = -1
  with pytest.raises(ConfigError, match="data.eval_holdout=-1"):
    holdout.holdout_size(cfg, 64)


def test_held_out_rows_are_fixed_and_never_trained_on(tok, cfg, tmp_path):
  cfg.source = write_rows(tmp_path / "rows.jsonl", 64)
  _, heldout, n = holdout.split(sources.load_source(cfg), cfg)
  held = sorted(int(_numbers(r["prompt"])[0]) for r in heldout.dataset)
  assert n == len(held) == 3
  assert held == holdout.heldout_indices(64, 3).tolist()  # the same rows, whatever the seed
  epoch = trained_rows(cfg, tok)[:61]  # the first epoch: every other row once
  assert sorted(epoch) == sorted(set(range(64)) - set(held))
  cfg.eval_holdout = 0
  assert sorted(trained_rows(cfg, tok)[:64]) == list(range(64))


def test_rows_are_named_by_their_line_in_the_file(tok, cfg, tmp_path):
  rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]
  rows[30] = {"prompt": "Question 30?", "response": 30}  # not a string
  cfg.source, cfg.eval_holdout = str(tmp_path / "rows.jsonl"), 4
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  held = holdout.heldout_indices(40, 4)
  assert 30 not in held and min(held) < 30  # in the training part the bad row's index moves
  with pytest.raises(DataError, match=f"in row 30 of {cfg.source} is int"):
    trained_rows(cfg, tok)


def test_streams_hold_out_their_first_rows(tok, cfg, tmp_path):
  cfg.source, cfg.streaming, cfg.eval_holdout = write_rows(tmp_path / "rows.jsonl", 30), True, 4
  cfg.shuffle_buffer = 0
  train, heldout, n = holdout.split(sources.load_source(cfg, streaming=True), cfg)
  assert n == 4 and [r["prompt"] for r in heldout.dataset] == [f"Question {i}?" for i in range(4)]
  assert train.locate(0) == f"row 4 of {cfg.source}"
  assert sorted(set(trained_rows(cfg, tok))) == list(range(4, 30))


def test_heldout_indices_are_a_fixed_random_choice():
  a = holdout.heldout_indices(1000, 50)
  assert np.array_equal(a, holdout.heldout_indices(1000, 50)) and len(set(a.tolist())) == 50
  assert np.all(np.diff(a) > 0) and not np.array_equal(a, np.arange(50))
