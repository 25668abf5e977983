"""The scanner study: its bootstrap intervals against hand cases, arm and regime parsing, the run
plan, and the study end to end on the tiny Llama (configs/study.py:gpu,smoke: the GPU code path on
CPU) over both regimes with learning-rate tuning, resume, budget and the command line."""
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dft_jax import config_files
from dft_jax import objectives
from dft_jax.errors import ConfigError
from dft_jax.experiments import report, scanner

REPO = pathlib.Path(__file__).parent.parent


def study_config(variant="gpu,smoke"):
  return config_files.load(config_files.STUDY, variant)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_one_seed_two_problems():
  """Means of two problems drawn with replacement from [0, 1]: 0, 0.5, 1 with probabilities
  1/4, 1/2, 1/4, so the 95 % interval is [0, 1] and the 40 % one [0.5, 0.5]."""
  assert report.mean_interval([[0.0, 1.0]]) == (0.5, 0.0, 1.0)
  assert report.mean_interval([[0.0, 1.0]], confidence=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_over_seeds_matches_the_enumerated_distribution():
  """Three seeds with one number each (0, 1, 5): the 27 equally likely seed draws, enumerated."""
  sums = sorted(sum(c) for c in itertools.product([0, 1, 5], repeat=3))
  cdf = np.arange(1, 28) / 27
  low, high = sums[np.argmax(cdf >= 0.1)] / 3, sums[np.argmax(cdf >= 0.9)] / 3
  assert (low, high) == (1 / 3, 11 / 3)
  point, b_low, b_high = report.mean_interval([[0.0], [1.0], [5.0]], confidence=0.8,
                                              num_resamples=20000)
  assert (point, b_low, b_high) == pytest.approx((2.0, low, high))


def test_bootstrap_is_paired_by_seed_and_problem():
  """b = a + 0.1 on every (seed, problem): the paired difference is exactly 0.1; resampled apart,
  the two means would give a wide interval."""
  a = np.random.default_rng(0).random((3, 50))
  assert report.paired_difference(a + 0.1, a) == pytest.approx((0.1, 0.1, 0.1))
  _, low, high = report.mean_interval(a)
  assert high - low > 0.1


def test_bootstrap_interval_of_a_proportion_is_the_normal_one():
  """600 of 2000 problems right: 0.3 +- 1.96 sqrt(0.3 * 0.7 / 2000) = 0.3 +- 0.0201."""
  correct = np.zeros((1, 2000))
  correct[0, :600] = 1
  point, low, high = report.mean_interval(correct)
  assert point == 0.3 and (high - low) / 2 == pytest.approx(1.96 * np.sqrt(0.21 / 2000), rel=0.1)


def test_bootstrap_statistic_of_several_matrices():
  gain, kl = np.full((3, 20), 0.5), np.full((3, 7), 0.25)
  assert report.bootstrap(lambda m: m["gain"] / m["kl"], {"gain": gain, "kl": kl}) == (
      pytest.approx((2.0, 2.0, 2.0)))
  with pytest.raises(ValueError, match="numbers of seeds"):
    report.bootstrap(lambda m: m["a"], {"a": np.ones((2, 3)), "b": np.ones((3, 3))})


def test_differences_within_the_interval_are_marked():
  assert report.cell((0.01, -0.02, 0.04), "{:+.2f}", difference=True) == (
      f"+0.01 [-0.02, +0.04] {report.NOT_EVIDENCE}")
  assert report.cell((0.05, 0.01, 0.09), "{:+.2f}", difference=True) == "+0.05 [+0.01, +0.09]"
  summary = {"sft": {}, "a": {"vs_ref/in_domain_accuracy": (0.1, 0.05, 0.15)},
             "b": {"vs_ref/in_domain_accuracy": (-0.01, -0.03, 0.02)},
             "c": {"vs_ref/in_domain_accuracy": (-0.2, -0.3, -0.1)}}
  assert report.reading_lines(summary, "sft")[1] == (
      "- more accurate in-domain: a; less accurate in-domain: c; not distinguishable: b.")


# ----------------------------------------------------------------------------- arms, regimes, plan


def test_parse_arm():
  assert scanner.parse_arm("sft") == scanner.Arm("sft", {"name": "sft"}, None)
  arm = scanner.parse_arm("p=power,alpha=0.25,lr=1e-4")
  assert arm == scanner.Arm("p", {"name": "power", "alpha": 0.25}, 1e-4)
  assert scanner.parse_arm("e=eaft,entropy=full").objective["entropy"] == "full"
  for bad in ("=sft", "x=", "x=sft,alpha"):
    with pytest.raises(ConfigError, match="--arm"):
      scanner.parse_arm(bad)
  with pytest.raises(ConfigError, match="its own label"):
    scanner.select_arms(study_config().study, ["a=sft", "a=dft"])


def test_arm_spec_round_trips():
  for spec in ("sft=sft", "k=dft,kl_coef=0.2,lr=0.0003", "e=eaft,entropy=full"):
    arm = scanner.parse_arm(spec)
    assert scanner.parse_arm(scanner.arm_spec(arm)) == arm


def test_arm_config_sets_objective_lr_and_seed():
  config = study_config()
  c = scanner.arm_config(config, scanner.parse_arm("k=dft,kl_coef=0.2,lr=3e-4"), seed=2)
  assert (c.objective.name, c.objective.kl_coef, c.optimizer.learning_rate, c.train.seed) == (
      "dft", 0.2, 3e-4, 2)
  c = scanner.arm_config(config, scanner.parse_arm("p=psft,eps_high=0.3"), seed=0)
  assert (c.objective.name, c.objective.psft.eps_high) == ("psft", 0.3)
  assert config.objective.kl_coef == 0.0 and config.objective.psft.eps_high == 0.28  # untouched
  with pytest.raises(ConfigError, match="arm 'x': objective 'nope' is unknown"):
    scanner.arm_config(config, scanner.parse_arm("x=nope"), 0)
  with pytest.raises(ConfigError, match="arm 'y'.*objective.power.alpha=-1(\\.0)? is out of range"):
    scanner.arm_config(config, scanner.parse_arm("y=power,alpha=-1"), 0)
  with pytest.raises(ConfigError, match="arm 'z': 'alhpa' is neither a hyperparameter of power"):
    scanner.arm_config(config, scanner.parse_arm("z=power,alhpa=0.5"), 0)
  with pytest.raises(ConfigError, match="arm 'w': alpha='big' has the wrong type"):
    scanner.arm_config(config, scanner.parse_arm("w=power,alpha=big"), 0)


def test_every_objective_has_an_arm():
  """dft_seq (DFT with one weight per sequence) is the one registry record left out of the study."""
  config = study_config("gpu")
  names = {scanner.parse_arm(spec).objective["name"] for spec in config.study.arms}
  assert names == set(objectives.OBJECTIVES) - {"dft_seq"}
  for spec in config.study.arms:
    scanner.arm_config(config, scanner.parse_arm(spec), 0)


def test_regimes():
  study = study_config().study
  assert scanner.select_regimes(study) == ["model_weak", "model_strong"]
  assert scanner.select_regimes(study, ["model_strong"]) == ["model_strong"]
  with pytest.raises(ConfigError, match="expected names from study.regime_sets"):
    scanner.select_regimes(study, ["nope"])
  config = study_config()
  c = scanner.regime_config(config, "model_strong")
  assert (c.data.source, c.eval.in_domain) == ("builtin:lookup_train", "builtin:lookup_test")
  assert config.data.source == "builtin:arith_train"  # untouched
  val = scanner.validation_eval_config(config, "model_weak")
  assert (val.suites, val.in_domain, val.num_examples) == ("in_domain", "builtin:arith_val", 8)


def test_lr_grid():
  assert scanner.parse_lr_grid(()) == ()
  assert scanner.parse_lr_grid(("3e-4", "1e-4", "1e-4")) == (1e-4, 3e-4)
  for bad in (("x",), ("0",), ("-1e-4",)):
    with pytest.raises(ConfigError, match="--tune_lr"):
      scanner.parse_lr_grid(bad)
  assert scanner.best_lr({1e-5: 0.2, 5e-5: 0.7, 1e-4: 0.5}) == 5e-5
  assert scanner.best_lr({2e-4: 0.5, 5e-5: 0.5, 1e-4: 0.1}) == 5e-5


def test_plan_is_seed_major_and_tunes_on_seed_0():
  sft, fixed = scanner.parse_arm("sft"), scanner.parse_arm("f=dft,lr=1e-4")
  tasks = scanner.plan(["w", "s"], [sft, fixed], 2, (1e-4, 3e-4))
  assert [(t.seed, t.regime, t.arm.label, t.tune) for t in tasks] == [
      (0, "w", "sft", True), (0, "w", "f", False), (0, "s", "sft", True), (0, "s", "f", False),
      (1, "w", "sft", False), (1, "w", "f", False), (1, "s", "sft", False), (1, "s", "f", False)]
  assert not any(t.tune for t in scanner.plan(["w"], [sft], 2, ()))
  left = scanner.plan(["w", "s"], [sft, fixed], 2, (1e-4,), done={("w", "sft", 0), ("s", "f", 1)})
  assert len(left) == 6 and ("w", "sft", 0) not in {(t.regime, t.arm.label, t.seed) for t in left}
  # train steps: a tuned arm at every grid lr, or at its chosen lr once tuned; a fixed one once
  lrs = lambda tasks, chosen: [(p.label, p.lr) for p in scanner.programs_needed(  # noqa: E731
      tasks, (1e-4, 3e-4), lambda regime, label: chosen)]
  assert lrs(tasks, None) == [("sft", 1e-4), ("sft", 3e-4), ("f", 1e-4)]
  assert lrs(tasks[4:], 3e-4) == [("sft", 3e-4), ("f", 1e-4)]


# ----------------------------------------------------------------------------- end to end

ARMS = ("sft=sft", "fixed=dft,lr=2e-3")


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
  """Both regimes, two seeds: seed 0 tunes sft over the grid and runs the fixed arm, seed 1 trains
  sft at the chosen lr; --resume then finds nothing to do and keeps everything."""
  config = study_config()
  config.study.update(seeds=2, compilation_cache=str(tmp_path / "xla"))
  out = str(tmp_path / "out")
  regimes = scanner.run_study(config, out, arm_specs=ARMS, log=lambda s: None)
  assert list(regimes) == ["model_weak", "model_strong"]
  for name, results in regimes.items():
    tuning = results["lr_tuning"]
    assert list(tuning["arms"]) == ["sft"] and tuning["grid"] == [1e-3, 3e-3]
    scores = {float(lr): v for lr, v in tuning["arms"]["sft"]["val_accuracy"].items()}
    chosen = tuning["arms"]["sft"]["lr"]
    assert chosen == scanner.best_lr(scores)
    assert tuning["tune_on"] == config.study.regime_sets[name].val
    assert [(r["arm"], r["seed"], r["lr"]) for r in results["runs"]] == [
        ("sft", 0, chosen), ("fixed", 0, 2e-3), ("sft", 1, chosen), ("fixed", 1, 2e-3)]
    for run in results["runs"]:
      assert [h["step"] for h in run["history"]] == [1, 2]
      assert all(np.isfinite(h["loss"]) and 0 < h["target_prob"] < 1 for h in run["history"])
      ev = run["eval"]
      assert ev["kl_to_base"] > 0 and len(ev["kl_per_prompt"]) == 8
      assert len(ev["in_domain_correct"]) == 8 and len(ev["factual_correct"]) == 8
      assert np.mean(ev["in_domain_correct"]) == ev["in_domain_accuracy"]
      assert sum(ev["target_prob_hist"]) == sum(results["base"]["target_prob_hist"])
    assert results["base"]["kl_to_base"] == 0.0
    assert results["study"]["config"]["data"]["source"] == config.study.regime_sets[name].train
    # Every arm of a seed trains on the same batches; seeds change the data order.
    tokens = {(r["arm"], r["seed"]): [h["loss_tokens"] for h in r["history"]]
              for r in results["runs"]}
    assert tokens["sft", 0] == tokens["fixed", 0] != tokens["sft", 1] == tokens["fixed", 1]
    summary = report.summarize(results)
    kl = [r["eval"]["kl_per_prompt"] for r in results["runs"] if r["arm"] == "sft"]
    assert summary["sft"]["kl_to_base"][0] == pytest.approx(np.mean(kl))
    assert summary["fixed"]["seeds"] == 2 and "vs_ref/kl_to_base" in summary["fixed"]
  weak, strong = (regimes[n]["runs"][0]["history"] for n in ("model_weak", "model_strong"))
  assert [h["loss_tokens"] for h in weak] != [h["loss_tokens"] for h in strong]  # its own data

  for name in ("model_weak", "model_strong"):
    for f in ("results.json", "results.md", "curves.png", "target_prob_hist.png",
              "gain_vs_forgetting.png"):
      assert os.path.getsize(os.path.join(out, name, f)) > 0, (name, f)
  overview = open(os.path.join(out, "results.md")).read()
  assert "| model_weak | `builtin:arith_train` |" in overview
  assert "| model_strong | `builtin:lookup_train` |" in overview
  table = open(os.path.join(out, "model_strong", "results.md")).read()
  assert "| fixed | 0.002 | 2 | " in table and "acc − sft" in table
  assert "Learning rates chosen by greedy accuracy on `builtin:lookup_val`" in table

  saved = {n: json.loads(open(os.path.join(out, n, "results.json")).read()) for n in regimes}
  resumed = scanner.run_study(config, out, arm_specs=ARMS, resume=True, log=lambda s: None)
  for name, results in resumed.items():
    assert results["runs"] == saved[name]["runs"]
    assert results["lr_tuning"] == saved[name]["lr_tuning"]
    assert "base_eval_s" not in results["timing"]  # the base evaluation was kept, not redone

  config.train.num_steps = 3
  with pytest.raises(ConfigError, match="another config"):
    scanner.run_study(config, out, arm_specs=ARMS, resume=True, log=lambda s: None)


@pytest.mark.slow
def test_budget_stops_before_a_run(tmp_path):
  config = study_config()
  config.study.update(seeds=1, budget_s=1e-3, compilation_cache="", compile_workers=0)
  config.eval.update(suites="in_domain")
  regimes = scanner.run_study(config, str(tmp_path), arm_specs=("sft",),
                              regime_names=["model_strong"], log=lambda s: None)
  assert regimes["model_strong"]["runs"] == []
  assert "time budget" in regimes["model_strong"]["stopped_early"]


@pytest.mark.slow
def test_command_line_checks_flags_and_replots(tmp_path):
  """Flags reach the config (a bad regime or grid fails before anything loads); --replot rewrites
  the tables of an earlier study from its results.json files."""
  run = lambda *flags: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "dft_jax.experiments.scanner", "--config=configs/study.py:gpu,smoke",
       *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  bad = run("--regime=nope", f"--config.study.out={tmp_path}")
  assert bad.returncode != 0 and "expected names from study.regime_sets" in bad.stderr
  bad = run("--tune_lr=1e-3,fast", f"--config.study.out={tmp_path}")
  assert bad.returncode != 0 and "--tune_lr" in bad.stderr

  results = {"study": {"regime": "model_strong", "model": "m", "arms": [
      {"label": "sft", "objective": {"name": "sft"}, "lr": None}],
                       "config": json.loads(study_config().to_json())},
             "environment": {"platform": "cpu"}, "timing": {"total_s": 1.0},
             "base": {"in_domain_accuracy": 0.0, "in_domain_correct": [0, 0]},
             "runs": [{"arm": "sft", "seed": s, "lr": 1e-3, "history": [{"step": 1, "loss": 1.0}],
                       "eval": {"in_domain_accuracy": 1.0, "in_domain_correct": [1, 1]}}
                      for s in (0, 1)]}
  os.makedirs(tmp_path / "model_strong")
  (tmp_path / "model_strong" / "results.json").write_text(json.dumps(results))
  done = run(f"--replot={tmp_path}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| sft | 0.001 | 2 | 1.000 [1.000, 1.000] | +1.000 [+1.000, +1.000] |" in (
      tmp_path / "model_strong" / "results.md").read_text()
  assert "| model_strong |" in (tmp_path / "results.md").read_text()
