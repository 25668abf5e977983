"""Chat with a model from the command line (greedy by default).

  python -m dft_jax.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"

Each --prompt is one user turn; the tokenizer's chat template wraps it (raw text when the tokenizer
has none, or with --raw). Prompts run as one left-padded batch.
"""
import argparse

from dft_jax import models, sampling
from dft_jax.errors import ModelError, cli_entry


def chat_prompt_ids(tokenizer, prompt: str, *, system: str | None = None, raw: bool = False):
  """Token ids of `prompt` as a user turn under the chat template, ready for the reply."""
  if raw or tokenizer.chat_template is None:
    return tokenizer(prompt).input_ids
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": prompt}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False).input_ids


@cli_entry
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dft_jax.generate",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="alias, HF folder, .gguf file (see dft_jax.models.load)")
  parser.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
  parser.add_argument("--system", default=None, help="system message")
  parser.add_argument("--raw", action="store_true", help="no chat template")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on "
                      "accelerators, float32 on CPU)")
  args = parser.parse_args(argv)
  model, tokenizer = models.load(args.model, compute_dtype=args.dtype)
  if tokenizer is None:
    raise ModelError(f"model {args.model!r} has no tokenizer; generate needs one")
  prompts = [chat_prompt_ids(tokenizer, p, system=args.system, raw=args.raw) for p in args.prompt]
  replies = sampling.generate(
      model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      top_p=args.top_p, eos_ids=sampling.stop_ids(model, tokenizer),
      pad_id=sampling.pad_id(tokenizer), seed=args.seed)
  for prompt, reply in zip(args.prompt, replies):
    if len(args.prompt) > 1:
      print(f"### {prompt}")
    print(tokenizer.decode(reply, skip_special_tokens=True).strip())


if __name__ == "__main__":
  main()
