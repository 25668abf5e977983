"""What every command shares: `--config=FILE[:variant]` with `--config.a.b=value` overrides
(ml_collections config_flags; the file is executed once), `--help` listing the command's flags and
the config fields with their defaults and meanings (exit 0), one-line errors (`dft_jax: error:
...`, exit 2), one log format (`dft_jax: ...`), a status line in long phases, and stop signals that
end any phase with one line.

  cli.prepare_process()                        # first: process-wide settings
  cli.define_config(argv)                      # before the flags are parsed
  cli.run(main, argv, doc=__doc__, sections=("model", "data"))

Importing this module changes nothing in the process; a command's `cli_main` calls
`prepare_process()` first.
"""
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import time

from dft_jax import config_files
from dft_jax import device_memory
from dft_jax import host
from dft_jax.errors import ConfigError, cli_entry

PACKAGE = os.path.dirname(os.path.abspath(__file__))
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")
WIDTH = 100


# ----------------------------------------------------------------------------- the process


def prepare_process():
  """The process-wide settings of a command, called first by its `cli_main` (before anything
  imports transformers or starts jax's threads): transformers' advice about a missing PyTorch stays
  off the console (dft_jax never uses torch models), glibc's malloc hands freed memory back
  (host.keep_heap_small: a command's host memory), and JAX's allocator takes the share of a GPU a
  7B full fine-tune needs (device_memory.choose_allocator_fraction, before the backend starts)."""
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found ..."
  host.keep_heap_small()
  device_memory.choose_allocator_fraction()


# ----------------------------------------------------------------------------- config flags


def _override_flag(argv, missing):
  """The `--config.a.b=v` argument of argv whose dotted path names the missing field, and the
  path of the section that lacks it."""
  for arg in argv[1:]:
    path = arg.split("=", 1)[0].split(".")
    if arg.startswith("--config.") and missing in path[1:]:
      return arg, ".".join(["config", *path[1:path.index(missing, 1)]])
  return "--config", "config"


def _causes(e):
  """e and the exceptions it was raised from, outermost first."""
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _first_line(e):
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _config_error(argv, e):
  """One line for whatever loading the config file or resolving an override raised."""
  causes = list(_causes(e))
  keys = [c for c in causes if isinstance(c, KeyError)]
  if keys:  # an override names no field; the outer KeyError holds ml_collections' suggestion
    missing = str(keys[-1].args[0])
    flag, section = _override_flag(argv, missing)
    hint = re.search(r"Did you mean \"(\w+)\"", str(keys[0].args[0]))
    return ConfigError(f"{flag}: {section} has no field {missing!r}"
                       + (f"; did you mean {hint[1]!r}?" if hint else ""))
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  root = causes[-1]
  os_error = re.search(r"\[Errno \d+\][^\n]*", str(root)) if isinstance(root, OSError) else None
  if os_error:
    return ConfigError(f"--config={spec}: cannot load the config file: {os_error[0]}")
  return ConfigError(f"--config={spec}: {_first_line(root)}")


def _forget_flags(names):
  """Removes flags defined by an earlier command in this process (tests call several)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for name in list(flags.FLAGS):
    if name in names or any(name.startswith(f"{n}.") for n in names):
      delattr(flags.FLAGS, name)


@cli_entry
def define_config(argv, default=config_files.DEFAULT, help_text="config file[:variant]"):
  """Defines --config (default: configs/default.py) and the --config.a.b overrides found in argv.

  ml_collections loads the file and resolves the overrides' fields; a missing file, an error
  inside it or an override naming no field becomes one line (ConfigError) instead of a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv[:] = config_files.resolve_config_args(argv)  # configs/ from any folder (the same list
  _forget_flags(["config"])                          # is parsed again by `run`)
  _state["config_file"] = default
  argv = [a for a in argv if a not in HELP_FLAGS]
  try:
    config_flags.DEFINE_config_file("config", default, help_text, lock_config=True, sys_argv=argv)
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's config file raises)
    raise _config_error(argv, e) from None


