"""Export a decoder as an HF folder that transformers / vLLM / lm-eval load directly, and LoRA
adapters as a PEFT adapter folder.

  python -m dft_jax.export --model=runs/dft --out=hf_model/     # a training run folder
  python -m dft_jax.export --model=smollm2-135m-instruct --out=smollm2_hf/ --dtype=bfloat16

Writes config.json, generation_config.json, model.safetensors (HF names, [out, in] layout; no
lm_head when tied; LoRA adapters folded in, a quantised base dequantised) and, with a tokenizer,
its files and chat template (tokenizer.save_pretrained). `export_peft` writes the adapters alone
(adapter_config.json + adapter_model.safetensors) for `peft.PeftModel.from_pretrained`.
"""
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dft_jax import cli
from dft_jax.errors import ConfigError, ModelError
from dft_jax.models import hf, peft
from dft_jax.models.decoder import PARAM_DTYPES


def export_hf(model, tokenizer, out_dir, *, dtype=None) -> pathlib.Path:
  """Writes `model` (+ `tokenizer` when not None) to out_dir in HF format; dtype defaults to the
  model's param dtype. Returns out_dir."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(dtype or model.param_dtype)
  if dtype.name not in PARAM_DTYPES:
    raise ModelError(f"export dtype {dtype.name!r} is not supported; supported: "
                     f"{', '.join(PARAM_DTYPES)}")
  pure = jax.tree.map(lambda a: a.astype(dtype), model.merged_params())
  config = model.config
  hf_config = config.to_hf(torch_dtype=dtype.name)
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config[k] is not None}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  save_file(hf.params_to_hf(config, pure), str(out / "model.safetensors"),
            metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  return out


def export_peft(model, out_dir, *, base_model_name_or_path=None) -> pathlib.Path:
  """Writes `model`'s LoRA adapters (float32) as a PEFT adapter folder; returns out_dir."""
  if model.lora is None:
    raise ModelError("export_peft: the model has no LoRA adapters (load it with lora=...)")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = peft.config_json(model.lora, base_model_name_or_path)
  (out / peft.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  layers = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["layers"]
  save_file(peft.to_peft(model.config, model.lora, jax.device_get(layers)),
            str(out / peft.WEIGHTS_FILE), metadata={"format": "pt"})
  return out


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if not flags_.out:
    raise ConfigError("--out: give the folder to write, e.g. --out=hf_model/")
  spec = cli.model_spec()
  model, tokenizer, _ = cli.load_model(spec, flags_.config, step=flags_.step)
  with cli.phase(f"writing {flags_.out}"):
    out = export_hf(model, tokenizer, flags_.out, dtype=flags_.dtype)
  print(f"exported {model.config.model_type} ({model.config.num_layers} layers) to {out}",
        flush=True)


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
