"""Where rows come from: `data.source` -> `datasets.Dataset` (`IterableDataset` when streaming).

`data.source` is one of
  builtin:NAME          data shipped with dft_jax (`builtin.load_builtin`)
  FILE or GLOB          local .json / .jsonl / .parquet / .csv / .txt files (all of one kind)
  FOLDER                a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
  ORG/NAME              a hub dataset (`data.subset` = its config name), split `data.split`

Library errors (missing files, bytes that are not UTF-8, malformed JSON lines, a lone surrogate
escape, a CSV row with too many fields, unreadable parquet, a damaged save_to_disk folder, an
offline hub) become one `DataError` line naming the file and, where it can be found, the line.
Loading a local source sends nothing over the network (`datasets`' download-count request is off,
see `quiet_datasets`).

Content, not dates: `Source.digests` holds the sha256 of what the rows are read from (each local
file, the Arrow files of a save_to_disk folder, a built-in set's rows; a hub dataset's
fingerprint, which follows its revision), read on every load. The cache of a local file's parsed
rows is keyed on it (`datasets` alone keys it on the file's modification time, so a file changed in
place with the same time would be read from the cache), and the data iterator saves it with its
position (pipeline.py) so a resume on changed data is refused naming the file.
"""
import concurrent.futures
import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import re

import datasets
import pyarrow as pa

from dft_jax.errors import DataError, one_line

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class RowLocator:
  """Names a row for error messages: `row 17 of data/train.jsonl`.

  `files` and `builder` are set for multi-file sources; the file holding a row is then found
  (on the error path only) by counting each file's rows in order. `renumber` maps the row numbers
  of a part of the source (the training part, without the held-out rows) to the source's.
  """
  source: str
  split_note: str = ""
  files: tuple = ()
  builder: str = ""
  cache_dir: str | None = None
  renumber: object = dataclasses.field(default=None, compare=False)

  def __call__(self, index):
    if self.renumber is not None:
      index = self.renumber(index)
    if len(self.files) > 1:
      found = _file_of_row(self.files, self.builder, index, self.cache_dir)
      if found is not None:
        return f"row {found[1]} of {found[0]}{self.split_note}"
    return f"row {index} of {self.source}{self.split_note}"

  def of_wrong_type(self, key, index, value):
    """(where, type name) of the row whose field `key` is not a string, for a row `index` whose
    value arrived as `value`: the JSON reader gives a column one type, so one number among
    numeric strings turns every row's value into a number; the row that holds the number in the
    file is the one to name. Falls back to row `index` and the value's type."""
    if self.builder == "json" and self.renumber is None:
      for f, row, kind in _json_rows_of(self.files, key):
        if kind not in ("str", "NoneType"):
          where = f"row {row} of {f}" if len(self.files) > 1 else f"row {row} of {self.source}"
          return where + self.split_note, kind
    return self(index), type(value).__name__


@dataclasses.dataclass(frozen=True)
class Source:
  dataset: datasets.Dataset | datasets.IterableDataset
  locate: RowLocator
  files: tuple = ()  # local data files, with their builder
  builder: str = ""
  # what the rows are read from -> {"sha256": hex, "bytes": size or None} (module docstring)
  digests: dict = dataclasses.field(default_factory=dict, compare=False)

  def read_error(self, e):
    """A library exception raised while reading rows -> DataError."""
    if self.files:
      return file_error(e, self.files, self.builder)
    return DataError(f"cannot read {self.locate.source}: {one_line(e)}")

  @contextlib.contextmanager
  def reading(self, errors=Exception):
    """Library exceptions of the types `errors` raised while rows are read (a stream's rows, or a
    map-style row whose text column holds bytes that are not UTF-8) -> one DataError naming the
    file and line; our own DataErrors pass through."""
    try:
      with quiet_datasets(keep_bars=True):
        yield
    except DataError:
      raise
    except errors as e:  # pylint: disable=broad-except  (library errors -> one line at the edge)
      raise self.read_error(e) from None


