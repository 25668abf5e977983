"""SFT under the scanner, measured: every arm trained from one base model at every learning rate of
one shared grid and over several data orders, in two regimes of prior strength, evaluated along
training; forgetting compared at matched in-domain gain (docs/study.md).

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu   # the study, one H200
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --config.study.regimes=model_weak
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --resume   # add the missing
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny
  python -m dft_jax.experiments.scanner --replot=results/scanner     # tables + figures again

The setting is configs/study.py (`--config.train.num_steps=10` overrides any field; an arm is a
label of study.arms, a set of overrides in the main job's field names; study.run_arms picks and
orders them). For each regime (study.regime_sets: train, validation, test and out-of-distribution
sets) and each arm: every (rate of study.lr_grid, data seed) is a member of one population
(population.py: the train job's step vmapped over stacked train states), trained from the same base
parameters on the batches of its seed with the same loop as dft_jax.train, and evaluated every
study.eval_every global batches (in-domain test and OOD accuracy, KL to the base on general
prompts, factual QA, held-out perplexity, target probabilities) and at the end on the validation
set. The base model is evaluated once per regime.

Results: OUT/<regime>/base.json and OUT/<regime>/arms/<label>.json, each written atomically when
it is complete, so a stopped study keeps what it finished; `--resume` runs only what is missing
(the kept files must have the same config), and a study folder that holds results is never
started over without it. The arms' train steps are traced and compiled in a background thread
while the previous arm trains. `study.budget_s` stops starting arms that would end past it.
"""
import concurrent.futures
import copy
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dft_jax import cli
from dft_jax import config_files
from dft_jax import evaluate
from dft_jax import files
from dft_jax import loop
from dft_jax import models
from dft_jax import objectives
from dft_jax import sharding
from dft_jax import step as step_lib
from dft_jax.data import formats
from dft_jax.errors import ConfigError
from dft_jax.evaluate import sets as sets_lib
from dft_jax.experiments import population as pop
from dft_jax.experiments import report
from dft_jax.models import attention

HISTORY_KEYS = ("grad_norm", "update_norm", "loss_tokens", "skipped", *objectives.metric_names())


# ----------------------------------------------------------------------------- arms and regimes


def run_arm_labels(study_cfg):
  """study.run_arms ("sft,dft", or a sequence) -> labels of study.arms, in order."""
  value = study_cfg.run_arms
  labels = [a.strip() for a in (value.split(",") if isinstance(value, str) else value)
            if a.strip()]
  unknown = [a for a in labels if a not in study_cfg.arms]
  if unknown or not labels or len(set(labels)) != len(labels):
    raise ConfigError(f"study.run_arms={value!r}: expected distinct labels of study.arms "
                      f"({', '.join(study_cfg.arms)})")
  return labels


def apply_overrides(config, overrides, where):
  """A copy of config with the nested `overrides` set, each to a field the config has, with its
  type; ConfigError naming `where` and the field otherwise."""
  c = copy.deepcopy(config)

  def update(block, values, path):
    for key, value in values.items():
      field = f"{path}.{key}" if path else key
      if key not in block:
        raise ConfigError(f"{where}: {field} is not a config field")
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        update(block[key], value, field)
        continue
      try:
        block[key] = value
      except TypeError:
        raise ConfigError(f"{where}: {field}={value!r} has the wrong type (expected "
                          f"{type(block[key]).__name__})") from None

  update(c, overrides, "")
  return c


def arm_config(config, label):
  """(config, setting): the study config with arm `label`'s overrides (study.arms[label]) and its
  objective resolved (objectives.validate: the edge; nothing below checks it again)."""
  overrides = config.study.arms[label]
  if "learning_rate" in overrides.get("optimizer", {}):
    raise ConfigError(f"study.arms.{label}: sets optimizer.learning_rate, which study.lr_grid "
                      "sets for every arm")
  c = apply_overrides(config, overrides, f"study.arms.{label}")
  try:
    return c, objectives.validate(c.objective)
  except ConfigError as e:
    raise ConfigError(f"study.arms.{label}: {e}") from None


def select_regimes(study_cfg):
  """study.regimes ("model_weak,model_strong") -> names of study.regime_sets, in order."""
  chosen = [n.strip() for n in study_cfg.regimes.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in study_cfg.regime_sets]
  if unknown or not chosen:
    raise ConfigError(f"study.regimes={study_cfg.regimes!r}: expected names from "
                      f"study.regime_sets ({', '.join(study_cfg.regime_sets)})")
  return list(dict.fromkeys(chosen))


