"""Every objective of the registry through the same checks: its defaults validate, its config
block survives a JSON round trip (as config.json stores it), and its loss reports the metrics its
record names. (Its loss and gradients through both heads against full logits, for every registered
objective: tests/test_lm_head.py.)"""
import json

import ml_collections
import numpy as np
import pytest

from dft_jax import config_files, lm_head, objectives
from dft_jax import step as step_lib

NAMES = list(objectives.OBJECTIVES)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_validate_and_round_trip(name):
  record = objectives.OBJECTIVES[name]
  block = ml_collections.ConfigDict(objectives.config_block(name))
  setting = objectives.validate(block)
  assert setting.name == name and setting.objective is record
  assert setting.hparams == {k: hp.default for k, hp in record.hparams.items()}
  for field, hp in record.hparams.items():
    assert hp.ok(hp.default), (name, field)
  again = objectives.validate(json.loads(block.to_json()))
  assert again == setting
  sides = {n for stat in setting.stats for n in stat.side if n != "reference"}
  assert setting.needs == set(record.needs) | sides and setting.needs <= set(objectives.NEEDS)
  assert all(isinstance(stat, lm_head.Statistic) for stat in setting.stats)
  assert [s.name for s in setting.stats[:2]] == ["logp", "entropy"]


def test_default_config_holds_the_registry():
  config = config_files.load(config_files.DEFAULT)
  assert config.objective.to_dict() == objectives.config_block("dft")
  for name in NAMES:
    assert config_files.load(config_files.DEFAULT, name).objective.name == name


def make_data(seed=0, b=2, t=9, d=6, v=41):  # v > EAFT's default top-20
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  w = (2.0 * rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
  segment_ids = np.array([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2], np.int32)
  mask = ((segment_ids > 0) & (np.roll(segment_ids, -1, 1) == segment_ids)).astype(np.float32)
  return dict(hidden=hidden, w=w, targets=rng.integers(0, v, (b, t)).astype(np.int32),
              loss_mask=mask, segment_ids=segment_ids,
              ref_hidden=(hidden + 0.4 * rng.normal(size=hidden.shape)).astype(np.float32),
              ref_w=(w + 0.2 * rng.normal(size=w.shape)).astype(np.float32),
              old_logp=(-3.0 + rng.normal(size=(b, t))).astype(np.float32),
              token_key=np.asarray(step_lib.token_keys(seed, 0, (b, t))))


@pytest.mark.parametrize("name", NAMES)
def test_metric_names_are_the_metrics_the_loss_reports(name):
  """objectives.metric_names(setting) lists exactly the scalar metrics of the setting's loss, and
  metric_names() (the study's history keys) holds those of every setting."""
  data = make_data()
  cfg = {"name": name, "entropy_coef": 0.1, "kl_coef": 0.1}
  setting = objectives.validate(cfg)
  stats = lm_head.token_stats_naive(data["hidden"], data["w"], data["targets"],
                                    stats=setting.stats, ref_hidden_BxTxD=data["ref_hidden"],
                                    ref_w_DxV=data["ref_w"],
                                    extra_BxT={"token_key": data["token_key"]})
  stats.update(old_logp=data["old_logp"], ref_logp=data["old_logp"], token_key=data["token_key"])
  _, metrics = objectives.objective_loss(stats, data, setting)
  reported = {k for k in objectives.finalize_metrics(metrics) if not k.startswith("hist/")}
  assert set(objectives.metric_names(setting)) == reported
  assert reported <= set(objectives.metric_names())
  assert f"loss/{'objective'}" in reported and "kl_anchor/k3" in reported
