"""User-facing errors: bad config, data or model input, reported as one line by every CLI."""
import functools
import math
import numbers
import operator
import os
import re
import sys
import threading


class UserInputError(ValueError):
  """Input the user can fix; the message names the field, file, row or flag."""


class ConfigError(UserInputError):
  """A config field has an unknown name, a wrong type or a value out of range."""


class DataError(UserInputError):
  """A dataset source, file or row cannot be used."""


class ModelError(UserInputError):
  """A model path, checkpoint, architecture or tokenizer cannot be used."""


_BOUNDS = (("minimum", ">=", operator.ge), ("above", ">", operator.gt),
           ("maximum", "<=", operator.le), ("below", "<", operator.lt))


def check_number(name, value, *, integer=False, optional=False, **bounds):
  """Raises ConfigError `name=value: must be ...` unless `value` is a finite number (an integer,
  not a bool, when `integer`) within `bounds` (minimum= / above= / maximum= / below=); None passes
  when `optional`. Returns `value`."""
  if optional and value is None:
    return value
  kind = numbers.Integral if integer else numbers.Real
  ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
  limits = [(sign, bounds[key], op) for key, sign, op in _BOUNDS if key in bounds]
  if ok and all(op(value, limit) for _, limit, op in limits):
    return value
  if integer and limits == [(">=", 1, operator.ge)]:
    what = "a positive integer"
  else:
    what = " and ".join([("an integer" if integer else "a finite number")]
                        + [f"{sign} {limit}" for sign, limit, _ in limits]).replace(" and ", " ", 1)
  raise ConfigError(f"{name}={value!r}: must be {'None or ' if optional else ''}{what}")


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)|\bcode: (\d+)")


def os_error_reason(e):
  """'[Errno N] what it means' of an OS error however it is reported: Python's OSError (with its
  file), tensorstore's "os_error_code='N'", Rust's "(os error N)" (safetensors); else None."""
  if isinstance(e, OSError) and e.errno:
    return f"[Errno {e.errno}] {e.strerror}" + (f": {e.filename}" if e.filename else "")
  code = _OS_ERROR_CODE.search(str(e))
  if code:
    number = int(next(filter(None, code.groups())))
    return f"[Errno {number}] {os.strerror(number)}"
  return None


def one_line(e, limit=300):
  """An exception's message as one line of at most `limit` characters (its type if it has none)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _quiet_from_now_on():
  """Nothing printed after the error line: a library's background thread or exit handler that
  fails while the process ends (e.g. an executor refusing new work after shutdown) stays silent."""
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None


def cli_entry(main):
  """Wraps a CLI `main` so a UserInputError prints `dft_jax: error: <message>` and exits 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserInputError as e:
      print(f"dft_jax: error: {e}", file=sys.stderr, flush=True)
      _quiet_from_now_on()
      sys.exit(2)

  return wrapped
