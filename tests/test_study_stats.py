"""The study's statistics against answers known by hand: the two-way bootstrap, Holm's
correction, the matched-gain interpolation, and the whole analysis on a synthetic results table
whose verdicts are known."""
import itertools

import ml_collections
import numpy as np
import pytest

from dft_jax.experiments import analysis
from dft_jax.experiments import report
from dft_jax.experiments import stats


# ----------------------------------------------------------------------------- bootstrap


def test_draw_zero_is_the_data_and_the_rest_resample_seeds_and_items():
  r = stats.Resamples.draw(3, {"x": 50}, num_resamples=500)
  values = np.random.default_rng(0).random((3, 50))
  draws = r.mean(values, "x")
  assert draws[0] == pytest.approx(values.mean())
  assert draws.shape == (501,) and np.std(draws[1:]) > 0
  assert r.mean(values.mean(1))[0] == pytest.approx(values.mean())  # one number per run


def test_bootstrap_of_one_seed_two_items_is_the_enumerated_distribution():
  """Two items [0, 1] drawn with replacement: means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4."""
  r = stats.Resamples.draw(1, {"x": 2}, num_resamples=20000)
  draws = r.mean(np.array([[0.0, 1.0]]), "x")
  shares = [np.mean(draws[1:] == v) for v in (0.0, 0.5, 1.0)]
  assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
  assert stats.interval(draws) == (0.5, 0.0, 1.0)
  assert stats.interval(draws, confidence=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_over_seeds_matches_the_enumerated_distribution():
  """Three seeds with one number each (0, 1, 5): the 27 equally likely seed draws."""
  sums = sorted(sum(c) for c in itertools.product([0, 1, 5], repeat=3))
  cdf = np.arange(1, 28) / 27
  low, high = sums[np.argmax(cdf >= 0.1)] / 3, sums[np.argmax(cdf >= 0.9)] / 3
  r = stats.Resamples.draw(3, {}, num_resamples=20000)
  assert stats.interval(r.mean(np.array([0.0, 1.0, 5.0])), 0.8) == pytest.approx(
      (2.0, low, high))


def test_token_weighted_ratio_resamples_prompts_with_their_token_counts():
  """Per-prompt KL sums 1 and 9 over 1 and 9 tokens: token-weighted 10/10 = 1 -- not the mean of
  the per-prompt means (1 and 1: also 1) -- and sums 0 and 9: 9/10, where prompt means give 1/2."""
  r = stats.Resamples.draw(1, {"p": 2}, num_resamples=100)
  tokens = np.array([[1.0, 9.0]])
  assert r.ratio(np.array([[0.0, 9.0]]), tokens, "p")[0] == pytest.approx(0.9)


def test_p_value_and_interval_of_differences():
  assert stats.p_value(np.r_[0.1, np.full(999, 0.1)]) == 0.0
  assert stats.p_value(np.r_[0.0, np.linspace(-1, 1, 1001)]) == pytest.approx(1.0, abs=0.01)
  assert stats.p_value(np.r_[0.5, np.r_[np.full(975, 0.5), np.full(25, -0.5)]]) == (
      pytest.approx(0.05))
  assert np.isnan(stats.p_value(np.r_[np.nan, np.ones(10)]))
  point, low, high = stats.interval(np.r_[np.nan, np.ones(10)])
  assert np.isnan(point)


def test_holm_on_a_hand_worked_example():
  """p = (0.01, 0.04, 0.03, 0.005), alpha 0.05: sorted 0.005, 0.01, 0.03, 0.04 are tested at
  0.05/4, 0.05/3, 0.05/2, 0.05/1; adjusted 0.02, 0.03, 0.06, 0.06; the first two significant.
  A NaN (nothing to compare) is left out of m."""
  adjusted, levels, significant = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
  np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(levels[:4], [1 - 0.05 / 3, 1 - 0.05, 1 - 0.05 / 2, 1 - 0.05 / 4])
  assert significant.tolist() == [True, False, False, True, False]
  assert np.isnan(adjusted[4])


# ----------------------------------------------------------------------------- matched gain


def test_first_crossing_interpolates_linearly():
  gains = np.array([0.0, 0.2, 0.6, 1.0])
  values = np.array([0.0, 1.0, 3.0, 5.0])
  assert stats.first_crossing(gains, values, 0.4) == pytest.approx(2.0)
  assert stats.first_crossing(gains, values, 1.0) == pytest.approx(5.0)
  assert stats.first_crossing(gains, values, 0.0) == 0.0
  assert np.isnan(stats.first_crossing(gains, values, 1.2))
  # the first crossing, not a later one: gain 0.5 is reached between steps 1 and 2, left, reached
  up_down = np.array([0.0, 1.0, 0.2, 0.8])
  assert stats.first_crossing(up_down, np.array([0.0, 2.0, 9.0, 9.0]), 0.5) == pytest.approx(1.0)


def test_frontier_takes_the_best_rate_that_reaches_the_gain():
  gains = np.array([[0.0, 0.1, 0.2], [0.0, 0.5, 1.0]])     # rate 0 never reaches 0.4
  kl = np.array([[0.0, 0.01, 0.02], [0.0, 1.0, 2.0]])
  value, rate = stats.frontier_at(gains, kl, 0.4)
  assert (value, rate) == (pytest.approx(0.8), 1)
  value, rate = stats.frontier_at(gains, kl, 0.1)
  assert (value, rate) == (pytest.approx(0.01), 0)        # both reach it: the least KL
  value, rate = stats.frontier_at(gains, kl, 2.0)
  assert np.isnan(value) and rate == -1


# ----------------------------------------------------------------------------- a synthetic study

RATES, SEEDS, STEPS = (1e-4, 3e-4), (0, 1, 2), (1, 2, 3)
N, PROMPTS, TOKENS = 200, 20, 10


def correct(accuracy, n=N):
  """n problems, the first round(accuracy * n) right."""
  k = int(round(accuracy * n))
  return "1" * k + "0" * (n - k)


def evaluation(gain, kl_per_gain, factual_per_gain, entropy_per_gain, ood_gain):
  """One evaluation of a run whose in-domain gain over the base (accuracy 0.1) is `gain`."""
  kl = kl_per_gain * gain
  rng = np.random.default_rng(int(1e6 * gain) + 7)
  noise = rng.normal(0, 0.002 * kl, PROMPTS)
  return {"in_domain_correct": correct(0.1 + gain), "ood_x_correct": correct(0.05 + ood_gain),
          "factual_correct": correct(0.6 + factual_per_gain * gain, 50),
          "kl_sum_per_prompt": list(TOKENS * (kl + noise)),
          "tokens_per_prompt": [TOKENS] * PROMPTS,
          "entropy_general": 1.0 + entropy_per_gain * gain,
          "perplexity_heldout": 20.0 * (1 + 0.5 * kl),
          "val_correct": correct(0.1 + gain, 100), "target_prob_hist": [1] * 20}


ARMS = {  # label: (speed, KL per unit gain, factual change per gain, entropy per gain, OOD/gain)
    "sft": (1.0, 2.0, -0.2, -1.0, 0.25),
    "dft": (1.0, 2.0, 0.0, -1.0, 0.25),       # forgets less factual QA at equal gain: C1 supported
    "psft": (0.8, 0.5, -0.2, -1.0, 0.25),     # slower, a quarter of SFT's KL at equal gain (C3),
                                              # so less perplexity growth (C1 on perplexity)
    "sft_entropy": (1.0, 2.0, -0.2, 0.0, 0.25),  # keeps its entropy: C4 supported
}


def synthetic_regime():
  base = evaluation(0.0, 0, 0, 0, 0)
  base["target_prob_mean"] = 0.5
  arms = {}
  for label, (speed, kl, factual, entropy, ood) in ARMS.items():
    members = [{"lr": lr, "seed": s} for lr in RATES for s in SEEDS]
    gain = lambda step, lr: speed * step * (0.1 if lr == 1e-4 else 0.2)  # noqa: E731
    evals = [[evaluation(gain(step, m["lr"]), kl, factual, entropy, ood * gain(step, m["lr"]))
              for m in members] for step in STEPS]
    arms[label] = {"members": members, "steps": list(STEPS), "evals": evals,
                   "history": [[{"update_norm": 1.0}] for _ in members]}
  return {"base": {"eval": base, "sets": {"in_domain": "x"}}, "arms": arms, "speedup": None}


def study_cfg():
  return ml_collections.ConfigDict(dict(gain_levels=(0.25, 0.5, 0.8), confidence=0.95,
                                        resamples=1000))


def test_analysis_of_a_synthetic_study_finds_the_known_answers():
  regime = analysis.regime_arrays("weak", synthetic_regime())
  measures = analysis.Measures(regime, 1000)
  # SFT's best gain: 0.2 * 3 = 0.6 at the higher rate; at 50 % (0.3) its KL is 2 * 0.3 = 0.6
  assert analysis.best_sft_gain(measures) == pytest.approx(0.6)
  for label, (_, kl, _, _, _) in ARMS.items():
    value, _ = analysis.matched(measures, label, "kl", 0.3)
    assert value[0] == pytest.approx(kl * 0.3, rel=0.02), label
  value, rate = analysis.matched(measures, "sft", "factual", 0.3)
  assert value[0] == pytest.approx(-0.06, abs=0.021) and regime.rates[rate] in RATES

  analysed, counts = report.analyse({"weak": synthetic_regime()}, study_cfg())
  a = analysed["weak"]
  verdicts = {(claim, arm): analysis.verdict(a["claimed"][claim, arm])
              for claim, arm, _, _ in analysis.CLAIMS}
  assert verdicts == {("C1", "dft"): "supported", ("C1", "psft"): "supported",
                      ("C2", "dft"): "not distinguishable", ("C3", "psft"): "supported",
                      ("C4", "sft_entropy"): "supported"}
  # Holm: the family of the claims holds every claim comparison of the regime
  assert counts["claims"] == sum(len(v) for v in a["claimed"].values())
  kl_psft = [c for c in a["claimed"]["C3", "psft"] if c.where == "gain 50%"][0]
  assert kl_psft.difference[0] == pytest.approx(0.5 * 0.3 - 2 * 0.3, rel=0.02)
  assert kl_psft.significant and kl_psft.level > 0.95


def test_a_perturbed_table_changes_the_verdict():
  """The same study with DFT forgetting more factual QA than SFT: C1 for DFT contradicted."""
  saved = ARMS["dft"]
  try:
    ARMS["dft"] = (1.0, 2.0, -0.5, -1.0, 0.25)
    analysed, _ = report.analyse({"weak": synthetic_regime()}, study_cfg())
    assert analysis.verdict(analysed["weak"]["claimed"]["C1", "dft"]) == "contradicted"
  finally:
    ARMS["dft"] = saved