def load_source(data_cfg, *, streaming=False):
  """`data.source` (+ split, subset, max_rows, cache_dir) -> Source; DataError when unusable."""
  spec = data_cfg.source
  if not isinstance(spec, str) or not spec.strip():
    raise DataError(f"data.source={spec!r}: expected builtin:NAME, a file, a glob, a folder or a "
                    "hub dataset name")
  if spec.startswith("builtin:"):
    source = _builtin(spec)
  elif os.path.isdir(spec):
    source = _folder(spec, data_cfg.split)
  elif os.path.isfile(spec) or any(c in spec for c in _GLOB_CHARS):
    source = _files(spec, data_cfg.split, data_cfg.cache_dir, streaming)
  elif os.path.splitext(spec)[1].lower() in BUILDERS or spec.startswith((".", "/", "~")):
    raise DataError(f"data.source={spec!r}: no such file or directory")
  else:
    source = _hub(spec, data_cfg.subset, data_cfg.split, data_cfg.cache_dir, streaming)
  ds = source.dataset
  if streaming and isinstance(ds, datasets.Dataset):
    ds = ds.to_iterable_dataset()
  if data_cfg.max_rows is not None:
    n = data_cfg.max_rows
    ds = ds.take(n) if streaming else ds.select(range(min(n, len(ds))))
  if isinstance(ds, datasets.Dataset) and len(ds) == 0:
    raise DataError(f"data.source={spec!r} has no rows{source.locate.split_note}")
  return dataclasses.replace(source, dataset=ds)


def _builtin(spec):
  from dft_jax.data import builtin  # pylint: disable=g-import-not-at-top
  rows = builtin.load_builtin(spec.removeprefix("builtin:"))
  text = json.dumps(rows, sort_keys=True).encode()
  digests = {spec: {"sha256": hashlib.sha256(text).hexdigest(), "bytes": None}}
  return Source(datasets.Dataset.from_list(rows), RowLocator(spec), digests=digests)


def _folder(path, split):
  markers = ("dataset_info.json", "state.json", "dataset_dict.json")
  if not any(os.path.exists(os.path.join(path, m)) for m in markers):
    raise DataError(f"data.source={path!r} is a folder but not one written by save_to_disk (no "
                    f"{' / '.join(markers)}); for a folder of files use a glob like {path}/*.jsonl")
  try:
    with quiet_datasets():
      ds = datasets.load_from_disk(path)
  except Exception as e:  # pylint: disable=broad-except  (library errors -> one line at the edge)
    raise DataError(f"cannot load save_to_disk folder {path}: "
                    f"{_damaged_file(path) or one_line(e)}") from None
  note = ""
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise DataError(f"{path} has splits {sorted(ds)}; data.split={split!r} is not one of them")
    ds, note = ds[split], f" (split {split!r})"
  digests = file_digests(sorted(f["filename"] for f in ds.cache_files))
  return Source(ds, RowLocator(path, note), digests=digests)


def _files(spec, split, cache_dir, streaming):
  files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise DataError(f"data.source={spec!r}: no files match")
  kinds = {os.path.splitext(f)[1].lower() for f in files}
  unknown = kinds - set(BUILDERS)
  if unknown:
    raise DataError(f"data.source={spec!r}: unsupported file type {sorted(unknown)}; "
                    f"expected one of {sorted(BUILDERS)}")
  builders = {BUILDERS[k] for k in kinds}
  if len(builders) > 1:
    raise DataError(f"data.source={spec!r} mixes file types {sorted(kinds)}; use one kind per "
                    "source")
  builder = builders.pop()
  if split.split("[")[0] != "train":
    raise DataError(f"data.split={split!r}: local files have one split, 'train' (slices such as "
                    "'train[:1000]' work)")
  for f in files:
    if os.path.getsize(f) == 0:
      raise DataError(f"{f} is empty")
  digests = file_digests(files)
  try:
    ds = load_files(builder, files, digests, split=split, cache_dir=cache_dir, streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except  (library errors -> one line at the edge)
    raise file_error(e, files, builder) from None
  note = "" if split == "train" else f" (split {split!r})"
  locate = RowLocator(spec if len(files) > 1 else files[0], note, tuple(files), builder, cache_dir)
  return Source(ds, locate, tuple(files), builder, digests)


def load_files(builder, files, digests, *, split="train", cache_dir=None, streaming=False):
  """`datasets.load_dataset(builder, data_files=files)` with its cache keyed on the files'
  content: the config name `sha256-...` (part of the cache folder's name) is a digest of
  `digests` (file_digests of `files`)."""
  content = hashlib.sha256(json.dumps([digests[f]["sha256"] for f in files]).encode())
  with quiet_datasets():
    return datasets.load_dataset(builder, name=f"sha256-{content.hexdigest()[:16]}",
                                 data_files=list(files), split=split, cache_dir=cache_dir,
                                 streaming=streaming)


def _hub(name, subset, split, cache_dir, streaming):
  try:
    with quiet_datasets():
      ds = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir,
                                 streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot load hub dataset {name!r} (subset {subset!r}, split {split!r}): "
                    f"{one_line(e)}; without a network, use a local file, a glob or a "
                    "save_to_disk folder") from None
  where = f"hub dataset {name}"
  fingerprint = None if streaming else ds._fingerprint  # pylint: disable=protected-access
  digests = {} if streaming else {where: {"sha256": fingerprint, "bytes": None}}  # its revision
  return Source(ds, RowLocator(where, f" (split {split!r})"), digests=digests)


