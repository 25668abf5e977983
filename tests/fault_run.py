"""`python -m dft_jax.train ARGS` with faults injected from the test side (tests/test_faults.py).

  FAULT_NAN_AT_STEP=2 python tests/fault_run.py ARGS
  FAULT_SLOW_SAVE_AT_STEP=3 FAULT_SAVE_DELAY_S=60 python tests/fault_run.py ARGS
  FAULT_HOLD_IN_STEP=6 python tests/fault_run.py ARGS

The product carries no fault knobs: this script wraps two of its seams before running the real
command line, and with no FAULT_* variable set it is exactly `python -m dft_jax.train ARGS`.
  FAULT_NAN_AT_STEP=N        the batch of step N gets a NaN in its loss_mask, so the step's loss
                             and gradients are NaN inside the jitted step (the data iterator seam)
  FAULT_SLOW_SAVE_AT_STEP=N  checkpoint N stays uncommitted in its temporary folder for
  FAULT_SAVE_DELAY_S=S       S seconds: an extra item whose commit waits (the CheckpointManager
                             seam), e.g. to kill a run while an async save is in flight
  FAULT_HOLD_IN_STEP=N       the run stops inside step N, its update computed, its metrics and
                             checkpoint not yet written (the loop seam), with every earlier
                             checkpoint committed; it prints HOLDING and waits to be killed
"""
import concurrent.futures
import dataclasses
import itertools
import os
import pathlib
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dft_jax import checkpoint  # noqa: E402
from dft_jax import data  # noqa: E402
from dft_jax import loop  # noqa: E402
from dft_jax import train  # noqa: E402

HOLDING = "fault_run: holding in step"


class PoisonedIterator:
  """The train iterator, but the `step`-th batch it yields (counting from 1 in this process)
  carries a NaN in loss_mask."""

  def __init__(self, inner, step):
    self._inner, self._step, self._yielded = inner, step, 0

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    self._yielded += 1
    if self._yielded == self._step:
      batch = dict(batch, loss_mask=np.array(batch["loss_mask"], copy=True))
      batch["loss_mask"].flat[0] = np.nan
    return batch


def _done_after(seconds):
  future = concurrent.futures.Future()
  timer = threading.Timer(seconds, future.set_result, args=(None,))
  timer.daemon = True
  timer.start()
  return future


class SlowCommitHandler(ocp.JsonCheckpointHandler):
  """A small JSON item whose commit completes `seconds` later; orbax renames the step's temporary
  folder only when every item has committed, so the whole checkpoint stays in flight."""

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


def poisoned(make_train_iterator, step):
  """make_train_iterator whose iterators carry a NaN in the `step`-th batch they yield."""
  return lambda *a, **kw: PoisonedIterator(make_train_iterator(*a, **kw), step)


def inject_nan(step):
  data.make_train_iterator = poisoned(data.make_train_iterator, step)


def slow_save(step, seconds):
  save = ocp.CheckpointManager.save

  def slow(self, at_step, *args, **kwargs):
    if at_step == step:
      items = dict(kwargs.pop("args").items())
      kwargs["args"] = ocp.args.Composite(
          **items, slow_commit=SlowCommitSave({"seconds": seconds}))
    return save(self, at_step, *args, **kwargs)

  ocp.CheckpointManager.save = slow


def hold_in_step(step):
  """Step `step` computes its update, then the run waits for the checkpoints in flight to commit,
  prints `HOLDING step` and waits forever: a kill then lands in that step, after its batch was
  taken from the data and before its metrics and checkpoint are written."""
  managers, make_manager, train_loop = [], checkpoint.make_manager, loop.train_loop

  def kept_manager(*args, **kwargs):
    managers.append(make_manager(*args, **kwargs))
    return managers[-1]

  def held_loop(state, train_step, *args, **kwargs):
    steps = itertools.count(int(state.step) + 1)

    def held_step(*step_args):
      out = train_step(*step_args)
      if next(steps) == step:
        jax.block_until_ready(out)
        for manager in managers:
          manager.wait_until_finished()
        print(f"{HOLDING} {step}", flush=True)
        threading.Event().wait()
      return out

    return train_loop(state, held_step, *args, **kwargs)

  checkpoint.make_manager, loop.train_loop = kept_manager, held_loop


if __name__ == "__main__":
  if os.environ.get("FAULT_NAN_AT_STEP"):
    inject_nan(int(os.environ["FAULT_NAN_AT_STEP"]))
  if os.environ.get("FAULT_SLOW_SAVE_AT_STEP"):
    slow_save(int(os.environ["FAULT_SLOW_SAVE_AT_STEP"]), float(os.environ["FAULT_SAVE_DELAY_S"]))
  if os.environ.get("FAULT_HOLD_IN_STEP"):
    hold_in_step(int(os.environ["FAULT_HOLD_IN_STEP"]))
  train.cli_main(["dft_jax.train", *sys.argv[1:]])
