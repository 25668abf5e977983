"""How a training run keeps control of its end and of its workdir: stop signals, the agreement of
processes, the check and lock of the workdir, and the metrics rewind of a resumed run
(tests/test_faults.py stops, kills and poisons runs against these).

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
- One run per workdir: `WorkdirLock` (run.lock, held by process 0 for the whole run) refuses a
  second run naming the first one; the lock of a killed run is taken over.
"""
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from dft_jax import files
from dft_jax.errors import ConfigError

LOCK_FILE = "run.lock"


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


# ----------------------------------------------------------------------------- processes


def process0_says(flag):
  """Process 0's `flag` on every process (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def every_process_says(flag):
  """Whether `flag` holds on every process (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


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


# ----------------------------------------------------------------------------- one run per workdir


def _flock(fd):
  """True: locked; False: another process holds the lock; None: the filesystem has no flock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError:
    return None


def _owner(fd):
  """The run a lock file names ({} when it names none, e.g. torn by a kill)."""
  try:
    owner = json.loads(os.pread(fd, 1 << 16, 0))
    return owner if isinstance(owner, dict) else {}
  except ValueError:
    return {}


def _describe(owner):
  if "pid" not in owner:
    return "a run whose lock file names no process"
  command = str(owner.get("command", "?"))
  command = command if len(command) <= 200 else command[:197] + "..."
  return (f"pid {owner['pid']} on {owner.get('host', '?')} since {owner.get('started', '?')} "
          f"({command})")


def _alive(owner):
  """Whether the run a lock file names may still run (may_still_run)."""
  return "pid" in owner and may_still_run(owner.get("host"), owner["pid"])


def may_still_run(host, pid):
  """Whether process `pid` of `host` may still run: it exists on this host, or it ran on another
  host (which cannot be checked from here)."""
  if host != socket.gethostname():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def live_holder(workdir):
  """The run that `workdir`'s run.lock names ({pid, host, started, command}) if it may still run,
  else None; reads the file, takes no lock (a reader such as evaluate asks while the run trains)."""
  try:
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    owner = _owner(fd)
  finally:
    os.close(fd)
  return owner if _alive(owner) else None


def _same_file(fd, path):
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


class WorkdirLock:
  """Context manager: `run.lock` in the workdir names the run that uses it (pid, host, start time,
  command) and is flock'ed while that run lives; a second run is refused with a ConfigError naming
  the first.

  The kernel drops a flock when its process dies, even by kill -9: a lock file nobody holds is
  stale and is taken over with a warning naming the dead run. On a filesystem without flock the
  file's content decides: a pid alive on this host, or a run on another host, holds it. The file is
  removed on release.
  """

  def __init__(self, workdir):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self):
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      locked, owner = _flock(fd), _owner(fd)
      if locked is False or (locked is None and _alive(owner)):
        os.close(fd)
        hint = "" if locked is False else f" (if it is gone, delete {self.path})"
        raise ConfigError(f"--workdir={self.workdir} is in use by another run: {_describe(owner)}"
                          f"{hint}; wait for it to end or use another --workdir")
      if _same_file(fd, self.path):  # not removed by a run that released it meanwhile
        break
      os.close(fd)
    if owner:
      logging.warning("%s: taking over the lock of %s, which is gone", self.path, _describe(owner))
    me = dict(pid=os.getpid(), host=socket.gethostname(),
              started=time.strftime("%Y-%m-%d %H:%M:%S %z"), command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self):
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None


@contextlib.contextmanager
def one_run_per_workdir(workdir):
  """Process 0 holds the workdir's WorkdirLock for the whole run; when another run holds it, every
  process raises the ConfigError."""
  lock, refused = WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except ConfigError as e:
      refused = e
  if not process0_says(refused is None):
    raise refused or ConfigError(f"--workdir={workdir} is in use by another run (process 0's "
                                 "error names it)")
  try:
    yield
  finally:
    lock.release()
