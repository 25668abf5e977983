"""SFT under the scanner, measured: SFT vs DFT vs PSFT (and variants) trained from one base model.

  python -m dft_jax.experiments.scanner --scale=gpu --model=/tmp/smollm2/SmolLM2-135M.gguf
  python -m dft_jax.experiments.scanner --scale=cpu                  # SmolLM2, 2 CPU cores, ~20 min
  python -m dft_jax.experiments.scanner --scale=gpu --smoke          # the GPU path, tiny, on a CPU
  python -m dft_jax.experiments.scanner --scale=gpu --tune_lr 5e-5,1e-4,2e-4   # per-arm LRs first
  python -m dft_jax.experiments.scanner --replot results/scanner     # tables + figures again

The setting is configs/study.py (`--set train.num_steps=10` overrides any field). For each seed
(the data order) and each arm (`--arm label=objective[,field=value...][,lr=X]`, any objective in
objectives.OBJECTIVES with any of its hyperparameters): train from the same base parameters on the
same batches, then evaluate with dft_jax.evaluate (in-domain greedy accuracy on held-out problems;
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
import argparse
import concurrent.futures
import copy
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dft_jax import config_files
from dft_jax import evaluate
from dft_jax import objectives
from dft_jax import train
from dft_jax.errors import ConfigError, cli_entry
from dft_jax.experiments import report

DEFAULT_OUT = {"gpu": os.path.join("results", "scanner"),
               "cpu": os.path.join("results", "scanner", "cpu")}
HISTORY_KEYS = ("loss", "target_prob", "entropy", "grad_norm", "learning_rate", "loss_tokens",
                "p_below_0.1", "p_above_0.9", "psft/clip_frac_high", "psft/ratio", "kl_anchor/k3")


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  objective: dict   # config.objective fields (name, hyperparameters)
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
  """The arms to run and the optional ones skipped (objective not registered)."""
  if arm_specs:
    return [parse_arm(s) for s in arm_specs], []
  arms = [parse_arm(s) for s in study_cfg.arms]
  skipped = []
  for spec in study_cfg.optional_arms:
    arm = parse_arm(spec)
    (arms if arm.objective["name"] in objectives.OBJECTIVES else skipped).append(arm)
  return arms, [a.label for a in skipped]


def arm_config(config, arm, seed):
  """The study config with this arm's objective fields, learning rate and data seed."""
  c = copy.deepcopy(config)
  for key, value in arm.objective.items():
    if key not in c.objective:
      raise ConfigError(f"arm {arm.label!r}: objective.{key} is not a field; allowed: "
                        f"{', '.join(sorted(c.objective))}, lr")
    try:
      c.objective[key] = value
    except TypeError:
      raise ConfigError(f"arm {arm.label!r}: objective.{key}={value!r} has the wrong type "
                        f"(expected {type(c.objective[key]).__name__})") from None
  if arm.lr is not None:
    c.optimizer.learning_rate = float(arm.lr)
  c.train.seed = seed
  try:
    objectives.validate(c.objective)
  except ConfigError as e:
    raise ConfigError(f"arm {arm.label!r}: {e}") from None
  return c


def apply_overrides(config, items):
  """--set a.b=value ... onto the config (the value's type follows the field's)."""
  for item in items or ():
    key, eq, value = item.partition("=")
    *path, field = key.strip().split(".")
    node = config
    try:
      for p in path:
        node = node[p]
      current = node[field]
    except (KeyError, AttributeError):
      raise ConfigError(f"--set {item!r}: no config field {key!r}") from None
    if not eq:
      raise ConfigError(f"--set {item!r}: expected field=value")
    parsed = _value(value)
    if isinstance(current, (tuple, list)):
      parsed = tuple(v for v in value.split(";") if v)
    elif isinstance(current, float) and isinstance(parsed, int):
      parsed = float(parsed)
    elif isinstance(current, str) and not isinstance(parsed, str):
      parsed = value.strip()
    node[field] = parsed
  return config


def load_study_config(scale, smoke):
  if scale not in ("cpu", "gpu"):
    raise ConfigError(f"--scale={scale!r}: expected cpu or gpu")
  return config_files.load("study.py", scale + (",smoke" if smoke else ""))


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
  ref_needed: bool
  compiled: concurrent.futures.Future  # -> the compiled train_step(state, batch, ref_params)


def fresh_state(config, graphdef, params, mesh):
  """train.init_train_state's TrainState (fresh optimizer) on `params` as they are."""
  return train.init_train_state(nnx.merge(graphdef, params), config, mesh)[1:3]


def build_trainer(config, graphdef, base_params, mesh, example_batch, compiler):
  """Traces the arm's train step here and hands its compilation to `compiler` (an executor), so
  that it overlaps with the evaluation and the other arms' runs."""
  state, tx = fresh_state(config, graphdef, base_params, mesh)  # for shapes and shardings only
  ref_needed = objectives.needs_ref_logp(config.objective)
  step = train.make_train_step(graphdef, tx, config, mesh, train.shardings_of(state), ref_needed)
  lowered = step.lower(train.abstract_of(state), example_batch,
                       base_params if ref_needed else None)
  return Trainer(config, ref_needed, compiler.submit(lowered.compile))


