"""dft_jax.data: token-by-token masks per format, sources, and one clear error per bad input."""
import itertools
import json
import os
import re
import subprocess
import sys

import datasets
import pytest

from dft_jax import data
from dft_jax.data import formats
from dft_jax.data import testing
from dft_jax.errors import ConfigError, DataError

EOS = "<|im_end|>"


def spans(tokenizer, ids, trained, flag=1):
  """Decoded maximal runs of tokens whose trained flag equals `flag`."""
  return [tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
          for f, run in itertools.groupby(zip(ids, trained), key=lambda x: x[1]) if f == flag]


def make_iter(c, tokenizer, seq_len=256, batch=4, seed=0):
  return data.make_train_iterator(c, tokenizer, seq_len=seq_len, global_batch_size=batch, seed=seed,
                                  max_segments=64, process_index=0, process_count=1)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


ODD_RESPONSES = ["2 + 3 = 5.\n#### 5", "\nstarts with a newline", "café ☕ ends with space ",
                 "x", "line one\n\nline three"]


# ----------------------------------------------------------------------------- masks per format


@pytest.mark.parametrize("response", ODD_RESPONSES)
@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_prompt_response_trains_exactly_response_and_eos(tok, cfg, response, system_prompt):
  cfg.system_prompt = system_prompt
  prompt = "What is 2 + 3?"
  ids, trained = formats.Encoder(cfg, tok).encode({"prompt": prompt, "response": response})
  assert spans(tok, ids, trained) == [response + EOS]
  messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
      {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
  untrained = spans(tok, ids, trained, flag=0)
  assert untrained[0].endswith("<|im_start|>assistant\n") and untrained[-1] == "\n"


def test_prompt_ids_are_the_untrained_prefix_of_training_examples(tok, cfg):
  cfg.system_prompt = "Be brief."
  enc = formats.Encoder(cfg, tok)
  ids, trained = enc.encode({"prompt": "Hi there", "response": "Hello."})
  assert enc.prompt_ids("Hi there") == ids[:trained.index(1)]


def test_plain_concatenation_without_template(tok, cfg):
  cfg.chat_template = "none"
  ids, trained = formats.Encoder(cfg, tok).encode({"prompt": "Q: 1+1?\nA:", "response": " 2"})
  assert spans(tok, ids, trained) == [" 2" + EOS]
  assert spans(tok, ids, trained, flag=0) == ["Q: 1+1?\nA:"]


CONVERSATION = [{"role": "system", "content": "You count."},
                {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "1, 2"}]


@pytest.mark.parametrize("loss_on,expected", [
    ("assistant", ["1" + EOS, "1, 2" + EOS]),
    ("last_assistant", ["1, 2" + EOS]),
])
def test_messages_trained_turns(tok, cfg, loss_on, expected):
  cfg.format, cfg.loss_on = "messages", loss_on
  ids, trained = formats.Encoder(cfg, tok).encode({"messages": CONVERSATION})
  assert spans(tok, ids, trained) == expected
  assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize("fmt,template", [("messages", None), ("prompt_response", None),
                                          ("prompt_response", "none")])
def test_loss_on_all_trains_every_token_but_the_first(tok, cfg, fmt, template):
  cfg.format, cfg.loss_on, cfg.chat_template = fmt, "all", template
  row = {"messages": CONVERSATION, "prompt": "Q?", "response": "A."}
  ids, trained = formats.Encoder(cfg, tok).encode(row)
  assert trained == [0] + [1] * (len(ids) - 1) and len(ids) > 4


def test_text_trains_every_token_and_eos(tok, cfg):
  cfg.format = "text"
  text = "Rivers shape the land they cross."
  ids, trained = formats.Encoder(cfg, tok).encode({"text": text})
  assert tok.decode(ids) == text + EOS
  assert trained == [0] + [1] * (len(ids) - 1)


def test_system_prompt_of_the_template_is_untrained(tok, cfg):
  """A SmolLM2-style template that injects a default system turn."""
  template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n"
              "{% endif %}" + testing.CHATML)
  cfg.chat_template = template
  ids, trained = formats.Encoder(cfg, tok).encode({"prompt": "Hi", "response": "Hello"})
  assert spans(tok, ids, trained) == ["Hello" + EOS]
  assert tok.decode(ids).startswith("<|im_start|>system\nDefault.")


