"""SFT under the scanner, measured: SFT vs DFT vs PSFT (and variants) trained from one base model.

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu \
      --config.model.name=PATH/SmolLM2-135M-Instruct.Q4_1.gguf
  python -m dft_jax.experiments.scanner                              # :cpu, SmolLM2 on 2 CPU cores
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --tune_lr=5e-5,1e-4,2e-4
  python -m dft_jax.experiments.scanner --replot=results/scanner     # tables + figures again

The setting is configs/study.py (`--config.train.num_steps=10` overrides any field, e.g.
`--config.study.seeds=1`). For each seed (the data order) and each arm
(`--arm=label=objective[,field=value...][,lr=X]`, any objective in objectives.OBJECTIVES with any
of its hyperparameters): train from the same base parameters on the same batches, with the same
step and loop as dft_jax.train, then evaluate with dft_jax.evaluate (in-domain greedy accuracy on
held-out problems;
KL(base || tuned) and entropy on the base model's replies to general prompts; factual QA accuracy;
held-out perplexity; the target-probability histogram on held-out responses).

One process does all of it: the model is loaded and the base evaluated once; every arm's train
step is traced once and compiled in background threads while the base model is evaluated and the
first arms train, then reused by all seeds (only the data differ); the evaluation programs are
shared by all runs; a persistent XLA compilation cache makes a second invocation skip compiles.
The loop is seed-major, so when `study.budget_s` runs out every arm has as many seeds as possible
(`--resume` adds the missing runs later). OUT/results.json is rewritten after every run;
OUT/results.md and the figures (report.py) after every seed. With `--tune_lr` (study.lr_grid) each
arm's learning rate is first chosen on the validation split (tune_learning_rates, OUT/lr_tuning/).
"""
import concurrent.futures
import copy
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dft_jax import cli
from dft_jax import config_files
from dft_jax import evaluate
from dft_jax import files
from dft_jax import loop
from dft_jax import models
from dft_jax import objectives
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError
from dft_jax.experiments import report

HISTORY_KEYS = ("loss", "target_prob", "entropy", "grad_norm", "learning_rate", "loss_tokens",
                "p_below_0.1", "p_above_0.9", "psft/clip_frac_high", "psft/ratio", "kl_anchor/k3")


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  objective: dict   # name, then config.objective fields or the objective's hyperparameters
  lr: float | None  # optimizer.learning_rate, None: the study's


def _value(text):
  text = text.strip()
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def parse_arm(spec):
  """'label=objective[,field=value...]' (or just 'objective') -> Arm; lr=X sets the arm's LR."""
  label, sep, rest = spec.partition("=")
  parts = [p for p in (rest if sep else label).split(",") if p.strip()]
  if not label.strip() or not parts:
    raise ConfigError(f"--arm {spec!r}: expected label=objective[,field=value...]")
  fields = {}
  for item in parts[1:]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ConfigError(f"--arm {spec!r}: {item!r} is not field=value")
    fields[key.strip()] = _value(value)
  lr = fields.pop("lr", None)
  return Arm(label.strip(), dict(name=parts[0].strip(), **fields), lr)


def arm_spec(arm):
  """Arm -> the 'label=objective[,field=value...][,lr=X]' string parse_arm reads back."""
  fields = [f"{k}={v}" for k, v in arm.objective.items() if k != "name"]
  lr = [f"lr={arm.lr!r}"] if arm.lr is not None else []
  return ",".join([f"{arm.label}={arm.objective['name']}", *fields, *lr])


def select_arms(study_cfg, arm_specs=None):
  """The arms to run: `arm_specs` (--arm) if given, else the config's."""
  return [parse_arm(s) for s in (arm_specs or study_cfg.arms)]


