"""Exports are all or nothing: written beside the target and renamed when complete, a failed write
(disk full, no permission) removed with one line naming the cause, a killed export's folder removed
by the next one, the exported checkpoint step named in the message and in the folder."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors import SafetensorError

from dft_jax import export
from dft_jax import models
from test_train import REPO, TINY, tiny_config


@pytest.fixture(scope="module")
def tiny():
  return models.load(TINY, compute_dtype="float32")


def folder_files(folder):
  return sorted(p.name for p in folder.iterdir())


def hidden_leftovers(parent):
  return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_export_names_what_it_exported_in_its_folder(tiny, tmp_path):
  model, tokenizer = tiny
  out = export.export_hf(model, tokenizer, tmp_path / "hf", source="runs/dft", step=7)
  marker = json.loads((out / export.MARKER).read_text())
  assert marker["source"] == "runs/dft" and marker["step"] == 7 and marker["format"] == "hf"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
  assert set(marker["files"]) | {export.MARKER} == set(folder_files(out))
  assert models.load(str(out))[0].config == model.config  # a model folder transformers reads
  assert hidden_leftovers(tmp_path) == []


def fill_the_disk(written_bytes):
  """A save_file that writes some bytes, then fails as a full disk does."""
  def save_file(tensors, path, metadata=None):
    del tensors, metadata
    with open(path, "wb") as f:
      f.write(b"\0" * written_bytes)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return save_file


def rust_full_disk(tensors, path, metadata=None):
  """How safetensors itself reports it."""
  del tensors, path, metadata
  raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer", [fill_the_disk(1 << 16), rust_full_disk])
def test_a_full_disk_leaves_nothing_and_keeps_an_earlier_export(tiny, tmp_path, monkeypatch,
                                                                 writer):
  model, tokenizer = tiny
  earlier = export.export_hf(model, tokenizer, tmp_path / "hf", source="runs/dft", step=2)
  before = {name: (earlier / name).read_bytes() for name in folder_files(earlier)}
  monkeypatch.setattr(export, "save_file", writer)
  for out in (tmp_path / "new", earlier):
    with pytest.raises(export.ExportError) as e:
      export.export_hf(model, tokenizer, out, source="runs/dft", step=4)
    assert str(e.value) == (f"writing the export {out} failed: [Errno 28] No space left on device; "
                            "nothing was left there (its unfinished folder was removed)")
  assert not (tmp_path / "new").exists()
  assert {name: (earlier / name).read_bytes() for name in folder_files(earlier)} == before
  assert hidden_leftovers(tmp_path) == []


def test_no_permission_for_the_tokenizer_files_is_one_line(tiny, tmp_path, monkeypatch):
  model, tokenizer = tiny

  def refused(self, folder, *args, **kwargs):
    del self, args, kwargs
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{folder}/tokenizer.json")

  monkeypatch.setattr(type(tokenizer), "save_pretrained", refused)
  with pytest.raises(export.ExportError, match=r"^writing the export .*/hf failed: \[Errno 13\] "
                                               r"Permission denied: .*/tokenizer.json; nothing"):
    export.export_hf(model, tokenizer, tmp_path / "hf")
  assert os.listdir(tmp_path) == []


def test_a_folder_holding_other_files_is_refused(tiny, tmp_path):
  model, _ = tiny
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match=f"^{tmp_path} holds files and is no dft_jax export"):
    export.export_hf(model, None, tmp_path)
  assert folder_files(tmp_path) == ["notes.txt"]
  (tmp_path / "file").write_text("")
  with pytest.raises(export.ExportError, match="is a file; an export writes a folder"):
    export.export_hf(model, None, tmp_path / "file")


def test_the_next_export_removes_a_killed_exports_folder_only(tiny, tmp_path):
  model, _ = tiny
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  host = os.uname().nodename
  dead = tmp_path / f".hf{export.PARTIAL}{host}-{gone.pid}"
  alive = tmp_path / f".hf{export.PARTIAL}{host}-{os.getppid()}"
  for folder in (dead, alive):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
  export.export_hf(model, None, tmp_path / "hf")
  assert hidden_leftovers(tmp_path) == [alive.name]


KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, sys, time
    from dft_jax import export, models
    real = export.save_file
    def slow(tensors, path, metadata=None):
      real(tensors, path, metadata=metadata)
      print("weights written", flush=True)
      time.sleep(600)
    export.save_file = slow
    model, tokenizer = models.load(sys.argv[1], compute_dtype="float32")
    export.export_hf(model, tokenizer, sys.argv[2])
""")


@pytest.mark.slow
def test_an_export_killed_while_writing_leaves_nothing_that_looks_like_a_model(tiny, tmp_path):
  out = tmp_path / "hf"
  proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, TINY, str(out)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "weights written"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.listdir(tmp_path) == [f".hf{export.PARTIAL}{os.uname().nodename}-{proc.pid}"]
  model, tokenizer = tiny
  export.export_hf(model, tokenizer, out)
  assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.slow
def test_the_export_command_names_the_checkpoint_step(tmp_path, capsys):
  from dft_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path, train__num_steps=2, checkpoint__every_steps=1)
  config.log.tensorboard = False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  run = tmp_path / "run"
  for step, flags in ((2, []), (1, ["--step=1"])):
    export.cli_main(["dft_jax.export", f"--model={run}", f"--out={tmp_path}/hf{step}", *flags])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == (f"exported llama (2 layers) of checkpoint step {step} of {run} to "
                       f"{tmp_path}/hf{step}")
    marker = json.loads((tmp_path / f"hf{step}" / export.MARKER).read_text())
    assert (marker["source"], marker["step"]) == (str(run), step)