def regime_config(config, name):
  """The study config with regime `name`'s train set (data.source) and test set (eval.in_domain:
  the reference responses of the target-probability histogram)."""
  sets = config.study.regime_sets[name]
  c = copy.deepcopy(config)
  c.data.source, c.eval.in_domain = sets.train, sets.test
  return c


def check_attention(model_cfg):
  """The population trains its runs under jax.vmap, and JAX's cuDNN attention has no batching rule
  for packed rows: model.attention must resolve to "xla" (on GPU, "auto" resolves to cudnn)."""
  if attention.resolve_impl(model_cfg.attention, model_cfg.compute_dtype) == "cudnn":
    raise ConfigError(f"model.attention={model_cfg.attention!r} resolves to cudnn here, which the "
                      "study's vmapped population cannot batch over packed rows; set "
                      "--config.model.attention=xla")


def check_grid(study_cfg):
  grid = tuple(study_cfg.lr_grid)
  if not grid or not all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in grid):
    raise ConfigError(f"study.lr_grid={grid!r}: expected learning rates > 0")
  if int(study_cfg.seeds) < 1 or int(study_cfg.eval_every) < 1:
    raise ConfigError("study.seeds and study.eval_every must be >= 1")
  return tuple(sorted(set(float(v) for v in grid)))


def eval_steps(num_steps, every):
  """The global batches after which a population is evaluated: every `every`, and the last."""
  return sorted(set(range(every, num_steps + 1, every)) | {num_steps})


# ----------------------------------------------------------------------------- the study folder


def arm_path(out_dir, regime, label):
  return os.path.join(out_dir, regime, "arms", f"{label}.json")


def base_path(out_dir, regime):
  return os.path.join(out_dir, regime, "base.json")


def existing_results(out_dir):
  """The base / arm result files under out_dir."""
  found = []
  for root, _, names in os.walk(out_dir):
    found += [os.path.join(root, n) for n in names
              if n.endswith(".json") and (n == "base.json" or os.path.basename(root) == "arms")]
  return sorted(found)


def config_key(config):
  """What a kept result must share with this study to be resumed: the config without the
  study's bookkeeping fields (budget, cache, output folder, which arms and regimes run)."""
  c = json.loads(config.to_json())
  for field in ("budget_s", "compilation_cache", "out", "run_arms", "regimes", "resamples",
                "confidence", "gain_levels", "report"):
    c["study"].pop(field, None)
  c["study"].pop("arms", None)  # an arm's own overrides are in its config below
  return c


def kept(path, key):
  """The results in `path` if they were made with config `key`, None if there are none;
  ConfigError if they were made with another config."""
  earlier = files.read_json(path)
  if earlier is None:
    return None
  if json.dumps(earlier["config"], sort_keys=True) != json.dumps(key, sort_keys=True):
    raise ConfigError(f"--resume: {path} was made with another config; use a new study.out or "
                      "move that folder away")
  return earlier


# ----------------------------------------------------------------------------- one regime


class Regime:
  """What every arm of a regime shares: its config, the seeds' batches, the evaluators, the base
  model's results."""

  def __init__(self, name, config, graphdef, base_params, tokenizer):
    self.name, self.config = name, config
    self.graphdef, self.base_params, self.tokenizer = graphdef, base_params, tokenizer
    sets, study = config.study.regime_sets[name], config.study
    self.run_evaluator = evaluate.RunEvaluator(config.eval, config.data, tokenizer, graphdef,
                                               base_params)
    where = f"study.regime_sets.{name}"
    answer_sets = {"in_domain": self.answer_set(sets.test, config.eval.num_examples,
                                                f"{where}.test"),
                   **{f"ood_{k}": self.answer_set(v, study.ood_examples, f"{where}.ood.{k}")
                      for k, v in sets.ood.items()},
                   "val": self.answer_set(sets.val, study.val_examples, f"{where}.val")}
    self.evaluator = pop.PopulationEvaluator(
        self.run_evaluator, answer_sets, batch_size=config.eval.batch_size,
        forced_batch_size=config.eval.forced_batch_size)
    self.descriptions = {"in_domain": f"{sets.test} ({len(answer_sets['in_domain'].answers)})",
                         **{f"ood_{k}": f"{v} ({len(answer_sets[f'ood_{k}'].answers)})"
                            for k, v in sets.ood.items()},
                         "val": f"{sets.val} ({len(answer_sets['val'].answers)})",
                         "forgetting": self.run_evaluator.describe("forgetting"),
                         "target_probs": self.run_evaluator.describe("target_probs")}
    self.batches = {seed: data_batches(config, tokenizer, seed) for seed in range(study.seeds)}

  def answer_set(self, spec, num, where):
    """The greedy-answer set `spec` (SOURCE[,FIELD=VALUE...], as eval.in_domain) from
    study.regime_sets: its prompts rendered as training renders them, its answers."""
    s = sets_lib.resolve(spec, where)
    rows, locate = sets_lib.load(s, num)
    rows = sets_lib.check_rows(s, rows, locate, ("prompt", "answer"))
    return pop.AnswerSet(
        [self.run_evaluator.prompt_ids(str(formats.get_field(r, s.prompt_field))) for r in rows],
        [str(formats.get_field(r, s.answer_field)) for r in rows],
        self.config.study.regime_sets[self.name].max_new_tokens)

  def score(self, states, final):
    """[R] results of the population states on every set (the validation set only at the
    end)."""
    names = [n for n in self.evaluator.answer_sets if final or n != "val"]
    return self.evaluator(states, names)

  def base(self, num_members):
    """The base model's results, scored through the population programs the arms use (the base
    replicated num_members times: the same compiled programs). Its KL to itself is 0 by
    definition: the vmapped and the plain forward differ by rounding (~1e-5 in bfloat16), which
    is set to 0 here."""
    states = jax.tree.map(lambda p: jnp.repeat(p[None], num_members, axis=0), self.base_params)
    scored = self.score(states, final=True)[0]
    scored.update(kl_to_base=0.0, kl_heldout=0.0,
                  kl_sum_per_prompt=[0.0] * len(scored["kl_sum_per_prompt"]))
    return scored