def test_nested_fields(tok, cfg):
  cfg.prompt_field, cfg.response_field = "extra_info.question", "reward_model.solution"
  row = {"extra_info": {"question": "Q?"}, "reward_model": {"solution": "S."}}
  ids, trained = formats.Encoder(cfg, tok).encode(row)
  assert spans(tok, ids, trained) == ["S." + EOS]


# ----------------------------------------------------------------------------- templates


def test_template_that_rerenders_earlier_turns_is_an_error(tok, cfg):
  cfg.format = "messages"
  cfg.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not "
      "loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with pytest.raises(DataError, match=r"not prefix-stable at message 2 of row 0"):
    formats.Encoder(cfg, tok).encode({"messages": CONVERSATION})


def test_template_without_end_of_turn_token_is_an_error(tok, cfg):
  cfg.chat_template = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:\n{% endif %}")
  with pytest.raises(DataError, match="no special end-of-turn token"):
    formats.Encoder(cfg, tok).encode({"prompt": "Hi", "response": "Hello"})


def test_tokens_merging_across_the_turn_boundary_is_an_error(tok, cfg):
  """'assistant: ' + 'Hello' tokenises as 'assistant:' + ' Hello': no token boundary there."""
  cfg.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                       "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  with pytest.raises(DataError, match="not prefix-stable at message 1 of row 0"):
    formats.Encoder(cfg, tok).encode({"prompt": "Hi", "response": "Hello"})


def test_tokenizer_without_template_needs_config(cfg):
  tokenizer = testing.tiny_chat_tokenizer(chat_template=None)
  with pytest.raises(ConfigError, match="no chat template; set data.chat_template"):
    formats.Encoder(cfg, tokenizer)


def test_template_from_file(tok, cfg, tmp_path):
  path = tmp_path / "chatml_upper.jinja"
  path.write_text(testing.CHATML.replace("message['role']", "message['role'] | upper").replace(
      "<|im_start|>assistant", "<|im_start|>ASSISTANT"))
  cfg.chat_template = str(path)
  ids, trained = formats.Encoder(cfg, tok).encode({"prompt": "Hi", "response": "Hello"})
  assert spans(tok, ids, trained) == ["Hello" + EOS]
  assert tok.decode(ids) == ("<|im_start|>USER\nHi<|im_end|>\n"
                             "<|im_start|>ASSISTANT\nHello<|im_end|>\n")


# ----------------------------------------------------------------------------- sources


ROWS = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(12)]


def _epoch_responses(it, tokenizer, num_batches=3):
  """Decoded trained segments of the first batches."""
  out = []
  for _ in range(num_batches):
    b = next(it)
    for r in range(len(b["tokens"])):
      for s in set(b["segment_ids"][r].tolist()) - {0}:
        sel = (b["segment_ids"][r] == s) & (b["loss_mask"][r] > 0)
        out.append(tokenizer.decode(b["targets"][r][sel]))
  return out


def _expected(rows):
  return {r["response"] + EOS for r in rows}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_local_files(tok, cfg, tmp_path, kind):
  ds = datasets.Dataset.from_list(ROWS)
  path = tmp_path / f"rows.{kind}"
  {"jsonl": lambda p: ds.to_json(p, lines=True), "json": lambda p: p.write_text(json.dumps(ROWS)),
   "parquet": ds.to_parquet, "csv": ds.to_csv}[kind](path if kind == "json" else str(path))
  cfg.source = str(path)
  got = _epoch_responses(make_iter(cfg, tok), tok)
  assert set(got) == _expected(ROWS)


def test_glob_and_row_of_the_right_file(tok, cfg, tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ROWS[:6])
  write_jsonl(tmp_path / "b.jsonl", ROWS[6:])
  cfg.source = str(tmp_path / "*.jsonl")
  assert set(_epoch_responses(make_iter(cfg, tok), tok)) == _expected(ROWS)
  write_jsonl(tmp_path / "b.jsonl", ROWS[6:8] + [{"prompt": "P"}] + ROWS[9:])
  with pytest.raises(DataError, match=f"missing in row 2 of {tmp_path}/b.jsonl"):
    make_iter(cfg, tok)


