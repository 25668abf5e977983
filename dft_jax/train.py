"""The main job: fine-tune a language model with an SFT-family objective, evaluate before and after.

  python -m dft_jax.train [--config=configs/default.py[:variant]] [--workdir=DIR] [--config.a.b=v ...]
                          [--allow_config_change]

`train_and_evaluate` reads top to bottom: check the config, lock the workdir, refuse a resume with
a changed config, return the summary of a finished run; then `run`: build the mesh, load the model
and tokenizer, place the train state, open the data, restore the newest usable checkpoint of the
workdir (the same command resumes a run), compile the step (dft_jax/step.py), evaluate the base
model, run the loop (dft_jax/loop.py) with checkpoints and stop signals, evaluate the result,
write the summary.
A first SIGTERM / SIGINT ends the run after the current step with a checkpoint (exit 0); see
dft_jax/run_control.py. Nothing imports this module: it is the command line.
"""
import itertools
import logging
import os

import jax
import numpy as np

from dft_jax import checkpoint as ckpt
from dft_jax import cli
from dft_jax import data
from dft_jax import device_memory
from dft_jax import evaluate
from dft_jax import files
from dft_jax import loop
from dft_jax import metrics as metrics_lib
from dft_jax import models
from dft_jax import objectives
from dft_jax import preflight
from dft_jax import reference_logp
from dft_jax import run_control
from dft_jax import sharding
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError


def check_updates_per_snapshot(setting, train_cfg):
  """An objective that trains against a policy snapshot (PSFT's old_logp, arXiv 2508.17784) needs
  several updates per snapshot: with train.minibatches=1 the snapshot is the policy itself, every
  ratio is 1 and the update is exactly SFT's, so that is refused, naming the field.
  setting: the resolved objective (objectives.Setting); train_cfg: config.train."""
  name = setting.name
  if "old_logp" in setting.needs and train_cfg.minibatches == 1:
    raise ConfigError(
        f"objective.name={name!r} with train.minibatches=1 is SFT: with one update per policy "
        "snapshot its ratio stays 1 and its numbers equal SFT's; set train.minibatches to the "
        "updates per snapshot (the paper: 8 minibatches of each global batch), e.g. "
        f"--config=configs/default.py:{name} or --config.train.minibatches=4 "
        "--config.train.microbatches=1")


def validate_config(config):
  """Every section's own check, before anything is loaded or compiled (ConfigError, one line);
  returns the objective resolved (objectives.Setting), which the rest of the run receives."""
  setting = objectives.validate(config.objective)
  check_updates_per_snapshot(setting, config.train)
  step_lib.validate(config, jax.device_count(), jax.process_count())
  data.validate(config.data, seq_len=config.train.seq_len,
                global_batch_size=config.train.global_batch_size,
                process_count=jax.process_count(), max_segments=config.model.max_segments)
  ckpt.validate(config.checkpoint)
  metrics_lib.validate(config.log)
  evaluate.settings(config.eval)
  models.lora_config(config.lora)
  return setting


def batches_of(data_iter, mesh):
  """(global batch, data position where it starts) for every step."""
  while True:
    position = data_iter.state()
    yield step_lib.global_batch(next(data_iter), mesh), position


def train_and_evaluate(config, workdir, allow_config_change=False):
  """Runs (or resumes) training in `workdir`; returns the summary dict (also summary.json).

  One run per workdir (run_control.WorkdirLock). A run resuming from checkpoints must have the
  config they were written with (but the fields of checkpoint.RESUMABLE), unless
  allow_config_change.
  A finished run (summary.json of as many steps) returns its summary and writes nothing.
  Raises run_control.Preempted when a stop signal ended the run early (after a checkpoint).
  """
  setting = validate_config(config)
  run_control.check_workdir(workdir)
  with run_control.one_run_per_workdir(workdir):
    ckpt.check_config(workdir, config, allow_config_change)
    finished = files.read_json(os.path.join(workdir, "summary.json"))
    if finished is not None and finished["steps"] >= config.train.num_steps:
      logging.info("%s: this run finished all its %d steps; nothing to do", workdir,
                   finished["steps"])
      return finished
    return run(config, workdir, setting)


