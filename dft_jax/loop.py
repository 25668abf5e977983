"""The training loop, shared by `python -m dft_jax.train`, the scanner study and the benchmarks.

`train_loop` runs the jitted step over the batches; each step's metrics are read one step late
(the next step is already dispatched, so the device never waits for the host) by a `Recorder`,
which turns them into host scalars (throughput, MFU, learning rate), keeps the history, writes
them and applies the non-finite policy. Checkpoints and stop requests are hooks of the caller.
"""
import json
import logging
import math
import time

import jax
import numpy as np

from dft_jax import objectives
from dft_jax import throughput
from dft_jax.errors import UserInputError


class NonFiniteError(UserInputError):
  """train.nonfinite='stop' and a step had a non-finite loss or gradient (one line from the CLI,
  naming the step and where its batch starts in the data)."""


def host_metrics(metrics):
  """Device metrics -> (scalars, histograms) as Python floats / numpy on the host."""
  metrics = jax.device_get(metrics)
  scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  histograms = {k: (objectives.HIST_EDGES, np.asarray(v)) for k, v in metrics.items()
                if k.startswith("hist/")}
  return scalars, histograms


class Recorder:
  """Reads each step's device metrics: adds step_seconds, tokens_per_s, the learning rate and MFU
  (when the chip's peak is known), keeps them in `history`, writes every `log_every`-th step (and
  the last) to `writer`, and applies train.nonfinite to a skipped update (non-finite, or larger
  than max_update_ratio allows: the step's guards): 'skip' logs a warning, 'stop' raises
  NonFiniteError.

  schedule / minibatches: the optimizer's schedule and updates per step (the learning rate of a
  step is that of its last update); flops_per_token: throughput.flops_per_token of the run;
  max_update_ratio: optimizer.max_update_ratio, named when an update is skipped for its size.
  """

  def __init__(self, *, num_steps, schedule=None, minibatches=1, flops_per_token=None,
               nonfinite="skip", writer=None, log_every=1, max_update_ratio=None):
    self.num_steps, self.schedule, self.minibatches = num_steps, schedule, minibatches
    self.nonfinite, self.writer, self.log_every = nonfinite, writer, log_every
    self.max_update_ratio = max_update_ratio
    self.flops_per_token = flops_per_token
    self.peak = throughput.peak_flops(jax.devices()[0])
    self.history = []
    self.start()

  def start(self):
    """Starts the clock of the next step (call it when the step is dispatched after a pause,
    e.g. after compiling)."""
    self.last_time = time.time()

  def __call__(self, step, metrics, batch_position=None):
    """batch_position: where this step's batch starts in the data (named on a non-finite step)."""
    scalars, histograms = host_metrics(metrics)  # blocks until the step is done
    now = time.time()
    seconds, self.last_time = now - self.last_time, now
    scalars.update(step_seconds=seconds, tokens_per_s=scalars["tokens"] / seconds)
    if self.schedule is not None:
      scalars["learning_rate"] = float(self.schedule(step * self.minibatches - 1))
    if self.peak and self.flops_per_token:
      scalars["mfu"] = throughput.mfu(scalars["tokens_per_s"], self.flops_per_token, self.peak,
                                      jax.device_count())
    self.history.append(dict(step=step, **scalars))
    if self.writer is not None and (step % self.log_every == 0 or step == self.num_steps):
      self.writer.write(step, scalars, histograms)
    if scalars["skipped"] > 0:
      self._skipped(step, scalars, batch_position)
    return scalars

  def _skipped(self, step, scalars, batch_position):
    position = {k: v for k, v in (batch_position or {}).items() if k != "content"}
    where = ("" if batch_position is None else
             f" on the batch starting at data position {json.dumps(position)}")
    if scalars.get("oversized", 0) >= scalars["skipped"]:
      ratio = scalars["update_ratio"]
      times = (f"{ratio:.3g} times their norm" if math.isfinite(ratio)
               else "more than 1e38 times their norm (the update's norm overflows float32)")
      message = (f"step {step}: the update would move the parameters by {times}, "
                 f"more than optimizer.max_update_ratio={self.max_update_ratio} allows (a learning rate far "
                 f"too large: optimizer.learning_rate, its schedule){where}")
    else:
      message = (f"step {step}: non-finite loss or gradient (loss={scalars['loss']}, "
                 f"grad_norm={scalars['grad_norm']}){where}")
    if self.nonfinite == "stop":
      raise NonFiniteError(message + "; stopping (train.nonfinite='stop')")
    logging.warning("%s; the update was skipped (train.nonfinite='skip')", message)


FIGURES = ("loss", "target_prob", "entropy")  # a run's first and last step in its summary


def run_progress(earlier, history):
  """The whole run's progress through the last step of `history` (this process's Recorder rows),
  after `earlier` (the progress saved with the checkpoint this process resumed from; None for a
  new run): {"first", "last": FIGURES of the run's first and latest step, "steps": the latest
  step, "train_seconds", "tokens", "skipped": sums over every step so far}. Saved with each
  checkpoint, it lets a resumed run's summary cover the whole run."""
  earlier = earlier or dict(first=None, last=None, steps=0, train_seconds=0.0, tokens=0,
                            skipped=0)
  if not history:
    return earlier
  figures = lambda row: {key: row.get(key) for key in FIGURES}
  return dict(first=earlier["first"] or figures(history[0]), last=figures(history[-1]),
              steps=history[-1]["step"],
              train_seconds=earlier["train_seconds"] + sum(h["step_seconds"] for h in history),
              tokens=earlier["tokens"] + int(sum(h["tokens"] for h in history)),
              skipped=earlier["skipped"] + int(sum(h["skipped"] for h in history)))


def train_loop(state, train_step, batches, *, num_steps, record, frozen=None,
               save=None, checkpoint_every=0, stop=None, evaluate=None, evaluate_every=0):
  """Runs `train_step` from step state.step + 1 through num_steps; returns the last state.

  batches: iterator of (global batch, position where it starts in the data or None).
  frozen: what the step reads and never updates (step.Frozen).
  record(step, metrics, position): reads a step's metrics (a Recorder); called one step late,
    and before a checkpoint of that step is written (the non-finite policy sees it first).
  save(step, state): writes a checkpoint every `checkpoint_every` steps and at the last step.
  stop(step) -> bool: asked after every step; True saves a checkpoint (if `save`) and returns
    early (the returned state's step tells where it stopped).
  evaluate(step, state): every `evaluate_every` steps but the last (the caller evaluates the
    result), once the step's metrics are recorded.
  """
  pending = None
  for step in range(int(state.step) + 1, num_steps + 1):
    batch, position = next(batches)
    state, metrics = train_step(state, batch, frozen)
    if pending is not None:  # read the previous step's metrics while this one runs
      record(*pending)
    pending = (step, metrics, position)
    stopping = stop is not None and stop(step)
    if save is not None and (stopping or step % checkpoint_every == 0 or step == num_steps):
      record(*pending)
      pending = None
      save(step, state)
    if (evaluate is not None and evaluate_every and step % evaluate_every == 0
        and step < num_steps and not stopping):
      if pending is not None:
        record(*pending)
        pending = None
      evaluate(step, state)
    if stopping:
      break
  if pending is not None:
    record(*pending)
  return state
