"""Score a model on the evaluation suites, against a base model.

  python -m dft_jax.evaluate --model=runs/dft          # a training run folder: its latest checkpoint
  python -m dft_jax.evaluate --model=smollm2-135m-instruct --config.eval.math_file=math500.jsonl
  python -m dft_jax.evaluate --model=tuned.gguf --base=smollm2-135m-instruct --out=results.json

--model is a training run folder (its checkpoint, scored with the run's own config: its data and
held-out split, its evaluation settings), an alias, an HF folder or a .gguf file (scored with the
model, data and eval blocks of --config, configs/default.py by default). --config.SECTION.FIELD=V
sets any field either way, e.g. --config.eval.suites=math --config.eval.samples=8.
"""
import json
import os
import sys

from dft_jax import cli
from dft_jax.errors import ConfigError, ModelError
from dft_jax.evaluate import evaluator


def base_model(config, run, base_name):
  """The base model for KL: --base (with config.model's options), else a run's model.name with the
  run's model options (for a LoRA run, its adapters at their initial, identity value: the same
  parameter tree as the model), else None (the model itself: KL 0)."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  if not (base_name or run):
    return None
  name = base_name or config.model.name
  options = models.decoder_options(config.model, config.get("lora") if run else None)
  with cli.phase(f"loading the base model {name}"):
    return models.load(name, **options)[0]


def check_same_architecture(model, base):
  if model.config != base.config:
    raise ConfigError("--base must have the model's architecture (KL needs the same vocabulary "
                      f"and shapes): {base.config} vs {model.config}")


def write_results(path, record):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"results: {os.path.abspath(path)}", flush=True)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  spec = cli.model_spec()
  evaluator.settings(flags_.config.eval)  # field errors before anything is loaded
  run = checkpoint.is_workdir(spec)
  # The sets to score, read and checked before a model loads (a run: its own config's sets).
  planned = (cli.with_overrides(checkpoint.read_config(spec), flags_.config, cli.overridden())
             if run else flags_.config)
  evaluator.check_sets(planned.eval, planned.data)
  model, tokenizer, config, step = cli.load_model(spec, flags_.config, step=flags_.step)
  if tokenizer is None:
    raise ModelError(f"--model={spec!r} has no tokenizer; evaluation needs one (set "
                     "--config.model.tokenizer to an HF tokenizer folder)")
  base = base_model(config, run, flags_.base)
  if base is not None:
    check_same_architecture(model, base)
  base_name = flags_.base or (config.model.name if run else spec)
  graphdef, params = nnx.split(model)
  scorer = evaluator.RunEvaluator(config.eval, config.data, tokenizer, graphdef,
                                  params if base is None else nnx.split(base)[1])
  with cli.phase(f"evaluating {spec}", timed=False):
    results = scorer(params)
  scored = spec if step is None else f"{spec} checkpoint step {step}"
  print(evaluator.format_table(results, f"{scored} (base: {base_name})"), flush=True)
  if flags_.out:
    write_results(flags_.out, {"model": spec, "step": step, "base": base_name,
                               "settings": config.eval.to_dict(), "results": results})


def define_flags(argv):
  cli.define_config(argv)
  cli.define_model_flags()
  cli.define("string", "base", None, "base model for KL (default: a run's model.name; for "
             "another --model, the model itself: KL 0)")
  cli.define("string", "out", None, "also write the results as JSON here")


def cli_main(argv=None):
  """`python -m dft_jax.evaluate ARGS`."""
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc=__doc__, sections=("model", "data", "eval"))