def define(kind, name, default, help_text, **kwargs):
  """flags.DEFINE_<kind>(name, ...), replacing a flag of that name an earlier command defined."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  _forget_flags([name])
  getattr(flags, f"DEFINE_{kind}")(name, default, help=help_text, **kwargs)


def overridden(config_flag="config"):
  """Dotted paths of the config fields set on the command line (`--config.a.b=v`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  prefix = f"{config_flag}."
  return [n[len(prefix):] for n in flags.FLAGS if n.startswith(prefix) and flags.FLAGS[n].present]


def with_overrides(config, source, paths):
  """`config` with the fields `paths` (dotted) copied from `source`: e.g. a run's own config with
  the fields the command line set."""
  for path in paths:
    *sections, field = path.split(".")
    node, values = config, source
    for s in sections:
      node, values = node[s], values[s]
    node[field] = values[field]
  return config


@cli_entry
def parse_flags(argv):
  """absl's flag parser with one-line errors (absl prints usage hints and exits 1); loads the
  config (ml_collections defers a failed load to the first access)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()  # values of an earlier command in this process go
  try:
    args = flags.FLAGS([a for a in argv if a not in HELP_FLAGS])
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()  # a failed load raises here
  except flags.Error as e:
    if "Error whilst parsing config file" in str(e):
      raise _config_error(argv, e) from None
    raise ConfigError(str(e).strip().splitlines()[0]) from None
  except Exception as e:  # pylint: disable=broad-except
    raise _config_error(argv, e) from None
  return args


# ----------------------------------------------------------------------------- --help


def _command_flags():
  """The flags a command defined itself (not absl's, not the config's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  out = []
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("dft_jax") or module == "__main__":
      out += [f for f in defined if f.name != "config" and not f.name.startswith("config.")]
  return sorted({f.name: f for f in out}.values(), key=lambda f: f.name)


def _two_columns(left, right, indent=2, column=40):
  """`left` then `right` wrapped to WIDTH from `column` (on the next line when `left` is long)."""
  head = " " * indent + left
  body = textwrap.wrap(right, WIDTH - column) or [""]
  if len(head) + 2 > column:
    lines = [head] + [" " * column + b for b in body]
  else:
    lines = [head.ljust(column) + body[0]] + [" " * column + b for b in body[1:]]
  return "\n".join(line.rstrip() for line in lines)


def help_text(doc, config=None, config_file=None, sections=None):
  """The command's --help: its docstring, its own flags, then the config fields (defaults of the
  loaded config) with their meanings (config_files.field_docs)."""
  lines = [doc.strip(), "", "flags:"]
  for f in _command_flags():
    meaning = " ".join(re.sub(r";\s*repeat this option.*", "", f.help, flags=re.S).split())
    default = "" if f.default in (None, "", []) else f" (default: {f.default})"
    lines.append(_two_columns(f"--{f.name}", f"{meaning}{default}"))
  if config is not None:
    lines += ["", *textwrap.wrap(
        f"config fields, with the values of --config={config_file} (set any field with "
        "--config.SECTION.FIELD=VALUE):", WIDTH)]
    docs = config_files.field_docs()
    fields = list(config_files.flatten(config, leaves=docs))
    sections_order = list(dict.fromkeys(path.split(".")[0] for path, _ in fields))
    order = {path: i for i, path in enumerate(docs)}  # as the config files define them
    fields.sort(key=lambda f: (sections_order.index(f[0].split(".")[0]), order.get(f[0], 0)))
    for path, value in fields:
      if sections is None or path.split(".")[0] in sections:
        lines.append(_two_columns(f"{path}={value}", docs.get(path, "")))
  return "\n".join(lines)


def _print_help_and_exit(argv, doc, sections):
  from absl import flags  # pylint: disable=g-import-not-at-top
  config, config_file = None, None
  if "config" in flags.FLAGS:
    config = flags.FLAGS.config
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    config_file = given[-1] if given else os.path.relpath(_state["config_file"])
  print(help_text(doc, config, config_file, sections), flush=True)
  sys.exit(0)


# ----------------------------------------------------------------------------- logging


class _LineFormat(logging.Formatter):
  """`dft_jax: message` for dft_jax's own lines, `dft_jax: warning: message` for its warnings;
  a library's warnings under the library's logger name."""

  def format(self, record):
    own = record.pathname.startswith(PACKAGE)
    level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
    return f"{'dft_jax' if own else record.name}: {level}{record.getMessage()}"


class _TqdmSafeHandler(logging.StreamHandler):
  """Writes above any tqdm bar on the console (tqdm.write), so bars and lines do not mix."""

  def emit(self, record):
    import tqdm  # pylint: disable=g-import-not-at-top
    try:
      _status.clear()
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
      _status.redraw()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


# Library warnings that report what dft_jax asked for: orbax on the read-only checkpoint manager
# that evaluate, generate and export open.
EXPECTED_WARNINGS = ("read_only=True", "directory is read only")


def _shown(record):
  """dft_jax's INFO lines and up; a library's warnings and up, unless expected."""
  if record.pathname.startswith(PACKAGE):
    return True
  return (record.levelno >= logging.WARNING
          and not any(w in record.getMessage() for w in EXPECTED_WARNINGS))


def setup_logging():
  """One handler on stderr: dft_jax's INFO lines and every library's warnings, in _LineFormat; no
  INFO chatter from libraries (orbax writes about ten lines per checkpoint, jax one per missing
  backend, e.g. "Unable to initialize backend 'tpu'")."""
  root = logging.getLogger()
  for handler in list(root.handlers):  # ours from an earlier command, absl's, basicConfig's
    if isinstance(handler, logging.StreamHandler) or type(handler).__name__ == "ABSLHandler":
      root.removeHandler(handler)
  handler = _TqdmSafeHandler(sys.stderr)
  handler.dft_jax = True
  handler.setFormatter(_LineFormat())
  handler.addFilter(_shown)
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.INFO)  # absl.logging.info: the data summary


# ----------------------------------------------------------------------------- phases


class _StatusLine:
  """One status line on a terminal's stderr (`dft_jax: compiling the train step… 12 s`), kept up
  to date by a thread while a phase runs; nothing when stderr is not a terminal."""

  def __init__(self):
    self.text, self.lock = None, threading.Lock()

  def show(self, text):
    with self.lock:
      self.text = text
      self._write(f"\r\033[K{text}")

  def clear(self):
    if self.text is not None:
      self._write("\r\033[K")

  def redraw(self):
    if self.text is not None:
      self._write(self.text)

  def end(self):
    with self.lock:
      self.clear()
      self.text = None

  @staticmethod
  def _write(text):
    if sys.stderr.isatty():
      sys.stderr.write(text)
      sys.stderr.flush()


_status = _StatusLine()
_state = {"phase": None, "on_stop": None, "config_file": None}


@contextlib.contextmanager
def phase(label, timed=True):
  """Names what the command is doing (a stop signal's message says it). A `timed` phase (one long
  library call: loading, compiling) shows `label… 12 s` on a terminal's status line, counting,
  and logs `label… done in S s` at the end; in a log file, `label…` at the start and the same
  end line. A phase with its own progress bars (evaluation) passes timed=False: `label…` is
  logged at the start."""
  previous, _state["phase"] = _state["phase"], label
  started, done = time.time(), threading.Event()
  ticking = timed and sys.stderr.isatty()  # in a log, the start and end lines are enough
  if ticking:
    def tick():
      while not done.wait(1.0):
        _status.show(f"dft_jax: {label}… {time.time() - started:.0f} s")
    thread = threading.Thread(target=tick, daemon=True, name="dft_jax-status")
    thread.start()
  else:
    logging.info("%s…", label)
  try:
    yield
  finally:
    done.set()
    if ticking:
      thread.join()
      _status.end()
    _state["phase"] = previous
  if timed:
    logging.info("%s… done in %.1f s", label, time.time() - started)


# ----------------------------------------------------------------------------- stop signals

# A stop signal (SIGTERM, SIGINT) reaches a Python handler only once the main thread is back in
# Python, which a compile or a generation call can delay by minutes. So the handler does nothing;
# signal.set_wakeup_fd makes the C-level handler write the signal's number to a pipe at once, and a
# thread reading it ends the command: one line (what it was doing, what was kept) and the exit code
# of the stop policy (`on_stop`). Where something else took the signal over (the training loop's
# run_control.StopSignals, which stops after the current step with a checkpoint), the thread leaves
# it. Nothing is installed before a command's cli.run.


def _noted(signum, frame):
  del signum, frame


def _default_on_stop(signum):
  return "", 128 + signum


def on_stop(policy):
  """Sets what a stop signal outside the training loop does: policy(signum) -> (what was kept,
  exit code); None: nothing kept, exit 128 + signum (130 for SIGINT, 143 for SIGTERM)."""
  _state["on_stop"] = policy


def _end_of_bar():
  """What ends an open progress bar's line: erase it on a terminal, a newline in a log."""
  import tqdm  # pylint: disable=g-import-not-at-top
  if not getattr(tqdm.tqdm, "_instances", None):
    return ""
  return "\r\033[K" if sys.stderr.isatty() else "\n"


def _stop(signum):
  kept, code = (_state["on_stop"] or _default_on_stop)(signum)
  where = f" while {_state['phase']}" if _state["phase"] else " while exiting"
  _status.clear()
  sys.stderr.write(f"{_end_of_bar()}dft_jax: stopped by {signal.Signals(signum).name}{where}"
                   f"{'; ' + kept if kept else ''}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  (the main thread may be inside a C call)


def _watch(read_fd):
  while True:
    try:
      received = os.read(read_fd, 64)
    except OSError:
      return
    if not received:
      return
    for signum in received:
      if signum in (signal.SIGTERM, signal.SIGINT) and signal.getsignal(signum) is _noted:
        _stop(signum)


@contextlib.contextmanager
def stop_signals(keep=False):
  """SIGTERM / SIGINT end the command at once with one line (see above). The previous handlers
  come back on exit, unless `keep` (the command is the whole process: a signal while it exits
  then ends it with exit 0, its work done). Outside the main thread (nothing can be installed
  there) it does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  previous = {s: signal.signal(s, _noted) for s in (signal.SIGTERM, signal.SIGINT)}
  threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="dft_jax-stop").start()
  finished = False
  try:
    yield
    finished = True
  finally:
    _state["phase"] = None
    if keep and finished:
      on_stop(lambda signum: ("its work was done", 0))
    else:
      _state["on_stop"] = None
      for s, handler in previous.items():
        signal.signal(s, handler)
      signal.set_wakeup_fd(previous_fd)
      os.close(write_fd)  # the watcher reads EOF and ends


# ----------------------------------------------------------------------------- run folders


def _complete_steps(workdir):
  from dft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))


@contextlib.contextmanager
def run_folder(workdir):
  """A training run's folder: printed at the start. A stop signal before the first checkpoint, or
  an error, removes what this run created while it has no checkpoint (the folder itself if the
  run made it, else an empty checkpoints/ folder) and exits 128 + signum; after a checkpoint, a
  stop exits 0 (run the same command to resume)."""
  path = os.path.abspath(workdir)
  existed = os.path.exists(path)
  checkpoints = os.path.join(path, "checkpoints")
  had_checkpoints = os.path.exists(checkpoints)
  logging.info("run folder %s", path)

  def clean_up():
    if _complete_steps(path):
      return
    if not existed:
      shutil.rmtree(path, ignore_errors=True)
    elif not had_checkpoints and os.path.isdir(checkpoints) and not os.listdir(checkpoints):
      os.rmdir(checkpoints)

  def stopped(signum):
    steps = _complete_steps(path)
    if steps:
      return (f"checkpoint {steps[-1]} in {checkpoints} is intact: run the same command to "
              "resume", 0)
    clean_up()
    return "no checkpoint yet, nothing kept", 128 + signum

  on_stop(stopped)
  try:
    yield path
  except BaseException:
    clean_up()
    raise
  finally:
    on_stop(None)


# ----------------------------------------------------------------------------- run


def run(main, argv=None, *, doc="", sections=None):
  """Parses the flags (one-line errors; `--help` prints help_text and exits 0), sets up logging
  and stop signals, and returns main(remaining args); a UserInputError from `main` is one line
  (exit 2). `sections`: the config sections the command reads (--help lists those)."""
  argv = sys.argv if argv is None else argv
  args = parse_flags(argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    _print_help_and_exit(argv, doc, sections)
  setup_logging()
  with stop_signals(keep=argv is sys.argv):  # sys.argv: this command is the process
    return cli_entry(main)(args)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize() for multi-process runs: explicit arguments, or
  DFT_JAX_DISTRIBUTED=1 for auto-detection (TPU pods, SLURM)."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = bool(num_processes and num_processes > 1)
  if not explicit and os.environ.get("DFT_JAX_DISTRIBUTED") != "1":
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs need it
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()


# ----------------------------------------------------------------------------- models


def define_model_flags():
  """--model and --step, for the commands that use a trained model (load_model)."""
  define("string", "model", None, "a training run folder (its checkpoint), an alias, an HF "
         "folder, a .gguf file or preset:NAME (default: config.model.name)")
  define("integer", "step", None, "a run folder's checkpoint step (default: the latest)")


def model_spec():
  """What --model names, or config.model.name without it."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.FLAGS.model or flags.FLAGS.config.model.name


def load_model(spec, config, *, step=None):
  """(model, tokenizer, config, step) for the commands that use a trained model (evaluate,
  generate, export). `spec` is a training run folder (checkpoint.is_workdir: its checkpoint
  `step`, default the latest once a save in progress has committed, and the run's own config,
  with the fields set on the command line copied over; its model fields stay the run's; `step`
  the one restored) or a models.load spec (alias, HF folder, .gguf file, preset:NAME: built with
  config.model's options, config.model.name set to it; `step` None)."""
  from dft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  from dft_jax.models import loader  # pylint: disable=g-import-not-at-top
  if checkpoint.is_workdir(spec):
    with phase(f"restoring {spec}"):
      model, tokenizer, run_config, step = checkpoint.restore_model(spec, step)
    logging.info("%s: checkpoint step %d", spec, step)
    return model, tokenizer, with_overrides(run_config, config, overridden()), step
  if step is not None:
    raise ConfigError(f"--step={step} needs a training run folder; {spec!r} is none")
  config.model.name = spec
  with phase(f"loading {spec}"):
    model, tokenizer = models.load(spec, **models.decoder_options(config.model))
  if tokenizer is None and config.model.get("tokenizer"):  # a preset's tokenizer folder
    tokenizer = loader.tokenizer_for(config.model, None)
  return model, tokenizer, config, None
