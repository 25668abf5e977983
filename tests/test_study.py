"""The scanner study end to end on the tiny Llama (configs/study.py:gpu,smoke: the GPU code path on
CPU), its arm parsing, config overrides, resume and time budget."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dft_jax import config_files
from dft_jax.errors import ConfigError
from dft_jax.experiments import report, scanner

REPO = pathlib.Path(__file__).parent.parent


def study_config(variant="gpu,smoke"):
  return config_files.load(config_files.STUDY, variant)

ARMS = ("sft=sft", "psft=psft", "dft+kl=dft,kl_coef=0.1,lr=2e-3")


def test_parse_arm():
  assert scanner.parse_arm("sft") == scanner.Arm("sft", {"name": "sft"}, None)
  arm = scanner.parse_arm("p=power,alpha=0.25,lr=1e-4")
  assert arm == scanner.Arm("p", {"name": "power", "alpha": 0.25}, 1e-4)
  assert scanner.parse_arm("e=eaft,entropy=full").objective["entropy"] == "full"
  for bad in ("=sft", "x=", "x=sft,alpha"):
    with pytest.raises(ConfigError, match="--arm"):
      scanner.parse_arm(bad)


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
  with pytest.raises(ConfigError, match="arm 'y'.*objective.power.alpha=-1.0 is out of range"):
    scanner.arm_config(config, scanner.parse_arm("y=power,alpha=-1"), 0)
  with pytest.raises(ConfigError, match="arm 'z': 'alhpa' is neither a hyperparameter of power"):
    scanner.arm_config(config, scanner.parse_arm("z=power,alhpa=0.5"), 0)
  with pytest.raises(ConfigError, match="arm 'w': alpha='big' has the wrong type"):
    scanner.arm_config(config, scanner.parse_arm("w=power,alpha=big"), 0)


def test_every_objective_has_an_arm():
  names = {scanner.parse_arm(spec).objective["name"] for spec in study_config("cpu").study.arms}
  assert names >= {"sft", "dft", "psft", "power", "eaft"}


def test_study_end_to_end(tmp_path):
  """2 seeds x 3 arms through train + evaluation; then --resume adds a third seed only."""
  config = study_config()
  config.study.update(seeds=2, compilation_cache=str(tmp_path / "xla"))
  out = str(tmp_path / "out")
  results = scanner.run_study(config, out, arm_specs=ARMS, log=lambda s: None)

  assert [(r["seed"], r["arm"]) for r in results["runs"]] == [
      (s, a.split("=")[0]) for s in range(2) for a in ARMS]
  for run in results["runs"]:
    assert [h["step"] for h in run["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0 < h["target_prob"] < 1 for h in run["history"])
    assert run["eval"]["kl_to_base"] > 0
    assert sum(run["eval"]["target_prob_hist"]) == sum(results["base"]["target_prob_hist"])
  psft = [r for r in results["runs"] if r["arm"] == "psft"][0]["history"]
  assert all("psft/ratio" in h for h in psft)
  assert results["base"]["kl_to_base"] == 0.0
  # Every arm of a seed trains on the same batches; seeds change the data order.
  tokens = {(r["seed"], r["arm"]): [h["loss_tokens"] for h in r["history"]]
            for r in results["runs"]}
  assert tokens[0, "sft"] == tokens[0, "psft"] == tokens[0, "dft+kl"] != tokens[1, "sft"]
  assert tokens[1, "sft"] == tokens[1, "psft"]

  for name in ("results.json", "results.md", "curves.png", "target_prob_hist.png",
               "gain_vs_forgetting.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  table = open(os.path.join(out, "results.md")).read()
  assert "| base |" in table and "| dft+kl | dft, kl_coef=0.1 | 0.002 | 2 |" in table
  summary = report.summarize(results)
  kl = [r["eval"]["kl_to_base"] for r in results["runs"] if r["arm"] == "sft"]
  assert summary["sft"]["kl_to_base"] == pytest.approx((np.mean(kl), np.std(kl, ddof=1)))

  config.study.seeds = 3
  resumed = scanner.run_study(config, out, arm_specs=ARMS, resume=True, log=lambda s: None)
  assert len(resumed["runs"]) == 9 and resumed["runs"][:6] == json.loads(
      open(os.path.join(out, "results.json")).read())["runs"][:6]
  assert [r["seed"] for r in resumed["runs"][6:]] == [2, 2, 2]
  assert "base_eval_s" not in resumed["timing"]  # the base evaluation was kept, not redone

  config.train.num_steps = 3
  with pytest.raises(ConfigError, match="another config"):
    scanner.run_study(config, out, arm_specs=ARMS, resume=True, log=lambda s: None)


def test_budget_stops_before_a_run(tmp_path):
  config = study_config()
  config.study.update(seeds=1, budget_s=1e-3, compilation_cache="", compile_workers=0)
  config.eval.update(suites="in_domain")
  results = scanner.run_study(config, str(tmp_path), arm_specs=("sft",), log=lambda s: None)
  assert results["runs"] == [] and "time budget" in results["stopped_early"]


def test_best_lr_takes_the_top_score_and_the_smaller_lr_on_a_tie():
  assert scanner.best_lr({1e-5: 0.2, 5e-5: 0.7, 1e-4: 0.5}) == 5e-5
  assert scanner.best_lr({2e-4: 0.5, 5e-5: 0.5, 1e-4: 0.1}) == 5e-5


def test_arm_spec_round_trips():
  for spec in ("sft=sft", "k=dft,kl_coef=0.2,lr=0.0003", "e=eaft,entropy=full"):
    arm = scanner.parse_arm(spec)
    assert scanner.parse_arm(scanner.arm_spec(arm)) == arm


def test_learning_rate_tuning_on_the_validation_set(tmp_path):
  """--tune_lr: each arm without its own lr trains at every grid lr, scored on arith_val; the study
  then runs each arm at its chosen lr and its table shows the choice. Through the command line,
  with its --config overrides."""
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "dft_jax.experiments.scanner", "--config=configs/study.py:gpu,smoke",
       f"--config.study.out={out}", "--config.study.seeds=1", "--tune_lr=1e-3,3e-3",
       "--config.study.compilation_cache=", "--arm=sft", "--arm=fixed=dft,lr=2e-3",
       "--config.eval.suites=in_domain"], cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr[-3000:]
  tuning = json.loads((out / "lr_tuning.json").read_text())
  assert tuning["tune_on"] == "builtin:arith_val" and list(tuning["arms"]) == ["sft"]
  scores = {float(lr): v for lr, v in tuning["arms"]["sft"]["val_accuracy"].items()}
  assert set(scores) == {1e-3, 3e-3} and tuning["arms"]["sft"]["lr"] == scanner.best_lr(scores)
  tuning_runs = json.loads((out / "lr_tuning" / "results.json").read_text())
  assert [r["arm"] for r in tuning_runs["runs"]] == ["sft@0.001", "sft@0.003"]
  assert tuning_runs["study"]["config"]["eval"]["in_domain"] == "builtin:arith_val"
  results = json.loads((out / "results.json").read_text())
  lrs = {a["label"]: a["lr"] for a in results["study"]["arms"]}
  assert lrs == {"sft": tuning["arms"]["sft"]["lr"], "fixed": 2e-3}
  assert results["study"]["config"]["eval"]["in_domain"] == "builtin:arith_test"
  assert "Learning rates chosen by in-domain accuracy on `builtin:arith_val`" in (
      out / "results.md").read_text()
  assert "sft: lr" in result.stdout
