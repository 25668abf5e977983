"""Test setup: 8 fake CPU devices for the sharding tests (must be set before jax is imported)."""
import os

import pytest

# Tests check values, not speed: XLA:CPU without its LLVM optimisation passes compiles a tiny step
# about twice as fast, and subprocesses (the CLI tests) inherit the flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_compilations_within_the_session():
  """A persistent XLA cache for this test process: the many tests that build the same tiny train
  step compile it once. Subprocesses (the CLI tests) do not inherit it: they compile as a user's
  run does."""
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix="dft_jax_test_xla_")
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


@pytest.fixture
def cfg(tmp_path):
  """configs/default.py's data block with a per-test datasets cache."""
  from dft_jax.data import testing  # pylint: disable=g-import-not-at-top
  c = testing.default_config().data
  c.cache_dir = str(tmp_path / "hf_cache")
  return c
