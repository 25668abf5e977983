"""Test setup: 8 fake CPU devices for the sharding tests (must be set before jax is imported), and
the two tiers: `pytest` runs the fast tier; `pytest --slow` adds the tests marked
`@pytest.mark.slow` (launches of the real commands, fault injection, the bad-input corpus, the
study, the benchmark smoke runs, several processes)."""
import collections
import os

import pytest

# Tests check values, not speed: XLA:CPU without its LLVM optimisation passes compiles a tiny step
# about twice as fast, and its classic loop emitters instead of the MLIR fusion emitters another
# third faster (the fast tier: 3 min 6 s -> 2 min 12 s on 2 cores); subprocesses (the CLI tests)
# inherit the flags.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_compilations_within_the_session():
  """A persistent XLA cache for this test session, shared by its worker processes (pytest-xdist's
  workers inherit the folder from the first process through DFT_JAX_TEST_XLA_CACHE): the many
  tests that build the same tiny train step compile it once. The process that made the folder
  removes it at exit. Subprocesses (the CLI tests) do not use it: they compile as a user's run
  does."""
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  folder = os.environ.get("DFT_JAX_TEST_XLA_CACHE")
  if folder is None:
    folder = os.environ["DFT_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="dft_jax_test_xla_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_share_compilations_within_the_session()


@pytest.fixture(scope="session")
def tok():
  """The tiny real chat tokenizer of dft_jax.data.testing (byte-level BPE, ChatML, EOS <|im_end|>)."""
  from dft_jax.data import testing  # pylint: disable=g-import-not-at-top
  return testing.tiny_chat_tokenizer()


TinyRun = collections.namedtuple("TinyRun", "workdir config")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, config) of a finished run of the tiny Llama trained in this test process
  (tests/test_train.py's tiny_config: 4 steps, a checkpoint written asynchronously after every
  step, all kept), shared by the tests that read a run folder; they change only copies of it."""
  from dft_jax import train  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("tiny_run")
  config = tiny_config(folder, train__num_steps=4, checkpoint__every_steps=1, checkpoint__keep=4,
                       checkpoint__async_save=True)
  train.train_and_evaluate(config, str(folder / "run"))
  return TinyRun(folder / "run", config)


@pytest.fixture
def cfg(tmp_path):
  """configs/default.py's data block with a per-test datasets cache."""
  from dft_jax.data import testing  # pylint: disable=g-import-not-at-top
  c = testing.default_config().data
  c.cache_dir = str(tmp_path / "hf_cache")
  return c


# ----------------------------------------------------------------------------- the two tiers


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False,
                   help="also run the slow tier (tests marked slow: launches, faults, the study, "
                   "benchmark smoke runs, several processes)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow tier: run with --slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


_ran = []


def pytest_runtest_logreport(report):
  if report.when == "call":
    _ran.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
  """A session in which every selected test was skipped (e.g. slow tests chosen without --slow)
  ran nothing: it exits 5, as pytest does when nothing was collected, so CI cannot pass on it."""
  if exitstatus == 0 and not _ran and not hasattr(session.config, "workerinput"):
    session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
