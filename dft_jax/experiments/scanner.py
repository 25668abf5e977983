"""SFT under the scanner, measured: every objective trained from one base model, in two regimes of
prior strength (the base model weak or strong on the task), with bootstrap intervals.

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu   # the study, one H200
  python -m dft_jax.experiments.scanner                                 # :cpu, SmolLM2 on 2 cores
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --regime=model_strong \
      --arm=sft --arm=dft --tune_lr=5e-5,1e-4,2e-4 --config.study.seeds=5
  python -m dft_jax.experiments.scanner --replot=results/scanner     # tables + figures again

The setting is configs/study.py (`--config.train.num_steps=10` overrides any field). For each
regime (study.regime_sets: a train, a validation and a test set), each seed (the data order) and
each arm (`--arm=label=objective[,field=value...][,lr=X]`, any objective in objectives.OBJECTIVES
with any of its hyperparameters): train from the same base parameters on the same batches, with
the same step and loop as dft_jax.train, then evaluate with dft_jax.evaluate (in-domain greedy
accuracy on the held-out problems; KL(base || tuned) and entropy on the base model's replies to
general prompts; factual QA accuracy; held-out perplexity; the target-probability histogram on
held-out responses).

Learning rates (study.lr_grid, --tune_lr): with a grid, every arm without its own lr trains on seed
0 at each grid lr and keeps the one with the best greedy accuracy on the regime's validation split
(the smaller on a tie); that run is then evaluated on the test split as the arm's seed 0 (training
it again would repeat it), and seeds 1 .. seeds-1 train at the chosen lr.

One process does all of it: the model is loaded once and the base model evaluated once per regime;
every train step the study needs (one per arm and lr: the regimes share them, as only the data
differ) is traced and compiled in background threads while the base model is evaluated and the
first runs train; a persistent XLA compilation cache makes a second invocation skip compiles. The
order is seed-major (all of seed 0, tuning included, then seed 1, ...), regimes alternating within
a seed, so when `study.budget_s` runs out every regime has as many seeds as possible (`--resume`
adds the missing runs later). OUT/<regime>/results.json is rewritten after every run, its
results.md after every seed, the figures (report.py) and OUT/results.md (all regimes) at the end.
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

HISTORY_KEYS = ("grad_norm", "learning_rate", "loss_tokens", *objectives.metric_names())


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  objective: dict   # name, then config.objective fields or the objective's hyperparameters
  lr: float | None  # optimizer.learning_rate; None: tuned on the grid, or the study's


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
  arms = [parse_arm(s) for s in (arm_specs or study_cfg.arms)]
  labels = [a.label for a in arms]
  if len(set(labels)) != len(labels):
    raise ConfigError(f"arms {labels}: every arm needs its own label")
  return arms


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


def select_regimes(study_cfg, names=None):
  """The regimes to run, in order: `names` (--regime) if given, else study.regimes."""
  chosen = list(names) if names else [n.strip() for n in study_cfg.regimes.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in study_cfg.regime_sets]
  if unknown or not chosen:
    raise ConfigError(f"regimes {chosen or study_cfg.regimes!r}: expected names from "
                      f"study.regime_sets ({', '.join(study_cfg.regime_sets)})")
  return list(dict.fromkeys(chosen))


def all_regimes(study_cfg):
  """Every regime of study.regime_sets: those of study.regimes first, in its order."""
  first = select_regimes(study_cfg)
  return first + [n for n in study_cfg.regime_sets if n not in first]


def regime_config(config, name):
  """The study config with regime `name`'s train set (data.source) and test set (eval.in_domain)."""
  sets = config.study.regime_sets[name]
  c = copy.deepcopy(config)
  c.data.source, c.eval.in_domain = sets.train, sets.test
  return c


def validation_eval_config(config, name):
  """config.eval reduced to greedy in-domain accuracy on the regime's validation set."""
  e = copy.deepcopy(config.eval)
  e.update(suites="in_domain", in_domain=config.study.regime_sets[name].val,
           num_examples=config.study.tune_examples)
  return e


def parse_lr_grid(values):
  """study.lr_grid (floats, or strings from --tune_lr) -> a tuple of learning rates > 0; () none."""
  if not values:
    return ()
  try:
    grid = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    grid = ()
  if not grid or not all(0 < lr < float("inf") for lr in grid):
    raise ConfigError(f"--tune_lr / study.lr_grid={values!r}: expected learning rates > 0, "
                      "e.g. --tune_lr 5e-5,1e-4,2e-4")
  return tuple(sorted(set(grid)))


