"""Checkpoints through orbax's CheckpointManager: atomic, async, keep-N, sealed, resumable.

Layout of a workdir:
  config.json              the run's full config (written once, checked on resume)
  run.lock                 held while a run uses the workdir (dft_jax/run_control.py)
  checkpoints/<step>/      orbax items: `params` and `optimizer` (sharded arrays), `data` (the
                           data iterator's JSON state) and `progress` (the run's figures so far,
                           loop.run_progress: its first and latest loss, steps, time, tokens); the
                           step is the folder's name. Inference (evaluate, export, generate)
                           restores `params` alone.
  checkpoints/<step>/checksums.json   the sha256 of every file of the items
  rejected_checkpoints/<step>/        checkpoints a resumed run found unusable, kept for a look
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest complete one. Before that rename (once every
process's writes have landed) process 0 writes checksums.json into the folder, so a complete
checkpoint is a sealed one. A restore checks the files against it and takes the newest checkpoint
that passes and that orbax reads; newer ones that do not are skipped with one warning (and moved to
rejected_checkpoints/ by a resuming run), so altered bytes are never trained on. `checkpoint.keep`
>= 1: orbax deletes old checkpoints only after a newer one is complete.

A state holding NaN or inf is never written; a write that fails (disk full, no permission) or a
checkpoint that does not fit the run raises CheckpointError: one line naming the folder and the
last complete checkpoint.

A resumed run must have the config its checkpoints were written with, except the fields in
RESUMABLE; `check_config` names any other changed field with its old and new value.
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dft_jax import files
from dft_jax import run_control
from dft_jax.errors import (ConfigError, ModelError, UserInputError, check_number,
                            os_error_reason)

CONFIG_FILE = "config.json"
MANIFEST = "checksums.json"
# Written by orbax after the manifest, as part of the commit itself: not covered by it.
COMMIT_RECORDS = ("_CHECKPOINT_METADATA", "commit_success.txt")
TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX
REJECTED_DIR = "rejected_checkpoints"
OPTIONAL_ITEMS = ("progress",)  # restored when a checkpoint has them
SAVE_WAIT_S = 600  # longest wait of a reader (evaluate, export, generate) for a save to commit
# Fields a resumed run may change: how long it trains (a longer train.num_steps extends the run and
# its learning-rate schedule), how a step is laid out on the devices, what the run logs, how it
# checkpoints and evaluates, the guards against bad updates. None of them changes what a step
# computes (up to float rounding), but whether a bad update is skipped.
RESUMABLE = ("train.num_steps", "train.microbatches", "train.nonfinite",
             "optimizer.max_update_ratio", "mesh.",
             "model.attention", "model.remat", "model.lm_head_chunk",
             "data.num_proc", "data.cache_dir", "data.error_on_dropped", "data.allow_changed",
             "checkpoint.", "eval.", "log.")


class CheckpointError(UserInputError):
  """A checkpoint cannot be written (disk full, no permission, non-finite state) or none can be
  restored (damaged, or written for another model or config); earlier checkpoints stay intact."""


def validate(ckpt_cfg):
  """Checks config.checkpoint; ConfigError naming the field. keep >= 1: the newest complete
  checkpoint is never deleted."""
  check_number("checkpoint.every_steps", ckpt_cfg.every_steps, integer=True, minimum=1)
  check_number("checkpoint.keep", ckpt_cfg.keep, integer=True, minimum=1)


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir, ckpt_cfg=None):
  """The workdir's CheckpointManager; ckpt_cfg (config.checkpoint) for a writing run, None to
  read only. A writing manager is always orbax's async one (its commit callback seals each
  checkpoint); `save(..., blocking=True)` waits for the commit."""
  directory = checkpoint_dir(workdir)
  if ckpt_cfg is None:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=True, async_options=ocp.AsyncOptions(
          post_finalization_callback=functools.partial(_seal_in_flight, directory)))
  return ocp.CheckpointManager(directory, options=options)


def complete_steps(directory):
  """Steps whose checkpoint folder orbax has committed (renamed from its temporary name)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# ----------------------------------------------------------------------------- checksums


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(folder, items=None):
  """{path relative to `folder`: sha256} of the files of a checkpoint folder (of `items` only, if
  given), but the manifest and orbax's commit records; files are hashed on 8 threads."""
  paths = []
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.relpath(os.path.join(root, name), folder)
      top = path.split(os.sep)[0]
      if path not in (MANIFEST, *COMMIT_RECORDS) and (items is None or top in items):
        paths.append(path)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL
    return dict(zip(paths, pool.map(lambda p: _sha256(os.path.join(folder, p)), paths)))


