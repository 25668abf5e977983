"""What a run does when it is stopped or killed (tests/test_faults.py injects these faults).

- Stop signals: the first SIGTERM (what TPU VMs, SLURM and Kubernetes send before a kill) or SIGINT
  lets the current step finish, writes a checkpoint and ends the run with `Preempted` (the CLI
  prints where it stopped and exits 0); a second signal ends the process at once (the default
  action), which leaves the last complete checkpoint intact. In a multi-process run JAX's
  preemption service owns SIGTERM (jax.distributed installs it) and every process stops at the
  step its sync protocol agrees on (`CheckpointManager.reached_preemption`).
- Hard kills: orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it when every
  item has committed; a restart lists only renamed folders (and deletes temporary ones), so it
  resumes from the last complete checkpoint. `rewind_jsonl` drops the metrics rows that a killed run
  wrote after that checkpoint, so the log of a resumed run reads as one uninterrupted run.
- Files: `check_workdir` names a workdir that cannot be written before any work starts.
"""
import json
import logging
import os
import signal
import tempfile
import threading

import jax

from dft_jax import files
from dft_jax.errors import ConfigError



class Preempted(Exception):
  """The run stopped on a signal after writing a checkpoint (not an error: the CLI exits 0)."""


# ----------------------------------------------------------------------------- stop signals


class StopSignals:
  """Context manager: SIGTERM / SIGINT ask the training loop to stop after the current step.

  `requested(step, manager)` is called once per step by every process. Single process: True once
  a signal arrived. Multi-process: True at the step JAX's preemption sync point names, the same on
  every process (the signal may reach only one of them). Handlers are installed only in the main
  thread and restored on exit.
  """

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    self._exit_on_next_signal()
    logging.warning("%s: stopping after the current step with a checkpoint; send it again to exit "
                    "at once", self.received)

  def _exit_on_next_signal(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous = signal.signal(sig, signal.SIG_DFL)
      if previous is not None:  # None: a handler installed outside Python (JAX's, multi-process)
        self._previous.setdefault(sig, previous)

  def requested(self, step, manager):
    if jax.process_count() == 1:
      return self.received is not None
    if not manager.reached_preemption(step):
      return False
    self.received = self.received or "SIGTERM (preemption notice)"
    if threading.current_thread() is threading.main_thread():
      self._exit_on_next_signal()
    return True


# ----------------------------------------------------------------------------- files


def check_workdir(workdir):
  """Creates `workdir` and proves it (and its checkpoints/ folder, if any) writable; ConfigError
  naming the folder otherwise. Every process checks (all of them write checkpoint shards)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  for folder in [workdir] + ([checkpoints] if os.path.isdir(checkpoints) else []):
    try:
      os.makedirs(folder, exist_ok=True)
      with tempfile.TemporaryFile(dir=folder):
        pass
    except OSError as e:
      raise ConfigError(f"--workdir={workdir}: cannot write to {folder}: "
                        f"{e.strerror or e}") from None


def rewind_jsonl(path, step):
  """Keeps the rows of `path` with "step" <= step and drops a torn last line: the rows a run killed
  after its last checkpoint wrote are written again by the resumed run."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("step", 0) <= step:
      keep.append(line.rstrip("\n") + "\n")
  if len(keep) == len(lines) and all(line.endswith("\n") for line in lines):
    return
  files.write_text(path, "".join(keep))
