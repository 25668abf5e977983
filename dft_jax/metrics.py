"""Metric writers: a console progress line, a JSONL log, TensorBoard event files and Weights &
Biases (log.wandb, optional: `pip install wandb`).

Each writer takes `write(step, scalars, histograms)` where scalars is {name: float} and histograms is
{name: (bucket_edges_K+1, counts_K)}; every writer gets the same names (training metrics, and the
evaluations under eval/). Only process 0 writes.
"""
import importlib.util
import json
import logging
import os
import secrets
import sys
import time

import numpy as np

from dft_jax.errors import ConfigError, check_number, one_line

METRICS_FILE = "metrics.jsonl"    # the run folder's training metrics, one row per logged step
EVAL_METRICS_FILE = "eval.jsonl"  # its evaluations (eval/... names), one row per evaluation
WANDB_MODES = ("online", "offline")
WANDB_RUN_ID = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


def validate(log_cfg):
  """Checks config.log; ConfigError naming the field (log.wandb without the wandb package too)."""
  check_number("log.every_steps", log_cfg.every_steps, integer=True, minimum=1)
  w = log_cfg.wandb
  if not w.enabled:
    return
  if w.mode not in WANDB_MODES:
    raise ConfigError(f"log.wandb.mode={w.mode!r}: expected one of {', '.join(WANDB_MODES)} "
                      "(offline writes the run folder's wandb/ for `wandb sync`)")
  if not w.project:
    raise ConfigError("log.wandb.project is empty: name the W&B project to log to")
  if importlib.util.find_spec("wandb") is None:
    raise ConfigError("log.wandb.enabled=True needs the wandb package, which is not installed: "
                      "pip install wandb (or pip install 'dft_jax[wandb]'), or set "
                      "--config.log.wandb.enabled=False")


def wandb_tags(tags):
  """log.wandb.tags (a tuple, or comma-separated strings from the command line) -> a list."""
  return [tag.strip() for item in tags or () for tag in str(item).split(",") if tag.strip()]


def is_evaluation(scalars):
  """Whether a row holds an evaluation's results (every name under eval/)."""
  return bool(scalars) and all(name.startswith("eval/") for name in scalars)


class JsonlWriter:
  """One JSON object per line: {"step": s, "time": unix seconds, name: value, ...}. Rows of
  evaluations (is_evaluation) go to `eval_path` when given, so `path` keeps one row per logged
  training step."""

  def __init__(self, path, eval_path=None):
    self._paths, self._files = {False: path, True: eval_path or path}, {}

  def write(self, step, scalars, histograms=None):
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: float(v) for k, v in scalars.items()})
    for name, (edges, counts) in (histograms or {}).items():
      record[name] = {"edges": np.asarray(edges).tolist(), "counts": np.asarray(counts).tolist()}
    path = self._paths[is_evaluation(scalars)]
    if path not in self._files:
      self._files[path] = open(path, "a", buffering=1)
    self._files[path].write(json.dumps(record) + "\n")

  def close(self):
    for f in self._files.values():
      f.close()


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
    """A training step's row moves the bar (it closes at the last step); an evaluation's row does
    not."""
    del histograms
    if is_evaluation(scalars):
      return
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
    if step >= self._total:  # before the evaluation after training prints its own bars
      self.close()

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class WandbWriter:
  """Weights & Biases: the same names and steps as the other writers, histograms as
  wandb.Histogram, the run's full config. Files go to WORKDIR/wandb (mode offline: only there, for
  `wandb sync`); the run id is kept in WORKDIR/wandb_run_id, so a resumed run continues the same
  W&B run. wandb_cfg: config.log.wandb; run_config: the run's config as a dict."""

  def __init__(self, wandb_cfg, workdir, run_config=None):
    import wandb  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    id_path = os.path.join(workdir, WANDB_RUN_ID)
    if os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
      with open(id_path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    try:
      self._run = wandb.init(
          project=wandb_cfg.project, entity=wandb_cfg.entity,
          name=wandb_cfg.name or os.path.basename(os.path.abspath(workdir)),
          tags=wandb_tags(wandb_cfg.tags), mode=wandb_cfg.mode, dir=workdir, config=run_config,
          id=run_id, resume="allow", settings=wandb.Settings(console="off", silent=True))
    except Exception as e:  # pylint: disable=broad-except  (login, network: one line at the edge)
      raise ConfigError(f"log.wandb: W&B could not start the run ({one_line(e)}); log in with "
                        "`wandb login`, or set --config.log.wandb.mode=offline") from None

  def write(self, step, scalars, histograms=None):
    row = {k: float(v) for k, v in scalars.items()}
    for name, (edges, counts) in (histograms or {}).items():
      row[name] = self._wandb.Histogram(
          np_histogram=(np.asarray(counts, np.float64), np.asarray(edges, np.float64)))
    self._run.log(row, step=int(step))

  def close(self):
    self._run.finish()


class MultiWriter:
  """Every writer at once; a context manager that closes them."""

  def __init__(self, writers):
    self._writers = list(writers)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def write(self, step, scalars, histograms=None):
    for w in self._writers:
      w.write(step, scalars, histograms)

  def flush(self):
    for w in self._writers:
      getattr(w, "flush", lambda: None)()

  def close(self):
    for w in self._writers:
      w.close()


def make_writer(log_cfg, workdir, total_steps, is_main_process=True, run_config=None):
  """The writers config.log asks for (process 0 only); run_config: the run's config as a dict,
  for W&B."""
  if not is_main_process:
    return MultiWriter([])
  writers = []
  if log_cfg.progress:
    writers.append(ProgressWriter(total_steps))
  if log_cfg.jsonl:
    writers.append(JsonlWriter(os.path.join(workdir, METRICS_FILE),
                               os.path.join(workdir, EVAL_METRICS_FILE)))
  if log_cfg.tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  if log_cfg.wandb.enabled:
    writers.append(WandbWriter(log_cfg.wandb, workdir, run_config))
  return MultiWriter(writers)