def _seal_in_flight(directory):
  """Writes checksums.json into the checkpoint that orbax is committing. Orbax calls this on
  process 0 once every process's writes have landed and before the rename that commits the
  checkpoint, so every complete checkpoint carries its checksums."""
  in_flight = [name for name in os.listdir(directory) if name.endswith(TMP_SUFFIX)]
  if len(in_flight) != 1:
    raise RuntimeError(f"expected one checkpoint being committed in {directory}: {in_flight}")
  folder = os.path.join(directory, in_flight[0])
  files.write_json(os.path.join(folder, MANIFEST), {"sha256": checksums(folder)}, sort_keys=True)


def damage(folder, items=None):
  """What makes checkpoint `folder` (its `items` only, if given) differ from its checksums.json,
  as a phrase; None when every file matches."""
  try:
    expected = files.read_json(os.path.join(folder, MANIFEST))
    if expected is None:
      return f"it has no {MANIFEST}"
    expected = {path: digest for path, digest in expected["sha256"].items()
                if items is None or path.split("/")[0] in items}
    actual = checksums(folder, items)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"it cannot be checked against its {MANIFEST} ({_reason(e)})"
  problems = ((sorted(expected.keys() - actual.keys()), "missing"),
              (sorted(p for p in expected.keys() & actual.keys() if expected[p] != actual[p]),
               f"not what was written (its sha256 differs from {MANIFEST})"),
              (sorted(actual.keys() - expected.keys()), f"not listed in {MANIFEST}"))
  for paths, what in problems:
    if paths:
      more = f" (and {len(paths) - 1} other files)" if len(paths) > 1 else ""
      return f"its file {paths[0]}{more} is {what}"
  return None


# ----------------------------------------------------------------------------- save


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _last_complete(manager):
  steps = complete_steps(manager.directory)
  return f"step {steps[-1]}" if steps else "none"


def _reason(e):
  """One line for an exception (an OS error as errors.os_error_reason names it)."""
  os_error = os_error_reason(e)
  if os_error:
    return os_error
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  paths = re.findall(r"^(\S+):$", str(e), re.MULTILINE)  # orbax's tree diff: one path per entry
  if paths:
    return f"{text.rstrip(':')} at {len(paths)} entries, e.g. {', '.join(paths[:3])}"
  return text[:400]


def save(manager, step, state, data_state, blocking=False, progress=None):
  """Starts saving TrainState `state` as checkpoint `step` with the data iterator's state and the
  run's `progress` (a JSON dict; None: none), and waits for its commit when `blocking`; returns
  whether a save was started.

  Raises CheckpointError, with nothing written, when `state` holds NaN or inf, and when a write
  fails (an async write reports its failure at the next save or `wait`).
  """
  if not bool(jax.device_get(_all_finite((state.params, state.opt_state)))):
    raise CheckpointError(
        f"step {step}: the state holds NaN or inf values; no checkpoint written to "
        f"{manager.directory} (the last complete checkpoint, {_last_complete(manager)}, is intact)")
  items = dict(params=ocp.args.StandardSave(state.params),
               optimizer=ocp.args.StandardSave(state.opt_state),
               data=ocp.args.JsonSave(data_state))
  if progress is not None:
    items["progress"] = ocp.args.JsonSave(progress)
  try:
    started = manager.save(step, args=ocp.args.Composite(**items))
    if blocking:
      manager.wait_until_finished()
    return started
  except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, OS errors)
    raise _write_error(manager, e) from None