def test_save_to_disk_folder(tok, cfg, tmp_path):
  datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                        "test": datasets.Dataset.from_list(ROWS[6:])}).save_to_disk(tmp_path / "dd")
  cfg.source, cfg.split = str(tmp_path / "dd"), "test"
  assert set(_epoch_responses(make_iter(cfg, tok), tok)) == _expected(ROWS[6:])
  cfg.split = "validation"
  with pytest.raises(DataError, match=r"has splits \['test', 'train'\]; data.split='validation'"):
    make_iter(cfg, tok)
  datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "d")
  cfg.source, cfg.split = str(tmp_path / "d"), "train"
  assert set(_epoch_responses(make_iter(cfg, tok), tok)) == _expected(ROWS)


def test_nested_fields_from_a_file(tok, cfg, tmp_path):
  rows = [{"extra_info": {"question": r["prompt"], "level": 1}, "solution": r["response"]}
          for r in ROWS]
  cfg.source = write_jsonl(tmp_path / "nested.jsonl", rows)
  cfg.prompt_field, cfg.response_field = "extra_info.question", "solution"
  assert set(_epoch_responses(make_iter(cfg, tok), tok)) == _expected(ROWS)


def test_num_proc_gives_the_same_tokens_and_errors(tok, cfg, tmp_path):
  cfg.source, cfg.max_rows = "builtin:arith_train", 40  # in memory: no map cache to reuse
  one = next(make_iter(cfg, tok))
  cfg.num_proc = 2
  two = next(make_iter(cfg, tok))
  for k in one:
    assert (one[k] == two[k]).all(), k
  cfg.source, cfg.max_rows = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"prompt": "P"}]), None
  with pytest.raises(DataError, match=f"^field 'response' is missing in row 12 of {cfg.source}$"):
    make_iter(cfg, tok)


def test_max_rows(tok, cfg):
  cfg.max_rows = 10
  assert make_iter(cfg, tok).stats["rows"] == 10


# ----------------------------------------------------------------------------- bad input


def _error(cfg, tok, **kwargs):
  with pytest.raises(DataError) as info:
    make_iter(cfg, tok, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_missing_field_names_field_file_and_row(tok, cfg, tmp_path):
  cfg.source = write_jsonl(tmp_path / "d.jsonl", ROWS[:3] + [{"prompt": "P", "answer": 1}])
  assert _error(cfg, tok) == f"field 'response' is missing in row 3 of {cfg.source}"


def test_absent_column_lists_the_columns(tok, cfg, tmp_path):
  cfg.source = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "response": "R"}])
  assert _error(cfg, tok) == (f"field 'prompt' not found in {cfg.source} (columns: question, "
                              "response); set data.prompt_field to one of them")


def test_non_string_field(tok, cfg, tmp_path):
  cfg.source = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"prompt": 3, "response": "R"}])
  assert _error(cfg, tok) == f"field 'prompt' in row 2 of {cfg.source} is int, expected a string"


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}],
     "message 0 (user) of row 1 of {src} has content of type int, expected a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
      {"role": "assistant", "content": "A"}],
     "message 0 (user) of row 1 of {src} has content of type list, expected a string"),
    ([{"role": "user", "content": "Q"}, {"role": "robot", "content": "A"}],
     "message 1 of row 1 of {src} has unknown role 'robot'; expected one of system, user, "
     "assistant"),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
     "row 1 of {src} has no assistant turn (roles: system, user); nothing to train on"),
])
def test_bad_conversations(tok, cfg, tmp_path, messages, expected):
  good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
  cfg.format = "messages"
  cfg.source = write_jsonl(tmp_path / "m.jsonl", [good, {"messages": messages}])
  assert _error(cfg, tok) == expected.format(src=cfg.source)


def test_empty_file(tok, cfg, tmp_path):
  (tmp_path / "e.jsonl").write_text("")
  cfg.source = str(tmp_path / "e.jsonl")
  assert _error(cfg, tok) == f"{cfg.source} is empty"


def test_missing_path(tok, cfg, tmp_path):
  cfg.source = str(tmp_path / "nope.jsonl")
  assert _error(cfg, tok) == f"data.source={cfg.source!r}: no such file or directory"