def arm_config(config, arm, seed):
  """The study config with this arm's objective, its fields (a generic config.objective field or
  one of the objective's hyperparameters: `eps_high=0.3` is objective.psft.eps_high), learning
  rate and data seed."""
  c = copy.deepcopy(config)
  name = arm.objective["name"]
  if name not in objectives.OBJECTIVES:
    raise ConfigError(f"arm {arm.label!r}: objective {name!r} is unknown; allowed: "
                      f"{', '.join(objectives.OBJECTIVES)}")
  c.objective.name = name
  own = objectives.OBJECTIVES[name].hparams
  for key, value in arm.objective.items():
    if key == "name":
      continue
    if key in own:
      block, field = c.objective[name], key
    elif key in objectives.GENERIC:
      block, field = c.objective, key
    else:
      raise ConfigError(f"arm {arm.label!r}: {key!r} is neither a hyperparameter of {name} "
                        f"({', '.join(own) or 'none'}) nor one of "
                        f"{', '.join(objectives.GENERIC)}, lr")
    try:
      block[field] = value
    except TypeError:
      raise ConfigError(f"arm {arm.label!r}: {key}={value!r} has the wrong type "
                        f"(expected {type(block[field]).__name__})") from None
  if arm.lr is not None:
    c.optimizer.learning_rate = float(arm.lr)
  c.train.seed = seed
  try:
    objectives.validate(c.objective)
  except ConfigError as e:
    raise ConfigError(f"arm {arm.label!r}: {e}") from None
  return c


def enable_compilation_cache(path, log=print):
  """Persistent XLA cache: every compiled program (however small or fast) is written and reused.
  A JAX without these options only costs the reuse, so that is logged, not raised."""
  if not path:
    return
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  try:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  except (AttributeError, ValueError) as e:
    log(f"persistent compilation cache not enabled: {e}")


class InlineExecutor:
  """Runs submitted work at once in the calling thread (study.compile_workers = 0)."""

  def submit(self, fn):
    future = concurrent.futures.Future()
    future.set_result(fn())
    return future

  def shutdown(self, **unused):
    del unused


def make_compiler(workers):
  """Where train steps compile: `workers` background threads (-1: a quarter of the cores, at most
  4), or 0 for the calling thread."""
  if workers < 0:
    workers = max(1, min(4, (os.cpu_count() or 1) // 4))
  return concurrent.futures.ThreadPoolExecutor(workers) if workers else InlineExecutor()


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Trainer:
  """One arm's config and train step, compiled once (in the background) and reused by every seed."""
  config: object
  compiled: concurrent.futures.Future  # -> the compiled train_step(state, batch, frozen)


def fresh_state(config, graphdef, params, mesh):
  """step.init_train_state's (TrainState with a fresh optimizer, Frozen, tx, schedule) on
  `params` as they are."""
  return step_lib.init_train_state(nnx.merge(graphdef, params), config, mesh)[1:]


def build_trainer(config, graphdef, base_params, mesh, example_batch, compiler):
  """Traces the arm's train step here and hands its compilation to `compiler` (an executor), so
  that it overlaps with the evaluation and the other arms' runs."""
  state, frozen, tx, _ = fresh_state(config, graphdef, base_params, mesh)  # shapes, shardings
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen))
  lowered = step.lower(step_lib.abstract_of(state), example_batch, step_lib.abstract_of(frozen))
  return Trainer(config, compiler.submit(lowered.compile))


def train_run(trainer, graphdef, base_params, host_batches, mesh):
  """Trains a copy of base_params on host_batches through loop.train_loop (the train job's loop,
  without checkpoints); (params, per-step history, seconds)."""
  t0 = time.time()
  step = trainer.compiled.result()
  started = time.time()
  params = jax.tree.map(jnp.copy, base_params)  # the step donates its state
  state, frozen, _, schedule = fresh_state(trainer.config, graphdef, params, mesh)
  t = trainer.config.train
  recorder = loop.Recorder(num_steps=t.num_steps, schedule=schedule, minibatches=t.minibatches,
                           nonfinite=t.nonfinite)
  batches = ((step_lib.global_batch(b, mesh), None) for b in host_batches)
  state = loop.train_loop(state, step, batches, num_steps=t.num_steps, record=recorder,
                          frozen=frozen)
  jax.block_until_ready(state.params)
  history = [{"step": h["step"], **{k: h[k] for k in HISTORY_KEYS if k in h}}
             for h in recorder.history]
  seconds = {"compile_wait": round(started - t0, 2),
             "first_step": round(recorder.history[0]["step_seconds"], 2),
             "train": round(time.time() - started, 2)}
  return state.params, history, seconds


