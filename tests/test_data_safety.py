"""Nothing sent: loading local data or a local tokenizer opens no network connection.

The test runs a real process whose sockets refuse to connect, started without the offline switches
the other tests set.
"""
import json
import os
import pathlib
import subprocess
import sys

import datasets

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_llama"
ROWS = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(8)]


def run_python(script, *args):
  env = {k: v for k, v in os.environ.items()
         if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                      "HF_UPDATE_DOWNLOAD_COUNTS")}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


LOAD_LOCAL_DATA = """
import json, socket, sys
attempts = []


def refuse(*args, **kwargs):
  attempts.append(repr(args)[:200])
  raise OSError("this test allows no network")


socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = refuse
from dft_jax import data
from dft_jax.data import testing
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
for source, fmt in json.loads(sys.argv[2]):
  for streaming in (False, True):
    c = testing.default_config().data
    c.update(source=source, format=fmt, streaming=streaming, cache_dir=sys.argv[3])
    next(data.make_train_iterator(c, tokenizer, seq_len=64, global_batch_size=2, seed=0,
                                  process_index=0, process_count=1))
print(json.dumps(attempts))
"""


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