def test_glob_without_matches(tok, cfg, tmp_path):
  cfg.source = str(tmp_path / "*.parquet")
  assert _error(cfg, tok) == f"data.source={cfg.source!r}: no files match"


def test_unreadable_parquet(tok, cfg, tmp_path):
  (tmp_path / "bad.parquet").write_text("this is not parquet")
  cfg.source = str(tmp_path / "bad.parquet")
  assert re.fullmatch(re.escape(f"cannot read {cfg.source} as parquet: ") + ".*magic bytes.*",
                      _error(cfg, tok))


def test_malformed_jsonl_line(tok, cfg, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "a", "response": }\n')
  cfg.source = str(path)
  assert _error(cfg, tok).startswith(f"{path}: line 3: invalid JSON (Expecting value")


def test_folder_that_is_not_a_saved_dataset(tok, cfg, tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ROWS)
  cfg.source = str(tmp_path)
  assert "not one written by save_to_disk" in _error(cfg, tok)


def test_offline_hub_name(tok, cfg):
  cfg.source = "no-such-org/no-such-dataset"
  assert _error(cfg, tok).startswith("cannot load hub dataset 'no-such-org/no-such-dataset'")


def test_unknown_builtin(tok, cfg):
  cfg.source = "builtin:nope"
  assert _error(cfg, tok).startswith("unknown built-in data set 'nope'; expected one of "
                                     "arith_train")


def test_local_split_other_than_train(tok, cfg, tmp_path):
  cfg.source, cfg.split = write_jsonl(tmp_path / "d.jsonl", ROWS), "test"
  assert _error(cfg, tok).startswith("data.split='test': local files have one split, 'train'")


def test_dropped_rows_are_counted_or_an_error(tok, cfg, tmp_path):
  rows = ROWS[:4] + [{"prompt": "P", "response": "  "},
                     {"prompt": "long " * 80, "response": "R"}] + ROWS[4:]
  cfg.source, cfg.max_length = write_jsonl(tmp_path / "d.jsonl", rows), 64
  it = make_iter(cfg, tok)
  assert it.stats["dropped"] == {"empty": 1, "longer than the limit": 1}
  assert "14 rows read, 12 kept, 2 dropped (1 empty, 1 longer than the limit" in it.summary()
  cfg.error_on_dropped = True
  assert _error(cfg, tok).startswith(f"row 4 of {cfg.source} is empty (max_length=64")


def _reply(content):
  return {"role": "assistant", "content": content}


def test_blank_trained_replies_are_dropped_and_counted_like_empty_responses(tok, cfg, tmp_path):
  """A blank trained assistant turn would teach only the end-of-turn token: the row is dropped."""
  blank_last = {"messages": CONVERSATION[:4] + [_reply("")]}
  blank_first = {"messages": CONVERSATION[:2] + [_reply(" \n")] + CONVERSATION[3:]}
  rows = [{"messages": CONVERSATION}, blank_last, {"messages": CONVERSATION}, blank_first]
  cfg.format, cfg.source = "messages", write_jsonl(tmp_path / "m.jsonl", rows)
  it = make_iter(cfg, tok)
  assert it.stats["dropped"] == {"empty": 2}
  assert "4 rows read, 2 kept, 2 dropped (2 empty;" in it.summary()
  cfg.loss_on = "last_assistant"  # the blank first reply is then context, not a target
  assert make_iter(cfg, tok).stats["dropped"] == {"empty": 1}
  cfg.loss_on = "all"
  assert make_iter(cfg, tok).stats["dropped"] == {"empty": 2}
  cfg.loss_on, cfg.error_on_dropped = "assistant", True
  assert _error(cfg, tok).startswith(f"row 1 of {cfg.source} is empty (max_length=")
  cfg.format, cfg.error_on_dropped = "prompt_response", False
  cfg.source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "response": r}
                                                  for r in ("A", "", "B", " \n")])
  assert make_iter(cfg, tok).stats["dropped"] == {"empty": 2}


def test_no_usable_rows(tok, cfg, tmp_path):
  cfg.source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P", "response": ""}])
  assert _error(cfg, tok).startswith(f"no usable rows in {cfg.source}: ")


