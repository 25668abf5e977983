"""Nothing run, nothing sent: code in a model or tokenizer folder is never imported (nor offered on
stdin), and loading local data or a local tokenizer opens no network connection.

Both run real processes: a user who answers "y" to every question on stdin, and a process whose
sockets refuse to connect, started without the offline switches the other tests set.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import datasets
import pytest
import transformers

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_llama"
PROMPT = "Do you wish to run the custom code"
ROWS = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]


def run_python(script, *args, stdin=""):
  env = {k: v for k, v in os.environ.items()
         if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                      "HF_UPDATE_DOWNLOAD_COUNTS")}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", script, *map(str, args)], input=stdin, env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def with_custom_tokenizer_code(folder, tokenizer_class, marker):
  """Makes tokenizer_config.json in `folder` name a class of the folder's own Python file
  (`auto_map`, as hub repositories with custom tokenizers do); importing that file writes
  `marker`."""
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config.update(tokenizer_class=tokenizer_class,
                auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  (folder / "tokenization_custom.py").write_text(
      f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
      "from transformers import PreTrainedTokenizerFast\n\n\n"
      "class CustomTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  return folder


LOAD_TOKENIZERS = """
import json, sys
from dft_jax import models
from dft_jax.errors import ModelError
from dft_jax.models import hf
for kind, path in json.loads(sys.argv[1]):
  try:
    tokenizer = models.load(path)[1] if kind == "model" else hf.read_tokenizer(path)
    print(json.dumps({"path": path, "ids": tokenizer("hello world")["input_ids"]}))
  except ModelError as e:
    print(json.dumps({"path": path, "error": str(e)}))
"""


@pytest.mark.slow
def test_code_in_a_tokenizer_folder_is_never_run_nor_offered(tmp_path):
  """Three folders whose tokenizer_config.json names the folder's own code: a tokenizer alone and
  a model whose tokenizer class exists only as that code are refused in one line; a model that
  also names a transformers class loads that class on its tokenizer.json, with a warning."""
  marker = tmp_path / "custom_code_ran"
  tokenizer_only = tmp_path / "tokenizer"
  tokenizer_only.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(TINY / name, tokenizer_only)
  model_custom, model_plain = (pathlib.Path(shutil.copytree(TINY, tmp_path / name))
                               for name in ("model_custom", "model_plain"))
  folders = [("tokenizer", with_custom_tokenizer_code(tokenizer_only, "CustomTokenizer", marker)),
             ("model", with_custom_tokenizer_code(model_custom, "CustomTokenizer", marker)),
             ("model", with_custom_tokenizer_code(model_plain, "PreTrainedTokenizerFast", marker))]
  proc = run_python(LOAD_TOKENIZERS, json.dumps([(k, str(f)) for k, f in folders]),
                    stdin="y\n" * 10)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert PROMPT not in proc.stdout + proc.stderr
  assert not marker.exists()
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for result, folder in zip(results[:2], (tokenizer_only, model_custom)):
    assert result["error"] == (
        f"{folder}/tokenizer_config.json: the tokenizer class is custom code (auto_map "
        "tokenization_custom.CustomTokenizer), and dft_jax never runs code from a model folder; to "
        "load the folder's tokenizer.json instead, set tokenizer_class there to "
        "PreTrainedTokenizerFast")
  plain = transformers.PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"))
  assert results[2]["ids"] == plain("hello world")["input_ids"]
  assert (f"{model_plain}/tokenizer_config.json names custom tokenizer code (auto_map "
          "tokenization_custom.CustomTokenizer); not run") in proc.stderr


LOAD_LOCAL_DATA = """
import json, socket, sys
attempts = []


def refuse(*args, **kwargs):
  attempts.append(repr(args)[:200])
  raise OSError("this test allows no network")


socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = refuse
from dft_jax import data
from dft_jax.data import testing
from dft_jax.models import hf
tokenizer = hf.read_tokenizer(sys.argv[1])
for source, fmt in json.loads(sys.argv[2]):
  for streaming in (False, True):
    c = testing.default_config().data
    c.update(source=source, format=fmt, streaming=streaming, cache_dir=sys.argv[3], max_length=64)
    next(data.make_train_iterator(c, tokenizer, seq_len=64, global_batch_size=2, seed=0,
                                  max_segments=64, process_index=0, process_count=1))
print(json.dumps(attempts))
"""


@pytest.mark.slow
def test_local_data_and_tokenizer_open_no_connection(tmp_path):
  """Every kind of local source, map-style and streaming, with the hub's offline switches unset
  (datasets would send a download-count request for each packaged builder, local files too)."""
  ds = datasets.Dataset.from_list(ROWS)
  ds.to_json(str(tmp_path / "rows.jsonl"))
  (tmp_path / "rows.json").write_text(json.dumps(ROWS))
  ds.to_csv(str(tmp_path / "rows.csv"))
  ds.to_parquet(str(tmp_path / "rows.parquet"))
  (tmp_path / "rows.txt").write_text("".join(r["response"] + "\n" for r in ROWS))
  ds.save_to_disk(str(tmp_path / "saved"))
  sources = [(str(tmp_path / name), "text" if name.endswith(".txt") else "prompt_response")
             for name in ("rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "rows.txt",
                          "saved")]
  proc = run_python(LOAD_LOCAL_DATA, TINY, json.dumps(sources), tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == []
