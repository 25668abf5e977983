"""Faults: kill, interrupt and poison real training runs; nothing may be lost.

The signals, kills, a second run on a workdir and a full disk (slow tier) start the real CLI
(`python -m dft_jax.train`) on the tiny Llama in a subprocess (one CPU device, a JAX compilation
cache shared by all of them) and compare what survives with an uninterrupted reference run bit for
bit: metrics rows, parameters, optimizer state, data position. Where a process of its own adds
nothing (damaged checkpoints, a changed config or another model on resume, a finished run run
again) the command runs in the test process (commands_testlib) on copies of a run trained there
(conftest.tiny_run), and a resumed run must end bit for bit as that run.
"""
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dft_jax import checkpoint as ckpt
from dft_jax import data
from dft_jax import files
from dft_jax import run_control
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError, ModelError
from commands_testlib import error_lines, run_command
from conftest import FAST_COMPILE
import fault_run
import test_train
from test_train import REPO, TINY, cli_flags, read_jsonl, tiny_config

STEPS = 8
VOLATILE = ("time", "step_seconds", "tokens_per_s", "mfu")  # wall-clock metrics


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("rows")


def fault_config(rows_dir, **overrides):
  """STEPS steps, an async checkpoint after every step."""
  settings = dict(train__num_steps=STEPS, checkpoint__every_steps=1, checkpoint__async_save=True)
  settings.update(overrides)
  return tiny_config(rows_dir, **settings)


def command(config, workdir, *extra):
  """`python -m dft_jax.train` through tests/fault_run.py, which injects the faults that FAULT_*
  variables of the environment name (none: the plain command)."""
  return [sys.executable, str(REPO / "tests" / "fault_run.py"), *cli_flags(config),
          f"--workdir={workdir}", *extra]


def slow_save(env, step, seconds):
  """The environment that holds checkpoint `step`'s commit back for `seconds` (tests/fault_run.py)."""
  return dict(env, FAULT_SLOW_SAVE_AT_STEP=str(step), FAULT_SAVE_DELAY_S=str(seconds))


def train_here(workdir, config, *extra):
  """(exit code, stdout, stderr) of `python -m dft_jax.train` with `config`'s flags on `workdir`,
  run in this process."""
  return run_command("dft_jax.train", [*cli_flags(config), f"--workdir={workdir}", *extra])


def run(cmd, env, **kwargs):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        **kwargs)


def start(cmd, env):
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc, timeout=120):
  end = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      output = proc.stdout.read()[-3000:]
      raise AssertionError(f"the run ended (rc={proc.returncode}) first:\n{output}")
    if time.time() > end:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.01)


def read_until(proc, text, timeout=60):
  """Reads the run's output until a line holds `text`; returns what it read."""
  seen, end = "", time.time() + timeout
  while text not in seen:
    if time.time() > end:
      proc.kill()
      raise AssertionError(f"no {text!r} in the output:\n{seen[-3000:]}")
    if select.select([proc.stdout], [], [], 0.1)[0]:
      chunk = os.read(proc.stdout.fileno(), 1 << 16).decode(errors="replace")
      if not chunk:
        raise AssertionError(f"the run ended first:\n{seen[-3000:]}")
      seen += chunk
  return seen


def complete_steps(workdir):
  return ckpt.complete_steps(workdir / "checkpoints")


def temporary_folders(workdir):
  folder = workdir / "checkpoints"
  return sorted(p.name for p in folder.iterdir() if "orbax-checkpoint-tmp" in p.name)


def saving(workdir, step):
  """Whether checkpoint `step` is being written (its temporary folder exists)."""
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(name.startswith(f"{step}.") for name in temporary_folders(workdir))


def metric_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [r["step"] for r in read_jsonl(path)] if path.exists() else []