GOOD_LINE = b'{"prompt": "Q?", "response": "A."}\n'
LATIN1 = {  # kind -> (file bytes with a Latin-1 e-acute at line 3, its byte in that line)
    "jsonl": (GOOD_LINE * 2 + b'{"prompt": "Caf\xe9?", "response": "A."}\n' + GOOD_LINE, 16),
    "json": (b'[{"prompt": "Q?", "response": "A."},\n {"prompt": "Q?", "response": "A."},\n'
             b' {"prompt": "Caf\xe9?", "response": "A."}]\n', 17),
    "csv": (b"prompt,response\nQ?,A.\nCaf\xe9?,A.\nQ?,A.\n", 4),
    "txt": (b"Some text.\nMore text.\nCaf\xe9 text.\n", 4),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", sorted(LATIN1))
def test_bytes_that_are_not_utf8_name_file_line_and_byte(tok, cfg, tmp_path, kind, streaming):
  path = tmp_path / f"latin1.{kind}"
  content, byte = LATIN1[kind]
  path.write_bytes(content)
  cfg.source, cfg.streaming = str(path), streaming
  cfg.format = "text" if kind == "txt" else "prompt_response"
  expected = f"{path}: line 3, byte {byte}: 0xe9 is not UTF-8 text; data files must be UTF-8"
  for _ in range(2):  # the second time from the datasets cache, where there is one
    with pytest.raises(DataError) as info:
      next(make_iter(cfg, tok))
    assert str(info.value) == expected


def test_bytes_that_are_not_utf8_in_one_file_of_a_glob(tok, cfg, tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ROWS)
  (tmp_path / "b.jsonl").write_bytes(LATIN1["jsonl"][0])
  cfg.source = str(tmp_path / "*.jsonl")
  assert _error(cfg, tok) == (f"{tmp_path}/b.jsonl: line 3, byte 16: 0xe9 is not UTF-8 text; data "
                              "files must be UTF-8")


def test_csv_row_with_more_fields_than_the_header(tok, cfg, tmp_path):
  path = tmp_path / "ragged.csv"
  path.write_text('prompt,response\nQ?,A.\n"Two\nlines?",A.\n\nQ?,A.,extra\nQ?,A.\n')
  cfg.source = str(path)
  assert _error(cfg, tok) == f"{path}: line 6 (row 2) has 3 fields, the header has 2"


@pytest.mark.parametrize("text,expected", [
    ('{"prompt": "Q?", "response": "A."}\n["Q?", "A."]\n', "line 2: an array, expected one JSON "
                                                          "object per line"),
    ('{"prompt": "Q?", "response": "A."}\n\n3\n', "line 3: a number, expected one JSON object per "
                                                   "line"),
    ('"Q? A."', "a string, expected a list of objects or one object per line"),
])
def test_json_that_is_not_rows(tok, cfg, tmp_path, text, expected):
  path = tmp_path / ("rows.jsonl" if "\n" in text else "rows.json")
  path.write_text(text)
  cfg.source = str(path)
  assert _error(cfg, tok) == f"{path}: {expected}"


def _cut(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage,file,expected", [
    (_cut, "state.json", "invalid JSON (Expecting"),
    (_cut, "dataset_info.json", "invalid JSON ("),
    (_cut, "data-00000-of-00001.arrow", "not a readable Arrow file (Expected to read"),
    (lambda p: p.write_bytes(b"\0" * len(p.read_bytes())), "data-00000-of-00001.arrow",
     "not a readable Arrow file ("),
    (lambda p: p.unlink(), "data-00000-of-00001.arrow", "No such file or directory"),
])
def test_damaged_save_to_disk_folder_names_the_file(tok, cfg, tmp_path, damage, file, expected):
  folder = tmp_path / "saved"
  datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
  damage(folder / file)
  cfg.source = str(folder)
  message = _error(cfg, tok)
  assert message.startswith(f"cannot load save_to_disk folder {folder}: ")
  assert f"{folder / file}" in message and expected in message


