"""Export a decoder as an HF folder that transformers / vLLM / lm-eval load directly, and LoRA
adapters as a PEFT adapter folder.

  python -m dft_jax.export --model=runs/dft --out=hf_model/     # a training run folder
  python -m dft_jax.export --model=smollm2-135m-instruct --out=smollm2_hf/ --dtype=bfloat16

Writes config.json, generation_config.json, model.safetensors (HF names, [out, in] layout; no
lm_head when tied; LoRA adapters folded in, a quantised base dequantised) and, with a tokenizer,
its files and chat template (tokenizer.save_pretrained). `export_peft` writes the adapters alone
(adapter_config.json + adapter_model.safetensors) for `peft.PeftModel.from_pretrained`.

All or nothing: an export is written into a hidden folder beside its target
(`.NAME.partial-HOST-PID`) and renamed to NAME once every file is written, with MARKER
(dft_jax_export.json: what was exported, which checkpoint step, the dtype). A failed write (disk
full, no permission) removes the folder and raises ExportError, one line naming the cause; a
killed export leaves only its hidden folder, which the next export beside it removes. An existing
earlier export at NAME is replaced; a folder that holds other files is refused (an export
replaces its folder whole).
"""
import contextlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sys

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dft_jax import cli
from dft_jax import files
from dft_jax import run_control
from dft_jax.errors import ConfigError, ModelError, UserInputError, os_error_reason
from dft_jax.models import hf, peft
from dft_jax.models.decoder import PARAM_DTYPES

MARKER = "dft_jax_export.json"
PARTIAL = ".partial-"


class ExportError(UserInputError):
  """An export could not be written (disk full, no permission, a folder in the way); nothing was
  left at its target."""


def _unfinished(out):
  """The hidden folders of unfinished exports to `out` whose writer is gone (its pid does not exist
  on this host; a writer on another host cannot be checked and is left alone)."""
  for path in out.parent.glob(f".{out.name}{PARTIAL}*"):
    host, _, pid = path.name[len(f".{out.name}{PARTIAL}"):].rpartition("-")
    if pid.isdigit() and not run_control.may_still_run(host, int(pid)):
      yield path


def _check_target(out):
  """ExportError unless `out` is absent, an empty folder or an earlier export (it has MARKER)."""
  if out.exists() and not out.is_dir():
    raise ExportError(f"{out} is a file; an export writes a folder: choose another path")
  if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
    raise ExportError(f"{out} holds files and is no dft_jax export (it has no {MARKER}); an "
                      "export replaces its folder whole: choose a new or an empty folder")


@contextlib.contextmanager
def writing(out_dir, record):
  """Yields a hidden folder beside `out_dir` to write an export into; when the block ends, writes
  MARKER (`record` plus the files written) and renames the folder to `out_dir` (replacing an
  earlier export there). An OS error (or a library's report of one) in the block removes the
  folder and becomes ExportError naming the cause."""
  out = pathlib.Path(out_dir).absolute()
  _check_target(out)
  tmp = None
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _unfinished(out):
      shutil.rmtree(stale, ignore_errors=True)
      logging.info("removed %s, an unfinished export whose writer is gone", stale)
    tmp = out.parent / f".{out.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    files.write_json(str(tmp / MARKER), {**record, "files": sorted(
        p.name for p in tmp.iterdir() if p.name != MARKER)})
    _put_in_place(tmp, out)
  except UserInputError:
    _remove(tmp)
    raise
  except Exception as e:  # pylint: disable=broad-except  (OS and library write errors)
    _remove(tmp)
    reason = os_error_reason(e)
    if reason is None:
      raise
    raise ExportError(f"writing the export {out} failed: {reason}; nothing was left there (its "
                      "unfinished folder was removed)") from None


def _put_in_place(tmp, out):
  """Renames the finished folder `tmp` to `out`; an earlier export at `out` is moved aside first
  and removed after."""
  if out.is_dir() and any(out.iterdir()):
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)  # onto an empty folder too


def _remove(folder):
  if folder is not None:
    shutil.rmtree(folder, ignore_errors=True)


def export_hf(model, tokenizer, out_dir, *, dtype=None, source=None, step=None) -> pathlib.Path:
  """Writes `model` (+ `tokenizer` when not None) to out_dir in HF format, all or nothing (module
  docstring); dtype defaults to the model's param dtype. `source` and `step` (what was exported:
  a run folder and its checkpoint step) go into MARKER. Returns out_dir."""
  dtype = np.dtype(dtype or model.param_dtype)
  if dtype.name not in PARAM_DTYPES:
    raise ModelError(f"export dtype {dtype.name!r} is not supported; supported: "
                     f"{', '.join(PARAM_DTYPES)}")
  pure = jax.tree.map(lambda a: a.astype(dtype), model.merged_params())
  config = model.config
  hf_config = config.to_hf(torch_dtype=dtype.name)
  generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config[k] is not None}
  record = {"format": "hf", "source": source, "step": step, "dtype": dtype.name}
  with writing(out_dir, record) as tmp:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(hf.params_to_hf(config, pure), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return pathlib.Path(out_dir)


def export_peft(model, out_dir, *, base_model_name_or_path=None, source=None,
                step=None) -> pathlib.Path:
  """Writes `model`'s LoRA adapters (float32) as a PEFT adapter folder, all or nothing; returns
  out_dir."""
  if model.lora is None:
    raise ModelError("export_peft: the model has no LoRA adapters (load it with lora=...)")
  config = peft.config_json(model.lora, base_model_name_or_path)
  layers = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["layers"]
  record = {"format": "peft", "source": source, "step": step, "dtype": "float32"}
  with writing(out_dir, record) as tmp:
    (tmp / peft.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft.to_peft(model.config, model.lora, jax.device_get(layers)),
              str(tmp / peft.WEIGHTS_FILE), metadata={"format": "pt"})
  return pathlib.Path(out_dir)


def what_was_exported(source, step):
  """'SOURCE' or 'checkpoint step N of RUN': the phrase the export's messages use."""
  return source if step is None else f"checkpoint step {step} of {source}"


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if not flags_.out:
    raise ConfigError("--out: give the folder to write, e.g. --out=hf_model/")
  spec = cli.model_spec()
  model, tokenizer, _, step = cli.load_model(spec, flags_.config, step=flags_.step)
  with cli.phase(f"writing {flags_.out}"):
    out = export_hf(model, tokenizer, flags_.out, dtype=flags_.dtype, source=spec, step=step)
  print(f"exported {model.config.model_type} ({model.config.num_layers} layers) of "
        f"{what_was_exported(spec, step)} to {out}", flush=True)


def define_flags(argv):
  cli.define_config(argv)
  cli.define_model_flags()
  cli.define("string", "out", None, "output folder (created; required)")
  cli.define("enum", "dtype", None, "weights dtype (default: the model's parameter dtype)",
             enum_values=list(PARAM_DTYPES))


def cli_main(argv=None):
  """`python -m dft_jax.export ARGS`."""
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc=__doc__, sections=("model",))


if __name__ == "__main__":
  cli_main()
