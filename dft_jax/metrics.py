"""Metric writers: a console progress line, a JSONL log and TensorBoard event files.

Each writer takes `write(step, scalars, histograms)` where scalars is {name: float} and histograms is
{name: (bucket_edges_K+1, counts_K)}. Only process 0 writes.
"""
import json
import os
import sys
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

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


def _histogram_proto(edges, counts):
  edges, counts = np.asarray(edges, np.float64), np.asarray(counts, np.float64)
  centers = 0.5 * (edges[:-1] + edges[1:])
  return summary_pb2.HistogramProto(
      min=float(edges[0]), max=float(edges[-1]), num=float(counts.sum()),
      sum=float((centers * counts).sum()), sum_squares=float((centers**2 * counts).sum()),
      bucket_limit=edges[1:].tolist(), bucket=counts.tolist())


class TensorBoardWriter:
  """Real TensorBoard event files (scalars + histograms) without TensorFlow."""

  def __init__(self, logdir):
    self._writer = EventFileWriter(logdir)

  def write(self, step, scalars, histograms=None):
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    values += [summary_pb2.Summary.Value(tag=k, histo=_histogram_proto(*h))
               for k, h in (histograms or {}).items()]
    self._writer.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _format_eta(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressWriter:
  """One console line per logged step: step/total, loss, target prob, entropy, tokens/s, ETA.

  On a terminal the line is redrawn in place; in a log file each step gets its own line.
  """

  KEYS = (("loss", "loss {:.4f}"), ("target_prob", "p {:.3f}"), ("entropy", "H {:.3f}"),
          ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"))

  def __init__(self, total_steps, stream=None):
    self._total = total_steps
    self._stream = stream or sys.stderr
    self._tty = self._stream.isatty()
    self._start = None

  def write(self, step, scalars, histograms=None):
    now = time.time()
    if self._start is None:
      self._start = (now, step - 1)
    t0, s0 = self._start
    rate = (step - s0) / max(now - t0, 1e-9)
    parts = [f"step {step}/{self._total}"]
    parts += [fmt.format(scalars[k]) for k, fmt in self.KEYS if k in scalars]
    parts.append(f"ETA {_format_eta((self._total - step) / rate)}")
    line = " | ".join(parts)
    if self._tty:
      self._stream.write("\r\033[K" + line + ("\n" if step >= self._total else ""))
    else:
      self._stream.write(line + "\n")
    self._stream.flush()

  def close(self):
    pass


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
