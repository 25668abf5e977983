"""Host memory: hand memory that Python and XLA have freed back to the operating system.

glibc keeps freed heap blocks for reuse: after the many mid-sized arrays of a GGUF dequantisation
(each tensor in float32, transposed, stacked) the process keeps ~0.45 GB it no longer uses for the
rest of the run (SmolLM2-135M, measured). `release_freed()` calls malloc_trim(0) after such
phases. And each thread that allocates gets an arena of its own (up to 8 per core), which keeps
what the thread freed: XLA:CPU's worker threads grew the default run to 6.9 GB inside a train step
whose buffers XLA puts at 3.0 GiB. `limit_arenas()` caps the arenas at 2 (the step's peak: 3.7 GB,
measured). Elsewhere than glibc both do nothing.
"""
import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    return None
  return libc if libc is not None and hasattr(libc, "malloc_trim") else None


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_arenas(arenas=2):
  """mallopt(M_ARENA_MAX, arenas) for the threads started from now on (call it before jax starts
  its thread pools); True if it could."""
  libc = _libc()
  return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def release_freed():
  """Returns the heap memory glibc holds freed to the OS (malloc_trim); True if it could."""
  libc = _libc()
  return bool(libc is not None and libc.malloc_trim(0) is not None)
