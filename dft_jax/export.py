"""Export a decoder as an HF folder that transformers / vLLM / lm-eval load directly.

  python -m dft_jax.export --checkpoint WORKDIR --out hf_model/   # a dft_jax.train workdir
  python -m dft_jax.export --model smollm2-135m-instruct --out smollm2_hf/ [--dtype bfloat16]

Writes config.json, generation_config.json, model.safetensors (HF names, [out, in] layout; no
lm_head when tied) and, with a tokenizer, its files and chat template (tokenizer.save_pretrained).
"""
import argparse
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dft_jax.errors import ModelError, cli_entry
from dft_jax.models import hf
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
  pure = jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(dtype),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))
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


@cli_entry
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dft_jax.export",
                                   description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a dft_jax.train workdir (its latest checkpoint)")
  source.add_argument("--model", help="a models.load spec: alias, HF folder, .gguf, preset:NAME")
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--dtype", choices=PARAM_DTYPES, default=None,
                      help="weights dtype (default: the model's parameter dtype)")
  args = parser.parse_args(argv)
  if args.checkpoint:
    from dft_jax import checkpoint  # pylint: disable=g-import-not-at-top
    model, tokenizer, _ = checkpoint.restore_model(args.checkpoint)
  else:
    from dft_jax import models  # pylint: disable=g-import-not-at-top
    model, tokenizer = models.load(args.model)
  out = export_hf(model, tokenizer, args.out, dtype=args.dtype)
  print(f"exported {model.config.model_type} ({model.config.num_layers} layers) to {out}")


if __name__ == "__main__":
  main()
