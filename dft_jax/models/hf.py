"""HF <-> decoder parameter mapping, and reading HF folders (config.json + safetensors, tokenizer).

HF Linear weights are [out, in]; ours put the input axes first ([D, N, H] for q_proj, [N, H, D] for
o_proj) and stack layers on a leading axis (and experts on the next one: HF's per-expert tensors
model.layers.{i}.mlp.experts.{e}.gate_proj.weight, the layout transformers saves and the hub
holds). One table drives both directions.
"""
import json
import math
import pathlib
from collections.abc import Mapping

import numpy as np
from absl import logging
from safetensors import safe_open

from dft_jax.errors import ModelError, one_line
from dft_jax.models.config import ModelConfig
from dft_jax.models.decoder import layer_param_shapes

# name -> (HF name, kind); kind: k = number of our leading axes that form HF's "in" axis of a
# Linear weight (transposed), "vector" = flattened 1-D (norm scales, biases), "table" = as is.
_TOP = {
    "embed": ("model.embed_tokens.weight", "table"),
    "final_norm": ("model.norm.weight", "vector"),
    "lm_head": ("lm_head.weight", 1),
}
_LAYER = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "vector"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", 1),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", 1),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", 1),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", 2),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "vector"),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "vector"),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "vector"),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "vector"),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "vector"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "vector"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", 1),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", 1),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "vector"),
    "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", "vector"),
    "router": ("model.layers.{i}.mlp.gate.weight", 1),
    "experts_gate": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", 1),
    "experts_up": ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", 1),
    "experts_down": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", 1),
}
# With norms on the attention and MLP outputs (Gemma), HF's post_attention_layernorm is the
# attention output's and the MLP's input norm is pre_feedforward_layernorm.
_SANDWICH_MLP_NORM = "model.layers.{i}.pre_feedforward_layernorm.weight"
# Present in some checkpoints, never used: RoPE buffers of old exports.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def layer_tensor_name(param: str, layer: int) -> str:
  """HF name of one layer's `param`, e.g. ("wq", 0) -> "model.layers.0.self_attn.q_proj.weight"."""
  return _LAYER[param][0].format(i=layer)


def _hf_shape(kind, shape):
  if kind == "vector":
    return (math.prod(shape),)
  if kind == "table":
    return tuple(shape)
  return (math.prod(shape[kind:]), math.prod(shape[:kind]))


def _to_ours(a, kind, shape):
  return (a if isinstance(kind, str) else a.T).reshape(shape)


def _to_hf(a, kind, shape):
  hf_shape = _hf_shape(kind, shape)
  return a.reshape(hf_shape) if isinstance(kind, str) else a.reshape(hf_shape[::-1]).T


def _layer_template(c: ModelConfig, name: str) -> str:
  if name == "mlp_norm" and c.sandwich_norms:
    return _SANDWICH_MLP_NORM
  return _LAYER[name][0]


def _entries(c: ModelConfig):
  """(path in our params, HF name, kind, our shape) for every parameter, layers (and experts)
  unstacked: path ("layers", name, i) or ("layers", name, i, e)."""
  top = dict(embed=(c.vocab_size, c.hidden_size), final_norm=(c.hidden_size,))
  if not c.tie_word_embeddings:
    top["lm_head"] = (c.hidden_size, c.vocab_size)
  out = [((name,), _TOP[name][0], _TOP[name][1], shape) for name, shape in top.items()]
  for name, (shape, axes) in layer_param_shapes(c).items():
    template, kind = _layer_template(c, name), _LAYER[name][1]
    if axes[0] == "expert":
      out += [(("layers", name, i, e), template.format(i=i, e=e), kind, shape[1:])
              for i in range(c.num_layers) for e in range(shape[0])]
    else:
      out += [(("layers", name, i), template.format(i=i), kind, shape)
              for i in range(c.num_layers)]
  return out


