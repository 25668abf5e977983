"""Metric writers: a console progress line, a JSONL log and TensorBoard event files.

Each writer takes `write(step, scalars, histograms)` where scalars is {name: float} and histograms is
{name: (bucket_edges_K+1, counts_K)}. Only process 0 writes.
"""
import json
import logging
import os
import sys
import time

import numpy as np

from dft_jax.errors import check_number


def validate(log_cfg):
  """Checks config.log; ConfigError naming the field."""
  check_number("log.every_steps", log_cfg.every_steps, integer=True, minimum=1)


class JsonlWriter:
  """One JSON object per line: {"step": s, "time": unix seconds, name: value, ...}."""

  def __init__(self, path):
    self._file = open(path, "a", buffering=1)

  def write(self, step, scalars, histograms=None):
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: float(v) for k, v in scalars.items()})
    for name, (edges, counts) in (histograms or {}).items():
      record[name] = {"edges": np.asarray(edges).tolist(), "counts": np.asarray(counts).tolist()}
    self._file.write(json.dumps(record) + "\n")

  def close(self):
    self._file.close()


def _not_a_nan_report(record):
  return "NaN or Inf found in input tensor" not in record.getMessage()


def _quiet_nan_warnings():
  """tensorboardX warns once per NaN or inf value it writes: a step whose loss is NaN has dozens
  of metrics, one line each. The values are written (TensorBoard shows them); the step's own
  warning (loop.Recorder) says what happened, once."""
  logger = logging.getLogger("tensorboardX.x2num")
  if _not_a_nan_report not in logger.filters:
    logger.addFilter(_not_a_nan_report)


class TensorBoardWriter:
  """TensorBoard event files (scalars + histograms) through tensorboardX, without TensorFlow."""

  def __init__(self, logdir):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    _quiet_nan_warnings()
    self._writer = tensorboardX.SummaryWriter(logdir)

  def write(self, step, scalars, histograms=None):
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), int(step))
    for name, (edges, counts) in (histograms or {}).items():
      edges, counts = np.asarray(edges, np.float64), np.asarray(counts, np.float64)
      centers = 0.5 * (edges[:-1] + edges[1:])
      self._writer.add_histogram_raw(
          name, min=float(edges[0]), max=float(edges[-1]), num=float(counts.sum()),
          sum=float((centers * counts).sum()), sum_squares=float((centers**2 * counts).sum()),
          bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=int(step))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class ProgressWriter:
  """A tqdm bar over the run's steps: loss, target probability, entropy, tokens/s, MFU. The bar
  starts at the first step written (its time, measured from the compiled step's dispatch, is in
  its tok/s), so tqdm's rate and ETA come from the steps after it: the ETA shows once steps are
  timed, never from a start that included compiling or the base evaluation."""

  KEYS = (("loss", "loss", "{:.4f}"), ("target_prob", "p", "{:.3f}"), ("entropy", "H", "{:.3f}"),
          ("tokens_per_s", "tok/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"))

  def __init__(self, total_steps, stream=None):
    self._total, self._stream, self._bar = total_steps, stream, None

  def write(self, step, scalars, histograms=None):
    del histograms
    if self._bar is None:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=self._total, initial=step, desc="train", unit="step",
                            file=self._stream or sys.stderr, dynamic_ncols=True)
    self._bar.set_postfix_str(", ".join(
        f"{label} {fmt.format(scalars[k])}" for k, label, fmt in self.KEYS if k in scalars),
                              refresh=False)
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)
    else:  # the first step written: shown, but not timed by tqdm
      self._bar.refresh()

  def close(self):
    if self._bar is not None:
      self._bar.close()


class MultiWriter:
  def __init__(self, writers):
    self._writers = list(writers)

  def write(self, step, scalars, histograms=None):
    for w in self._writers:
      w.write(step, scalars, histograms)

  def flush(self):
    for w in self._writers:
      getattr(w, "flush", lambda: None)()

  def close(self):
    for w in self._writers:
      w.close()


def make_writer(log_cfg, workdir, total_steps, is_main_process=True):
  if not is_main_process:
    return MultiWriter([])
  writers = []
  if log_cfg.progress:
    writers.append(ProgressWriter(total_steps))
  if log_cfg.jsonl:
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  if log_cfg.tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  return MultiWriter(writers)
