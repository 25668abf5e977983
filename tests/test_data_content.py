"""dft_jax.data: what was trained on is what is resumed on. The iterator state carries the content
of the data files; caches are keyed on content, not on the file's size and modification time."""
import json
import logging
import os

import numpy as np
import pytest

from dft_jax import data
from dft_jax.data import sources
from dft_jax.errors import DataError


def write_rows(path, numbers):
  """Rows whose texts have the same token count for every number of the same digit count."""
  path.write_text("".join(json.dumps({"prompt": f"What is {n} + {n}?",
                                      "response": f"{n} + {n} = {2 * n}. #### {2 * n}"}) + "\n"
                          for n in numbers))
  return str(path)


def make_iter(c, tokenizer):
  return data.make_train_iterator(c, tokenizer, seq_len=192, global_batch_size=2, seed=0,
                                  max_segments=64, process_index=0, process_count=1)


def same_size_and_time(path, change):
  """Rewrites `path` with change(text) -- same length -- and puts its old modification time back,
  as `cp -p`, a restored backup or an edit within one clock tick leave it."""
  before = os.stat(path)
  text = path.read_text()
  changed = change(text)
  assert changed != text and len(changed) == len(text)
  path.write_text(changed)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def trained_texts(batches, tokenizer):
  out = []
  for b in batches:
    for r in range(len(b["tokens"])):
      for s in set(b["segment_ids"][r].tolist()) - {0}:
        sel = (b["segment_ids"][r] == s) & (b["loss_mask"][r] > 0)
        out.append(tokenizer.decode(b["targets"][r][sel]))
  return out


@pytest.fixture
def rows(tmp_path, cfg):
  """40 rows, the held-out split off; cfg reads them."""
  path = tmp_path / "rows.jsonl"
  write_rows(path, range(10, 50))
  cfg.source, cfg.eval_holdout, cfg.shuffle_buffer, cfg.pack_window = str(path), 0, 8, 16
  return path


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_on_rows_edited_in_place_is_refused_naming_the_file(tok, cfg, rows, streaming):
  """Same token counts, same size, same modification time: only the content tells."""
  cfg.streaming = streaming
  it = make_iter(cfg, tok)
  next(it), next(it)
  state = json.loads(json.dumps(it.state()))
  same_size_and_time(rows, lambda text: text.replace("= 30.", "= 31."))
  with pytest.raises(DataError) as e:
    make_iter(cfg, tok).restore(state)
  message = str(e.value)
  assert message.startswith(f"{rows} was changed (its sha256 differs) since the checkpoint")
  for way_on in ("Restore the file", "new --workdir", "--config.data.allow_changed=True"):
    assert way_on in message


def test_resume_on_appended_rows_names_the_file_and_what_was_added(tok, cfg, rows):
  it = make_iter(cfg, tok)
  next(it)
  state = it.state()
  extra = json.dumps({"prompt": "What is 1 + 1?", "response": "2"}) + "\n"
  with open(rows, "a") as f:
    f.write(extra)
  with pytest.raises(DataError, match=f"^{rows} has {len(extra)} bytes appended "
                                      r"\(rows added at its end\) since the checkpoint"):
    make_iter(cfg, tok).restore(state)


def test_resume_on_a_file_gone_from_the_glob_names_it(tok, cfg, tmp_path):
  first, second = write_rows(tmp_path / "a.jsonl", range(10, 30)), write_rows(
      tmp_path / "b.jsonl", range(30, 50))
  cfg.source, cfg.eval_holdout = str(tmp_path / "*.jsonl"), 0
  state = make_iter(cfg, tok).state()
  os.remove(second)
  with pytest.raises(DataError, match=f"^{second} was part of the data and is gone"):
    make_iter(cfg, tok).restore(state)
  assert first in state["content"]


def test_allow_changed_resumes_on_the_data_as_it_is_now(tok, cfg, rows, caplog):
  it = make_iter(cfg, tok)
  next(it)
  state = it.state()
  same_size_and_time(rows, lambda text: text.replace("= 30.", "= 31."))
  cfg.allow_changed = True
  resumed = make_iter(cfg, tok)
  with caplog.at_level(logging.WARNING):
    resumed.restore(state)
  assert "data.allow_changed=True: " in caplog.text and str(rows) in caplog.text
  assert (resumed.epoch, resumed.row) == (state["epoch"], state["row"])
  epoch = trained_texts([next(resumed) for _ in range(40)], tok)
  assert any("= 31." in t for t in epoch) and not any("= 30." in t for t in epoch)


def test_resume_on_unchanged_data_and_an_older_state_without_content(tok, cfg, rows):
  it = make_iter(cfg, tok)
  next(it)
  state = it.state()
  expected = next(it)
  for saved in (state, {k: v for k, v in state.items() if k != "content"}):
    resumed = make_iter(cfg, tok)
    resumed.restore(saved)
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_a_file_changed_with_the_same_size_and_time_is_not_read_from_the_cache(tok, cfg, rows):
  first = sorted(trained_texts([next(make_iter(cfg, tok)) for _ in range(1)], tok))
  assert list(sources.load_source(cfg).dataset)[20]["response"] == "30 + 30 = 60. #### 60"
  same_size_and_time(rows, lambda text: text.replace("30 + 30 = 60.", "30 + 30 = 61."))
  assert list(sources.load_source(cfg).dataset)[20]["response"] == "30 + 30 = 61. #### 60"
  it = make_iter(cfg, tok)
  texts = trained_texts([next(it) for _ in range(20)], tok)
  assert any("= 61." in t for t in texts) and not any("= 60." in t for t in texts)
  assert first  # the first load filled the cache that the second must not read


def test_digests_are_of_the_content(tmp_path):
  path = tmp_path / "f.bin"
  path.write_bytes(b"abc" * 1000)
  import hashlib  # pylint: disable=g-import-not-at-top
  assert sources.file_digest(str(path)) == {"sha256": hashlib.sha256(b"abc" * 1000).hexdigest(),
                                            "bytes": 3000}
  assert sources.file_digest(str(path), 3)["sha256"] == hashlib.sha256(b"abc").hexdigest()
