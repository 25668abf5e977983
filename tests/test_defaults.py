"""The GPU defaults: JAX's allocator share set before jax starts its backend, a step that cannot
fit the pool refused before it runs, and model.max_segments None taking the data's own bound."""
import itertools
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from dft_jax import device_memory
from dft_jax.data import packing, pipeline
from dft_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records XLA_PYTHON_CLIENT_MEM_FRACTION as jax starts its backend, then runs the train command
# with a config it refuses after counting the devices (4 rows in 3 microbatches).
FIRST_BACKEND = """
import os
from jax._src import xla_bridge
seen = []
start = xla_bridge.backends
def recording():
  seen.append(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
  return start()
xla_bridge.backends = recording
from dft_jax import train
try:
  train.cli_main(["train", "--config.train.microbatches=3"])
except SystemExit as e:
  print("EXIT", e.code)
print("AT FIRST BACKEND", seen[0] if seen else "never")
"""


@pytest.mark.slow
def test_allocator_fraction_is_set_before_jax_starts_its_backend():
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  proc = subprocess.run([sys.executable, "-c", FIRST_BACKEND], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  lines = proc.stdout.splitlines()
  assert "EXIT 2" in lines, proc.stderr[-2000:]
  assert "train.microbatches (3)" in proc.stderr  # refused after the backend counted devices
  assert lines[-1] == f"AT FIRST BACKEND {device_memory.ALLOCATOR_FRACTION}"


def test_a_fraction_of_ones_own_is_kept():
  environ = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
  assert device_memory.choose_allocator_fraction(environ) == "0.5"
  assert device_memory.choose_allocator_fraction({}) == device_memory.ALLOCATOR_FRACTION


class Pool(types.SimpleNamespace):
  """A device with an allocator pool of `limit` bytes (a GPU's memory_stats, as jax reports)."""

  def memory_stats(self):
    return {"bytes_limit": self.limit}


def test_a_step_larger_than_the_pool_is_refused_naming_the_setting():
  compiled = jax.jit(lambda x: (x @ x.T).sum()).lower(jnp.ones((64, 256))).compile()
  need = device_memory.step_bytes(compiled)
  m = compiled.memory_analysis()
  assert need == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                  + m.temp_size_in_bytes) >= 64 * 256 * 4
  device_memory.check_fits(compiled, Pool(limit=need, device_kind="H200"))  # just fits
  device_memory.check_fits(compiled, jax.devices()[0])  # CPU: no pool limit
  with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=.* raise "
                                        "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    device_memory.check_fits(compiled, Pool(limit=need - 1, device_kind="H200"))


def most_documents_in_a_row(lengths, seq_len):
  """The most documents any row of seq_len can hold, by trying every subset (small N)."""
  return max(len(s) for n in range(len(lengths) + 1)
             for s in itertools.combinations(lengths, n) if sum(s) <= seq_len)


@pytest.mark.parametrize("lengths,seq_len", [([5, 9, 3, 7, 30, 2], 16), ([40, 41], 64),
                                             ([1] * 8, 5), ([100, 3, 3, 94], 100)])
def test_data_bound_is_the_most_documents_a_row_can_hold_plus_padding(lengths, seq_len):
  expected = max(2, most_documents_in_a_row(lengths, seq_len) + 1)
  assert packing.data_bound(lengths, seq_len, packing=True) == expected
  assert packing.data_bound(lengths, seq_len, packing=False) == 2
  assert packing.data_bound([1] * 100, 100, packing=True) == packing.DEFAULT_MAX_SEGMENTS


def test_iterator_takes_the_data_bound_when_max_segments_is_none(cfg, tok):
  it = pipeline.make_train_iterator(cfg, tok, seq_len=384, global_batch_size=4, seed=0,
                                    max_segments=None, process_index=0, process_count=1)
  lengths = it._length  # pylint: disable=protected-access  (the kept documents' lengths)
  assert it.max_segments == packing.data_bound(lengths, 384, packing=True) > 2
  runs = [packing.segment_runs_per_row(next(it)["segment_ids"]).max() for _ in range(30)]
  assert max(runs) <= it.max_segments < 64
  assert f"(model.max_segments={it.max_segments})" in it.summary()
