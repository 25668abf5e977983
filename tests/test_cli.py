"""The command family (dft_jax/cli.py): --help with the config fields and their meanings, one
console format, run folders that a failed start does not leave behind, stop signals in every
phase, the progress bar's ETA."""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from dft_jax import cli
from dft_jax import config_files
from dft_jax import metrics
from conftest import FAST_COMPILE
from test_train import REPO, cli_flags, tiny_config

COMMANDS = ("dft_jax.train", "dft_jax.evaluate", "dft_jax.generate", "dft_jax.export",
            "dft_jax.data.inspect", "dft_jax.experiments.scanner")


# ----------------------------------------------------------------------------- config meanings


@pytest.mark.parametrize("path,arg", [(config_files.DEFAULT, None), (config_files.DEFAULT, "gpu"),
                                      (config_files.STUDY, "gpu")])
def test_every_config_field_has_a_meaning(path, arg):
  docs = config_files.field_docs()
  missing = [p for p, _ in config_files.flatten(config_files.load(path, arg), leaves=docs)
             if not docs.get(p)]
  assert not missing


def test_field_meanings_come_from_the_comments(tmp_path):
  path = tmp_path / "config.py"
  path.write_text(
      "import ml_collections\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  # The section's comment is nobody's meaning.\n"
      "  c.a = ml_collections.ConfigDict(dict(\n"
      "      x=1,        # the x\n"
      "                  # and more about x\n"
      "      # above y\n"
      "      y=dict(z=2),\n"
      "      u=1, v=2,   # u and v\n"
      "  ))\n"
      "  c.b = ml_collections.ConfigDict(dict(w=3))\n"
      "  return c\n")
  assert config_files.file_field_docs(str(path)) == {
      "a.x": "the x and more about x", "a.y": "above y", "a.u": "u and v", "a.v": "u and v"}


def test_objective_meanings_come_from_the_registry():
  from dft_jax import objectives
  docs = config_files.field_docs()
  hp = objectives.OBJECTIVES["psft"].hparams["eps_high"]
  assert docs["objective.psft.eps_high"] == f"psft: {hp.doc} ({hp.allowed})"


# ----------------------------------------------------------------------------- one family


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_and_lists_the_config_fields(command):
  done = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stderr == ""  # no library warnings (PyTorch, TPU backend), no traceback
  lines = done.stdout.splitlines()
  name = next(line for line in lines if line.lstrip().startswith("model.name="))
  assert "alias | HF folder | .gguf file" in name  # the default and its meaning
  assert "--config.SECTION.FIELD=VALUE" in done.stdout and "flags:" in lines


def test_run_folder_is_printed_and_removed_when_the_start_fails(tmp_path, capsys):
  created = tmp_path / "new"
  with pytest.raises(RuntimeError), cli.run_folder(str(created)):
    (created / "checkpoints").mkdir(parents=True)
    raise RuntimeError("the run failed before its first checkpoint")
  assert not created.exists()
  existing = tmp_path / "old"
  (existing / "notes").mkdir(parents=True)
  with pytest.raises(RuntimeError), cli.run_folder(str(existing)):
    (existing / "checkpoints").mkdir()
    raise RuntimeError("failed")
  assert sorted(p.name for p in existing.iterdir()) == ["notes"]  # only its empty checkpoints/
  with pytest.raises(RuntimeError), cli.run_folder(str(created)):
    (created / "checkpoints" / "2").mkdir(parents=True)  # a complete checkpoint: kept
    raise RuntimeError("failed after step 2")
  assert (created / "checkpoints" / "2").is_dir()


def test_progress_bar_times_only_the_steps_after_the_first(monkeypatch):
  """tqdm's clock, stepped by hand: 100 s pass before the first step is written (compiling, the
  base evaluation), 2 s between steps 1 and 2. The bar's elapsed time and rate count those 2 s
  alone, and it shows no rate (no ETA) before a timed step."""
  import io
  import tqdm.std
  now = [0.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
  stream = io.StringIO()
  writer = metrics.ProgressWriter(10, stream=stream)
  now[0] = 100.0
  writer.write(1, {"loss": 1.0})
  assert writer._bar.n == 1 and writer._bar.format_dict["rate"] is None  # no ETA yet
  now[0] = 102.0
  writer.write(2, {"loss": 0.9})
  assert writer._bar.n == 2 and writer._bar.format_dict["elapsed"] == 2.0
  assert writer._bar.format_dict["n"] - writer._bar.format_dict["initial"] == 1  # one timed step
  writer.close()
  assert "1/10" in stream.getvalue() and "2/10" in stream.getvalue()


# ----------------------------------------------------------------------------- stop signals


def run_until(args, text, sig, workdir, delay=0.5, timeout=300):
  """Starts `python -m dft_jax.train` on the tiny model, sends `sig` `delay` s after `text` is
  printed; returns (exit code, output)."""
  proc = subprocess.Popen([sys.executable, "-m", "dft_jax.train", *args, f"--workdir={workdir}"],
                          cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seen, sent, end = "", None, time.time() + timeout
  while time.time() < end:
    if select.select([proc.stdout], [], [], 0.1)[0]:
      chunk = os.read(proc.stdout.fileno(), 1 << 16).decode(errors="replace")
      if not chunk:
        break
      seen += chunk
    if sent is None and text in seen:
      time.sleep(delay)
      proc.send_signal(sig)
      sent = time.time()
  code = proc.wait(timeout=60)
  assert sent is not None, seen[-3000:]
  return code, seen


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp("rows"), train__num_steps=6)
  config.eval.update(before=True, num_general=2, num_factual=2, max_new_tokens=4,
                     factual_max_new_tokens=4, math_max_new_tokens=4)
  return cli_flags(config)


@pytest.mark.slow
@pytest.mark.parametrize("text,sig,phase", [
    ("compiling the train step", signal.SIGTERM, "compiling the train step"),
    ("scoring held-out rows", signal.SIGINT, "evaluating the base model"),
])
def test_a_stop_before_the_first_step_is_one_line_and_leaves_nothing(tiny_args, tmp_path, text,
                                                                     sig, phase):
  code, output = run_until(tiny_args, text, sig, tmp_path / "run")
  assert code == 128 + sig, output[-3000:]
  assert "Traceback" not in output
  # a clean console: the run folder first, dft_jax's lines in one format, no library chatter
  assert output.splitlines()[0] == f"dft_jax: run folder {tmp_path / 'run'}"
  assert "PyTorch" not in output and "backend" not in output and "INFO" not in output
  # it ended inside the phase (a stop that waited for the phase's end would name the next one)
  assert output.rstrip().splitlines()[-1] == (
      f"dft_jax: stopped by {signal.Signals(sig).name} while {phase}; no checkpoint yet, "
      "nothing kept")
  assert not (tmp_path / "run").exists()
