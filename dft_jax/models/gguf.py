"""GGUF import: llama.cpp model file -> HF-style config, HF-named float32 state dict, tokenizer.

Everything is read from the file (metadata, tensors, vocabulary); no torch, no hub. Tensors are
dequantised with the `gguf` package (`gguf.quants.dequantize`), the same routine transformers'
GGUF loader uses, so the numbers match it exactly.

    hf_config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""
import os
import re

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
import transformers

from dft_jax.errors import ModelError

# general.architecture -> (HF model_type, HF architectures[0]).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_TENSOR = re.compile(r"(\w+)\.(weight|bias)")

# llama.cpp permutes these rows (llama only): HF projection -> config key of its head count.
_ROPE_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}

_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|>, <|endoftext|>, ...
_TOKEN_TYPE_USER_DEFINED = 4  # matched whole in text, but not special

# Qwen2's split (also used by Qwen3 GGUFs, pre "qwen2"): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newline runs, then the whitespace rules.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_split():
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> the pre-tokenizer the vocabulary was trained with.
PRE_TOKENIZERS = {
    "default": _byte_level_split,
    "gpt-2": _byte_level_split,
    # llama.cpp splits "\p{N}" first, then the GPT-2 regex; SmolLM2's own tokenizer.json is
    # Digits(individual_digits) + ByteLevel(use_regex), the same thing.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level_split()]),
    "qwen2": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]),
}


def read_gguf(path):
  """Reads a GGUF file into `(hf_config, state_dict, tokenizer)`.

  hf_config: dict shaped like the model's HF `config.json`.
  state_dict: HF parameter names -> float32 numpy arrays in HF layout ([out, in] for linears).
  tokenizer: `transformers.PreTrainedTokenizerFast` built from the file's vocabulary.
  Raises ModelError (one line, naming the path) for a missing, non-GGUF, truncated or unsupported
  file.
  """
  reader = open_gguf(path)
  hf_config = gguf_hf_config(reader, path)
  return hf_config, gguf_state_dict(reader, hf_config, path), gguf_tokenizer(reader, path)


def read_gguf_config(path):
  """The HF-style config dict of a GGUF file, without dequantising anything."""
  return gguf_hf_config(open_gguf(path), path)


def open_gguf(path):
  """A `gguf.GGUFReader` over `path` (memory-mapped), or ModelError saying what is wrong."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ModelError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ModelError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError) as e:
    raise ModelError(f"{path}: truncated or corrupt GGUF file "
                     f"({os.path.getsize(path)} bytes): {type(e).__name__}: {e}") from e


def _metadata(reader, key, path, default=KeyError):
  """The value of metadata `key` (strings, numbers, lists), or `default`; ModelError if required."""
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise ModelError(f"{path}: GGUF metadata has no {key!r}")
    return default
  value = field.contents()
  if field.types == [gguf.GGUFValueType.FLOAT32]:
    value = float(str(np.float32(value)))  # 9.999999747e-06 -> 1e-05, as in config.json
  return value


def gguf_hf_config(reader, path):
  """HF `config.json`-shaped dict from GGUF metadata (llama, qwen2, qwen3)."""
  arch = _metadata(reader, "general.architecture", path)
  if arch not in ARCHITECTURES:
    raise ModelError(f"{path}: general.architecture {arch!r} is not supported; "
                     f"supported: {', '.join(ARCHITECTURES)}")
  model_type, hf_class = ARCHITECTURES[arch]
  def key(name, default=KeyError):
    return _metadata(reader, f"{arch}.{name}", path, default)

  hidden_size = key("embedding_length")
  num_heads = key("attention.head_count")
  head_dim = key("attention.key_length", hidden_size // num_heads)
  rotary_dim = key("rope.dimension_count", head_dim)
  if rotary_dim != head_dim:
    raise ModelError(f"{path}: {arch}.rope.dimension_count={rotary_dim} != head_dim={head_dim}; "
                     "partial rotary embeddings are not supported")
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise ModelError(f"{path}: tensor 'rope_freqs.weight' (llama3-style rope scaling stored as "
                     "per-frequency factors) is not supported")
  if "token_embd.weight" not in tensors:
    raise ModelError(f"{path}: GGUF has no tensor 'token_embd.weight'")
  return {
      "model_type": model_type,
      "architectures": [hf_class],
      "hidden_size": hidden_size,
      "intermediate_size": key("feed_forward_length"),
      "num_hidden_layers": key("block_count"),
      "num_attention_heads": num_heads,
      "num_key_value_heads": key("attention.head_count_kv", num_heads),
      "head_dim": head_dim,
      "rope_theta": key("rope.freq_base", 10000.0),
      "rope_scaling": _rope_scaling(key),
      "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
      "max_position_embeddings": key("context_length"),
      "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF dims: [hidden, vocab]
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "mlp_bias": False,
      "hidden_act": "silu",
      "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id", path, None),
      "eos_token_id": _metadata(reader, "tokenizer.ggml.eos_token_id", path, None),
      "pad_token_id": _metadata(reader, "tokenizer.ggml.padding_token_id", path, None),
  }


