"""The commands run in the test process: what `python -m COMMAND ARGV` prints and its exit status,
for the tests where a process of its own adds nothing (the ones about exit codes, signals and the
console of a real process launch it)."""
import io
import sys
import threading

from dft_jax import export, generate, train
from dft_jax.data import inspect as data_inspect
from dft_jax.evaluate import cli as evaluate_cli
from dft_jax.experiments import scanner

COMMANDS = {  # the command -> the module whose cli_main(argv) it runs
    "dft_jax.train": train, "dft_jax.evaluate": evaluate_cli, "dft_jax.generate": generate,
    "dft_jax.export": export, "dft_jax.data.inspect": data_inspect,
    "dft_jax.experiments.scanner": scanner,
}


def run_command(command, argv):
  """(exit code, stdout, stderr) of `python -m COMMAND ARGV` run in this process: its own argv and
  flags, a stdin that answers "y" to every question and then ends (nothing should ask: a question
  that was asked shows as what it allowed), the process's hooks as they were afterwards."""
  out, err = io.StringIO(), io.StringIO()
  saved = (sys.stdin, sys.stdout, sys.stderr, sys.unraisablehook, threading.excepthook)
  sys.stdin, sys.stdout, sys.stderr = io.StringIO("y\n" * 100), out, err
  try:
    COMMANDS[command].cli_main([command, *argv])
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  finally:  # an error line silences the process's later reports (errors.cli_entry): not ours
    sys.stdin, sys.stdout, sys.stderr, sys.unraisablehook, threading.excepthook = saved
  return code, out.getvalue(), err.getvalue()


def error_lines(output):
  return [line for line in output.splitlines() if line.startswith("dft_jax: error:")]
