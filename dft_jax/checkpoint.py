"""Checkpoints through orbax's CheckpointManager: atomic, async, keep-N, resumable.

Layout of a workdir:
  config.json              the run's full config (written once, checked on resume)
  checkpoints/<step>/      orbax items: `state` (step, params, optimizer state; sharded arrays)
                           and `data` (the data iterator's JSON state)
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest complete one.
"""
import json
import os

import jax
import orbax.checkpoint as ocp

from dft_jax.errors import ConfigError, ModelError

CONFIG_FILE = "config.json"
# Fields that must match between a run and the checkpoints it resumes from.
IDENTITY_FIELDS = (("model", "name"), ("objective", "name"), ("train", "seq_len"))


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir, ckpt_cfg):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "data"))


def save(manager, step, state, data_state, *, force=False):
  """Starts saving (async when configured); returns whether a save was started."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore(manager, abstract_state, step=None):
  """Restores (state, data_state) at `step` (default: latest complete) onto the shardings that
  `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding) describes."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def write_config(workdir, config):
  """Writes config.json, or checks that an existing one describes the same run."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for section, field in IDENTITY_FIELDS:
      before, now = old.get(section, {}).get(field), new[section][field]
      if before != now and os.path.isdir(checkpoint_dir(workdir)):
        raise ConfigError(
            f"--workdir={workdir} holds checkpoints of a run with {section}.{field}={before!r}, "
            f"but this run has {section}.{field}={now!r}; use a new --workdir")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_config(workdir):
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ModelError(f"--checkpoint={workdir}: no {CONFIG_FILE} there; expected a dft_jax.train workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
