"""Device memory: the share of a GPU that JAX's allocator takes, and whether a compiled step fits.

JAX's allocator reserves XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU when its backend starts
(JAX's default 0.75). The Qwen2.5-7B full fine-tune at 4 x 4096 peaks at 110.6 GiB on one H200
(docs/speed.md): over 0.75 of its 139.8 GiB ("Out of memory while trying to allocate 38.58GiB"),
within 0.95. Commands take ALLOCATOR_FRACTION unless the environment sets one, before jax starts
(cli.prepare_process); the train job compares XLA's own count of the compiled step's buffers with
the pool before the first step and names the setting when it cannot fit.
"""
import os

FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
ALLOCATOR_FRACTION = "0.95"  # multi-GPU runs through NCCL may want ~0.90: its buffers live outside
GIB = 2 ** 30


def choose_allocator_fraction(environ=os.environ):
  """Sets XLA_PYTHON_CLIENT_MEM_FRACTION to ALLOCATOR_FRACTION unless `environ` has one (it takes
  effect only if jax has not started its GPU backend yet); returns the value in force."""
  return environ.setdefault(FRACTION_VARIABLE, ALLOCATOR_FRACTION)


def step_bytes(compiled):
  """XLA's count of the device memory a compiled step holds: its arguments, outputs (less those
  that reuse a donated argument's buffer) and temporaries; None when XLA gives no analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def check_fits(compiled, device, what="the train step"):
  """ConfigError naming XLA_PYTHON_CLIENT_MEM_FRACTION (and the fields that shrink a step) when
  the compiled step's buffers exceed the allocator's pool on `device`: the step would run out of
  memory. Devices without a pool limit (CPU) pass."""
  from dft_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  limit = (device.memory_stats() or {}).get("bytes_limit")
  need = step_bytes(compiled)
  if not limit or need is None or need <= limit:
    return
  fraction = os.environ.get(FRACTION_VARIABLE, "JAX's default 0.75")
  raise ConfigError(
      f"{what} needs {need / GIB:.1f} GiB of device memory (XLA's buffers), the allocator's "
      f"pool on {getattr(device, 'device_kind', device)} is {limit / GIB:.1f} GiB "
      f"({FRACTION_VARIABLE}={fraction} of the device): raise {FRACTION_VARIABLE} if the device "
      f"has room, or shrink the step (train.microbatches, model.remat=nothing_saveable, "
      f"optimizer.mu_dtype=bfloat16, a smaller train.global_batch_size or train.seq_len)")