def run(config, workdir, setting):
  """The run itself (train_and_evaluate's checks done, the workdir locked; setting: the objective
  resolved by validate_config)."""
  t, is_main = config.train, jax.process_index() == 0
  evaluates = config.eval.before or config.eval.after or config.eval.every_steps
  mesh = sharding.make_mesh(config.mesh)

  preflight.check(config)  # the data and evaluation files, before the model loads
  with cli.phase(f"loading {config.model.name}"):
    model, tokenizer = models.load_from_config(config.model, config.lora)
  data_iter = data.make_train_iterator(config.data, tokenizer, seq_len=t.seq_len,
                                       global_batch_size=t.global_batch_size, seed=t.seed,
                                       max_segments=config.model.max_segments)
  model.max_segments = data_iter.max_segments  # model.max_segments None: the data's bound
  model_config, lora = model.config, model.lora
  graphdef, state, frozen, tx, schedule = step_lib.init_train_state(model, config, mesh,
                                                                    setting=setting)
  del model
  # The starting parameters (with LoRA: its adapters, B = 0), for the base model's evaluation.
  initial = None
  if evaluates:
    initial = frozen.reference or jax.tree.map(jax.numpy.copy, state.params)

  if setting.ref_logp == "precomputed":  # once, from the starting parameters, before a restore
    with cli.phase("precomputing the reference's log-probabilities"):
      data_iter = reference_logp.attach(data_iter, config, workdir, tokenizer, graphdef, state,
                                        frozen, mesh)
  manager = ckpt.make_manager(workdir, config.checkpoint)
  restored, earlier = ckpt.restore(manager, state), None  # earlier: the run's progress so far
  if restored is not None:
    state, data_state, earlier = restored
    data_iter.restore(data_state)
    logging.info("resuming from step %d of %d (workdir %s)", int(state.step), t.num_steps,
                 os.path.abspath(workdir))
  ckpt.write_config(workdir, config)  # only once the checkpoints are known to fit this run
  if is_main:  # rows a killed run logged after its last checkpoint are logged again
    for name in (metrics_lib.METRICS_FILE, metrics_lib.EVAL_METRICS_FILE):
      run_control.rewind_jsonl(os.path.join(workdir, name), int(state.step))

  batches = batches_of(data_iter, mesh)
  first = next(batches)
  with cli.phase("compiling the train step"):
    train_step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                          step_lib.shardings_of(frozen), setting=setting,
                                          sources=data.mixture.source_names(config.data))
    train_step = train_step.lower(state, first[0], frozen).compile()
  device_memory.check_fits(train_step, jax.local_devices()[0])  # before a step runs out of it

  evaluator = None
  if evaluates:
    base_params = step_lib.full_params(initial, frozen.base)
    evaluator = evaluate.RunEvaluator(config.eval, config.data, tokenizer, graphdef, base_params)
  before = files.read_json(os.path.join(workdir, "eval_before.json"))
  scored_before = config.eval.before and before is None
  if scored_before:
    with cli.phase("evaluating the base model", timed=False):
      before = evaluator(base_params)
    if is_main:
      files.write_json(os.path.join(workdir, "eval_before.json"), before)

  with metrics_lib.make_writer(config.log, workdir, t.num_steps, is_main,
                               run_config=config.to_dict()) as writer:
    if scored_before:  # every writer gets the evaluations under eval/
      writer.write(int(state.step), *evaluate.writer_metrics(before))
    recorder = loop.Recorder(
        num_steps=t.num_steps, schedule=schedule, minibatches=t.minibatches,
        flops_per_token=step_lib.train_flops_per_token(state, frozen, model_config, t.seq_len),
        nonfinite=t.nonfinite, writer=writer, log_every=config.log.every_steps,
        max_update_ratio=config.optimizer.max_update_ratio)

    def evaluate_during(step, state):
      with cli.phase(f"evaluating at step {step}", timed=False):
        writer.write(step, *evaluate.writer_metrics(
            evaluator(step_lib.full_params(state.params, frozen.base))))
      recorder.start()  # the next step's time leaves the evaluation out

    with run_control.StopSignals() as signals, ckpt.finishing_saves(manager):
      state = loop.train_loop(
          state, train_step, itertools.chain([first], batches), num_steps=t.num_steps,
          record=recorder, frozen=frozen,
          save=lambda step, state: ckpt.save(
              manager, step, state, data_iter.state(), blocking=not config.checkpoint.async_save,
              progress=loop.run_progress(earlier, recorder.history)),
          checkpoint_every=config.checkpoint.every_steps,
          stop=lambda step: signals.requested(step, manager),
          evaluate=evaluate_during, evaluate_every=config.eval.every_steps)
      ckpt.wait(manager)
    if signals.received:
      step = int(state.step)
      raise run_control.Preempted(
          f"stopped by {signals.received} after step {step} of {t.num_steps}; checkpoint "
          f"{ckpt.checkpoint_dir(workdir)}/{step} written: run the same command to resume")

    if config.checkpoint.export_hf and is_main:
      from dft_jax import export  # pylint: disable=g-import-not-at-top
      trained = step_lib.merge_model(graphdef, state.params, frozen.base)
      run = dict(source=os.path.abspath(workdir), step=int(state.step))
      export.export_hf(trained, tokenizer, os.path.join(workdir, "hf"), **run)  # adapters merged
      if lora is not None:
        export.export_peft(trained, os.path.join(workdir, "peft"),
                           base_model_name_or_path=config.model.name, **run)
    after = None
    if config.eval.after:
      with cli.phase("evaluating the trained model", timed=False):
        after = evaluator(step_lib.full_params(state.params, frozen.base))
      writer.write(t.num_steps, *evaluate.writer_metrics(after))
  summary = make_summary(config, loop.run_progress(earlier, recorder.history), recorder.history,
                         before, after)
  if is_main:
    files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def make_summary(config, progress, history, before, after):
  """The run's figures: the whole run's (loop.run_progress: its first and last step, training
  time, tokens/s), this process's part of it (`history`, its Recorder rows: the steps it trained,
  their time and tokens/s; a resumed run trained only the last ones), and the evaluations."""
  summary = {"objective": config.objective.name, "model": config.model.name,
             "steps": config.train.num_steps}
  if progress["steps"]:
    seconds = progress["train_seconds"]
    summary.update(train_seconds=round(seconds, 1), tokens_per_s=progress["tokens"] / seconds,
                   skipped_steps=progress["skipped"])
    for key in loop.FIGURES:
      summary[f"train_{key}"] = {"first": progress["first"][key], "last": progress["last"][key]}
  seconds = sum(h["step_seconds"] for h in history)
  summary["this_process"] = {
      "steps": [history[0]["step"], history[-1]["step"]] if history else [],
      "train_seconds": round(seconds, 1),
      "tokens_per_s": sum(h["tokens"] for h in history) / seconds if history else None}
  if history and "mfu" in history[-1]:
    summary["mfu"] = float(np.mean([h["mfu"] for h in history]))
  for name, results in (("before", before), ("after", after)):
    if results:
      summary[name] = {k: v for k, v in results.items() if k != "samples"}
  if after:
    summary["samples_after"] = after["samples"]
  return summary


