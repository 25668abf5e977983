"""Chat with a model from the command line (greedy by default).

  python -m dft_jax.generate --prompt="What is the capital of France?"     # config.model.name
  python -m dft_jax.generate --model=runs/dft --prompt="What is 12 * 7?"   # a training run folder
  python -m dft_jax.generate --model=model.gguf --prompt=Hi --temperature=0.7 --max_new_tokens=64

--model is a training run folder (its latest checkpoint, prompts rendered as the run's training
rendered them: its chat template and system prompt), an alias, an HF folder or a .gguf file. Each
--prompt is one user turn under the chat template (data.chat_template / data.system_prompt of the
config; --config.data.chat_template=none gives the raw prompt text). Prompts run as one
left-padded batch.
"""
import sys

from dft_jax import cli
from dft_jax.errors import ConfigError, ModelError


def prompt_ids(config, tokenizer, prompts):
  """Token ids of each prompt as a user turn, rendered as training renders prompts
  (data.Encoder.prompt_ids: config.data's template and system prompt); the raw text's tokens when
  the tokenizer has no chat template and config.data names none."""
  from dft_jax import data  # pylint: disable=g-import-not-at-top
  data_cfg = config.data
  if data_cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
    data_cfg.chat_template = "none"
  data_cfg.format = "prompt_response"
  encoder = data.Encoder(data_cfg, tokenizer)
  return [encoder.prompt_ids(p) for p in prompts]


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dft_jax.evaluate import generation  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if not flags_.prompt:
    raise ConfigError("--prompt: give at least one user message, e.g. --prompt='What is 2 + 2?'")
  spec = cli.model_spec()
  model, tokenizer, config, _ = cli.load_model(spec, flags_.config, step=flags_.step)
  if tokenizer is None:
    raise ModelError(f"model {spec!r} has no tokenizer; generate needs one (set "
                     "--config.model.tokenizer to an HF tokenizer folder)")
  ids = prompt_ids(config, tokenizer, flags_.prompt)
  with cli.phase("generating", timed=False):
    replies = generation.generate_ids(
        model, tokenizer, ids, max_new_tokens=flags_.max_new_tokens, batch_size=len(ids),
        temperature=flags_.temperature, top_p=flags_.top_p, seed=flags_.seed, label="generating")
  for prompt, reply in zip(flags_.prompt, replies):
    if len(flags_.prompt) > 1:
      print(f"### {prompt}")
    print(tokenizer.decode(reply, skip_special_tokens=True).strip(), flush=True)


def define_flags(argv):
  cli.define_config(argv)
  cli.define_model_flags()
  cli.define("multi_string", "prompt", None, "a user message (repeatable)")
  cli.define("integer", "max_new_tokens", 128, "longest reply (tokens)")
  cli.define("float", "temperature", 0.0, "sampling temperature (0: greedy)")
  cli.define("float", "top_p", 1.0, "nucleus sampling mass")
  cli.define("integer", "seed", 0, "sampling seed")


def cli_main(argv=None):
  """`python -m dft_jax.generate ARGS`."""
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc=__doc__, sections=("model", "data"))


if __name__ == "__main__":
  cli_main()
