"""The config files (configs/*.py), loaded by path as ml_collections' `--config=FILE[:ARG]` does.

They are the clone's configs/ folder, or, in an installed package, dft_jax/configs (the same
files); `--config=configs/NAME.py[:variant]` names them from any folder (resolve_config_args).
"""
import importlib.util
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = (os.path.join(_PACKAGE, "configs") if os.path.isdir(os.path.join(_PACKAGE, "configs"))
               else os.path.join(os.path.dirname(_PACKAGE), "configs"))  # installed, else a clone
DEFAULT = os.path.join(CONFIGS_DIR, "default.py")  # the main job's config
STUDY = os.path.join(CONFIGS_DIR, "study.py")      # the scanner study's


def resolve_config_args(argv):
  """argv with `--config=configs/FILE[:ARG]` pointing at CONFIGS_DIR when no such file is where
  the command runs (another folder, or an installed package)."""
  out = []
  for arg in argv:
    if arg.startswith("--config=configs/"):
      path, colon, variant = arg.removeprefix("--config=").partition(":")
      if not os.path.exists(path):
        arg = f"--config={os.path.join(CONFIGS_DIR, path.removeprefix('configs/'))}{colon}{variant}"
    out.append(arg)
  return out


def load(path, arg=None):
  """The ConfigDict of `path`'s get_config(arg) (get_config() without arg); a relative path is
  taken under configs/."""
  path = os.path.join(CONFIGS_DIR, path)
  name = "dft_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ImportError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- field meanings

DOCUMENTED = (DEFAULT, STUDY)  # the files that define fields; others (paper/) only set values


def _lines(path):
  """(tokens of each physical line, paren depth at its start) of a Python file, in order."""
  import io  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(f.read()).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
  lines, depth = {}, 0
  for tok in tokens:
    lines.setdefault(tok.start[0], ([], depth))[0].append(tok)
    if tok.type == tokenize.OP:
      depth += (tok.string in "([{") - (tok.string in ")]}")
  return [lines[n] for n in sorted(lines)]


def file_field_docs(path):
  """{"section.field": meaning} from a config file's comments: a field's meaning is the comment on
  the line that defines it (`name=value,  # meaning`, the same for every field of that line),
  continued by comment-only lines indented past the field names, or, for a field without one, the comment-only
  lines just above it. Sections are the `c.<section> = ml_collections.ConfigDict(dict(...))`
  blocks (and `c.<section>.<sub> = ...` ones, whose fields are section.sub.field); fields are the
  keyword arguments of their dict(...)."""
  import tokenize  # pylint: disable=g-import-not-at-top
  docs, section, pending, last, column = {}, None, [], [], None
  for tokens, depth in _lines(path):
    text = [t.string for t in tokens]
    comment = tokens[-1] if tokens[-1].type == tokenize.COMMENT else None
    note = comment.string.lstrip("#").strip() if comment else ""
    path = text[2:text.index("=")] if "=" in text else []
    if (depth == 0 and text[:2] == ["c", "."] and path  # c.section = or c.section.sub =
        and all(t == "." if i % 2 else t.isidentifier() for i, t in enumerate(path))):
      section = "".join(path)
    fields, d = [], depth
    for i, tok in enumerate(tokens):  # keyword arguments at depth 2: c.x = ConfigDict(dict(...))
      if (d == 2 and tok.type == tokenize.NAME and i + 1 < len(tokens) and text[i + 1] == "="
          and (i == 0 or text[i - 1] in ("(", ","))):
        fields.append(f"{section}.{tok.string}")
      if tok.type == tokenize.OP:
        d += (tok.string in "([{") - (tok.string in ")]}")
    if section and fields:
      for name in fields:
        docs[name] = note or " ".join(pending)
      last, column = (fields, tokens[0].start[1]) if comment else ([], None)
      pending = []
    elif section and depth >= 2 and len(tokens) == 1 and comment:
      if last and comment.start[1] > column:  # continues the line above
        for name in last:
          docs[name] += " " + note
      else:  # above the next field
        pending.append(note)
        last = []
    else:
      last, pending = [], []
  return {k: v for k, v in docs.items() if v}


def field_docs():
  """{"section.field": one-line meaning} of every config field: the comments of DOCUMENTED, and
  for config.objective the registry's own docs (dft_jax/objectives.py: Objective.doc, Hparam.doc
  and allowed values)."""
  from dft_jax import objectives  # pylint: disable=g-import-not-at-top
  docs = {}
  for path in DOCUMENTED:
    docs.update(file_field_docs(path))
  docs["objective.name"] = "the objective: " + ", ".join(objectives.OBJECTIVES)
  for name, hp in objectives.GENERIC.items():
    docs[f"objective.{name}"] = f"{hp.doc} ({hp.allowed})"
  for objective, record in objectives.OBJECTIVES.items():
    for name, hp in record.hparams.items():
      docs[f"objective.{objective}.{name}"] = f"{objective}: {hp.doc} ({hp.allowed})"
  return docs


def flatten(config, prefix="", leaves=()):
  """(dotted path, value) of every leaf field of a ConfigDict, in definition order; a field whose
  path is in `leaves` is one field even when its value is a dict (study.regime_sets)."""
  for key, value in config.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items") and path not in leaves:
      yield from flatten(value, f"{path}.", leaves)
    else:
      yield path, value