def _rope_scaling(key):
  """`rope_scaling` from `{arch}.rope.scaling.*` (linear / yarn), None when absent or "none"."""
  kind = key("rope.scaling.type", "none")
  if kind == "none":
    return None
  scaling = {"rope_type": kind, "factor": key("rope.scaling.factor")}
  original = key("rope.scaling.original_context_length", None)
  if original is not None:
    scaling["original_max_position_embeddings"] = original
  return scaling


def hf_tensor_name(gguf_name):
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for unknown names."""
  if m := _BLOCK_TENSOR.fullmatch(gguf_name):
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
  if m := _TOP_TENSOR.fullmatch(gguf_name):
    part, kind = m.groups()
    return f"{_TOP_LEVEL_NAMES[part]}.{kind}" if part in _TOP_LEVEL_NAMES else None
  return None


def expected_shapes(hf_config):
  """HF parameter name -> shape for a decoder with this config (what read_gguf returns)."""
  d, v, i = hf_config["hidden_size"], hf_config["vocab_size"], hf_config["intermediate_size"]
  hd = hf_config["head_dim"]
  q, kv = hf_config["num_attention_heads"] * hd, hf_config["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not hf_config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, d)
  layer = {
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
      "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
      "mlp.gate_proj.weight": (i, d), "mlp.up_proj.weight": (i, d), "mlp.down_proj.weight": (d, i),
  }
  if hf_config["attention_bias"]:
    layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
              "self_attn.v_proj.bias": (kv,)}
  if hf_config["model_type"] == "qwen3":
    layer |= {"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
  for n in range(hf_config["num_hidden_layers"]):
    shapes |= {f"model.layers.{n}.{name}": shape for name, shape in layer.items()}
  return shapes


def unpermute_rope_rows(w, num_heads):
  """Undoes llama.cpp's q/k row permutation (convert_hf_to_gguf `LlamaModel.permute`).

  Per head, llama.cpp rotates adjacent pairs (x_2j, x_2j+1); HF's rotate_half pairs (x_j, x_j+hd/2).
  GGUF row  h*hd + 2j + t  holds HF row  h*hd + t*hd/2 + j  (t in {0, 1}, j < hd/2), so
  HF = GGUF.reshape(heads, hd/2, 2, ...).swapaxes(1, 2).  Weights [out, in] and biases [out].
  """
  half = w.shape[0] // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader, hf_config, path):
  """HF-named float32 state dict: dequantised, q/k unpermuted (llama), shapes checked."""
  expected = expected_shapes(hf_config)
  state = {}
  for tensor in reader.tensors:
    name = hf_tensor_name(tensor.name)
    if name not in expected:
      raise ModelError(f"{path}: unexpected tensor {tensor.name!r} for {hf_config['model_type']} "
                       f"with {hf_config['num_hidden_layers']} layers")
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
    if shape != expected[name]:
      raise ModelError(f"{path}: tensor {tensor.name!r} has shape {list(shape)}, "
                       f"expected {list(expected[name])} from the metadata")
    try:
      w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
      raise ModelError(f"{path}: tensor {tensor.name!r} has quantisation type "
                       f"{tensor.tensor_type.name}, which the gguf package cannot "
                       "dequantise") from e
    w = np.array(w, dtype=np.float32).reshape(shape)  # a copy: nothing keeps the file mapped
    if hf_config["model_type"] == "llama" and (heads := _ROPE_PERMUTED.get(name.split(".")[-2])):
      w = unpermute_rope_rows(w, hf_config[heads])
    state[name] = w
  missing = sorted(set(expected) - set(state))
  if missing:
    raise ModelError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
  return state


def gguf_tokenizer(reader, path):
  """`PreTrainedTokenizerFast` from tokenizer.ggml.* metadata (byte-level BPE, "gpt2" model).

  Vocabulary and merges as stored; control tokens (token_type 3) become special added tokens,
  user-defined ones (4) plain added tokens; bos/eos/unk/pad, add_bos/add_eos and the chat template
  come from the metadata.
  """
  def meta(key, default=KeyError):
    return _metadata(reader, f"tokenizer.{key}", path, default)

  kind = meta("ggml.model")
  if kind != "gpt2":
    raise ModelError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 "
                     "(byte-level BPE)")
  pre = meta("ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ModelError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; "
                     f"supported: {', '.join(PRE_TOKENIZERS)}")
  tokens = meta("ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in meta("ggml.merges")]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  backend = tokenizers.Tokenizer(bpe)
  backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
  backend.decoder = decoders.ByteLevel()
  types = meta("ggml.token_type", [])

  def added(token_type, special):
    return [tokenizers.AddedToken(t, special=special, normalized=False)
            for t, k in zip(tokens, types) if k == token_type]

  backend.add_special_tokens(added(_TOKEN_TYPE_CONTROL, True))
  backend.add_tokens(added(_TOKEN_TYPE_USER_DEFINED, False))

  def token(key):
    i = meta(key, None)
    return None if i is None else tokens[i]

  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      bos_token=token("ggml.bos_token_id"),
      eos_token=token("ggml.eos_token_id"),
      unk_token=token("ggml.unknown_token_id"),
      pad_token=token("ggml.padding_token_id"),
      add_bos_token=meta("ggml.add_bos_token", False),
      add_eos_token=meta("ggml.add_eos_token", False),
      chat_template=meta("chat_template", None),
  )