def data_batches(config, tokenizer, seed):
  from dft_jax import data  # pylint: disable=g-import-not-at-top
  t = config.train
  it = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                global_batch_size=t.global_batch_size, seed=seed,
                                max_segments=config.model.max_segments)
  return [next(it) for _ in range(t.num_steps)]


# ----------------------------------------------------------------------------- the study


def environment():
  d = jax.devices()[0]
  return {"jax": jax.__version__, "platform": d.platform, "device": getattr(d, "device_kind", ""),
          "device_count": jax.device_count()}


def strip(results):
  return {k: v for k, v in results.items() if k != "samples"}


def run_study(config, out_dir, *, arm_specs=None, resume=False, lr_tuning=None, log=print):
  """Trains and evaluates every (seed, arm); returns the results dict (also OUT/results.json).

  lr_tuning: tune_learning_rates' summary, kept in the results and the table.
  resume: keep the runs (and base evaluation) of an earlier OUT/results.json made with the same
  config and arms, and run only the missing (seed, arm) pairs.
  """
  from dft_jax import data, sharding  # pylint: disable=g-import-not-at-top
  started = time.time()
  os.makedirs(out_dir, exist_ok=True)
  enable_compilation_cache(config.study.compilation_cache, log)
  arms = select_arms(config.study, arm_specs)
  for arm in arms:
    arm_config(config, arm, 0)  # bad arms fail before anything is loaded
  t = config.train
  step_lib.validate(config, jax.device_count())
  data.validate(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                process_count=1)
  results = {"study": {"model": config.model.name, "arms": [dataclasses.asdict(a) for a in arms],
                       "config": json.loads(config.to_json())},
             "environment": environment(), "runs": [], "timing": {}}
  if lr_tuning:
    results["lr_tuning"] = lr_tuning
  earlier = read_earlier(out_dir, results["study"]) if resume else None
  if earlier:
    results.update(base=earlier["base"], base_samples=earlier["base_samples"], runs=earlier["runs"])
    log(f"resuming: {len(earlier['runs'])} runs of {out_dir}/results.json kept")
  done = {(r["seed"], r["arm"]) for r in results["runs"]}
  todo = {seed: [a for a in arms if (seed, a.label) not in done]
          for seed in range(config.study.seeds)}

  mesh = sharding.make_mesh(config.mesh)
  model, tokenizer = models.load_from_config(config.model)
  graphdef, base_state, _, _, _ = step_lib.init_train_state(model, config, mesh)
  base_params = base_state.params
  del model, base_state
  batches = {0: data_batches(config, tokenizer, 0)}
  results["timing"]["load_s"] = round(time.time() - started, 1)
  log(f"model {config.model.name} on {results['environment']}; arms "
      f"{[a.label for a in arms]}")

  # Every arm that will run is traced now and compiled in the background, while the base model is
  # evaluated and the first arms train.
  compiler = make_compiler(config.study.compile_workers)
  example = step_lib.global_batch(batches[0][0], mesh)
  trainers = {a.label: build_trainer(arm_config(config, a, 0), graphdef, base_params, mesh,
                                     example, compiler)
              for a in arms if any(a in arms_of_seed for arms_of_seed in todo.values())}
  evaluator = evaluate.RunEvaluator(config.eval, config.data, tokenizer, graphdef, base_params)
  if "base" not in results:
    t0 = time.time()
    base = evaluator(base_params)
    results["base"], results["base_samples"] = strip(base), base["samples"]
    results["timing"]["base_eval_s"] = round(time.time() - t0, 1)
    log(f"base: {report.one_line(base)} ({results['timing']['base_eval_s']} s)")

  steady_s, first_run_s = {}, []
  for seed, seed_arms in todo.items():
    if seed_arms and seed not in batches:
      batches = {seed: data_batches(config, tokenizer, seed)}
    for arm in seed_arms:
      # A seen arm is compiled; an unseen one may still wait for its compilation like a first did.
      estimate = steady_s.get(arm.label, max(first_run_s, default=0.0))
      if out_of_budget(config.study.budget_s, started, estimate):
        results["stopped_early"] = (f"time budget {config.study.budget_s:.0f} s reached before "
                                    f"seed {seed} of {arm.label}")
        break
      run = run_arm(arm, seed, batches[seed], trainers[arm.label], graphdef, base_params, mesh,
                    evaluator)
      results["runs"].append(run)
      if arm.label not in steady_s:
        first_run_s.append(run["seconds"]["total"])
      steady_s[arm.label] = (run["seconds"]["total"] - run["seconds"]["compile_wait"]
                             - run["seconds"]["first_step"])
      results["timing"]["total_s"] = round(time.time() - started, 1)
      write_json(results, out_dir)
      log(f"seed {seed} {arm.label:14s} train {run['seconds']['train']:6.1f} s (waited "
          f"{run['seconds']['compile_wait']:.1f} s for compilation, first step "
          f"{run['seconds']['first_step']:.1f}) eval {run['seconds']['eval']:5.1f} s | "
          f"{report.one_line(run['eval'])}")
    if seed_arms:
      report.write_report(results, out_dir, log=log)
    if "stopped_early" in results:
      log(results["stopped_early"] + "; rerun with --resume to add the missing runs")
      break
  compiler.shutdown(wait=False, cancel_futures=True)
  results["timing"]["total_s"] = round(time.time() - started, 1)
  write_json(results, out_dir)
  report.write_report(results, out_dir, log=log)
  log(f"done in {results['timing']['total_s']:.0f} s: {os.path.abspath(out_dir)}")
  return results


