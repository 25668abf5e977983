"""The training loop, shared by `python -m dft_jax.train`, the scanner study and the benchmarks.

`train_loop` runs the jitted step over the batches; each step's metrics are read one step late
(the next step is already dispatched, so the device never waits for the host) by a `Recorder`,
which turns them into host scalars (throughput, MFU, learning rate), keeps the history, writes
them and applies the non-finite policy. Checkpoints and stop requests are hooks of the caller.
"""
import json
import logging
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
  the last) to `writer`, and applies train.nonfinite to a skipped update: 'skip' logs a warning,
  'stop' raises NonFiniteError.

  schedule / minibatches: the optimizer's schedule and updates per step (the learning rate of a
  step is that of its last update); flops_per_token: throughput.flops_per_token of the run.
  """

  def __init__(self, *, num_steps, schedule=None, minibatches=1, flops_per_token=None,
               nonfinite="skip", writer=None, log_every=1):
    self.num_steps, self.schedule, self.minibatches = num_steps, schedule, minibatches
    self.nonfinite, self.writer, self.log_every = nonfinite, writer, log_every
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
      self._nonfinite(step, scalars, batch_position)
    return scalars

  def _nonfinite(self, step, scalars, batch_position):
    where = ("" if batch_position is None else
             f" on the batch starting at data position {json.dumps(batch_position)}")
    message = (f"step {step}: non-finite loss or gradient (loss={scalars['loss']}, "
               f"grad_norm={scalars['grad_norm']}){where}")
    if self.nonfinite == "stop":
      raise NonFiniteError(message + "; stopping (train.nonfinite='stop')")
    logging.warning("%s; the update was skipped (train.nonfinite='skip')", message)


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
