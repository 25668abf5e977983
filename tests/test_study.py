"""The scanner study: arms as config overrides, regimes and their sets, the study folder's
resume rules, and the study end to end on the tiny Llama (configs/study.py:gpu,smoke: the GPU code
path on CPU) over both regimes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dft_jax import config_files
from dft_jax import data
from dft_jax.data import arith
from dft_jax.data import builtin_lookup
from dft_jax.errors import ConfigError
from dft_jax.experiments import scanner

REPO = pathlib.Path(__file__).parent.parent


def study_config(variant="gpu,smoke"):
  return config_files.load(config_files.STUDY, variant)


# ----------------------------------------------------------------------------- arms and regimes


def test_arms_are_overrides_of_the_config():
  config = study_config("gpu")
  c, setting = scanner.arm_config(config, "sft_kl")
  assert (c.objective.name, c.objective.kl_coef, setting.name) == ("sft", 0.1, "sft")
  c, _ = scanner.arm_config(config, "power_0_5")
  assert (c.objective.name, c.objective.power.alpha) == ("power", 0.5)
  assert config.objective.kl_coef == 0.0 and config.objective.name == "sft"  # untouched
  for label in config.study.arms:  # every arm of the file is a valid config
    scanner.arm_config(config, label)
  assert scanner.run_arm_labels(config.study)[:6] == [
      "sft", "sft_kl", "dft", "psft", "sft_entropy", "asft"]


def test_bad_arms_name_the_arm_and_the_field():
  config = study_config("gpu")
  config.study.arms.bad = dict(objective=dict(kl_cof=0.1))
  with pytest.raises(ConfigError, match="study.arms.bad: objective.kl_cof is not a config field"):
    scanner.arm_config(config, "bad")
  config.study.arms.typed = dict(objective=dict(kl_coef="big"))
  with pytest.raises(ConfigError, match="study.arms.typed: objective.kl_coef='big' has the wrong"):
    scanner.arm_config(config, "typed")
  config.study.arms.range = dict(objective=dict(name="power", power=dict(alpha=-1.0)))
  with pytest.raises(ConfigError, match="study.arms.range: .*alpha"):
    scanner.arm_config(config, "range")
  config.study.arms.rate = dict(optimizer=dict(learning_rate=1e-3))
  with pytest.raises(ConfigError, match="study.lr_grid sets for every arm"):
    scanner.arm_config(config, "rate")
  config.study.run_arms = "sft,nope"
  with pytest.raises(ConfigError, match="study.run_arms='sft,nope': expected distinct labels"):
    scanner.run_arm_labels(config.study)


def test_regimes_and_grid():
  config = study_config()
  assert scanner.select_regimes(config.study) == ["model_weak", "model_strong"]
  config.study.regimes = "nope"
  with pytest.raises(ConfigError, match="expected names from study.regime_sets"):
    scanner.select_regimes(config.study)
  c = scanner.regime_config(study_config(), "model_strong")
  assert (c.data.source, c.eval.in_domain) == ("builtin:lookup_hard_train",
                                               "builtin:lookup_hard_test")
  gpu = study_config("gpu").study
  assert scanner.check_grid(gpu) == (3e-5, 1e-4, 3e-4, 1e-3) and gpu.seeds >= 5
  assert scanner.eval_steps(12, 3) == [3, 6, 9, 12] and scanner.eval_steps(10, 4) == [4, 8, 10]
  gpu.lr_grid = (1e-4, -1.0)
  with pytest.raises(ConfigError, match="study.lr_grid"):
    scanner.check_grid(gpu)


def test_the_population_refuses_cudnn_attention():
  model_cfg = study_config("gpu").model
  scanner.check_attention(model_cfg)  # the GPU study's own setting: xla
  model_cfg.attention = "cudnn"
  with pytest.raises(ConfigError, match="model.attention='cudnn' resolves to cudnn"):
    scanner.check_attention(model_cfg)


@pytest.mark.parametrize("regime", ["model_weak", "model_strong"])
def test_ood_sets_are_deterministic_and_disjoint_from_training(regime):
  sets = study_config("gpu").study.regime_sets[regime]
  seen = {}
  for split in ("train", "val", "test"):
    seen[split] = {r["prompt"] for r in data.load_builtin(sets[split])}
  for name, spec in sets.ood.items():
    rows = data.load_builtin(spec)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts) == 300, name
    for split, other in seen.items():
      assert not set(prompts) & other, (name, split)
    assert all(data.is_correct(f"The answer is {r['answer']}.", r["answer"]) for r in rows)
    assert rows == data.load_builtin(spec)  # the same rows every time


def test_ood_generators_never_repeat_an_excluded_problem():
  """The same problem (people, things, counts, question; or kind and numbers) written another way
  is the same problem: the OOD generators exclude the training problems' keys."""
  (train,), keys = builtin_lookup.draw(300, seed=0, people=(2, 3))
  (ood,), ood_keys = builtin_lookup.draw(300, seed=0, people=(2, 3), layout="list", exclude=keys)
  assert ood_keys and not ood_keys & keys
  (again,), _ = builtin_lookup.draw(300, seed=0, people=(2, 3), layout="list")
  assert {r["prompt"] for r in ood} != {r["prompt"] for r in again}  # the exclusion bit
  rows = arith.generate_longer_numbers(200, seed=5)
  taken = frozenset((r["kind"], tuple(r["numbers"])) for r in rows[:100])
  assert not taken & {(r["kind"], tuple(r["numbers"]))
                      for r in arith.generate_longer_numbers(200, seed=5, exclude=taken)}
  assert all(arith.steps_hold(r["response"]) for r in rows)
  assert not arith.steps_hold("3 + 4 = 8") and not arith.steps_hold("3 - 4 = -1")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
  """Both regimes, sft and dft, 2 rates x 2 seeds: a budget that stops before the first arm
  keeps the first regime's base results and --resume adds the rest; the files, their shapes and
  the report; a second run refuses without --resume, finds nothing to do with it, and refuses
  another config."""
  config = study_config()
  config.study.update(compilation_cache=str(tmp_path / "xla"), budget_s=1e-3)
  out = str(tmp_path / "out")
  scanner.run_study(config, out, log=lambda s: None)  # past the budget once loaded: no arm
  assert os.path.exists(scanner.base_path(out, "model_weak"))
  assert not os.path.exists(scanner.base_path(out, "model_strong"))
  assert not os.path.exists(os.path.dirname(scanner.arm_path(out, "model_weak", "sft")))
  config.study.budget_s = 0.0
  regimes = scanner.run_study(config, out, resume=True, log=lambda s: None)
  for name in ("model_weak", "model_strong"):
    assert list(regimes[name]["arms"]) == ["sft", "dft"]
    base = regimes[name]["base"]["eval"]
    assert base["kl_to_base"] == 0.0 and base["tokens_per_prompt"]
    for label in ("sft", "dft"):
      results = regimes[name]["arms"][label]
      assert [(m["lr"], m["seed"]) for m in results["members"]] == [
          (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
      assert results["steps"] == [1, 2] and len(results["evals"]) == 2
      for step_evals in results["evals"]:
        assert len(step_evals) == 4
        for ev in step_evals:
          assert ev["kl_to_base"] > 0 and len(ev["in_domain_correct"]) == 8
          assert set(k for k in ev if k.startswith("ood_") and k.endswith("_correct")) == {
              f"ood_{k}_correct" for k in config.study.regime_sets[name].ood}
      assert "val_correct" in results["evals"][-1][0] and "val_correct" not in (
          results["evals"][0][0])
      rows = results["history"]
      assert [len(r) for r in rows] == [2] * 4 and all(h["update_norm"] > 0 for r in rows
                                                       for h in r)
      assert rows[2][0]["learning_rate"] == pytest.approx(3 * rows[0][0]["learning_rate"])
    assert os.path.getsize(os.path.join(out, name, "frontier.png")) > 0
  page = open(os.path.join(out, "results.md")).read()
  assert "## Verdicts on the seed's claims" in page and "| C1 (dft)" in page
  assert json.load(open(os.path.join(out, "summary.json")))["families"]["claims"] > 0

  with pytest.raises(ConfigError, match="--resume keeps them"):
    scanner.run_study(config, out, log=lambda s: None)
  kept = {p: open(p).read() for p in scanner.existing_results(out)}
  scanner.run_study(config, out, resume=True, log=lambda s: None)
  assert {p: open(p).read() for p in scanner.existing_results(out)} == kept
  config.train.num_steps = 3
  with pytest.raises(ConfigError, match="another config"):
    scanner.run_study(config, out, resume=True, log=lambda s: None)


@pytest.mark.slow
def test_command_line_refuses_a_bad_config_and_replots(tmp_path):
  run = lambda *flags: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "dft_jax.experiments.scanner", "--config=configs/study.py:gpu,smoke",
       *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  bad = run("--config.study.regimes=nope", f"--config.study.out={tmp_path}")
  assert bad.returncode == 2 and "expected names from study.regime_sets" in bad.stderr
  bad = run("--config.study.run_arms=sft,nope", f"--config.study.out={tmp_path}")
  assert bad.returncode == 2 and "study.run_arms" in bad.stderr
  empty = run(f"--replot={tmp_path}")
  assert empty.returncode == 0 and "no report" in empty.stdout