def parse_lr_grid(values):
  """study.lr_grid (floats, or strings from --tune_lr) -> a tuple of learning rates > 0."""
  try:
    grid = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    grid = ()
  if not grid or not all(0 < lr < float("inf") for lr in grid):
    raise ConfigError(f"--tune_lr / study.lr_grid={values!r}: expected learning rates > 0, "
                      "e.g. --tune_lr 5e-5,1e-4,2e-4")
  return grid


def best_lr(scores):
  """The lr of the highest score in {lr: score}; the smaller lr on a tie."""
  return min(scores, key=lambda lr: (-scores[lr], lr))


def tune_learning_rates(config, out_dir, *, arm_specs=None, resume=False, log=print):
  """(arm specs with learning rates chosen on the validation set, the choice); the tuning runs go
  to OUT/lr_tuning/ and the choice to OUT/lr_tuning.json.

  Every arm without its own lr trains once (seed 0, the study's token budget) at each lr of
  study.lr_grid and is scored by in-domain accuracy on study.tune_on (held out from both the
  training data and the test set that the study reports); the best lr wins, the smaller on a tie.
  study.budget_s bounds the tuning and the study each.
  """
  grid = parse_lr_grid(config.study.lr_grid)
  arms = select_arms(config.study, arm_specs)
  tuned = [a for a in arms if a.lr is None]
  if not tuned:
    raise ConfigError("--tune_lr: every arm sets its own lr=..., so there is nothing to tune")
  tune_cfg = copy.deepcopy(config)
  tune_cfg.study.update(seeds=1, lr_grid=())
  tune_cfg.eval.update(suites="in_domain", in_domain=config.study.tune_on,
                       num_examples=config.study.tune_examples)
  candidates = [arm_spec(dataclasses.replace(a, label=f"{a.label}@{lr:g}", lr=lr))
                for a in tuned for lr in grid]
  log(f"tuning the learning rate of {[a.label for a in tuned]} over {list(grid)} "
      f"on {config.study.tune_on}")
  results = run_study(tune_cfg, os.path.join(out_dir, "lr_tuning"), arm_specs=candidates,
                      resume=resume, log=log)
  if "stopped_early" in results:
    raise ConfigError(f"learning-rate tuning stopped early ({results['stopped_early']}); raise "
                      "--budget_s or shrink study.lr_grid, then rerun with --resume")
  accuracy = {r["arm"]: r["eval"]["in_domain_accuracy"] for r in results["runs"]}
  choice = {}
  for a in tuned:
    scores = {lr: accuracy[f"{a.label}@{lr:g}"] for lr in grid}
    best = best_lr(scores)
    choice[a.label] = {"lr": best, "val_accuracy": {f"{lr:g}": v for lr, v in scores.items()}}
    log(f"{a.label}: lr {best:g} (validation accuracy " + ", ".join(
        f"{lr:g}: {v:.3f}" for lr, v in scores.items()) + ")")
  summary = {"tune_on": config.study.tune_on, "num_examples": config.study.tune_examples,
             "seed": 0, "arms": choice}
  files.write_json(os.path.join(out_dir, "lr_tuning.json"), summary, indent=1)
  return [arm_spec(dataclasses.replace(a, lr=choice[a.label]["lr"]) if a.label in choice else a)
          for a in arms], summary


