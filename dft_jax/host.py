"""Host memory: hand memory that Python and XLA have freed back to the operating system.

glibc keeps freed heap blocks for reuse: after the many mid-sized arrays of a GGUF dequantisation
(each tensor in float32, transposed, stacked) the process keeps ~0.45 GB it no longer uses for the
rest of the run (SmolLM2-135M, measured). `release_freed()` calls malloc_trim(0) after such
phases. Two more habits of glibc grow a run: each thread that allocates gets an arena of its own
(up to 8 per core) that keeps what the thread freed, and after a large block is freed glibc raises
the size above which it maps blocks of their own (returned to the system when freed) up to 32 MB.
XLA:CPU's worker threads and buffers grew the default run to 6.9 GB inside a train step whose
buffers XLA puts at 3.0 GiB. `keep_heap_small()` caps the arenas at 2 and fixes that size at
256 KiB (measured in docs/speed.md "Host memory"). Elsewhere than glibc both do nothing.
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


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)


def keep_heap_small(arenas=2, mmap_threshold=256 * 1024):
  """mallopt(M_ARENA_MAX, arenas) and mallopt(M_MMAP_THRESHOLD, mmap_threshold) (call it before
  jax starts its thread pools); True if both were taken."""
  libc = _libc()
  return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1
              and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1)


def release_freed():
  """Returns the heap memory glibc holds freed to the OS (malloc_trim); True if it could."""
  libc = _libc()
  return bool(libc is not None and libc.malloc_trim(0) is not None)
