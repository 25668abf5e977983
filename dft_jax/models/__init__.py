"""Decoder LMs (Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE, Gemma 3 text) in Flax NNX: config,
weights import, loading.

  model, tokenizer = models.load("smollm2-135m-instruct")   # or an HF folder, .gguf, preset:NAME
  logits_BxTxV = model(tokens_BxT)
  model, _ = models.load(spec, lora=models.LoRAConfig(rank=8, base_quant="nf4"))  # (Q)LoRA
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)  # trainable / frozen
  ref_logits_BxTxV = model(tokens_BxT, adapters=False)               # the frozen base
"""
from dft_jax.models.config import (ARCHITECTURES, PRESETS, LinearRopeScaling, Llama3RopeScaling,
                                   ModelConfig, YarnRopeScaling)
from dft_jax.models.decoder import Decoder, KVCache, inactive_param_count, logical_specs
from dft_jax.models.loader import (ALIASES, decoder_options, from_state_dict, load,
                                   load_from_config, lora_config, read)
from dft_jax.models.lora import LoRAConfig

__all__ = [
    "ALIASES", "ARCHITECTURES", "PRESETS", "Decoder", "KVCache", "LinearRopeScaling",
    "Llama3RopeScaling", "LoRAConfig", "ModelConfig", "YarnRopeScaling", "decoder_options",
    "from_state_dict", "inactive_param_count", "load", "load_from_config", "logical_specs",
    "lora_config", "read",
]