def read_state(workdir, step):
  """{path: numpy array} of checkpoint `step`'s state (params and optimizer state)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tree = {item: ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / item))
            for item in ("params", "optimizer")}
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}


def read_data_state(workdir, step):
  return json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def assert_same_state(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def assert_same_run(workdir, reference):
  """Bit-identical to the reference: every logged metric of every step, the final state and the
  data position; no temporary checkpoint folder and no lock left behind."""
  rows, ref_rows = read_jsonl(workdir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
  last = ref_rows[-1]["step"]
  assert [r["step"] for r in rows] == list(range(1, last + 1))
  for row, ref in zip(rows, ref_rows):
    for key in ref:
      if key not in VOLATILE:
        assert row[key] == ref[key], (row["step"], key)
  assert_same_state(read_state(workdir, last), read_state(reference, last))
  assert read_data_state(workdir, last) == read_data_state(reference, last)
  assert not temporary_folders(workdir)
  assert not (workdir / "run.lock").exists()


def tree_digest(folder):
  digest = hashlib.sha256()
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
  return digest.hexdigest()


def file_times(folder):
  """{path: modification time} of every file under `folder`."""
  return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


PROGRESS = re.compile(r"^(Generating|tokenising|Map|Filter).*(examples/s|\])")


def warning_lines(output, text):
  return [line for line in output.splitlines()
          if line.startswith("dft_jax: warning: ") and text in line]


@pytest.fixture(scope="module")
def reference(rows_dir, env, tmp_path_factory):
  """The uninterrupted run; it keeps every checkpoint, so a copy can stand for a run stopped at
  any step (see stopped_copy)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = run(command(fault_config(rows_dir, checkpoint__keep=STEPS), workdir), env)
  assert result.returncode == 0, result.stderr[-3000:]
  # the libraries' INFO lines are filtered out, dft_jax's (the data summary) are not
  assert "checkpoint_manager.py" not in result.stderr and "rows read" in result.stderr
  assert complete_steps(workdir) == list(range(1, STEPS + 1))
  return workdir


def stopped_copy(finished, step, workdir):
  """A finished run's workdir as a run killed after checkpoint `step` leaves it: later checkpoints
  gone, metrics rows of later steps still in metrics.jsonl."""
  shutil.copytree(finished, workdir)
  for later in complete_steps(workdir):
    if later > step:
      shutil.rmtree(workdir / "checkpoints" / str(later))
  (workdir / "summary.json").unlink()
  return workdir


