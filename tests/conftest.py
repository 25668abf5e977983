"""Test setup: 8 fake CPU devices for the sharding tests (must be set before jax is imported)."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
