"""Writes the binary / model files of the bad-input corpus (cases.json names what each must print).

  PYTHONPATH=. python tests/bad_inputs/make_cases.py

Text files (jsonl, json, csv) are written by hand and kept as they are; this script makes the ones
that need a library or bytes an editor would not keep: a micro HF model folder without tokenizer
files, the same with its safetensors cut short, an HF config of an unsupported architecture, a GGUF
cut short, a parquet file that is not parquet, data files in Latin-1 (not UTF-8), save_to_disk
folders with a damaged state.json or Arrow file, and a tokenizer (alone, and in a model folder)
whose class is custom code. Everything is a few KB.
"""
import json
import pathlib
import shutil

import numpy as np
from flax import nnx

from dft_jax import export
from dft_jax.models import ModelConfig
from dft_jax.models.decoder import Decoder

HERE = pathlib.Path(__file__).parent
FIXTURES = HERE.parent / "fixtures"
MICRO = {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 4, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "max_position_embeddings": 64, "tie_word_embeddings": True,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def micro_model(folder):
  shutil.rmtree(folder, ignore_errors=True)  # an export replaces its folder whole
  model = Decoder(ModelConfig.from_hf(MICRO), rngs=nnx.Rngs(0))
  export.export_hf(model, None, folder)
  return folder


def latin1_data_files():
  """UTF-8 files but for one Latin-1 'é' (byte 0xe9) in their second data line."""
  (HERE / "latin1.jsonl").write_bytes(
      b'{"prompt": "What is 2 + 2?", "response": "4"}\n'
      b'{"prompt": "Caf\xe9 or tea?", "response": "Tea."}\n')
  (HERE / "latin1.csv").write_bytes(b"prompt,response\nWhat is 2 + 2?,4\nCaf\xe9 or tea?,Tea.\n")
  (HERE / "latin1.txt").write_bytes(b"Rivers shape the land.\nCaf\xe9 au lait is warm.\n")


def damaged_saved_folders():
  """save_to_disk folders: state.json cut short (a torn write), an Arrow file cut short."""
  import datasets  # pylint: disable=g-import-not-at-top
  rows = [{"prompt": "What is 2 + 2?", "response": "4"}, {"prompt": "Hi", "response": "Hello!"}]
  for name in ("saved_torn_state", "saved_cut_arrow"):
    shutil.rmtree(HERE / name, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(HERE / name))
  for path in (HERE / "saved_torn_state" / "state.json",
               next((HERE / "saved_cut_arrow").glob("*.arrow"))):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def custom_code_tokenizer(folder):
  """The tiny tokenizer, with tokenizer_config.json naming a class in the folder's own Python file
  (auto_map), as hub repositories with custom tokenizers do; the file fails loudly if imported."""
  folder.mkdir(exist_ok=True)
  shutil.copy(FIXTURES / "tiny_llama" / "tokenizer.json", folder)
  config = json.loads((FIXTURES / "tiny_llama" / "tokenizer_config.json").read_text())
  config.update(tokenizer_class="CustomTokenizer",
                auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  (folder / "tokenization_custom.py").write_text(
      'raise RuntimeError("code from a model folder was run")\n')


def main():
  micro_model(HERE / "model_no_tokenizer")
  cut = micro_model(HERE / "model_truncated_safetensors")
  weights = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  gpt2 = HERE / "model_unsupported_arch"
  gpt2.mkdir(exist_ok=True)
  (gpt2 / "config.json").write_text(json.dumps(dict(MICRO, model_type="gpt2"), indent=2) + "\n")

  import gguf  # pylint: disable=g-import-not-at-top
  path = HERE / "truncated.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 700])  # the tensor data ends early
  (HERE / "not_parquet.parquet").write_bytes(b"PAR1 these bytes are not a parquet file PAR1")
  latin1_data_files()
  damaged_saved_folders()
  custom_code_tokenizer(HERE / "tokenizer_custom_code")
  custom_code_tokenizer(micro_model(HERE / "model_custom_tokenizer_code"))


if __name__ == "__main__":
  main()
