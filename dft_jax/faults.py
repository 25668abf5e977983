"""What a run does when it is stopped, killed, poisoned or given bad input; the knobs that inject
those faults in tests (tests/test_faults.py).

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
- Bad flags: `check_config_flags` and `parse_flags` turn a missing config file, an unknown
  `--config.a.b` field or a value of the wrong type into one line instead of absl's traceback.
- Files: `check_workdir` names a workdir that cannot be written before any work starts.

Fault-injection knobs, `config.debug` (tests only; off when 0, and then nothing in the run changes):
  inject_nan_at_step  that step's batch gets a NaN in its loss_mask, so its loss and gradients are
                      NaN inside the jitted step (train.nonfinite decides what happens)
  slow_save_at_step   the checkpoint of that step stays uncommitted in its temporary folder for
  save_delay_s        save_delay_s seconds (an extra item whose write waits), e.g. to kill a run
                      while an async save is in flight
"""
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import signal
import tempfile
import threading

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dft_jax import config_files
from dft_jax.errors import ConfigError, cli_entry


# OS errors a user fixes (space, quota, permissions): the CLI reports them in one line.
FILE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                         errno.EROFS})


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
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- command line


def _load_config_file(spec):
  """`FILE[:ARG]` -> the ConfigDict its get_config(ARG) returns (what config_flags loads)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={spec}: no such config file {path!r}")
  try:
    return config_files.load(os.path.abspath(path), arg)
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's file raises)
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConfigError(f"--config={spec}: {type(e).__name__}: {message}") from None


def check_config_flags(argv, default_config_file, flag="config"):
  """ConfigError naming the flag when `--config=FILE[:ARG]` cannot be loaded or an override
  `--config.a.b=v` names no field; absl and ml_collections report both with a traceback."""
  spec = default_config_file
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{flag}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
  config = _load_config_file(spec)
  for arg in argv[1:]:
    if not arg.startswith(f"--{flag}."):
      continue
    path = arg[len(flag) + 3:].split("=", 1)[0]
    node, seen = config, [flag]
    for key in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--{flag}.{path}: {'.'.join(seen)} has no field {key!r}; "
                          f"fields: {', '.join(fields) or 'none (not a section)'}")
      node, seen = node[key], seen + [key]


@cli_entry
def parse_flags(argv):
  """absl's flag parser with one-line errors (absl prints usage hints and exits 1)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise ConfigError(str(e).strip().splitlines()[0]) from None


# ----------------------------------------------------------------------------- fault injection


def knob(config, name):
  """config.debug.<name>, 0 when the config has no debug section (configs other than default.py)."""
  debug = config.get("debug") or {}
  return debug.get(name, 0) or 0


def poison(batch):
  """A copy of a host batch with one NaN in loss_mask: the step's loss and gradients become NaN."""
  batch = dict(batch)
  batch["loss_mask"] = np.array(batch["loss_mask"], copy=True)
  batch["loss_mask"].flat[0] = np.nan
  return batch


def _done_after(seconds):
  future = concurrent.futures.Future()
  timer = threading.Timer(seconds, future.set_result, args=(None,))
  timer.daemon = True
  timer.start()
  return future


class SlowCommitHandler(ocp.JsonCheckpointHandler):
  """Writes a small JSON item whose commit completes `seconds` later; orbax renames the step's
  temporary folder only when every item has committed, so the whole checkpoint stays in flight."""

  async def async_save(self, directory, item=None, args=None):
    del item
    futures = await super().async_save(directory, args=ocp.args.JsonSave(args.item))
    return [*futures, _done_after(args.item["seconds"])]


@ocp.args.register_with_handler(SlowCommitHandler, for_save=True)
@dataclasses.dataclass
class SlowCommitSave(ocp.args.CheckpointArgs):
  item: dict


@ocp.args.register_with_handler(SlowCommitHandler, for_restore=True)
@dataclasses.dataclass
class SlowCommitRestore(ocp.args.CheckpointArgs):
  item: dict | None = None
