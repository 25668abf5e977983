"""`python -m dft_jax.evaluate`: score a training run's checkpoint or any model on the suites.

  python -m dft_jax.evaluate --checkpoint WORKDIR [--suite in_domain,forgetting] [--samples 8]
  python -m dft_jax.evaluate --model smollm2-135m-instruct --suite math --math_file math500.jsonl
  python -m dft_jax.evaluate --model tuned.gguf --base smollm2-135m-instruct --out results.json

A checkpoint is scored with its run's config.eval and config.data; a --model with the eval and
data blocks of configs/default.py. The flags override those fields.
"""
import argparse
import json
import os

import ml_collections
from flax import nnx

from dft_jax import config_files
from dft_jax.errors import ConfigError, cli_entry
from dft_jax.evaluate import evaluator

EVAL_FLAGS = ("suites", "math_file", "math_split", "in_domain", "samples", "temperature", "top_p",
              "num_examples", "num_math", "max_new_tokens", "math_max_new_tokens", "batch_size")


def restore_run(workdir, step, base_name):
  """(model, tokenizer, base model, the run's config) of a dft_jax.train workdir: the trained
  parameters alone (checkpoint.restore_model, no optimizer state), the base model by name
  (default: the run's model.name) with the run's model options (and, for a LoRA run, its
  adapters at their initial, identity value: the same parameter tree as the model)."""
  from dft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  model, tokenizer, config = checkpoint.restore_model(workdir, step)
  base_cfg = ml_collections.ConfigDict(dict(config.model))
  base_cfg.name = base_name or config.model.name
  base = models.load_from_config(base_cfg, config.get("lora"))[0]
  return model, tokenizer, base, config


def load_for_eval(args, defaults):
  """(model, tokenizer, base_model, data_cfg, eval_cfg, (name, base name)) from --checkpoint or
  --model; `defaults` (configs/default.py) gives the data and eval blocks of a --model."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  if bool(args.checkpoint) == bool(args.model):
    raise ConfigError("give exactly one of --checkpoint WORKDIR (a dft_jax.train run) and "
                      "--model SPEC (alias, HF folder, .gguf file)")
  if args.checkpoint:
    model, tokenizer, base, config = restore_run(args.checkpoint, args.step, args.base)
    return (model, tokenizer, base, config.data, config.eval,
            (args.checkpoint, args.base or config.model.name))
  kw = {} if args.dtype is None else {"compute_dtype": args.dtype}
  model, tokenizer = models.load(args.model, **kw)
  if tokenizer is None:
    raise ConfigError(f"--model={args.model!r} has no tokenizer; evaluation needs one")
  base = models.load(args.base, **kw)[0] if args.base else model
  return (model, tokenizer, base, defaults.data, defaults.eval,
          (args.model, args.base or args.model))


def check_same_architecture(model, base):
  if model.config != base.config:
    raise ConfigError("--base must have the model's architecture (KL needs the same vocabulary "
                      f"and shapes): {base.config} vs {model.config}")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dft_jax.evaluate",
                              description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", help="a dft_jax.train workdir (its latest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--model", help="alias, HF folder or .gguf file (e.g. the base model itself)")
  p.add_argument("--base", help="base model for KL (default: the checkpoint's model.name, or "
                 "--model itself, which gives KL 0)")
  p.add_argument("--suite", dest="suites", default=None,
                 help=f"comma-separated: {', '.join(evaluator.SUITES)}")
  p.add_argument("--math_file", help="MATH500-format rows {problem, answer} (jsonl/json/parquet)")
  p.add_argument("--math_split", help="split of a hub --math_file (default test; files: train)")
  p.add_argument("--in_domain", help="held-out set for in_domain (default builtin:arith_test)")
  p.add_argument("--samples", type=int, help="k replies per problem for avg@k / pass@k")
  p.add_argument("--temperature", type=float, help="sampling temperature for --samples > 1")
  p.add_argument("--top_p", type=float)
  p.add_argument("--num_examples", type=int, help="held-out problems (in_domain)")
  p.add_argument("--num_math", type=int, help="math rows (default: all)")
  p.add_argument("--max_new_tokens", type=int)
  p.add_argument("--math_max_new_tokens", type=int)
  p.add_argument("--batch_size", type=int, help="rows per generation batch")
  p.add_argument("--dtype", default=None, help="compute dtype for --model (default: bfloat16 on "
                 "accelerators, float32 on CPU)")
  p.add_argument("--out", help="write the results as JSON here")
  return p.parse_args(argv)


def with_flags(eval_cfg, args):
  """eval_cfg (a dict copy) with the fields the flags set."""
  flags = {k: getattr(args, k) for k in EVAL_FLAGS if getattr(args, k) is not None}
  return dict(dict(eval_cfg), **flags)


@cli_entry
def main(argv=None):
  args = parse_args(argv)
  defaults = config_files.load(config_files.DEFAULT)
  evaluator.settings(with_flags(defaults.eval, args))  # flag errors before anything is loaded
  model, tokenizer, base, data_cfg, eval_cfg, (name, base_name) = load_for_eval(args, defaults)
  check_same_architecture(model, base)
  cfg = evaluator.settings(with_flags(eval_cfg, args))
  graphdef, params = nnx.split(model)
  results = evaluator.RunEvaluator(cfg, data_cfg, tokenizer, graphdef, nnx.split(base)[1])(params)
  print(evaluator.format_table(results, f"{name} (base: {base_name})"), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"model": name, "base": base_name, "settings": cfg, "results": results}, f,
                indent=2)
    print(f"results: {os.path.abspath(args.out)}", flush=True)
