"""A tiny real tokenizer for tests: byte-level BPE trained offline, ChatML template, EOS <|im_end|>.

Same shape as SmolLM2-Instruct's (byte-level BPE, <|im_start|>/<|im_end|> special tokens, EOS =
<|im_end|>), a few hundred tokens, built in well under a second with no download.
"""
import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dft_jax import config_files

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@functools.cache
def _trained_json(corpus, vocab_size):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok.to_str()


def tiny_chat_tokenizer(corpus=None, vocab_size=600, chat_template=CHATML):
  """A fresh PreTrainedTokenizerFast (eos <|im_end|>, pad <|endoftext|>, bos <|im_start|>)."""
  if corpus is None:
    from dft_jax.data import builtin  # pylint: disable=g-import-not-at-top
    rows = builtin.load_builtin("arith_train")[:200] + builtin.load_builtin("general_prompts")
    corpus = [r["prompt"] + "\n" + r["response"] for r in rows]
  return PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_trained_json(tuple(corpus), vocab_size)),
      eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>",
      chat_template=chat_template)


def default_config(arg=None):
  """configs/default.py's get_config(arg)."""
  return config_files.load(config_files.DEFAULT, arg)
