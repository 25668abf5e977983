"""Runs command lines through the real CLI entry points, each in a fork of one warm process.

  python tests/bad_inputs/runner.py JOBS_JSON RESULTS_JSON

JOBS_JSON: [{"name": ..., "entry": "train" | "evaluate" | "generate" | "export" | "inspect" |
"scanner", "argv": [...], "hold_lock": WORKDIR (optional)}, ...], run in order. The parent imports
the CLI modules once (the slow part, seconds); each job runs in a forked child exactly as
`python -m dft_jax.<entry> ARGV` would: its own argv and flags, stdout and stderr on real file
descriptors, an uncaught exception printed as the interpreter prints it, and the exit status of the
child process. The parent never starts JAX's backends, so forking it
is safe. The child's stdin answers "y" to every question, then ends: nothing should ask, and a
question that was asked shows as what it allowed (custom code in a model folder runs, and the
corpus's code fails loudly) rather than as a wait. With "hold_lock" the parent holds that
workdir's lock (another live run, as far as the child can tell) while the child runs.
RESULTS_JSON: {name: {"code": int, "stdout": str, "stderr": str, "seconds": float}}.
"""
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback

from transformers import AutoTokenizer  # pylint: disable=unused-import  (its lazy imports, once)

from dft_jax import data, export, generate, run_control, train  # pylint: disable=unused-import
from dft_jax.data import inspect as data_inspect
from dft_jax.evaluate import cli as evaluate_cli
from dft_jax.experiments import scanner

MODULES = {  # entry -> the module `python -m dft_jax.<entry> ARGV` runs (all: cli_main(argv))
    "train": train, "evaluate": evaluate_cli, "generate": generate, "export": export,
    "inspect": data_inspect, "scanner": scanner,
}
ENTRIES = {entry: (lambda argv, m=module: m.cli_main([m.__name__, *argv]))
           for entry, module in MODULES.items()}


def exit_code(e):
  """The status the interpreter gives a SystemExit."""
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=sys.stderr)
  return 1


def answer_yes_on_stdin():
  read, write = os.pipe()
  os.write(write, b"y\n" * 100)
  os.close(write)
  os.dup2(read, 0)


def child(job, out, err):
  answer_yes_on_stdin()
  os.dup2(out, 1)
  os.dup2(err, 2)
  code = 0
  try:
    ENTRIES[job["entry"]](job["argv"])
  except SystemExit as e:
    code = exit_code(e)
  except BaseException:  # pylint: disable=broad-except  (what the interpreter does with it)
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def held_lock(workdir):
  if not workdir:
    return contextlib.nullcontext()
  os.makedirs(workdir, exist_ok=True)
  return run_control.WorkdirLock(workdir)


def run(job, timeout=120):
  with held_lock(job.get("hold_lock")), tempfile.TemporaryFile() as out, \
      tempfile.TemporaryFile() as err:
    start = time.time()
    pid = os.fork()
    if pid == 0:
      child(job, out.fileno(), err.fileno())
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.time() - start > timeout:
        os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        break
      time.sleep(0.01)
    texts = []
    for f in (out, err):
      f.seek(0)
      texts.append(f.read().decode(errors="replace"))
  return {"code": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1],
          "seconds": round(time.time() - start, 2)}


def main(jobs_path, results_path):
  with open(jobs_path) as f:
    jobs = json.load(f)
  results = {job["name"]: run(job) for job in jobs}
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