def file_digest(path, size=None):
  """{"sha256": hex, "bytes": size} of a file's content (of its first `size` bytes, if given)."""
  digest, left = hashlib.sha256(), os.path.getsize(path) if size is None else size
  total = left
  with open(path, "rb") as f:
    while left > 0:
      chunk = f.read(min(left, 1 << 24))
      if not chunk:
        break
      digest.update(chunk)
      left -= len(chunk)
  return {"sha256": digest.hexdigest(), "bytes": total - left}


def content_change(saved, current):
  """What differs between two `Source.digests` as a phrase naming the file ('FILE was changed',
  'FILE has N bytes appended', a file gone or new), or None when they are the same."""
  for name in saved.keys() - current.keys():
    return f"{name} was part of the data and is gone"
  for name in current.keys() - saved.keys():
    return f"{name} is new in the data"
  for name, old in saved.items():
    new = current[name]
    if new["sha256"] == old["sha256"]:
      continue
    if (old.get("bytes") is not None and new.get("bytes", 0) > old["bytes"]
        and file_digest(name, old["bytes"])["sha256"] == old["sha256"]):
      return f"{name} has {new['bytes'] - old['bytes']} bytes appended (rows added at its end)"
    return f"{name} was changed (its sha256 differs)"
  return None


def file_digests(paths):
  """{path: file_digest(path)}, hashed on 8 threads (hashlib releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return dict(zip(paths, pool.map(file_digest, paths)))


def file_error(e, files, builder):
  """A library exception from reading `files` -> DataError naming the file (and line): the first
  fault our own checks of the text formats find, else the library's message."""
  for f in files:
    bad = _first_bad_line(f, builder)
    if bad:
      return DataError(f"{f}: {bad}")
  root = e
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  bad_file = next((f for f in files if f in str(e) or f in str(root)), None)
  where = bad_file or (files[0] if len(files) == 1 else f"one of {len(files)} files")
  return DataError(f"cannot read {where} as {builder}: {one_line(root)}")


def _first_bad_line(path, builder):
  """'line N...: what is wrong' for the first fault of a json / csv / text data file, else None."""
  checks = {"json": (_first_undecodable_line, _first_bad_json, _first_lone_surrogate),
            "csv": (_first_undecodable_line, _first_ragged_csv_row),
            "text": (_first_undecodable_line,)}.get(builder, ())
  return next(filter(None, (check(path) for check in checks)), None)