def params_from_hf(config: ModelConfig, state_dict: Mapping[str, np.ndarray], dtype) -> dict:
  """Pure-dict params (nnx.to_pure_dict layout) from HF-named [out, in] tensors, cast to dtype.

  Raises ModelError naming a missing or unexpected tensor, or a shape mismatch."""
  entries = _entries(config)
  expected = {hf for _, hf, _, _ in entries}
  unexpected = sorted(k for k in state_dict if k not in expected
                      and not k.endswith(_IGNORED_SUFFIXES)
                      and not (k == "lm_head.weight" and config.tie_word_embeddings))
  if unexpected:
    raise ModelError(f"checkpoint has {len(unexpected)} tensor(s) this {config.model_type} config "
                     f"does not use, e.g. {unexpected[:3]}")
  pure = {}
  layers = {name: np.empty((config.num_layers, *shape), dtype)
            for name, (shape, _) in layer_param_shapes(config).items()}
  for path, hf_name, kind, shape in entries:
    if hf_name not in state_dict:
      raise ModelError(f"checkpoint lacks the tensor {hf_name!r}")
    a = np.asarray(state_dict[hf_name])
    if a.shape != _hf_shape(kind, shape):
      raise ModelError(f"checkpoint tensor {hf_name!r} has shape {a.shape}, expected "
                       f"{_hf_shape(kind, shape)} from config.json")
    a = _to_ours(a, kind, shape).astype(dtype)
    if path[0] == "layers":
      layers[path[1]][path[2:]] = a
    else:
      pure[path[0]] = a
  pure["layers"] = layers
  return pure


def params_to_hf(config: ModelConfig, pure: dict) -> dict[str, np.ndarray]:
  """HF-named [out, in] tensors from pure-dict params (inverse of params_from_hf)."""
  out = {}
  for path, hf_name, kind, shape in _entries(config):
    a = pure[path[0]] if len(path) == 1 else pure["layers"][path[1]][path[2:]]
    out[hf_name] = np.ascontiguousarray(_to_hf(np.asarray(a), kind, shape))
  return out


def read_config(folder: pathlib.Path) -> dict:
  """config.json of an HF folder."""
  path = folder / "config.json"
  if not path.is_file():
    raise ModelError(f"{folder} has no config.json (not an HF model folder)")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelError(f"{path} is not valid JSON: {e}") from None


def read_tokenizer(folder):
  """transformers.AutoTokenizer of an HF folder, never running code from the folder.

  With `trust_remote_code=False` a Python class that tokenizer_config.json's `auto_map` names is
  never imported, and transformers never asks on stdin whether to: the folder's tokenizer files
  are loaded with transformers' own class where it has one (a warning says the custom code was
  ignored); a tokenizer that exists only as that code is a ModelError."""
  import transformers  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  custom = _custom_tokenizer_class(folder)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
  except (OSError, ValueError) as e:
    if custom:
      raise ModelError(f"{folder / 'tokenizer_config.json'}: the tokenizer class is custom code "
                       f"(auto_map {custom}), and dft_jax never runs code from a model folder; to "
                       "load the folder's tokenizer.json instead, set tokenizer_class there to "
                       "PreTrainedTokenizerFast") from None
    raise ModelError(f"cannot load the tokenizer in {folder}: {one_line(e)}") from None
  if custom:
    logging.warning("%s names custom tokenizer code (auto_map %s); not run: the folder's tokenizer "
                    "files are loaded as %s", folder / "tokenizer_config.json", custom,
                    type(tokenizer).__name__)
  return tokenizer


def _custom_tokenizer_class(folder: pathlib.Path):
  """The class reference (`module.Class`) that tokenizer_config.json's `auto_map` gives
  AutoTokenizer, or None."""
  try:
    auto_map = json.loads((folder / "tokenizer_config.json").read_bytes()).get("auto_map")
  except (OSError, ValueError, AttributeError):
    return None
  refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
  refs = [refs] if isinstance(refs, str) else refs or ()
  return next((r for r in refs if isinstance(r, str) and r), None)


class SafetensorsDict(Mapping):
  """Read-only name -> numpy array view over model.safetensors or a sharded index (lazy)."""

  def __init__(self, folder: pathlib.Path):
    self._folder, self._handles = folder, {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ModelError(f"{index} is not a safetensors index ({e})") from None
    elif (folder / "model.safetensors").is_file():
      self._handles["model.safetensors"] = self._open(folder / "model.safetensors")
      weight_map = dict.fromkeys(self._handles["model.safetensors"].keys(), "model.safetensors")
    else:
      raise ModelError(f"{folder} has no model.safetensors or model.safetensors.index.json "
                       "(other weight formats are not supported)")
    self._map = weight_map

  @staticmethod
  def _open(path):
    if not path.is_file():
      raise ModelError(f"safetensors file {path} does not exist")
    try:
      return safe_open(str(path), framework="numpy")
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own error types)
      raise ModelError(f"cannot read {path}: {e}") from None

  def __getitem__(self, name):
    file = self._map[name]
    if file not in self._handles:
      self._handles[file] = self._open(self._folder / file)
    try:
      return self._handles[file].get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise ModelError(f"cannot read tensor {name!r} from {self._folder / file}: {e}") from None

  def __iter__(self):
    return iter(self._map)

  def __len__(self):
    return len(self._map)