@pytest.mark.parametrize("field,value,expected", [
    ("format", "chat", "data.format='chat': expected one of prompt_response, messages, text"),
    ("loss_on", "every", "data.loss_on='every': expected one of assistant, last_assistant, all"),
    ("truncation", "cut", "data.truncation='cut': expected one of drop, truncate_response"),
    ("max_length", 0, "data.max_length=0: must be a positive integer"),
])
def test_bad_config_values(tok, cfg, field, value, expected):
  cfg[field] = value
  with pytest.raises(ConfigError, match=re.escape(expected)):
    make_iter(cfg, tok)


def _inspect_cli(tmp_path, *flags):
  tokenizer_dir = tmp_path / "tokenizer"
  testing.tiny_chat_tokenizer().save_pretrained(tokenizer_dir)
  return subprocess.run(
      [sys.executable, "-m", "dft_jax.data.inspect", f"--tokenizer={tokenizer_dir}",
       f"--config.data.cache_dir={tmp_path}/cache", *flags],
      capture_output=True, text=True, check=False, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_inspect_cli(tmp_path):
  """The real CLI: marked spans and packing stats; a bad source is one line, exit 2."""
  source = write_jsonl(tmp_path / "d.jsonl", ROWS)
  proc = _inspect_cli(tmp_path, f"--config.data.source={source}", "--num=2", "--color=never")
  assert proc.returncode == 0, proc.stderr
  assert "[[Answer 0." + EOS + "]]" in proc.stdout and "[[Answer 1." + EOS + "]]" in proc.stdout
  assert f"data {source}: 12 rows read, 12 kept, 0 dropped" in proc.stdout
  proc = _inspect_cli(tmp_path, f"--config.data.source={tmp_path}/missing.jsonl")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"dft_jax: error: data.source='{tmp_path}/missing.jsonl': no such file or directory")


def test_streaming_from_files_and_its_errors(tok, cfg, tmp_path):
  cfg.streaming, cfg.source = True, write_jsonl(tmp_path / "d.jsonl", ROWS)
  assert set(_epoch_responses(make_iter(cfg, tok), tok)) == _expected(ROWS)
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"prompt": "a", "response": }\n')
  cfg.source = str(path)
  with pytest.raises(DataError, match=f"^{path}: line 13: invalid JSON"):
    next(make_iter(cfg, tok))
  cfg.source = write_jsonl(tmp_path / "m.jsonl", ROWS + [{"prompt": "P"}])
  with pytest.raises(DataError, match=r"^field 'response' is missing in row \d+ of this process's "
                                      f"shuffled stream of {cfg.source}$"):
    next(make_iter(cfg, tok))
  cfg.shuffle_buffer = 0
  with pytest.raises(DataError, match=f"^field 'response' is missing in row 12 of {cfg.source}$"):
    next(make_iter(cfg, tok))


def test_malformed_json_document(tok, cfg, tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(ROWS[:2], indent=1).replace("},", "}"))  # line 6 lacks a comma
  cfg.source = str(path)
  assert _error(cfg, tok).startswith(f"{path}: line 6: invalid JSON (Expecting ',' delimiter")


def test_a_lone_surrogate_escape_names_file_line_column_and_field(tok, cfg, tmp_path):
  """`\\ud800` alone is no character: Arrow's reader says only 'Trailing data at position N'.
  An escaped backslash before `ud800` and a complete pair are no fault."""
  lines = ['{"prompt": "What is 1 + 1?", "response": "2"}',
           '{"prompt": "Caf\\u00e9 \\\\ud800 or \\ud83d\\ude00?", "response": "Tea \\ud800."}']
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg.source = str(path)
  column = lines[1].index("\\ud800.") + 1
  assert _error(cfg, tok) == (
      f"{path}: line 2, column {column}, field 'response': \\ud800 is half of a UTF-16 surrogate "
      "pair without its other half (a lone surrogate), not a character; write the character "
      "itself or its complete pair")


def test_a_number_among_numeric_strings_names_the_row_that_holds_it(tok, cfg, tmp_path):
  """The reader gives the column one type: one number among numeric strings makes every value a
  number, so row 0 looks wrong; the row to fix is the one holding the number in the file."""
  rows = [{"prompt": f"What is {i} + 0?", "response": str(i)} for i in range(10)]
  rows[6]["response"] = 6
  cfg.source = write_jsonl(tmp_path / "typed.jsonl", rows)
  assert _error(cfg, tok) == f"field 'response' in row 6 of {cfg.source} is int, expected a string"