def data_batches(config, tokenizer, seed):
  """The num_steps host batches of data seed `seed` (train.seed: the data order)."""
  from dft_jax import data  # pylint: disable=g-import-not-at-top
  t = config.train
  it = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                global_batch_size=t.global_batch_size, seed=seed,
                                max_segments=config.model.max_segments)
  return [next(it) for _ in range(t.num_steps)]


def compile_population_step(config, setting, graphdef, base_params, members):
  """The arm's vmapped train step, traced and compiled for the population's shapes (run in a
  background thread while another arm trains)."""
  from dft_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  unit = pop.unit_rate_config(config)
  t = unit.train
  base_tx, _ = step_lib.make_optimizer(unit.optimizer, t.num_steps * t.minibatches,
                                       models_lib.logical_specs(base_params))
  rates = jax.ShapeDtypeStruct((len(members),), jnp.float32)
  state = jax.eval_shape(lambda p, r: pop.population_state(p, base_tx, r), base_params, rates)
  compute_dtype = nnx.merge(graphdef, base_params).compute_dtype  # the reference's (init_train_state)
  frozen = jax.eval_shape(lambda p: step_lib.Frozen(reference=jax.tree.map(
      lambda x: x.astype(compute_dtype), p) if setting.needs_reference else None), base_params)
  batch = {k: jax.ShapeDtypeStruct((len(members), t.global_batch_size, t.seq_len),
                                   jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in step_lib.BATCH_KEYS}
  step = pop.make_population_step(graphdef, pop.population_tx(base_tx), config, setting)
  return step.lower(state, batch, frozen).compile()


def train_arm(regime, label, config, setting, members, compiled, mesh, log):
  """Trains arm `label`'s population on the regime and scores it at the evaluation steps:
  the arm's results (its members, per-step history, per-evaluation results, seconds)."""
  t0 = time.time()
  step = compiled.result()
  compile_wait = time.time() - t0
  model = regime_model(regime)
  population = pop.init_population(model, config, setting, members, mesh)
  t = config.train
  history = pop.History(population, HISTORY_KEYS, t.minibatches)
  steps = eval_steps(t.num_steps, config.study.eval_every)
  evals, seconds = [], {"compile_wait": round(compile_wait, 1), "train": 0.0, "eval": 0.0}
  clock = [time.time()]

  def evaluate_at(step_number, state):
    seconds["train"] += time.time() - clock[0]
    started = time.time()
    evals.append(regime.score(state.params, final=step_number == t.num_steps))
    seconds["eval"] += time.time() - started
    log(f"{regime.name} {label}: step {step_number}/{t.num_steps} "
        f"{report.population_line(evals[-1], members)}")
    clock[0] = time.time()

  batches = pop.member_batches(regime.batches, members)
  loop.train_loop(population.state, step, batches, num_steps=t.num_steps, record=history,
                  frozen=population.frozen, save=evaluate_at,
                  checkpoint_every=config.study.eval_every)
  seconds = {k: round(v, 1) for k, v in seconds.items()}
  seconds["total"] = round(time.time() - t0, 1)
  return {"arm": label, "overrides": config.study.arms[label].to_dict(),
          "members": [{"lr": m.lr, "seed": m.seed} for m in members], "steps": steps,
          "evals": evals, "history": history.rows, "seconds": seconds}


def regime_model(regime):
  """A fresh copy of the base model (a population copies its parameters, the step donates them)."""
  return nnx.merge(regime.graphdef, jax.tree.map(jnp.copy, regime.base_params))


def one_run_seconds(regime, config, setting, members, mesh):
  """Training seconds of one member alone (the population program at R = 1), compiled first:
  the population's speed-up is R times this over its own training seconds."""
  member = members[:1]
  batches = list(pop.member_batches(regime.batches, member))
  population = pop.init_population(regime_model(regime), config, setting, member, mesh)
  step = pop.make_population_step(population.graphdef, population.tx, config, setting).lower(
      population.state, batches[0][0], population.frozen).compile()
  history = pop.History(population, ("loss",), config.train.minibatches)
  started = time.time()
  state = loop.train_loop(population.state, step, iter(batches),
                          num_steps=config.train.num_steps, record=history,
                          frozen=population.frozen)
  jax.block_until_ready(state.params)
  return time.time() - started


# ----------------------------------------------------------------------------- the study


def environment():
  d = jax.devices()[0]
  return {"jax": jax.__version__, "platform": d.platform, "device": getattr(d, "device_kind", ""),
          "device_count": jax.device_count()}


def run_study(config, out_dir, *, resume=False, log=print):
  """Trains and scores every arm of study.run_arms in every regime of study.regimes; returns
  {regime: {"base": ..., "arms": {label: results}}} (also the files under out_dir) and writes the
  report."""
  from dft_jax import data  # pylint: disable=g-import-not-at-top
  started = time.time()
  labels = run_arm_labels(config.study)
  names = select_regimes(config.study)
  grid = check_grid(config.study)
  members = pop.members(grid, range(config.study.seeds))
  configs = {n: regime_config(config, n) for n in names}
  arm_configs = {(n, a): arm_config(c, a) for n, c in configs.items() for a in labels}  # (c, s)
  for arm_cfg, _ in arm_configs.values():  # an arm may override model fields too
    check_attention(arm_cfg.model)
  t = config.train
  for c in configs.values():
    step_lib.validate(c, 1)
    data.validate(c.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                  process_count=1, max_segments=c.model.max_segments)
  found = existing_results(out_dir)
  if found and not resume:
    raise ConfigError(f"{out_dir} holds the results of an earlier study ({len(found)} files); "
                      "--resume keeps them and adds what is missing, or set another study.out")
  keys = {k: config_key(c) for k, (c, _) in arm_configs.items()}
  todo = [(n, a) for n in names for a in labels
          if kept(arm_path(out_dir, n, a), keys[n, a]) is None]
  if not todo and all(os.path.exists(base_path(out_dir, n)) for n in names):
    log(f"{out_dir}: every arm of {names} is there; nothing to train")
    return finish(config, out_dir, names, labels, log, config.study.report)

  if config.study.compilation_cache:
    enable_compilation_cache(config.study.compilation_cache)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])  # the members: one device
  model, tokenizer = models.load_from_config(config.model)
  graphdef, base_state, _, _, _ = step_lib.init_train_state(
      model, config, mesh, setting=objectives.validate(config.objective))
  base_params = base_state.params
  del model, base_state
  log(f"model {config.model.name} on {environment()}; regimes {names}; arms {labels}; "
      f"{len(members)} members per arm (rates {list(grid)} x seeds 0..{config.study.seeds - 1}); "
      f"{len(todo)} (regime, arm) populations to train")

  compiler = concurrent.futures.ThreadPoolExecutor(1)
  compiled = {}

  def compile_ahead(index):
    if index < len(todo) and todo[index] not in compiled:
      c, setting = arm_configs[todo[index]]
      compiled[todo[index]] = compiler.submit(compile_population_step, c, setting, graphdef,
                                              base_params, members)

  compile_ahead(0)
  regimes, arm_seconds = {}, []
  for i, (name, label) in enumerate(todo):
    if name not in regimes:
      regimes[name] = Regime(name, configs[name], graphdef, base_params, tokenizer)
      start_regime(regimes[name], out_dir, keys[todo[i]], len(members), resume, log)
    estimate = max(arm_seconds, default=0.0)
    if config.study.budget_s and time.time() - started + estimate > config.study.budget_s:
      log(f"time budget {config.study.budget_s:.0f} s: {len(todo) - i} populations left "
          f"(from {name} {label}); rerun with --resume to add them")
      break
    compile_ahead(i + 1)
    results = train_arm(regimes[name], label, *arm_configs[name, label], members,
                        compiled.pop((name, label)), mesh, log)
    results.update(config=keys[name, label], environment=environment())
    if not os.path.exists(speedup_path(out_dir, name)):
      measure_speedup(regimes[name], *arm_configs[name, label], members, mesh, results,
                      out_dir, log)
    os.makedirs(os.path.dirname(arm_path(out_dir, name, label)), exist_ok=True)
    files.write_json(arm_path(out_dir, name, label), results, indent=None)
    arm_seconds.append(results["seconds"]["total"])
  compiler.shutdown(wait=False, cancel_futures=True)
  log(f"trained in {time.time() - started:.0f} s")
  return finish(config, out_dir, names, labels, log, config.study.report)