def _time_line(summary):
  """'N steps in S s, T tokens/s' of the whole run, and what this process did when it is not
  the whole run (a resumed run)."""
  line = f"{summary['steps']} steps"
  if summary.get("train_seconds") is not None:
    line += f" in {summary['train_seconds']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s"
  this = summary.get("this_process")
  if this is None or this["steps"] == [1, summary["steps"]]:
    return line
  if not this["steps"]:
    return f"{line} (this process: no step left to train)"
  first, last = this["steps"]
  return (f"{line} (this process: steps {first}-{last} in {this['train_seconds']:.0f} s, "
          f"{this['tokens_per_s']:,.0f} tokens/s)")


def format_summary(summary):
  """A before/after table for the console: every evaluated set under what it scored
  (evaluate.table_sections), then the training figures of the whole run."""
  lines = [f"{summary['objective']} on {summary['model']}: {_time_line(summary)}"]
  sections = evaluate.table_sections([summary.get("before") or {}, summary.get("after") or {}])
  training = [(f"{key} (first -> last step)", [f"{v['first']:.4f}", f"{v['last']:.4f}"])
              for key in loop.FIGURES
              if (v := summary.get(f"train_{key}")) and None not in v.values()]
  if training:
    sections.append(("training batches", training))
  return "\n".join(lines + evaluate.format_sections(["before", "after"], sections))


# ----------------------------------------------------------------------------- command line


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  cli.initialize_distributed(flags_.coordinator_address, flags_.num_processes, flags_.process_id)
  config = flags_.config
  workdir = flags_.workdir or os.path.join("runs", config.objective.name)
  try:
    with cli.run_folder(workdir):
      summary = train_and_evaluate(config, workdir, flags_.allow_config_change)
  except run_control.Preempted as stopped:  # every process says where it stopped
    print(f"dft_jax: {stopped}", flush=True)
    return
  if jax.process_index() == 0:
    print(format_summary(summary), flush=True)
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)


def define_flags(argv):
  cli.define_config(argv)
  cli.define("string", "workdir", None, "run folder (default runs/<objective>); resumes if present")
  cli.define("bool", "allow_config_change", False,
             "resume although config fields changed since the checkpoints were written "
             "(each change is logged, config.json rewritten)")
  cli.define("string", "coordinator_address", None, "multi-process: host:port of process 0")
  cli.define("integer", "num_processes", None, "multi-process: number of processes")
  cli.define("integer", "process_id", None, "multi-process: this process's index")


def cli_main(argv=None):
  """`python -m dft_jax.train ARGS`: a bad flag, config file or config field is one line (exit 2),
  as is every UserInputError of the run."""
  import sys  # pylint: disable=g-import-not-at-top
  cli.prepare_process()
  ckpt.quiet_failure_reports()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc="\n\n".join(__doc__.split("\n\n")[:2]))  # summary and usage


if __name__ == "__main__":
  cli_main()