def wait(manager):
  """Blocks until in-flight saves are committed; CheckpointError if one failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, e) from None


@contextlib.contextmanager
def finishing_saves(manager):
  """On an exception, lets in-flight saves (of earlier, good steps) commit before it propagates."""
  try:
    yield
  except BaseException:
    with contextlib.suppress(Exception):
      manager.wait_until_finished()
    raise


@functools.cache  # once per process
def quiet_failure_reports():
  """Process-wide, for a command that writes checkpoints (its entry point calls it): a failed write
  ends the run with one CheckpointError line. Orbax reports the failure too, as it happens, from
  each of its threads (ERROR records with a traceback), and as the abandoned writes finish
  tensorstore reports 'Event loop is closed' (unraisable) and asyncio 'Task exception was never
  retrieved'; these reports, which would bury the line, are dropped. Orbax's warnings and errors
  without a traceback stay."""
  orbax_dir = os.path.dirname(ocp.__file__)
  logging.getLogger("absl").addFilter(lambda record: not (
      record.levelno >= logging.ERROR and record.exc_info
      and record.pathname.startswith(orbax_dir)))
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())
  default = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      default(unraisable)

  sys.unraisablehook = hook


def _write_error(manager, e):
  return CheckpointError(
      f"writing a checkpoint to {manager.directory} failed: {_reason(e)}; the last complete "
      f"checkpoint ({_last_complete(manager)}) is intact: free disk space or fix permissions, then "
      "run the same command to resume")


# ----------------------------------------------------------------------------- restore


def _try_restore(manager, step, items):
  """(restored items, None) or (None, why checkpoint `step` cannot be used). Process 0 checks the
  files against checksums.json; every process must read it with orbax."""
  folder = os.path.join(manager.directory, str(step))
  items = {name: item for name, item in items.items()  # older checkpoints have no progress
           if name not in OPTIONAL_ITEMS or os.path.isdir(os.path.join(folder, name))}
  problem = damage(folder, items) if jax.process_index() == 0 else None
  if not run_control.process0_says(problem is None):
    return None, problem or "process 0 found it damaged"
  try:
    restored, problem = manager.restore(step, args=ocp.args.Composite(**items)), None
  except (ValueError, KeyError, TypeError, OSError) as e:
    restored, problem = None, (
        f"orbax cannot read it: {_reason(e)}; it was written for another model or config "
        "(config.json next to it names the run) or is damaged")
  if not run_control.every_process_says(problem is None):
    return None, problem or "another process cannot read it"
  return restored, None


def _newest_usable(manager, items, steps, set_aside=False):
  """(step, restored items) of the newest of `steps` that is usable; CheckpointError naming the
  newest one's problem when none is. Skipped newer ones are named in one warning and, with
  `set_aside` (a run that will write checkpoints again), moved to rejected_checkpoints/."""
  skipped = []
  for step in reversed(steps):
    restored, problem = _try_restore(manager, step, items)
    if problem is None:
      if skipped:
        _skip(manager, skipped, step, set_aside)
      return step, restored
    skipped.append((step, problem))
  (step, problem), earlier = skipped[0], len(skipped) - 1
  either = f"; the {earlier} earlier checkpoint(s) cannot be used either" if earlier else ""
  raise CheckpointError(
      f"cannot restore checkpoint step {step} from {manager.directory}: {problem}{either}: use the "
      "config of the run that wrote them, a new --workdir, or copies of the checkpoints")


def _skip(manager, skipped, step, set_aside):
  """Says in one warning that the `skipped` [(step, problem)] checkpoints are not used, `step` is;
  with `set_aside` moves them to rejected_checkpoints/ (process 0), so their steps can be saved
  again."""
  (newest, problem), moved = skipped[0], ""
  if set_aside:
    rejected = os.path.join(os.path.dirname(str(manager.directory)), REJECTED_DIR)
    if jax.process_index() == 0:
      os.makedirs(rejected, exist_ok=True)
      for bad, _ in skipped:
        os.rename(os.path.join(manager.directory, str(bad)), _free_name(rejected, str(bad)))
    run_control.process0_says(True)  # the other processes wait for the moves
    manager.reload()
    moved = f"; moved to {rejected}"
  others = f" (and {', '.join(str(s) for s, _ in skipped[1:])})" if len(skipped) > 1 else ""
  logging.warning("checkpoint %s/%d%s cannot be used: %s; using checkpoint %d, the newest usable "
                  "one%s", manager.directory, newest, others, problem, step, moved)


def _free_name(folder, name):
  path, n = os.path.join(folder, name), 1
  while os.path.exists(path):
    path, n = os.path.join(folder, f"{name}.{n}"), n + 1
  return path


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(manager, state):
  """(TrainState, data_state, progress) of the newest usable checkpoint: `state`'s parameters and
  optimizer state replaced by the checkpoint's, restored onto their shardings (its frozen LoRA base
  is not in checkpoints and stays), progress None for a checkpoint written without one; None when
  there is no complete checkpoint. Unusable newer checkpoints are moved to rejected_checkpoints/
  (see `_newest_usable`); CheckpointError when none is usable."""
  steps = complete_steps(manager.directory)
  if not steps:
    return None
  step, restored = _newest_usable(manager, dict(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      optimizer=ocp.args.StandardRestore(_abstract(state.opt_state)),
      data=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore()), steps, set_aside=True)
  state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding),
                        params=restored["params"], opt_state=restored["optimizer"])
  return state, restored["data"], restored.get("progress")


def saves_in_progress(workdir):
  """Steps whose checkpoint orbax is writing (its temporary folders) for a run that holds
  `workdir` and may still run; [] otherwise (a killed run's temporary folders are no save)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory) or run_control.live_holder(workdir) is None:
    return []
  return sorted(int(name.split(".")[0]) for name in os.listdir(directory)
                if TMP_SUFFIX in name and name.split(".")[0].isdigit())


def wait_for_saves(workdir, timeout=SAVE_WAIT_S, poll=0.5):
  """Waits while the run training in `workdir` commits a checkpoint, so that "the newest
  checkpoint" is not one about to be superseded; ModelError after `timeout` seconds naming the step
  being written and --step."""
  writing = saves_in_progress(workdir)
  if not writing:
    return
  logging.info("%s: checkpoint %d is being written by the run training there; waiting for it",
               workdir, writing[-1])
  deadline = time.monotonic() + timeout
  while saves_in_progress(workdir):
    if time.monotonic() > deadline:
      raise ModelError(
          f"{workdir}: checkpoint {writing[-1]} is still being written after {timeout:.0f} s; "
          f"pass --step=N to use a complete one ({complete_steps(checkpoint_dir(workdir))})")
    time.sleep(poll)


def restore_params(workdir, abstract_params, step=None):
  """(step, trained parameters) of a workdir's checkpoint `step` (default: the newest usable one,
  once a save in progress has committed: wait_for_saves), restored onto `abstract_params`
  (jax.ShapeDtypeStruct with shardings) without the optimizer state; their files are checked
  against the checkpoint's checksums.json first."""
  manager = make_manager(workdir)
  if step is None:
    wait_for_saves(workdir)
  steps = complete_steps(manager.directory)
  if step is not None:
    if step not in steps:
      raise ModelError(f"{workdir}: no complete checkpoint of step {step} in "
                       f"{checkpoint_dir(workdir)} (complete: {steps or 'none'})")
    steps = [step]
  if not steps:
    raise ModelError(f"{workdir}: no complete checkpoint in {checkpoint_dir(workdir)}")
  items = dict(params=ocp.args.StandardRestore(abstract_params))
  step, restored = _newest_usable(manager, items, steps)
  return step, restored["params"]


# ----------------------------------------------------------------------------- config.json


def _flat(tree, prefix=""):
  """{"section.field": value} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


_ABSENT = type("Absent", (), {"__repr__": lambda self: "(no such field)"})()


def config_changes(old, new):
  """[(field, old value, new value)] of the fields of nested dicts `old` and `new` that differ,
  but those in RESUMABLE; a field missing on one side has the value `_ABSENT` there."""
  old, new = _flat(old), _flat(new)
  return [(field, old.get(field, _ABSENT), new.get(field, _ABSENT))
          for field in sorted(old.keys() | new.keys())
          if old.get(field, _ABSENT) != new.get(field, _ABSENT) and not field.startswith(RESUMABLE)]


def check_config(workdir, config, allow_changes=False):
  """ConfigError naming each changed field (old and new value) when `workdir` holds checkpoints
  written with another config (its config.json, with the defaults of fields newer than the run)
  than `config`, but for the RESUMABLE fields;
  with `allow_changes` each change is logged instead (write_config then rewrites config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or not complete_steps(checkpoint_dir(workdir)):
    return
  try:
    old = _with_defaults(files.read_json(path))  # fields newer than the run: their defaults
  except ValueError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); it names the config of the run that "
                      "wrote the checkpoints beside it") from None
  changes = config_changes(old, json.loads(config.to_json()))
  if not changes:
    return
  before = ", ".join(f"{field}={value!r}" for field, value, _ in changes)
  now = ", ".join(f"{field}={value!r}" for field, _, value in changes)
  if not allow_changes:
    raise ConfigError(
        f"--workdir={workdir} holds checkpoints of a run with {before}, but this run has {now}: "
        "run the same config to resume, pass --allow_config_change to resume with the new "
        "values, or use a new --workdir")
  logging.warning("--allow_config_change: %s resumes with %s (its checkpoints were written with "
                  "%s); config.json is rewritten", workdir, now, before)