def speedup_path(out_dir, regime):
  return os.path.join(out_dir, regime, "speedup.json")


def measure_speedup(regime, config, setting, members, mesh, results, out_dir, log):
  """One member trained alone (once per regime) against the population's training seconds."""
  alone = one_run_seconds(regime, config, setting, members, mesh)
  together = results["seconds"]["train"]
  record = {"arm": results["arm"], "members": len(members), "population_train_s": together,
            "one_run_train_s": round(alone, 2),
            "speedup": round(len(members) * alone / together, 2) if together else None,
            "environment": environment()}
  files.write_json(speedup_path(out_dir, regime.name), record)
  log(f"{regime.name}: {len(members)} runs in one program train in {together:.1f} s, one run "
      f"alone in {alone:.1f} s: {record['speedup']}x faster than one at a time")


def start_regime(regime, out_dir, key, num_members, resume, log):
  """The regime's base results: kept (with --resume) or scored now and written."""
  path = base_path(out_dir, regime.name)
  base_key = {k: v for k, v in key.items() if k != "objective"}
  earlier = kept(path, base_key) if resume else None
  if earlier is None:
    t0 = time.time()
    scored = regime.base(num_members)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {"config": base_key, "eval": scored, "sets": regime.descriptions,
                            "environment": environment(), "seconds": round(time.time() - t0, 1)},
                     indent=None)
    log(f"{regime.name} base: {report.one_line(scored)} ({time.time() - t0:.0f} s)")