# ----------------------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_resume_continues(rows_dir, env, reference,
                                                                     tmp_path):
  """SIGTERM while the checkpoint of step 3 is still being written (slow commit): the run waits
  for it, checkpoints the step it is at, says so and exits 0; the same command finishes the run
  exactly as if it had never stopped."""
  workdir = tmp_path / "run"
  cmd = command(fault_config(rows_dir), workdir)
  proc = start(cmd, slow_save(env, 3, 2))
  wait_for(lambda: saving(workdir, 3), proc)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output[-3000:]
  stopped = re.search(rf"dft_jax: stopped by SIGTERM after step (\d+) of {STEPS}; checkpoint "
                      rf"{re.escape(str(workdir / 'checkpoints'))}/(\d+) written", output)
  assert stopped and stopped[1] == stopped[2], output[-3000:]
  step = int(stopped[1])
  assert 3 <= step < STEPS
  assert complete_steps(workdir)[-2:] == [step - 1, step] and not temporary_folders(workdir)
  assert metric_steps(workdir) == list(range(1, step + 1))
  assert not (workdir / "run.lock").exists()
  resumed = run(cmd, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {step} of {STEPS} (workdir {workdir})" in resumed.stderr
  assert_same_run(workdir, reference)


@pytest.mark.slow
def test_second_signal_exits_at_once_and_keeps_the_last_checkpoint(rows_dir, env, tmp_path):
  """SIGTERM, then SIGINT while the run waits for a slow (60 s) checkpoint commit: the process
  ends at once, the last complete checkpoint is untouched and the next run resumes from it."""
  workdir = tmp_path / "run"
  cmd = command(fault_config(rows_dir), workdir)
  proc = start(cmd, slow_save(env, 3, 60))
  wait_for(lambda: saving(workdir, 3), proc)
  before = tree_digest(workdir / "checkpoints" / "2")
  proc.send_signal(signal.SIGTERM)
  read_until(proc, "SIGTERM: stopping after the current step")
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=30)
  # killed by SIGINT's default action with checkpoint 3's commit still held back: it did not wait
  assert proc.returncode == -signal.SIGINT and temporary_folders(workdir) == [
      "3.orbax-checkpoint-tmp"]
  assert complete_steps(workdir) == [1, 2] and tree_digest(workdir / "checkpoints" / "2") == before
  resumed = run(cmd + ["--config.train.num_steps=3"], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert metric_steps(workdir) == [1, 2, 3] and 3 in complete_steps(workdir)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(rows_dir, env, tmp_path):
  """Two processes (jax.distributed, one CPU device each); only process 1 gets SIGTERM. JAX's
  preemption sync point makes both checkpoint the same step and exit 0."""
  workdir = tmp_path / "run"
  config = fault_config(rows_dir, train__num_steps=200, checkpoint__every_steps=1000)
  port = test_train.free_port()
  procs = [start(command(config, workdir, f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}"), env) for i in range(2)]
  wait_for(lambda: len(metric_steps(workdir)) >= 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  steps = []
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
    stopped = re.search(r"dft_jax: stopped by SIGTERM.* after step (\d+) of 200", output)
    assert stopped, output[-3000:]
    steps.append(int(stopped[1]))
  assert steps[0] == steps[1] < 200
  assert complete_steps(workdir) == [steps[0]]
  assert metric_steps(workdir) == list(range(1, steps[0] + 1))


# ----------------------------------------------------------------------------- hard kills


@pytest.mark.slow
def test_kill9_during_an_async_save_resumes_from_the_previous_checkpoint(rows_dir, env, reference,
                                                                         tmp_path):
  """kill -9 while checkpoint 3 sits written but uncommitted in its temporary folder (its commit
  held for 60 s) and step 4 already trains: the restart resumes from checkpoint 2, deletes the
  partial folder and ends bit-identical to the uninterrupted run."""
  workdir = tmp_path / "run"
  cmd = command(fault_config(rows_dir), workdir)
  proc = start(cmd, slow_save(env, 3, 60))
  wait_for(lambda: len(metric_steps(workdir)) >= 4 and saving(workdir, 3), proc)
  proc.kill()
  proc.wait()
  assert complete_steps(workdir) == [1, 2]
  assert temporary_folders(workdir) == ["3.orbax-checkpoint-tmp"]
  assert list((workdir / "checkpoints" / "3.orbax-checkpoint-tmp").glob("params*/ocdbt*/d/*"))
  assert not (workdir / "checkpoints" / "3.orbax-checkpoint-tmp" / ckpt.MANIFEST).exists()
  resumed = run(cmd, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step 2 of {STEPS} (workdir {workdir})" in resumed.stderr
  assert f"taking over the lock of pid {proc.pid} on " in resumed.stderr
  assert_same_run(workdir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("every,hold,checkpoints,logged", [
    (1, 4, [2, 3], [1, 2, 3]),     # a save after every step: checkpoint 3 the last one
    (3, 6, [3], [1, 2, 3, 4]),     # step 4's metrics logged after checkpoint 3, then rewound
], ids=["saving_every_step", "between_saves"])
def test_kill9_inside_a_step_then_resume_is_bit_identical(rows_dir, env, reference, tmp_path,
                                                         every, hold, checkpoints, logged):
  """kill -9 inside step `hold` (tests/fault_run.py holds the run there: the step's batch taken
  from the data and its update computed, its metrics and checkpoint not written, every earlier
  checkpoint committed), then the same command: same metrics, parameters, optimizer state and
  data position as the run that was never interrupted."""
  workdir = tmp_path / "run"
  cmd = command(fault_config(rows_dir, checkpoint__every_steps=every), workdir)
  proc = start(cmd, dict(env, FAULT_HOLD_IN_STEP=str(hold)))
  read_until(proc, f"{fault_run.HOLDING} {hold}\n", timeout=300)
  proc.kill()
  proc.wait()
  assert complete_steps(workdir) == checkpoints  # killed in step `hold`
  assert not temporary_folders(workdir) and metric_steps(workdir) == logged
  assert (workdir / "run.lock").exists() and not (workdir / "summary.json").exists()
  resumed = run(cmd, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {checkpoints[-1]} of {STEPS}" in resumed.stderr
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- checkpoint integrity


def test_every_complete_checkpoint_carries_the_sha256_of_its_files(tiny_run):
  """checksums.json (written before orbax's commit rename) lists every file of the items with its
  sha256, computed here with hashlib; only orbax's commit records are left out."""
  assert complete_steps(tiny_run.workdir) == [1, 2, 3, 4]
  for step in complete_steps(tiny_run.workdir):
    folder = tiny_run.workdir / "checkpoints" / str(step)
    listed = json.loads((folder / ckpt.MANIFEST).read_text())["sha256"]
    on_disk = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in folder.rglob("*") if p.is_file()}
    assert {"_CHECKPOINT_METADATA", "commit_success.txt", ckpt.MANIFEST} <= on_disk.keys()
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt", ckpt.MANIFEST):
      del on_disk[name]
    assert listed == on_disk
    assert {path.split("/")[0] for path in listed} == {"params", "optimizer", "data", "progress"}


def remove_a_file(folder):
  path = largest_file(folder / "optimizer")
  path.unlink()
  return f"its file {path.relative_to(folder)} is missing"


def add_a_file(folder):
  (folder / "params" / "d" / "extra").write_bytes(b"x")
  return f"its file params/d/extra is not listed in {ckpt.MANIFEST}"


def alter_a_byte(folder):
  path = largest_file(folder / "params")
  flip_a_byte(path)
  return f"its file {path.relative_to(folder)} is not what was written"


def remove_the_manifest(folder):
  (folder / ckpt.MANIFEST).unlink()
  return f"it has no {ckpt.MANIFEST}"


def tear_the_manifest(folder):
  path = folder / ckpt.MANIFEST
  path.write_bytes(path.read_bytes()[:100])
  return f"it cannot be checked against its {ckpt.MANIFEST}"


@pytest.mark.parametrize("harm", [remove_a_file, add_a_file, alter_a_byte, remove_the_manifest,
                                  tear_the_manifest])
def test_damage_names_what_differs_from_the_checksums(tiny_run, tmp_path, harm):
  folder = tmp_path / "2"
  shutil.copytree(tiny_run.workdir / "checkpoints" / "2", folder)
  assert ckpt.damage(str(folder)) is None
  expected = harm(folder)
  assert ckpt.damage(str(folder)).startswith(expected)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_never_trained_on(tiny_run, tmp_path):
  """One bit of checkpoint 4's parameters flipped after it was written: the resumed run says in one
  line that it uses checkpoint 3 instead, moves 4 aside, and ends as the run it was copied from."""
  workdir = stopped_copy(tiny_run.workdir, 4, tmp_path / "run")
  params = workdir / "checkpoints" / "4" / "params"
  flip_a_byte(largest_file(params))
  code, _, err = train_here(workdir, tiny_run.config)
  assert code == 0, err[-3000:]
  [line] = warning_lines(err, "cannot be used")
  assert re.search(rf"checkpoint {re.escape(str(workdir))}/checkpoints/4 cannot be used: its file "
                   r"params/\S+ is not what was written \(its sha256 differs from "
                   r"checksums.json\); "
                   r"using checkpoint 3, the newest usable one; moved to "
                   rf"{re.escape(str(workdir))}/rejected_checkpoints$", line), line
  assert "resuming from step 3 of 4" in err
  assert (workdir / "rejected_checkpoints" / "4" / "params").is_dir()
  assert_same_run(workdir, tiny_run.workdir)


def test_restore_skips_a_checkpoint_orbax_cannot_read(tiny_run, tmp_path, caplog):
  """Checkpoint 3 lost its params manifest.ocdbt and was sealed again (its checksums match, orbax
  cannot read it): inference uses checkpoint 2, says so, and moves nothing."""
  workdir = stopped_copy(tiny_run.workdir, 3, tmp_path / "run")
  folder = workdir / "checkpoints" / "3"
  (folder / "params" / "manifest.ocdbt").unlink()
  files.write_json(str(folder / ckpt.MANIFEST), {"sha256": ckpt.checksums(str(folder))})
  with caplog.at_level(logging.WARNING):
    model, _, _, _ = ckpt.restore_model(str(workdir))
  assert re.search(rf"checkpoint {re.escape(str(workdir))}/checkpoints/3 cannot be used: orbax "
                   r"cannot read it: .*; using checkpoint 2, the newest usable one$", caplog.text,
                   re.MULTILINE), caplog.text
  expected, _, _, _ = ckpt.restore_model(str(tiny_run.workdir), step=2)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(expected))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert complete_steps(workdir) == [1, 2, 3] and not (workdir / "rejected_checkpoints").exists()


def test_no_usable_checkpoint_is_one_error(tiny_run, tmp_path):
  workdir = stopped_copy(tiny_run.workdir, 2, tmp_path / "run")
  for step in (1, 2):
    flip_a_byte(largest_file(workdir / "checkpoints" / str(step) / "params"))
  with pytest.raises(ckpt.CheckpointError, match=(
      rf"^cannot restore checkpoint step 2 from {re.escape(str(workdir))}/checkpoints: its file "
      r"params/\S+ is not what was written .*; the 1 earlier checkpoint\(s\) cannot be used either"
  )) as e:
    ckpt.restore_model(str(workdir))
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- a live run's readers


def as_if_training(workdir, pid=None):
  """run.lock naming a live process (this one) of this host, as the run training in `workdir`
  leaves it."""
  files.write_json(str(workdir / run_control.LOCK_FILE),
                   dict(pid=pid or os.getpid(), host=socket.gethostname(), command="train"))


def test_a_reader_waits_while_the_live_run_commits_a_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  in_flight = workdir / "checkpoints" / f"4{ckpt.TMP_SUFFIX}"
  in_flight.mkdir()
  assert ckpt.saves_in_progress(str(workdir)) == []  # no live run: a killed run's leftover
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  as_if_training(workdir, gone.pid)
  assert ckpt.saves_in_progress(str(workdir)) == []
  as_if_training(workdir)
  assert ckpt.saves_in_progress(str(workdir)) == [4]
  with pytest.raises(ModelError, match=(
      rf"^{re.escape(str(workdir))}: checkpoint 4 is still being written after 0 s; pass "
      r"--step=N to use a complete one \(\[3\]\)$")):
    ckpt.wait_for_saves(str(workdir), timeout=0.2, poll=0.05)
  committer = threading.Timer(0.3, os.rename, (in_flight, workdir / "checkpoints" / "4"))
  committer.start()
  ckpt.wait_for_saves(str(workdir), timeout=60, poll=0.05)
  assert ckpt.complete_steps(str(workdir / "checkpoints")) == [3, 4]


@pytest.mark.slow
def test_evaluation_names_the_step_it_scored_after_waiting_for_a_save(reference, tmp_path,
                                                                       capsys, monkeypatch):
  """Checkpoint 8 is being committed when the evaluation looks (its commit lands 0.5 s after the
  first look): it waits and scores step 8, not 7, and says so on the console and in --out."""
  from dft_jax.evaluate import cli as evaluate_cli  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  last = workdir / "checkpoints" / str(STEPS)
  in_flight = last.with_name(f"{STEPS}{ckpt.TMP_SUFFIX}")
  os.rename(last, in_flight)
  as_if_training(workdir)
  commit = threading.Timer(0.5, os.rename, (in_flight, last))
  looks = ckpt.saves_in_progress

  def commit_soon_after_the_first_look(path):
    if not commit.is_alive() and not last.exists():
      commit.start()
    return looks(path)

  monkeypatch.setattr(ckpt, "saves_in_progress", commit_soon_after_the_first_look)
  out = tmp_path / "eval.json"
  evaluate_cli.cli_main(["dft_jax.evaluate", f"--model={workdir}",
                         "--config.eval.suites=target_probs", "--config.eval.num_hist=2",
                         f"--out={out}"])
  assert f"{workdir} checkpoint step {STEPS} (base: " in capsys.readouterr().out
  assert json.loads(out.read_text())["step"] == STEPS


# ----------------------------------------------------------------------------- one run per workdir

HOLD_LOCK = ("import sys, time; from dft_jax import run_control; "
             "run_control.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
             "time.sleep(600)")


@pytest.mark.slow
def test_workdir_lock_names_its_holder_and_is_taken_over_after_a_kill(env, tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "locked\n"
  with pytest.raises(ConfigError, match=(
      rf"^--workdir={tmp_path} is in use by another run: pid {holder.pid} on "
      rf"{re.escape(socket.gethostname())} since \S+ \S+ \S+ \(-c {tmp_path}\); wait for it to "
      r"end or use another --workdir$")):
    run_control.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  assert (tmp_path / "run.lock").exists()  # kill -9 leaves it behind
  with caplog.at_level(logging.WARNING), run_control.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  assert f"taking over the lock of pid {holder.pid} on " in caplog.text
  assert not (tmp_path / "run.lock").exists()


def test_without_flock_a_live_pid_on_this_host_holds_the_lock(tmp_path, monkeypatch):
  """A filesystem without flock (ENOLCK): the pid in run.lock decides."""
  def no_flock(fd, operation):
    raise OSError(38, "Function not implemented")
  monkeypatch.setattr(run_control.fcntl, "flock", no_flock)
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with subprocess.Popen(["sleep", "60"]) as alive:
    for pid, held in ((alive.pid, True), (int(gone), False)):
      (tmp_path / "run.lock").write_text(json.dumps(dict(pid=pid, host=socket.gethostname())))
      lock = run_control.WorkdirLock(str(tmp_path))
      if held:
        with pytest.raises(ConfigError, match=rf"pid {pid} on .* \(if it is gone, delete "):
          lock.acquire()
      else:
        lock.acquire()
        lock.release()
    alive.kill()


@pytest.mark.slow
def test_a_second_run_is_refused_until_the_first_is_killed(rows_dir, env, reference, tmp_path):
  """While a run trains, the same command on its workdir is refused in one line naming it (and
  changes nothing); after a kill -9 of the first, the command takes the stale lock over, resumes
  and ends as the reference run."""
  workdir = tmp_path / "run"
  cmd = command(fault_config(rows_dir), workdir)
  first = start(cmd, slow_save(env, 2, 60))
  wait_for(lambda: saving(workdir, 2), first)
  second = run(cmd, env)
  assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
  [line] = error_lines(second.stderr)
  assert line.startswith(f"dft_jax: error: --workdir={workdir} is in use by another run: pid "
                         f"{first.pid} on {socket.gethostname()} since "), line
  assert f"({REPO / 'tests' / 'fault_run.py'} --config." in line
  first.kill()
  first.wait()
  resumed = run(cmd, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"taking over the lock of pid {first.pid} on " in resumed.stderr
  assert f"resuming from step 1 of {STEPS} (workdir {workdir})" in resumed.stderr
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- resume


def test_a_finished_run_run_again_prints_its_summary_and_changes_nothing(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)
  before, times = tree_digest(workdir), file_times(workdir)
  code, out, err = train_here(workdir, tiny_run.config)
  assert code == 0, err[-3000:]
  assert f"{workdir}: this run finished all its 4 steps; nothing to do" in err
  assert f"dft on {TINY}: 4 steps in" in out
  assert "loading" not in err and "compiling" not in err
  assert tree_digest(workdir) == before and file_times(workdir) == times


@pytest.mark.slow
def test_a_changed_field_on_resume_is_refused_unless_allowed(tiny_run, tmp_path):
  """Another learning rate and compute dtype on resume: refused in one line naming both fields
  with their old and new values, nothing changed; with --allow_config_change the run resumes,
  logs the changes and config.json holds the new values."""
  workdir = stopped_copy(tiny_run.workdir, 2, tmp_path / "run")
  changed = tiny_run.config.copy_and_resolve_references()
  changed.optimizer.learning_rate, changed.model.compute_dtype = 2e-3, "bfloat16"
  before = tree_digest(workdir)
  code, _, err = train_here(workdir, changed)
  assert code == 2 and "Traceback" not in err, err[-3000:]
  [line] = error_lines(err)
  assert (f"--workdir={workdir} holds checkpoints of a run with model.compute_dtype='float32', "
          "optimizer.learning_rate=0.001, but this run has model.compute_dtype='bfloat16', "
          "optimizer.learning_rate=0.002: run the same config to resume, pass "
          "--allow_config_change") in line, line
  assert "loading" not in err and tree_digest(workdir) == before
  code, _, err = train_here(workdir, changed, "--allow_config_change")
  assert code == 0, err[-3000:]
  [line] = warning_lines(err, "--allow_config_change")
  assert line.endswith(f"{workdir} resumes with model.compute_dtype='bfloat16', "
                       "optimizer.learning_rate=0.002 (its checkpoints were written with "
                       "model.compute_dtype='float32', optimizer.learning_rate=0.001); config.json "
                       "is rewritten")
  config = json.loads((workdir / "config.json").read_text())
  assert (config["optimizer"]["learning_rate"], config["model"]["compute_dtype"]) == (2e-3,
                                                                                      "bfloat16")
  assert metric_steps(workdir) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.slow
def test_nan_batch_is_skipped_and_only_finite_states_are_saved(rows_dir, tmp_path, monkeypatch):
  """train.nonfinite=skip: a NaN batch at step 2 leaves parameters and optimizer state exactly
  as after step 1 (checked bit for bit in checkpoint 2), is counted, and training goes on."""
  workdir = tmp_path / "run"
  config = fault_config(rows_dir, train__num_steps=3, checkpoint__keep=3)
  monkeypatch.setattr(data, "make_train_iterator", fault_run.poisoned(data.make_train_iterator, 2))
  code, _, err = train_here(workdir, config)
  assert code == 0, err[-3000:]
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0] and np.isnan(rows[1]["loss"])
  assert json.loads((workdir / "summary.json").read_text())["skipped_steps"] == 1
  states = {step: read_state(workdir, step) for step in (1, 2, 3)}
  for state in states.values():
    assert all(np.isfinite(v).all() for v in state.values())
  assert_same_state(states[2], states[1])
  assert states[3]["['params']['embed']['value']"].tobytes() != \
      states[2]["['params']['embed']['value']"].tobytes()
  assert len(warning_lines(err, "step 2: non-finite loss or gradient")) == 1
  assert "NaN or Inf" not in err  # TensorBoard's own warning, once per NaN metric


def test_metric_writers_write_nan_without_a_warning_per_value(tmp_path, caplog):
  """TensorBoard's writer warns for every NaN scalar it is given (a step whose loss is NaN has
  dozens): the value is written, the warning is not shown."""
  from dft_jax import metrics  # pylint: disable=g-import-not-at-top
  writer = metrics.TensorBoardWriter(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    for step in range(1, 4):
      writer.write(step, {name: float("nan") for name in ("loss", "grad_norm", "entropy")})
    writer.close()
  assert "NaN" not in caplog.text
  acc = test_train.event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
  assert all(np.isnan(e.value) for e in acc.Scalars("grad_norm"))


@pytest.mark.slow
def test_nan_batch_stops_the_run_with_one_line(rows_dir, tmp_path, monkeypatch):
  """train.nonfinite=stop: one line naming the step and where its batch starts, exit 2, and no
  checkpoint of that step or later (checkpoints are written after every step here)."""
  workdir = tmp_path / "run"
  config = fault_config(rows_dir, train__num_steps=4, train__nonfinite="stop")
  monkeypatch.setattr(data, "make_train_iterator", fault_run.poisoned(data.make_train_iterator, 2))
  code, _, err = train_here(workdir, config)
  assert code == 2
  assert "Traceback" not in err
  [line] = error_lines(err)
  assert line.startswith("dft_jax: error: step 2: non-finite loss or gradient (loss=nan")
  assert '"epoch": 0, "row": 8' in line and "train.nonfinite='stop'" in line
  assert complete_steps(workdir) == [1] and not temporary_folders(workdir)


def test_save_refuses_a_non_finite_state(tmp_path):
  """The last line of defence: a state holding inf is never written; the earlier one stays."""
  manager = ckpt.make_manager(str(tmp_path), tiny_config(tmp_path).checkpoint)
  state = step_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                              params={"w": jax.numpy.ones((4,))},
                              opt_state={"count": jax.numpy.zeros((), jax.numpy.int32)})
  ckpt.save(manager, 1, state, {"row": 0})
  ckpt.wait(manager)
  with pytest.raises(ckpt.CheckpointError, match=r"step 2: the state holds NaN or inf values; "
                     r"no checkpoint written to .*\(the last complete checkpoint, step 1, is "
                     r"intact\)"):
    ckpt.save(manager, 2, state.replace(params={"w": state.params["w"].at[1].set(np.inf)}),
              {"row": 8})
  ckpt.wait(manager)
  assert ckpt.complete_steps(tmp_path / "checkpoints") == [1]
  assert not temporary_folders(tmp_path)


# ----------------------------------------------------------------------------- disk and files


def with_file_size_limit(cmd, limit):
  """`cmd` in a process whose files may not grow past `limit` bytes: bigger writes fail with
  EFBIG as they fail with ENOSPC on a full disk (Python ignores SIGXFSZ)."""
  limit_and_exec = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                    f"({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", limit_and_exec, *cmd]


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_earlier_checkpoints(rows_dir, env, reference, tmp_path):
  """A run resumed from checkpoint 2 cannot write checkpoint 3 (files over 256 KiB fail, the
  state's are ~1 MiB): one line naming the folder and the intact checkpoint, exit 2; once the
  'disk' has room the same command resumes from checkpoint 2 and ends as the reference."""
  workdir = stopped_copy(reference, 2, tmp_path / "run")
  cmd = command(fault_config(rows_dir), workdir)
  full = run(with_file_size_limit(cmd, 256 * 1024), env)
  assert full.returncode == 2, full.stderr[-3000:]
  tail = full.stderr[-3000:]
  assert full.stderr.strip().splitlines()[-1] == error_lines(full.stderr)[-1], tail
  # nothing but dft_jax's lines, the data's progress bars and the error: no traceback, no
  # library report (a library's lines start with its logger's name)
  assert "Traceback" not in full.stderr, tail
  foreign = [line for line in full.stderr.splitlines()
             if line.strip() and not line.startswith("dft_jax: ") and not PROGRESS.search(line)]
  assert not foreign, tail
  [line] = error_lines(full.stderr)
  assert re.match(rf"dft_jax: error: writing a checkpoint to {re.escape(str(workdir))}/checkpoints "
                  r"failed: \[Errno 27\] File too large; the last complete checkpoint "
                  r"\(step 2\) is intact", line), line
  assert complete_steps(workdir) == [1, 2]
  resumed = run(cmd, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_run(workdir, reference)


@pytest.mark.slow
def test_workdir_of_another_model_or_config_is_refused(tiny_run, tmp_path):
  """Another model in a workdir with checkpoints: refused by config.json (one line, before any
  work); without config.json the restore itself fails in one line. Nothing in the folder changes,
  and the original command then resumes and ends as the run it was copied from."""
  workdir = stopped_copy(tiny_run.workdir, 2, tmp_path / "run")
  qwen = tiny_run.config.copy_and_resolve_references()
  qwen.model.name = str(REPO / "tests" / "fixtures" / "tiny_qwen2")
  before = tree_digest(workdir)
  code, _, err = train_here(workdir, qwen)
  assert code == 2
  [line] = error_lines(err)
  assert "holds checkpoints of a run with model.name=" in line and "tiny_llama" in line
  assert tree_digest(workdir) == before
  (workdir / "config.json").unlink()
  before = tree_digest(workdir)
  code, _, err = train_here(workdir, qwen)
  assert code == 2 and "Traceback" not in err
  [line] = error_lines(err)
  assert line.startswith(f"dft_jax: error: cannot restore checkpoint step 2 from "
                         f"{workdir / 'checkpoints'}: "), line
  assert "written for another model or config" in line
  assert tree_digest(workdir) == before  # config.json is written only after a good restore
  code, _, err = train_here(workdir, tiny_run.config)
  assert code == 0, err[-3000:]
  assert_same_run(workdir, tiny_run.workdir)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_is_one_line(rows_dir, env, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  workdir.chmod(0o500)
  result = run(command(fault_config(rows_dir), workdir), env)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  [line] = error_lines(result.stderr)
  assert f"--workdir={workdir}: cannot write to {workdir}: Permission denied" in line


def test_rewind_jsonl_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "lo')
  run_control.rewind_jsonl(str(path), 3)
  assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
  run_control.rewind_jsonl(str(path), 0)
  assert path.read_text() == ""