def write_config(workdir, config):
  """Writes config.json (after check_config), atomically."""
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()),
                     sort_keys=True)


def is_workdir(path):
  """Whether `path` is a dft_jax.train workdir: a folder with config.json and checkpoints/ (an HF
  model folder has a config.json too, but no checkpoints/)."""
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isdir(checkpoint_dir(path)))


def _merged(default, saved):
  """default (a nested dict) with saved's values: fields added since a run was written keep
  their defaults."""
  out = dict(default)
  for key, value in saved.items():
    out[key] = (_merged(default[key], value) if isinstance(value, dict)
                and isinstance(default.get(key), dict) else value)
  return out


def _with_defaults(saved):
  """A run's config.json (a nested dict) over configs/default.py's defaults."""
  from dft_jax import config_files  # pylint: disable=g-import-not-at-top
  return _merged(json.loads(config_files.load(config_files.DEFAULT).to_json()), saved)


def read_config(workdir):
  """The run's config.json over configs/default.py's defaults (fields newer than the run)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = files.read_json(os.path.join(workdir, CONFIG_FILE))
  if config is None:
    raise ModelError(f"{workdir}: no {CONFIG_FILE} there; expected a dft_jax.train workdir")
  return ml_collections.ConfigDict(_with_defaults(config))


def restore_model(workdir, step=None):
  """(model, tokenizer, config, step) of a workdir's checkpoint `step` (default: the newest usable,
  see restore_params): the model built abstractly from config.model (no base weights read) and its
  trained parameters restored onto the first device, without the optimizer state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_device = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  if models.lora_config(config.get("lora")) is None:
    abstract, tokenizer = models.load_from_config(config.model, abstract=True)
    graphdef, abstract_params = nnx.split(abstract)
    step, params = restore_params(workdir, on_device(abstract_params), step)
    return nnx.merge(graphdef, params), tokenizer, config, step
  # LoRA: the checkpoint holds the adapters; the frozen base is the model's own weights
  model, tokenizer = models.load_from_config(config.model, config.lora)
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  step, params = restore_params(workdir, on_device(adapters), step)
  return nnx.merge(graphdef, params, frozen), tokenizer, config, step
