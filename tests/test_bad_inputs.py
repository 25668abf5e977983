"""The bad-input corpus (tests/bad_inputs/cases.json): every case through its command's entry point
(`cli_main(argv)`, what `python -m dft_jax.<entry> ARGV` runs) must end with exit 2 and one line
naming what to fix, no traceback (slow tier).

The cases run in the test process (commands_testlib.run_command: each with its own argv, flags,
stdout and stderr, and a stdin that answers "y" to every question: a question that was asked shows
as what it allowed, and the corpus's custom code fails loudly). A few cases also run as real
processes: the exit status and the console are the process's own.
"""
import json
import os
import subprocess
import sys

import pytest

from dft_jax import run_control
from commands_testlib import error_lines, run_command
from conftest import FAST_COMPILE
from test_faults import fault_config
from test_train import REPO, cli_flags

CORPUS = REPO / "tests" / "bad_inputs"
CASES = json.loads((CORPUS / "cases.json").read_text())
COMMANDS = {"train": "dft_jax.train", "evaluate": "dft_jax.evaluate",  # a case's entry -> command
            "generate": "dft_jax.generate", "export": "dft_jax.export",
            "inspect": "dft_jax.data.inspect", "scanner": "dft_jax.experiments.scanner"}
PROCESS_CASES = ("config_unknown_flag", "data_malformed_jsonl_line", "model_truncated_gguf",
                 "config_evaluate_unknown_suite")


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory):
  """(folder of the cases' own folders, flags of a one-step tiny run, that run's workdir): the
  resume cases change a field of the trained run."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  base = cli_flags(fault_config(tmp_path_factory.mktemp("rows"), train__num_steps=1))
  trained = tmp / "trained_run"
  code, _, err = run_command("dft_jax.train", [*base, f"--workdir={trained}"])
  assert code == 0, err[-3000:]
  return tmp, base, trained


def case_argv(case, corpus_dirs):
  """The case's argv: {here} the corpus folder, {tmp} a folder of its own, {trained} the trained
  run; a train case gets the tiny run's flags and a workdir of its own."""
  tmp, base, trained = corpus_dirs
  argv = [a.format(here=CORPUS, tmp=tmp / case["name"], trained=trained) for a in case["argv"]]
  if case.get("entry", "train") != "train":
    return argv
  config_files = [a for a in argv if a.startswith("--config=")]  # before any --config.a.b
  return [*config_files, *base, f"--workdir={tmp / case['name'] / 'run'}",
          *(a for a in argv if a not in config_files)]


def test_corpus_has_every_kind_of_case():
  names = [c["name"] for c in CASES]
  assert len(names) >= 60 and len(set(names)) == len(names)
  for kind, least in (("config_", 15), ("data_", 7), ("model_", 4), ("resume_", 2),
                      ("workdir_", 2)):
    assert sum(n.startswith(kind) for n in names) >= least, kind


def assert_one_line_naming_it(case, code, out, err):
  output = out + err
  assert code == 2, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  lines = error_lines(err)
  assert len(lines) == 1, output[-3000:]
  assert case["expect"].format(here=CORPUS) in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_is_one_line_naming_it(corpus_dirs, case):
  argv = case_argv(case, corpus_dirs)
  workdir = corpus_dirs[0] / case["name"] / "run"
  if case.get("workdir_in_use"):  # another live run holds the workdir's lock
    workdir.mkdir(parents=True)
    with run_control.WorkdirLock(str(workdir)):
      result = run_command(COMMANDS[case.get("entry", "train")], argv)
  else:
    result = run_command(COMMANDS[case.get("entry", "train")], argv)
  assert_one_line_naming_it(case, *result)
  assert not list((corpus_dirs[0] / case["name"]).rglob("run.lock"))  # released on every way out


@pytest.mark.slow
@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_input_ends_the_process_with_exit_2_and_one_line(corpus_dirs, name):
  case = next(c for c in CASES if c["name"] == name)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  done = subprocess.run(
      [sys.executable, "-m", COMMANDS[case.get("entry", "train")],
       *case_argv(case, corpus_dirs)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
      capture_output=True, text=True, timeout=300, check=False)
  assert_one_line_naming_it(case, done.returncode, done.stdout, done.stderr)
