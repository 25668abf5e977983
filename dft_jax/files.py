"""Small files written atomically: a reader (or a run killed mid-write) sees the old file or the
new one, never a torn one."""
import json
import os
import tempfile


def write_text(path, text):
  """Writes `text` to a temporary file beside `path`, flushes it to disk, then renames it."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path, obj, **dump_kwargs):
  write_text(path, json.dumps(obj, indent=dump_kwargs.pop("indent", 2), **dump_kwargs) + "\n")


def read_json(path):
  """The JSON object in `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