def collect(out_dir, names, labels=None):
  """{regime: {"base": ..., "arms": {label: results}, "speedup": ...}} of the files under out_dir
  (the arms of `labels` in that order, then any others there)."""
  regimes = {}
  for name in names:
    base = files.read_json(base_path(out_dir, name))
    if base is None:
      continue
    folder = os.path.dirname(arm_path(out_dir, name, "x"))
    there = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(
        folder) else []
    order = [a for a in (labels or []) if a in there] + [a for a in there if a not in (labels or [])]
    regimes[name] = {"base": base,
                     "arms": {a: files.read_json(arm_path(out_dir, name, a)) for a in order},
                     "speedup": files.read_json(speedup_path(out_dir, name))}
  return regimes


def finish(config, out_dir, names, labels, log, write=True):
  regimes = collect(out_dir, names, labels)
  if write:
    report.write_report(regimes, out_dir, config.study, log=log)
    log(f"report: {os.path.abspath(os.path.join(out_dir, 'results.md'))}")
  return regimes


def enable_compilation_cache(path):
  """Persistent XLA cache: every compiled program is written and reused (a resumed study skips
  the compiles of the arms it trained before)."""
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# ----------------------------------------------------------------------------- command line


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  if flags.FLAGS.replot:
    finish(config, flags.FLAGS.replot, list(config.study.regime_sets), None,
           lambda s: print(s, flush=True))
    return
  run_study(config, config.study.out, resume=flags.FLAGS.resume,
            log=lambda s: print(s, flush=True))


def define_flags(argv):
  cli.define_config(argv, default=config_files.STUDY,
                    help_text="config file[:variant] (configs/study.py:cpu|gpu[,smoke])")
  cli.define("bool", "resume", False, "keep the results already in study.out (same config) and "
             "train only the missing (regime, arm) populations")
  cli.define("string", "replot", None, "only rewrite the tables and figures of a study folder "
             "from its result files")


def cli_main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.prepare_process()
  define_flags(argv)
  cli.run(main, argv, doc="\n\n".join(__doc__.split("\n\n")[:2]))  # summary and usage


if __name__ == "__main__":
  cli_main()