def best_lr(scores):
  """The lr of the highest score in {lr: score}; the smaller lr on a tie."""
  return min(scores, key=lambda lr: (-scores[lr], lr))


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
  """Where train steps are traced and compiled: `workers` background threads (-1: a quarter of the
  cores, at most 4), or 0 for the calling thread."""
  if workers < 0:
    workers = max(1, min(4, (os.cpu_count() or 1) // 4))
  return concurrent.futures.ThreadPoolExecutor(workers) if workers else InlineExecutor()


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Task:
  regime: str
  arm: Arm
  seed: int
  tune: bool  # train at every grid lr, keep the best on the validation set (seed 0 only)


def plan(regimes, arms, num_seeds, grid, done=frozenset()):
  """The runs still to do, in order: seed by seed, regime by regime, arm by arm; an arm without
  its own lr is tuned (Task.tune) on seed 0 when there is a grid. done: {(regime, label, seed)}."""
  return [Task(regime, arm, seed, tune=bool(grid) and arm.lr is None and seed == 0)
          for seed in range(num_seeds) for regime in regimes for arm in arms
          if (regime, arm.label, seed) not in done]


def program(arm, lr):
  """The arm at one learning rate: one compiled train step (shared by every regime and seed)."""
  return dataclasses.replace(arm, lr=lr)


def program_key(arm):
  return json.dumps([arm.objective, arm.lr], sort_keys=True)


def programs_needed(tasks, grid, chosen_lr):
  """Every train step the tasks need, in the order they first need it: a tuned arm at each grid
  lr (or, tuned earlier, at its chosen lr: chosen_lr(regime, label) -> lr or None), any other arm
  at its own lr (None: the study's)."""
  needed = {}
  for task in tasks:
    arm = task.arm
    if arm.lr is not None or not grid:
      lrs = [arm.lr]
    else:
      known = None if task.tune else chosen_lr(task.regime, arm.label)
      lrs = list(grid) if known is None else [known]
    for lr in lrs:
      needed.setdefault(program_key(program(arm, lr)), program(arm, lr))
  return list(needed.values())


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Trainer:
  """One arm's config and train step, compiled once (in the background) and reused by every seed
  and regime."""
  config: object
  compiled: concurrent.futures.Future  # -> the compiled train_step(state, batch, frozen)


def fresh_state(config, graphdef, params, mesh):
  """step.init_train_state's (TrainState with a fresh optimizer, Frozen, tx, schedule) on
  `params` as they are."""
  return step_lib.init_train_state(nnx.merge(graphdef, params), config, mesh,
                                   setting=objectives.validate(config.objective))[1:]


def build_trainer(config, graphdef, base_params, mesh, example_batch, compiler):
  """Hands the tracing and compilation of the arm's train step to `compiler` (an executor), so
  that it overlaps with the evaluations and the other arms' runs."""
  def compile_step():
    state, frozen, tx, _ = fresh_state(config, graphdef, base_params, mesh)  # shapes, shardings
    step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                    step_lib.shardings_of(frozen),
                                    setting=objectives.validate(config.objective))
    return step.lower(step_lib.abstract_of(state), example_batch,
                      step_lib.abstract_of(frozen)).compile()

  return Trainer(config, compiler.submit(compile_step))


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


def strip(results):
  return {k: v for k, v in results.items() if k != "samples"}


@dataclasses.dataclass
class Runner:
  """What every run of the study shares: the base model, the mesh, the compiled train steps, the
  evaluators of each regime and the current (regime, seed)'s batches."""
  graphdef: object
  base_params: object
  mesh: object
  tokenizer: object
  configs: dict          # regime -> its config
  trainers: dict         # program_key -> Trainer
  evaluators: dict       # regime -> RunEvaluator on the test split (+ forgetting, target_probs)
  val_evaluators: dict   # regime -> RunEvaluator on the validation split (tuning)
  batches: dict = dataclasses.field(default_factory=dict)

  def host_batches(self, regime, seed):
    if (regime, seed) not in self.batches:
      self.batches = {(regime, seed): data_batches(self.configs[regime], self.tokenizer, seed)}
    return self.batches[(regime, seed)]

  def train(self, arm, lr, regime, seed):
    return train_run(self.trainers[program_key(program(arm, lr))], self.graphdef,
                     self.base_params, self.host_batches(regime, seed), self.mesh)

  def run(self, task, lr):
    """Trains task.arm at lr and evaluates it on the regime's test split: the run's record."""
    params, history, seconds = self.train(task.arm, lr, task.regime, task.seed)
    return self.record(task, lr, params, history, seconds)

  def tune(self, task, grid):
    """Trains task.arm at every grid lr; the best on the validation split (the smaller lr on a
    tie) is evaluated on the test split: (the run's record, {lr: validation accuracy})."""
    trained, scores, seconds = {}, {}, {"compile_wait": 0.0, "train": 0.0, "validation": 0.0}
    for lr in grid:
      params, history, times = self.train(task.arm, lr, task.regime, task.seed)
      t0 = time.time()
      scores[lr] = self.val_evaluators[task.regime](params)["in_domain_accuracy"]
      for key, value in (*times.items(), ("validation", time.time() - t0)):
        seconds[key] = round(seconds.get(key, 0.0) + value, 2)  # summed over the grid
      trained[lr] = (params, history)
    chosen = best_lr(scores)
    params, history = trained.pop(chosen)
    del trained
    return self.record(task, chosen, params, history, seconds), scores

  def record(self, task, lr, params, history, seconds):
    t0 = time.time()
    ev = self.evaluators[task.regime](params)
    seconds["eval"] = round(time.time() - t0, 2)
    if lr is None:  # the arm runs at the study's learning rate
      lr = self.configs[task.regime].optimizer.learning_rate
    return {"arm": task.arm.label, "seed": task.seed, "lr": lr, "eval": strip(ev),
            "samples": ev["samples"], "history": history, "seconds": seconds}


# ----------------------------------------------------------------------------- the study


def environment():
  d = jax.devices()[0]
  return {"jax": jax.__version__, "platform": d.platform, "device": getattr(d, "device_kind", ""),
          "device_count": jax.device_count()}


def new_results(config, regime, arms, grid):
  """The empty results of one regime (OUT/<regime>/results.json)."""
  results = {"study": {"regime": regime, "sets": dict(config.study.regime_sets[regime]),
                       "model": config.model.name, "arms": [dataclasses.asdict(a) for a in arms],
                       "lr_grid": list(grid), "config": json.loads(config.to_json())},
             "environment": environment(), "runs": [], "timing": {}}
  if grid:
    results["lr_tuning"] = {"tune_on": config.study.regime_sets[regime].val,
                            "num_examples": config.study.tune_examples, "seed": 0,
                            "grid": list(grid), "arms": {}}
  return results


def read_earlier(out_dir, study):
  """The earlier results.json of out_dir if it has the same config (the study section aside:
  seeds, budget and cache may change), arms and lr grid, else None."""
  path = os.path.join(out_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    earlier = json.load(f)
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
  without_study = lambda c: {k: v for k, v in c.items() if k != "study"}  # noqa: E731
  if not (same(without_study(earlier["study"]["config"]), without_study(study["config"]))
          and same(earlier["study"]["arms"], study["arms"])
          and same(earlier["study"].get("lr_grid", []), study["lr_grid"])):
    raise ConfigError(f"--resume: {path} was made with another config, other arms or another lr "
                      "grid; use a new study.out or leave out --resume")
  return earlier


def out_of_budget(budget_s, started, estimate_s):
  """Whether work estimated to take estimate_s would end past budget_s (0: no budget)."""
  return bool(budget_s) and time.time() - started + estimate_s > budget_s


def write_json(results, out_dir):
  files.write_json(os.path.join(out_dir, "results.json"), results, indent=1)


def collect_regimes(out_dir, names):
  """{regime: results} of the regimes in `names` (in that order) that have OUT/<regime>/
  results.json."""
  paths = {n: os.path.join(out_dir, n, "results.json") for n in names}
  return {n: files.read_json(p) for n, p in paths.items() if os.path.isfile(p)}


def start_regimes(configs, arms, grid, out_dir, resume, log):
  """{regime: results}: new, or with resume the earlier OUT/<regime>/results.json's base
  evaluation, tuning and runs (the same config, arms and grid, else ConfigError)."""
  regimes = {}
  for name, c in configs.items():
    results = new_results(c, name, arms, grid)
    folder = os.path.join(out_dir, name)
    earlier = read_earlier(folder, results["study"]) if resume else None
    if earlier:
      results.update({k: earlier[k] for k in ("base", "base_samples", "runs", "lr_tuning")
                      if k in earlier})
      log(f"{name}: resuming with {len(earlier['runs'])} runs of {folder}/results.json")
    os.makedirs(folder, exist_ok=True)
    regimes[name] = results
  return regimes


def run_task(runner, task, grid, results, log):
  """Runs one task (a run, or an arm's tuning and its seed-0 run) and records it in results."""
  t0 = time.time()
  tuning = results.get("lr_tuning", {}).get("arms", {})
  if task.tune:
    run, scores = runner.tune(task, grid)
    tuning[task.arm.label] = {"lr": run["lr"],
                              "val_accuracy": {f"{lr:g}": v for lr, v in scores.items()}}
    note = " (validation " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in scores.items()) + ")"
  else:
    tuned = grid and task.arm.lr is None
    run, note = runner.run(task, tuning[task.arm.label]["lr"] if tuned else task.arm.lr), ""
  run["seconds"]["total"] = round(time.time() - t0, 2)
  results["runs"].append(run)
  log(f"{task.regime} seed {task.seed} {task.arm.label:12s} lr {run['lr']:g}{note} | "
      f"{run['seconds']['total']:5.1f} s (waited {run['seconds']['compile_wait']:.1f} s for "
      f"compilation) | {report.one_line(run['eval'])}")
  return run


def run_study(config, out_dir, *, arm_specs=None, regime_names=None, resume=False, log=print):
  """Trains and evaluates every (seed, regime, arm), tuning learning rates first when
  study.lr_grid is set; returns {regime: results} (also OUT/<regime>/results.json).

  resume: keep the runs, tuning and base evaluation of the earlier OUT/<regime>/results.json
  made with the same config, arms and grid, and run only the missing ones.
  """
  from dft_jax import data, sharding  # pylint: disable=g-import-not-at-top
  started = time.time()
  enable_compilation_cache(config.study.compilation_cache, log)
  arms = select_arms(config.study, arm_specs)
  names = select_regimes(config.study, regime_names)
  grid = parse_lr_grid(config.study.lr_grid)
  if grid and all(arm.lr is not None for arm in arms):
    raise ConfigError("--tune_lr: every arm sets its own lr=..., so there is nothing to tune")
  configs = {n: regime_config(config, n) for n in names}
  t = config.train
  for c in configs.values():
    for arm in arms:
      arm_config(c, arm, 0)  # bad arms fail before anything is loaded
    step_lib.validate(c, jax.device_count())
    data.validate(c.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                  process_count=1, max_segments=c.model.max_segments)
  regimes = start_regimes(configs, arms, grid, out_dir, resume, log)
  chosen_lr = lambda regime, label: (  # noqa: E731
      regimes[regime].get("lr_tuning", {}).get("arms", {}).get(label, {}).get("lr"))
  tasks = plan(names, arms, config.study.seeds, grid,
               {(n, r["arm"], r["seed"]) for n, res in regimes.items() for r in res["runs"]})

  mesh = sharding.make_mesh(config.mesh)
  model, tokenizer = models.load_from_config(config.model)
  graphdef, base_state, _, _, _ = step_lib.init_train_state(
      model, config, mesh, setting=objectives.validate(config.objective))
  runner = Runner(graphdef, base_state.params, mesh, tokenizer, configs, {}, {}, {})
  del model, base_state
  example = step_lib.global_batch(runner.host_batches(names[0], 0)[0], mesh)
  load_s = round(time.time() - started, 1)
  log(f"model {config.model.name} on {environment()}; regimes {names}; arms "
      f"{[a.label for a in arms]}{f'; lr grid {list(grid)}' if grid else ''}; {len(tasks)} "
      "runs to do")

  # Every train step the study needs is traced and compiled in the background, in the order the
  # runs need them, while the base model is evaluated and the first runs train.
  compiler = make_compiler(config.study.compile_workers)
  for p in programs_needed(tasks, grid, chosen_lr):
    runner.trainers[program_key(p)] = build_trainer(arm_config(config, p, 0), graphdef,
                                                    runner.base_params, mesh, example, compiler)
  for n in names:
    runner.evaluators[n] = evaluate.RunEvaluator(configs[n].eval, configs[n].data, tokenizer,
                                                 graphdef, runner.base_params)
    if any(task.tune and task.regime == n for task in tasks):
      runner.val_evaluators[n] = evaluate.RunEvaluator(validation_eval_config(config, n),
                                                       configs[n].data, tokenizer, graphdef,
                                                       runner.base_params)
    regimes[n]["timing"]["load_s"] = load_s
    if "base" not in regimes[n]:
      t0 = time.time()
      base = runner.evaluators[n](runner.base_params)
      regimes[n]["base"], regimes[n]["base_samples"] = strip(base), base["samples"]
      regimes[n]["timing"]["base_eval_s"] = round(time.time() - t0, 1)
      log(f"{n} base: {report.one_line(base)} ({regimes[n]['timing']['base_eval_s']} s)")

  seconds_per_training, remaining = {}, []
  for i, task in enumerate(tasks):
    trainings = len(grid) if task.tune else 1
    estimate = trainings * seconds_per_training.get(
        task.arm.label, max(seconds_per_training.values(), default=0.0))
    if out_of_budget(config.study.budget_s, started, estimate):
      remaining = tasks[i:]
      break
    results = regimes[task.regime]
    run = run_task(runner, task, grid, results, log)
    seconds_per_training[task.arm.label] = (
        run["seconds"]["total"] - run["seconds"]["compile_wait"]) / trainings
    results["timing"]["total_s"] = round(time.time() - started, 1)
    write_json(results, os.path.join(out_dir, task.regime))
    following = tasks[i + 1] if i + 1 < len(tasks) else None
    if following is None or (following.seed, following.regime) != (task.seed, task.regime):
      report.write_report(results, os.path.join(out_dir, task.regime),
                          confidence=config.study.confidence, figures=False, log=log)
  compiler.shutdown(wait=False, cancel_futures=True)

  for n, results in regimes.items():
    missing = [task for task in remaining if task.regime == n]
    if missing:
      results["stopped_early"] = (
          f"time budget {config.study.budget_s:.0f} s reached with {len(missing)} runs to do, "
          f"from seed {missing[0].seed} of {missing[0].arm.label}")
    results["timing"]["total_s"] = round(time.time() - started, 1)
    write_json(results, os.path.join(out_dir, n))
    report.write_report(results, os.path.join(out_dir, n), confidence=config.study.confidence,
                        log=log)
  report.write_overview(collect_regimes(out_dir, all_regimes(config.study)), out_dir,
                        config.study.confidence)
  if remaining:
    log(f"time budget {config.study.budget_s:.0f} s reached with {len(remaining)} runs to do; "
        "rerun with --resume to add them")
  log(f"done in {time.time() - started:.0f} s: {os.path.abspath(out_dir)}")
  return regimes


# ----------------------------------------------------------------------------- command line


def replot(out_dir, names, confidence=0.95):
  """Rewrites the tables and figures of a study folder: OUT/<regime>/ for the regimes in `names`
  and OUT/results.md, or of one regime's folder (its results.json)."""
  single = files.read_json(os.path.join(out_dir, "results.json"))
  if single is not None:
    report.write_report(single, out_dir, confidence=confidence)
    return
  regimes = collect_regimes(out_dir, names)
  if not regimes:
    raise ConfigError(f"--replot={out_dir}: no results.json there or in its folders")
  for name, results in regimes.items():
    report.write_report(results, os.path.join(out_dir, name), confidence=confidence)
  report.write_overview(regimes, out_dir, confidence)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  config = flags_.config
  if flags_.replot:
    replot(flags_.replot, all_regimes(config.study), config.study.confidence)
    return
  if flags_.tune_lr is not None:
    config.study.lr_grid = tuple(v for v in flags_.tune_lr.split(",") if v.strip())
  run_study(config, config.study.out, arm_specs=flags_.arm, regime_names=flags_.regime,
            resume=flags_.resume, log=lambda s: print(s, flush=True))


def define_flags(argv):
  cli.define_config(argv, default=config_files.STUDY,
                    help_text="config file[:variant] (configs/study.py:cpu|gpu[,smoke])")
  cli.define("multi_string", "arm", None, "label=objective[,field=value...][,lr=X] (repeatable; "
             "replaces the config's arms)")
  cli.define("multi_string", "regime", None, "a regime of study.regime_sets (repeatable; replaces "
             "study.regimes)")
  cli.define("string", "tune_lr", None, "LR,LR,...: choose each arm's learning rate from this "
             "grid on the regime's validation set (study.lr_grid; an empty value: no tuning)")
  cli.define("bool", "resume", False, "keep the runs already in OUT/<regime>/results.json (same "
             "config, arms and grid) and run only the missing ones")
  cli.define("string", "replot", None, "only rewrite the tables and figures of DIR (a study's "
             "OUT or one regime's folder) from its results.json files")


def cli_main(argv=None):
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc="\n\n".join(__doc__.split("\n\n")[:2]))  # summary and usage


if __name__ == "__main__":
  cli_main()