def train_run(trainer, graphdef, base_params, host_batches, mesh):
  """Trains a copy of base_params on host_batches; (params, per-step history, seconds)."""
  t0 = time.time()
  step = trainer.compiled.result()
  started = time.time()
  params = jax.tree.map(jnp.copy, base_params)  # the step donates its state
  state, _ = fresh_state(trainer.config, graphdef, params, mesh)
  ref = base_params if trainer.ref_needed else None
  device_metrics, first_step_s = [], None
  for b in host_batches:
    state, m = step(state, train.global_batch(b, mesh), ref)
    device_metrics.append(m)
    if first_step_s is None:
      jax.block_until_ready(m)
      first_step_s = time.time() - started
  history = []
  for i, m in enumerate(device_metrics, 1):
    scalars, _ = train.host_metrics(m)
    history.append({"step": i, **{k: scalars[k] for k in HISTORY_KEYS if k in scalars}})
  jax.block_until_ready(state.params)
  seconds = {"compile_wait": round(started - t0, 2), "first_step": round(first_step_s, 2),
             "train": round(time.time() - started, 2)}
  return state.params, history, seconds


def data_batches(config, tokenizer, seed):
  from dft_jax import data  # pylint: disable=g-import-not-at-top
  t = config.train
  it = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                global_batch_size=t.global_batch_size, seed=seed)
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
  arms, skipped = select_arms(config.study, arm_specs)
  for arm in arms:
    arm_config(config, arm, 0)  # bad arms fail before anything is loaded
  t = config.train
  train.validate_config(config, jax.device_count())
  data.validate(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                process_count=1)
  results = {"study": {"model": config.model.name, "arms": [dataclasses.asdict(a) for a in arms],
                       "skipped_arms": skipped, "config": json.loads(config.to_json())},
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
  model, tokenizer = train.load_model(config.model)
  tokenizer = tokenizer or train.load_tokenizer(config.model)
  graphdef, base_state, _, _ = train.init_train_state(model, config, mesh)
  base_params = base_state.params
  del model, base_state
  batches = {0: data_batches(config, tokenizer, 0)}
  results["timing"]["load_s"] = round(time.time() - started, 1)
  log(f"model {config.model.name} on {results['environment']}; arms "
      f"{[a.label for a in arms]}" + (f" (skipped, not registered: {skipped})" if skipped else ""))

  # Every arm that will run is traced now and compiled in the background, while the base model is
  # evaluated and the first arms train.
  compiler = make_compiler(config.study.compile_workers)
  example = train.global_batch(batches[0][0], mesh)
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
  """study.lr_grid (floats, or strings from --tune_lr / --set) -> a tuple of learning rates > 0."""
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
  arms, _ = select_arms(config.study, arm_specs)
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
  with open(os.path.join(out_dir, "lr_tuning.json"), "w") as f:
    json.dump(summary, f, indent=1)
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
  path = os.path.join(out_dir, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m dft_jax.experiments.scanner",
                              description=__doc__.split("\n")[0])
  p.add_argument("--scale", default="cpu", help="cpu | gpu (configs/study.py)")
  p.add_argument("--smoke", action="store_true", help="tiny model and budget, same code path")
  p.add_argument("--model", help="base model (alias, HF folder, .gguf) instead of the config's")
  p.add_argument("--out", help="output folder (default: results/scanner for gpu, "
                 "results/scanner/cpu for cpu, runs/scanner_<scale>_smoke with --smoke)")
  p.add_argument("--seeds", type=int, help="number of data-order seeds")
  p.add_argument("--arm", action="append", help="label=objective[,field=value...][,lr=X] "
                 "(repeatable; replaces the config's arms)")
  p.add_argument("--tune_lr", metavar="LR,LR,...", help="choose each arm's learning rate from "
                 "this grid on the validation set first (study.lr_grid, study.tune_on)")
  p.add_argument("--budget_s", type=float, help="no new run starts past this many seconds")
  p.add_argument("--compilation_cache", help="persistent XLA cache folder ('' to disable)")
  p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="config override, e.g. "
                 "train.num_steps=10 (repeatable)")
  p.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.json "
                 "(same config) and run only the missing ones")
  p.add_argument("--replot", metavar="DIR", help="only rewrite DIR's table and figures from "
                 "DIR/results.json")
  return p.parse_args(argv)


@cli_entry
def main(argv=None):
  args = parse_args(argv)
  if args.replot:
    path = os.path.join(args.replot, "results.json")
    if not os.path.exists(path):
      raise ConfigError(f"--replot={args.replot}: no results.json there")
    with open(path) as f:
      report.write_report(json.load(f), args.replot)
    return
  config = load_study_config(args.scale, args.smoke)
  apply_overrides(config, args.set)
  if args.model:
    config.model.name = args.model
  if args.seeds is not None:
    config.study.seeds = args.seeds
  if args.budget_s is not None:
    config.study.budget_s = args.budget_s
  if args.compilation_cache is not None:
    config.study.compilation_cache = args.compilation_cache
  out = args.out or (os.path.join("runs", f"scanner_{args.scale}_smoke") if args.smoke
                     else DEFAULT_OUT[args.scale])
  if args.tune_lr is not None:
    config.study.lr_grid = tuple(args.tune_lr.split(","))
  log = lambda s: print(s, flush=True)  # noqa: E731
  arm_specs, tuning = args.arm, None
  if config.study.lr_grid:
    arm_specs, tuning = tune_learning_rates(config, out, arm_specs=args.arm, resume=args.resume,
                                            log=log)
  run_study(config, out, arm_specs=arm_specs, resume=args.resume, lr_tuning=tuning, log=log)


if __name__ == "__main__":
  main()