def read_earlier(out_dir, study):
  """The earlier results.json of out_dir if it has the same config (the study section aside: seeds,
  budget and cache may change) and arms, else None."""
  path = os.path.join(out_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    earlier = json.load(f)
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  without_study = lambda c: {k: v for k, v in c.items() if k != "study"}
  if not (same(without_study(earlier["study"]["config"]), without_study(study["config"]))
          and same(earlier["study"]["arms"], study["arms"])):
    raise ConfigError(f"--resume: {path} was made with another config or other arms; use a new "
                      "--out or leave out --resume")
  return earlier


def out_of_budget(budget_s, started, estimate_s):
  """Whether a run estimated to take estimate_s would end past budget_s (0: no budget)."""
  return bool(budget_s) and time.time() - started + estimate_s > budget_s


def run_arm(arm, seed, batches, trainer, graphdef, base_params, mesh, evaluator):
  """Trains one arm on one seed's batches and evaluates it; the run's record."""
  t0 = time.time()
  params, history, seconds = train_run(trainer, graphdef, base_params, batches, mesh)
  t1 = time.time()
  after = evaluator(params)
  seconds.update(eval=round(time.time() - t1, 2), total=round(time.time() - t0, 2))
  return {"arm": arm.label, "seed": seed, "eval": strip(after), "samples": after["samples"],
          "history": history, "seconds": seconds}


def write_json(results, out_dir):
  files.write_json(os.path.join(out_dir, "results.json"), results, indent=1)


# ----------------------------------------------------------------------------- command line


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if flags_.replot:
    results = files.read_json(os.path.join(flags_.replot, "results.json"))
    if results is None:
      raise ConfigError(f"--replot={flags_.replot}: no results.json there")
    report.write_report(results, flags_.replot)
    return
  config = flags_.config
  out = config.study.out
  if flags_.tune_lr is not None:
    config.study.lr_grid = tuple(flags_.tune_lr.split(","))
  log = lambda s: print(s, flush=True)  # noqa: E731
  arm_specs, tuning = flags_.arm, None
  if config.study.lr_grid:
    arm_specs, tuning = tune_learning_rates(config, out, arm_specs=flags_.arm,
                                            resume=flags_.resume, log=log)
  run_study(config, out, arm_specs=arm_specs, resume=flags_.resume, lr_tuning=tuning, log=log)


def define_flags(argv):
  cli.define_config(argv, default=config_files.STUDY,
                    help_text="config file[:variant] (configs/study.py:cpu|gpu[,smoke])")
  cli.define("multi_string", "arm", None, "label=objective[,field=value...][,lr=X] (repeatable; "
             "replaces the config's arms)")
  cli.define("string", "tune_lr", None, "LR,LR,...: choose each arm's learning rate from this "
             "grid on the validation set first (study.lr_grid, study.tune_on)")
  cli.define("bool", "resume", False, "keep the runs already in OUT/results.json (same config) "
             "and run only the missing ones")
  cli.define("string", "replot", None, "only rewrite DIR's table and figures from "
             "DIR/results.json")


def cli_main(argv=None):
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc="\n\n".join(__doc__.split("\n\n")[:2]))  # summary and usage


if __name__ == "__main__":
  cli_main()
