"""What every command shares: `--config=FILE[:variant]` with `--config.a.b=value` overrides
(ml_collections config_flags; the file is executed once), one-line errors (`dft_jax: error: ...`,
exit 2), absl logging for dft_jax's own lines and no INFO chatter from libraries, and the optional
multi-process setup.

  cli.define_config(argv)          # before absl parses the flags
  cli.run(main, argv)              # absl.app.run with one-line flag errors
"""
import logging
import os
import re
import sys

from dft_jax import config_files
from dft_jax.errors import ConfigError, cli_entry


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


@cli_entry
def define_config(argv, default=config_files.DEFAULT, help_text="config file[:variant]"):
  """Defines --config (default: configs/default.py) and the --config.a.b overrides found in argv.

  ml_collections loads the file and resolves the overrides' fields; a missing file, an error
  inside it or an override naming no field becomes one line (ConfigError) instead of a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    config_flags.DEFINE_config_file("config", default, help_text, lock_config=True, sys_argv=argv)
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's config file raises)
    raise _config_error(argv, e) from None


@cli_entry
def parse_flags(argv):
  """absl's flag parser with one-line errors (absl prints usage hints and exits 1); loads the
  config (ml_collections defers a failed load to the first access)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()  # a failed load raises here
  except flags.Error as e:
    if "Error whilst parsing config file" in str(e):
      raise _config_error(argv, e) from None
    raise ConfigError(str(e).strip().splitlines()[0]) from None
  except Exception as e:  # pylint: disable=broad-except
    raise _config_error(argv, e) from None
  return args


def quiet_library_logs():
  """Drops the INFO lines of the libraries under absl's handler (orbax writes about ten per
  checkpoint, jax one per missing backend); dft_jax's own INFO lines and every warning stay."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(__file__))
  absl_logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or record.pathname.startswith(package))


def run(main, argv=None):
  """absl.app.run(main) with one-line flag errors and quiet library logs; a UserInputError from
  `main` is one line too (exit 2)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def main_with_logs(args):
    quiet_library_logs()
    return cli_entry(main)(args)

  app.run(main_with_logs, argv=sys.argv if argv is None else argv, flags_parser=parse_flags)


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
