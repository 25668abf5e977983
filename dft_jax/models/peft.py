"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, both ways.

PEFT names an adapter after the HF module it adapts, in HF's Linear layout:
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
with y = x W^T + (alpha / r) * x A^T B^T (use_rslora false), the same model as models/lora.py.
What `peft.PeftModel.from_pretrained(base, folder)` loads is what `export.export_peft` writes and
`load` reads back.
"""
import json
import math
import pathlib

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from dft_jax.errors import ModelError
from dft_jax.models import hf, loader
from dft_jax.models import lora as lora_lib
from dft_jax.models.config import ModelConfig
from dft_jax.models.decoder import layer_param_shapes, num_input_axes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# adapter_config.json fields whose other values change the adapted model in ways models/lora.py
# does not implement: field -> allowed values (None: the field is absent).
_UNSUPPORTED = {
    "use_rslora": (False, None), "use_dora": (False, None), "use_qalora": (False, None),
    "fan_in_fan_out": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None,),
    "layer_replication": (None,), "modules_to_save": (None, []), "exclude_modules": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
}


def module_name(target: str) -> str:
  """PEFT's target module name: "q" -> "q_proj", "gate" -> "gate_proj"."""
  return hf.layer_tensor_name(lora_lib.TARGETS[target], 0).split(".")[-2]


def _tensor_names(param: str, layer: int) -> tuple[str, str]:
  module = hf.layer_tensor_name(param, layer).removesuffix(".weight")
  return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def config_json(lora: lora_lib.LoRAConfig, base_model_name_or_path=None) -> dict:
  """adapter_config.json of adapters with this LoRAConfig (the base's quantisation is not part of
  an adapter: PEFT applies it to whichever base it is given)."""
  return dict(
      peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
      r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
      target_modules=sorted(module_name(t) for t in lora.targets), bias="none",
      use_rslora=False, use_dora=False, fan_in_fan_out=False, init_lora_weights=True,
      inference_mode=True, modules_to_save=None, layers_to_transform=None, rank_pattern={},
      alpha_pattern={})


def to_peft(config: ModelConfig, lora: lora_lib.LoRAConfig, layers: dict) -> dict:
  """PEFT-named float32 tensors from our stacked adapters (layers: pure dict holding
  "wq_lora_a", ...): A [L, *in, r] -> [r, in] per layer, B [L, r, *out] -> [out, r]."""
  out = {}
  for param in lora.adapted():
    a, b = (np.asarray(layers[n], np.float32) for n in lora_lib.adapter_names(param))
    for i in range(config.num_layers):
      a_name, b_name = _tensor_names(param, i)
      out[a_name] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)
      out[b_name] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
  return out


def _read(tensors, name, shape):
  if name not in tensors:
    raise ModelError(f"{WEIGHTS_FILE} lacks the tensor {name!r}")
  t = np.asarray(tensors[name], np.float32)
  if t.shape != shape:
    raise ModelError(f"{WEIGHTS_FILE} tensor {name!r} has shape {t.shape}, expected {shape}")
  return t


def from_peft(config: ModelConfig, lora: lora_lib.LoRAConfig, tensors) -> dict:
  """Our stacked adapters ("wq_lora_a": [L, *in, r], ...) from PEFT-named tensors; a missing,
  unexpected or misshapen tensor raises ModelError naming it."""
  expected = {n for p in lora.adapted() for i in range(config.num_layers)
              for n in _tensor_names(p, i)}
  unexpected = sorted(set(tensors) - expected)
  if unexpected:
    raise ModelError(f"{WEIGHTS_FILE} has {len(unexpected)} tensor(s) that adapter_config.json's "
                     f"target_modules do not name, e.g. {unexpected[:3]}")
  layers, r = {}, lora.rank
  for param in lora.adapted():
    shape = layer_param_shapes(config)[param][0]
    ins, outs = shape[:num_input_axes(param)], shape[num_input_axes(param):]
    a_layers, b_layers = [], []
    for i in range(config.num_layers):
      a_name, b_name = _tensor_names(param, i)
      a_layers.append(_read(tensors, a_name, (r, math.prod(ins))).T.reshape(*ins, r))
      b_layers.append(_read(tensors, b_name, (math.prod(outs), r)).T.reshape(r, *outs))
    layers.update(zip(lora_lib.adapter_names(param), (np.stack(a_layers), np.stack(b_layers))))
  return layers


def read_config(folder) -> lora_lib.LoRAConfig:
  """The LoRAConfig of a PEFT adapter folder; settings this format cannot carry raise
  ModelError naming the field."""
  path = pathlib.Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise ModelError(f"{folder} has no {CONFIG_FILE} (not a PEFT adapter folder)")
  try:
    c = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelError(f"{path} is not valid JSON: {e}") from None
  if c.get("peft_type") != "LORA":
    raise ModelError(f"{path}: peft_type {c.get('peft_type')!r} is not supported; supported: "
                     "'LORA'")
  for field, allowed in _UNSUPPORTED.items():
    if c.get(field) not in allowed:
      raise ModelError(f"{path}: {field} {c[field]!r} is not supported; supported: "
                       f"{', '.join(map(repr, allowed))}")
  by_module = {module_name(t): t for t in lora_lib.TARGETS}
  modules = c.get("target_modules")
  modules = list(by_module) if modules == "all-linear" else modules
  if not isinstance(modules, list) or not modules or any(m not in by_module for m in modules):
    raise ModelError(f"{path}: target_modules {modules!r} is not supported; give a list of "
                     f"{', '.join(by_module)} (or 'all-linear')")
  try:
    return lora_lib.LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                               targets=tuple(by_module[m] for m in modules))
  except KeyError as e:
    raise ModelError(f"{path} lacks the field {e.args[0]!r}") from None


def set_adapters(model, layers: dict):
  """Replaces `model`'s adapters (nnx.LoRAParam) by `layers` (the pure-dict of `from_peft`)."""
  state = nnx.state(model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(state, {"layers": layers})
  nnx.update(model, state)


def load(spec: str, folder, **decoder_kwargs):
  """(model, tokenizer): the base `spec` (models.load) with the PEFT adapters in `folder`."""
  lora = read_config(folder)
  model, tokenizer = loader.load(spec, lora=lora, **decoder_kwargs)
  path = pathlib.Path(folder) / WEIGHTS_FILE
  if not path.is_file():
    raise ModelError(f"{folder} has no {WEIGHTS_FILE}")
  try:
    tensors = load_file(str(path))
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own error types)
    raise ModelError(f"cannot read {path}: {e}") from None
  set_adapters(model, from_peft(model.config, lora, tensors))
  return model, tokenizer