def _first_undecodable_line(path):
  """The first line holding bytes that are not UTF-8 (a newline byte is never inside a UTF-8
  sequence, so decoding line by line is exact)."""
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        bad = " ".join(f"0x{b:02x}" for b in line[e.start:e.end])
        return f"line {n}, byte {e.start + 1}: {bad} is not UTF-8 text; data files must be UTF-8"
  return None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _first_bad_json(path):
  """For a JSON-lines file (several lines, the first a JSON value): its first line that does not
  parse or is not a JSON object. For a JSON document: where it does not parse, or that it is not a
  list or an object. None if no fault is found."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
  try:
    json.loads(lines[0][1] if len(lines) > 1 else "")
    per_line, allowed = True, dict
  except json.JSONDecodeError:
    lines, per_line, allowed = [(1, text)], False, (dict, list)
  for offset, chunk in lines:
    try:
      value = json.loads(chunk)
    except json.JSONDecodeError as e:
      return f"line {offset + e.lineno - 1}: invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(value, allowed):
      kind = _JSON_TYPES[type(value)]
      return (f"line {offset}: {kind}, expected one JSON object per line" if per_line else
              f"{kind}, expected a list of objects or one object per line")
  return None


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def _lone_surrogate_column(line):
  """The 1-based column of the first `\\uXXXX` escape of a JSON line that is half of a UTF-16
  surrogate pair without its other half (a high one not followed at once by a low one, or a low
  one alone), else None. Escapes are read in order, so `\\\\ud800` (an escaped backslash) is
  none."""
  pending = None  # (column, end) of a high surrogate waiting for its low half
  for m in _ESCAPE.finditer(line):
    code = int(m[1], 16) if m[1] else None
    is_low = code is not None and 0xDC00 <= code <= 0xDFFF
    if pending is not None:
      if is_low and m.start() == pending[1]:
        pending = None
        continue
      return pending[0]
    if code is not None and 0xD800 <= code <= 0xDBFF:
      pending = (m.start() + 1, m.end())
    elif is_low:
      return m.start() + 1
  return pending[0] if pending else None


def _surrogate_field(value, path=""):
  """The dotted key of the first string in a JSON value holding a lone surrogate, else None."""
  if isinstance(value, str):
    return path if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else None
  items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
      value, list) else ()
  for key, item in items:
    found = _surrogate_field(item, f"{path}.{key}" if path else str(key))
    if found is not None:
      return found
  return None


def _first_lone_surrogate(path):
  """The first line of a JSON file holding a lone surrogate escape (`\\ud800`): Python's
  reader accepts it, Arrow's does not (and says only 'Trailing data at position N'), and it is no
  character a tokenizer can read."""
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      column = _lone_surrogate_column(line)
      if column is None:
        continue
      try:
        field = _surrogate_field(json.loads(line))
      except json.JSONDecodeError:  # a line of a JSON document, not a whole value
        field = None
      where = f", field {field!r}" if field else ""
      return (f"line {n}, column {column}{where}: {line[column - 1:column + 5]} is half of a "
              "UTF-16 surrogate pair without its other half (a lone surrogate), not a character; "
              "write the character itself or its complete pair")
  return None


def _json_rows_of(files, key):
  """(file, row within the file, type name of row[key]) of every row of JSON files (lines or a
  document); type 'NoneType' where the field is missing. Error path only."""
  from dft_jax.data import formats  # pylint: disable=g-import-not-at-top
  for f in files:
    with open(f, encoding="utf-8") as stream:
      text = stream.read()
    try:
      rows = json.loads(text)
      rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row, value in enumerate(rows):
      field = formats.get_field(value, key) if isinstance(value, dict) else None
      yield f, row, type(field).__name__


def _first_ragged_csv_row(path):
  """The first CSV row with more fields than the header (the reader fills short rows with nulls)."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = next(reader, [])
    for row, fields in enumerate(filter(None, reader)):
      if len(fields) > len(header):
        return (f"line {reader.line_num} (row {row}) has {len(fields)} fields, the header has "
                f"{len(header)}")
  return None


def _damaged_file(folder):
  """'FILE: what is wrong' for the first JSON or Arrow file of a save_to_disk folder that cannot be
  read, else None."""
  for path in sorted(pathlib.Path(folder).rglob("*.json")):
    try:
      json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return f"{path}: invalid JSON ({one_line(e)})"
  for path in sorted(pathlib.Path(folder).rglob("*.arrow")):
    try:
      with pa.memory_map(str(path)) as stream:
        pa.ipc.open_stream(stream).read_all()
    except (OSError, pa.ArrowException) as e:
      return f"{path}: not a readable Arrow file ({one_line(e)})"
  return None


def _file_of_row(files, builder, index, cache_dir):
  """(file, row within file) for row `index` of the concatenation of `files`, or None."""
  for f in files:
    try:
      n = len(load_files(builder, [f], file_digests([f]), cache_dir=cache_dir))
    except Exception:  # pylint: disable=broad-except  (error path: fall back to the glob)
      return None
    if index < n:
      return f, index
    index -= n
  return None


@contextlib.contextmanager
def quiet_datasets(keep_bars=False):
  """Silences the library while we load: its own error logging (we report the error ourselves),
  its progress bars unless `keep_bars` ("Generating train split": our own lines say what is
  loaded; the tokenising map keeps its bar) and its download-count request (`load_dataset` sends
  one for every packaged builder, local files included: datasets.load.increase_load_count)."""
  logger = logging.getLogger("datasets")
  level, counts = logger.level, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
  bars = datasets.is_progress_bar_enabled()
  logger.setLevel(logging.CRITICAL)
  datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
  if not keep_bars:
    datasets.disable_progress_bars()
  try:
    yield
  finally:
    logger.setLevel(level)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
    if bars:
      datasets.enable_progress_bars()
