"""Checkpoints through orbax's CheckpointManager: atomic, async, keep-N, resumable.

Layout of a workdir:
  config.json              the run's full config (written once, checked on resume)
  checkpoints/<step>/      orbax items: `params` and `optimizer` (sharded arrays) and `data` (the
                           data iterator's JSON state); the step is the folder's name. Inference
                           (evaluate, export, generate) restores `params` alone.
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest complete one. A state holding NaN or inf is
never written; a write that fails (disk full, no permission) or a checkpoint that does not fit the
run raises CheckpointError: one line naming the folder and the last complete checkpoint.
"""
import contextlib
import functools
import json
import logging
import os
import re
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dft_jax import files
from dft_jax.errors import ConfigError, ModelError, UserInputError

CONFIG_FILE = "config.json"
# Fields that must match between a run and the checkpoints it resumes from.
IDENTITY_FIELDS = (("model", "name"), ("objective", "name"), ("train", "seq_len"))


class CheckpointError(UserInputError):
  """A checkpoint cannot be written (disk full, no permission, non-finite state) or does not fit
  this run (another model or config); earlier checkpoints stay intact."""


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir, ckpt_cfg=None):
  """The workdir's CheckpointManager; ckpt_cfg (config.checkpoint) for a writing run, None to
  read only."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep if ckpt_cfg else None, create=ckpt_cfg is not None,
      enable_async_checkpointing=bool(ckpt_cfg and ckpt_cfg.async_save),
      cleanup_tmp_directories=ckpt_cfg is not None, read_only=ckpt_cfg is None)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def complete_steps(directory):
  """Steps whose checkpoint folder orbax has committed (renamed from its temporary name)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _last_complete(manager):
  steps = complete_steps(manager.directory)
  return f"step {steps[-1]}" if steps else "none"


def _reason(e):
  """One line for an exception; tensorstore reports OS errors as "[os_error_code='28']"."""
  if isinstance(e, OSError) and e.errno:
    return f"[Errno {e.errno}] {e.strerror}" + (f": {e.filename}" if e.filename else "")
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f"[Errno {code[1]}] {os.strerror(int(code[1]))}"
  paths = re.findall(r"^(\S+):$", str(e), re.MULTILINE)  # orbax's tree diff: one path per entry
  if paths:
    return f"{text.rstrip(':')} at {len(paths)} entries, e.g. {', '.join(paths[:3])}"
  return text[:400]


def save(manager, step, state, data_state):
  """Starts saving TrainState `state` as checkpoint `step` (async when configured); returns
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
  try:
    return manager.save(step, args=ocp.args.Composite(**items))
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
def _silence_abandoned_writes():
  """After a failed write orbax abandons the checkpoint's other writes: as they finish, tensorstore
  reports 'Event loop is closed' (unraisable) and asyncio logs 'Task exception was never
  retrieved', tracebacks that would bury the one-line error. Only those reports are dropped."""
  default = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      default(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


def _write_error(manager, e):
  _silence_abandoned_writes()
  return CheckpointError(
      f"writing a checkpoint to {manager.directory} failed: {_reason(e)}; the last complete "
      f"checkpoint ({_last_complete(manager)}) is intact: free disk space or fix permissions, then "
      "run the same command to resume")


def _restore(manager, step, items):
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(
        f"cannot restore checkpoint step {step} from {manager.directory}: {_reason(e)}; it was "
        "written for another model or config (config.json next to it names the run) or is "
        f"damaged: use a new --workdir or that run's config, or delete {manager.directory}/{step} "
        "to resume from an earlier checkpoint") from None


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(manager, state, step=None):
  """(TrainState, data_state) of checkpoint `step` (default: latest complete): `state`'s
  parameters and optimizer state replaced by the checkpoint's, restored onto their shardings
  (its frozen LoRA base is not in checkpoints and stays); CheckpointError when the checkpoint does
  not fit (another model or optimizer wrote it)."""
  step = manager.latest_step() if step is None else step
  restored = _restore(manager, step, dict(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      optimizer=ocp.args.StandardRestore(_abstract(state.opt_state)),
      data=ocp.args.JsonRestore()))
  state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding),
                        params=restored["params"], opt_state=restored["optimizer"])
  return state, restored["data"]


def restore_params(workdir, abstract_params, step=None):
  """The trained parameters of a workdir's checkpoint (default: the latest), restored onto
  `abstract_params` (jax.ShapeDtypeStruct with shardings) without the optimizer state."""
  manager = make_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ModelError(f"{workdir}: no complete checkpoint in {checkpoint_dir(workdir)}")
  return _restore(manager, step, dict(params=ocp.args.StandardRestore(abstract_params)))["params"]


def check_config(workdir, config):
  """ConfigError when `workdir` holds checkpoints of a run with another model, objective or
  sequence length (its config.json says which)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or not complete_steps(checkpoint_dir(workdir)):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json())
  for section, field in IDENTITY_FIELDS:
    before, now = old.get(section, {}).get(field), new[section][field]
    if before != now:
      raise ConfigError(
          f"--workdir={workdir} holds checkpoints of a run with {section}.{field}={before!r}, "
          f"but this run has {section}.{field}={now!r}; use a new --workdir")


def write_config(workdir, config):
  """Writes config.json (after check_config), atomically."""
  check_config(workdir, config)
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


def read_config(workdir):
  """The run's config.json over configs/default.py's defaults (fields newer than the run)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dft_jax import config_files  # pylint: disable=g-import-not-at-top
  config = files.read_json(os.path.join(workdir, CONFIG_FILE))
  if config is None:
    raise ModelError(f"{workdir}: no {CONFIG_FILE} there; expected a dft_jax.train workdir")
  default = json.loads(config_files.load(config_files.DEFAULT).to_json())
  return ml_collections.ConfigDict(_merged(default, config))


def restore_model(workdir, step=None):
  """(model, tokenizer, config) of a workdir's checkpoint (default: the latest): the model built
  abstractly from config.model (no base weights read) and its trained parameters restored onto
  the first device, without the optimizer state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_device = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  if models.lora_config(config.get("lora")) is None:
    abstract, tokenizer = models.load_from_config(config.model, abstract=True)
    graphdef, abstract_params = nnx.split(abstract)
    return nnx.merge(graphdef, restore_params(workdir, on_device(abstract_params), step)), \
        tokenizer, config
  # LoRA: the checkpoint holds the adapters; the frozen base is the model's own weights
  model, tokenizer = models.load_from_config(config.model, config.lora)
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  return (nnx.merge(graphdef, restore_params(workdir, on_device(adapters), step), frozen),
          tokenizer, config)
