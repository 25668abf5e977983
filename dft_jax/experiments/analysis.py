"""The study's numbers from its result files: per-rate comparisons, forgetting at matched gain,
each arm at its best validation rate, and the verdicts on the seed's claims (stats.py has the
bootstrap, the matched-gain interpolation and Holm's correction; report.py writes them).

A regime's results: the base model's evaluation and, per arm, the members (rate, seed) of its
population with their evaluations at the steps of study.eval_every. Every arm has the same members
and steps. Per arm and measure the values are arranged [rates L, steps T + 1, seeds S, items N],
step 0 being the base model; `Measures` resamples them into draws [B + 1, L, T + 1].

Measures (the study's one definition of each):
  gain           in-domain greedy accuracy minus the base's (per problem)
  ood_<set>      accuracy gain on an out-of-distribution set (per problem)
  kl             KL(base || model) on the base's replies to general prompts, token-weighted:
                 the sum over every reply token over the number of tokens (per-prompt sums and
                 counts, resampled by prompt)
  factual        factual-QA accuracy minus the base's (per question)
  perplexity     held-out prose perplexity, % change from the base (per run)
  entropy        entropy on the general prompts minus the base's (per run)
"""
import dataclasses

import numpy as np

from dft_jax.experiments import stats

REFERENCE = "sft"
# measure -> (what better means at matched gain: "min" or "max", label, format)
MEASURES = {
    "kl": ("min", "KL(base‖model), general", "{:.3f}"),
    "factual": ("max", "factual QA change", "{:+.3f}"),
    "perplexity": ("min", "held-out ppl change %", "{:+.1f}"),
    "entropy": ("max", "entropy change, general", "{:+.3f}"),
}
# The seed's claims (SFT under the scanner): (id, arm, measure(s), direction vs SFT, statement)
CLAIMS = (
    ("C1", "dft", ("factual", "perplexity"), "SFT forgets more than DFT at the same in-domain gain"),
    ("C1", "psft", ("factual", "perplexity"), "SFT forgets more than PSFT at the same in-domain "
     "gain"),
    ("C2", "dft", ("ood",), "DFT generalizes better out of distribution (at the same in-domain "
     "gain)"),
    ("C3", "psft", ("kl",), "PSFT's trust region limits drift (KL to the base) at equal gain"),
    ("C4", "sft_entropy", ("entropy",), "an entropy bonus limits entropy collapse (at the same "
     "gain)"),
)


def bits_array(text):
  return np.frombuffer(text.encode(), np.uint8) - ord("0")


def item_values(ev, key):
  value = ev[key]
  return bits_array(value) if isinstance(value, str) else np.asarray(value, np.float64)


@dataclasses.dataclass
class Regime:
  """One regime's results as arrays."""
  name: str
  rates: list
  seeds: list
  steps: list            # evaluation steps, 0 (the base) first
  ood: list              # OOD set names
  arms: dict             # label -> {measure source key: [L, T + 1, S, N] or [L, T + 1, S]}
  val: dict              # label -> val_correct [L, S, N]
  update_norm: dict      # label -> mean update norm per run [L, S]
  base: dict             # the base evaluation
  histories: dict        # label -> results["history"] (per member)
  hist: dict             # label -> target-probability histograms at the last step [L, S, bins]

  @property
  def labels(self):
    return list(self.arms)


PER_ITEM = ("in_domain_correct", "factual_correct", "kl_sum_per_prompt", "tokens_per_prompt")
PER_RUN = ("entropy_general", "perplexity_heldout")


def regime_arrays(name, regime):
  """`Regime` of scanner.collect's {"base", "arms"} for one regime (arms with every member)."""
  base = regime["base"]["eval"]
  arms = {a: r for a, r in regime["arms"].items() if r is not None}
  first = next(iter(arms.values()))
  rates = sorted({m["lr"] for m in first["members"]})
  seeds = sorted({m["seed"] for m in first["members"]})
  ood = sorted(k[:-len("_correct")] for k in base if k.startswith("ood_") and k.endswith(
      "_correct"))
  keys = PER_ITEM + tuple(f"{o}_correct" for o in ood) + PER_RUN
  out = dict(arms={}, val={}, update_norm={}, histories={}, hist={})
  for label, r in arms.items():
    if [(m["lr"], m["seed"]) for m in r["members"]] != [(lr, s) for lr in rates for s in seeds]:
      raise ValueError(f"{name}/{label}: its members are not {rates} x {seeds}")
    index = {(m["lr"], m["seed"]): i for i, m in enumerate(r["members"])}

    def grid(values_of):
      return np.stack([np.stack([np.stack([values_of(step, index[lr, s]) for s in seeds])
                                 for step in range(len(r["steps"]) + 1)]) for lr in rates])

    evals = [None] + r["evals"]
    out["arms"][label] = {
        k: grid(lambda step, m, k=k: item_values(base if step == 0 else evals[step][m], k))
        for k in keys}
    out["val"][label] = np.stack([np.stack([item_values(r["evals"][-1][index[lr, s]],
                                                        "val_correct") for s in seeds])
                                  for lr in rates])
    out["update_norm"][label] = np.asarray(
        [[np.mean([h["update_norm"] for h in r["history"][index[lr, s]]]) for s in seeds]
         for lr in rates])
    out["hist"][label] = np.asarray(
        [[r["evals"][-1][index[lr, s]]["target_prob_hist"] for s in seeds] for lr in rates])
    out["histories"][label] = r["history"]
  return Regime(name=name, rates=rates, seeds=seeds, steps=[0] + list(first["steps"]), ood=ood,
                base=base, **out)


class Measures:
  """Every arm's measures as bootstrap draws [B + 1, L, T + 1] (draw 0: the point estimate)."""

  def __init__(self, regime, num_resamples, seed=0):
    self.regime = regime
    values = next(iter(regime.arms.values()))
    sizes = {"in_domain": values["in_domain_correct"].shape[-1],
             "factual": values["factual_correct"].shape[-1],
             "general": values["kl_sum_per_prompt"].shape[-1],
             "val": next(iter(regime.val.values())).shape[-1],
             **{o: values[f"{o}_correct"].shape[-1] for o in regime.ood}}
    self.draws = stats.Resamples.draw(len(regime.seeds), sizes, num_resamples, seed)
    self._cache = {}

  def __call__(self, label, measure):
    """[B + 1, L, T + 1] draws of a measure of an arm (see the module docstring)."""
    if (label, measure) not in self._cache:
      self._cache[label, measure] = self._measure(self.regime.arms[label], measure)
    return self._cache[label, measure]

  def _measure(self, v, measure):
    r = self.draws
    if measure == "gain" or measure.startswith("ood_"):
      key, items = (("in_domain_correct", "in_domain") if measure == "gain"
                    else (f"{measure}_correct", measure))
      acc = r.mean(v[key], items)
      return acc - acc[:, :, :1]
    if measure == "kl":
      return r.ratio(v["kl_sum_per_prompt"], v["tokens_per_prompt"], "general")
    if measure == "factual":
      acc = r.mean(v["factual_correct"], "factual")
      return acc - acc[:, :, :1]
    if measure == "perplexity":
      ppl = r.mean(v["perplexity_heldout"])
      return 100.0 * (ppl / ppl[:, :, :1] - 1.0)
    if measure == "entropy":
      h = r.mean(v["entropy_general"])
      return h - h[:, :, :1]
    raise KeyError(measure)

  def accuracy(self, label, measure="gain"):
    """Accuracy (not gain) draws of the in-domain or an OOD set."""
    key, items = (("in_domain_correct", "in_domain") if measure == "gain"
                  else (f"{measure}_correct", measure))
    return self.draws.mean(self.regime.arms[label][key], items)


@dataclasses.dataclass
class Comparison:
  """One arm against the reference on one measure: its value, the reference's and the paired
  difference (point, low, high at the tested level), with its bootstrap p-value."""
  arm: str
  measure: str
  where: str                   # "rate 1e-4" / "gain 50 %"
  value: tuple
  reference: tuple
  difference: tuple
  p: float
  better: str                  # "min" / "max": which sign of the difference is the arm's good
  level: float = 0.95          # the confidence its interval is shown at (Holm)
  significant: bool = False
  family: str = ""
  draws: np.ndarray = dataclasses.field(default=None, repr=False)

  @property
  def favours_arm(self):
    """The arm does better than the reference (significantly, once Holm has set `significant`)."""
    return self.significant and (self.difference[0] < 0) == (self.better == "min")


def compare(arm, measure, where, mine, theirs, better, confidence):
  diff = mine - theirs
  return Comparison(arm, measure, where, stats.interval(mine, confidence),
                    stats.interval(theirs, confidence), stats.interval(diff, confidence),
                    stats.p_value(diff), better, confidence, draws=diff)


def best_sft_gain(measures):
  """SFT's best in-domain gain over rates and steps (the point estimate)."""
  return float(np.max(measures(REFERENCE, "gain")[0]))


def matched(measures, label, measure, target):
  """[B + 1] draws of the arm's best value of `measure` at in-domain gain `target` (over its
  rates), and the rate index attaining it in draw 0."""
  better = "max" if measure.startswith("ood_") else MEASURES[measure][0]
  value, rate = stats.frontier_at(measures(label, "gain"), measures(label, measure), target,
                                  better)
  return value, int(rate[0])


def matched_comparisons(measures, levels, confidence):
  """Every arm but the reference against it, on every measure (OOD sets included), at each gain
  level (a fraction of SFT's best gain)."""
  best = best_sft_gain(measures)
  out = []
  for level in levels:
    target = level * best
    for measure in [*MEASURES, *measures.regime.ood]:
      theirs, _ = matched(measures, REFERENCE, measure, target)
      for label in measures.regime.labels:
        if label == REFERENCE:
          continue
        mine, _ = matched(measures, label, measure, target)
        better = "max" if measure.startswith("ood_") else MEASURES[measure][0]
        out.append(compare(label, measure, f"gain {level:.0%}", mine, theirs, better,
                           confidence))
  return out


def rate_comparisons(measures, confidence):
  """Every arm but the reference against it at the same rate, at the last step, on in-domain gain,
  the OOD gains and every forgetting measure."""
  out = []
  for i, lr in enumerate(measures.regime.rates):
    for measure in ["gain", *measures.regime.ood, *MEASURES]:
      better = "max" if measure == "gain" or measure.startswith("ood_") else MEASURES[measure][0]
      theirs = measures(REFERENCE, measure)[:, i, -1]
      for label in measures.regime.labels:
        if label != REFERENCE:
          out.append(compare(label, measure, f"rate {lr:g}", measures(label, measure)[:, i, -1],
                             theirs, better, confidence))
  return out


def apply_holm(comparisons, alpha, family):
  """Holm's correction over `comparisons` (one family): each gets its tested confidence level,
  its interval at that level and whether it is significant."""
  _, levels, significant = stats.holm([c.p for c in comparisons], alpha)
  for c, level, sig in zip(comparisons, levels, significant):
    c.level, c.significant, c.family = float(level), bool(sig), family
    c.difference = stats.interval(c.draws, float(level))
  return comparisons


def claim_comparisons(comparisons, ood):
  """The comparisons each claim of CLAIMS rests on: {(claim id, arm): [Comparison]} at matched
  gain."""
  out = {}
  for claim, arm, measures, _ in CLAIMS:
    names = [m for m in measures if m != "ood"] + (list(ood) if "ood" in measures else [])
    out[claim, arm] = [c for c in comparisons if c.arm == arm and c.measure in names]
  return out


def verdict(comparisons):
  """'supported' (some comparison favours the arm beyond Holm's interval, none favours the
  reference), 'contradicted' (the reverse), 'mixed' (both), 'not distinguishable' (neither), or
  'not testable' (the arm never reaches the matched gain)."""
  defined = [c for c in comparisons if np.isfinite(c.p)]
  if not defined:
    return "not testable"
  up = any(c.favours_arm for c in defined)
  down = any(c.significant and not c.favours_arm for c in defined)
  return {(True, False): "supported", (False, True): "contradicted", (True, True): "mixed",
          (False, False): "not distinguishable"}[up, down]


def best_validation_rate(measures, label, confidence):
  """The arm at its best validation rate (the smaller rate on a tie), the choice repeated in every
  bootstrap draw: {rate: share of draws choosing it}, and the test accuracy and KL at the chosen
  rate, with intervals that include the selection."""
  regime = measures.regime
  val = measures.draws.mean(regime.val[label][:, None], "val")[:, :, 0]  # [B + 1, L]
  chosen = np.argmax(val - 1e-9 * np.arange(val.shape[1]), axis=1)     # first of the best
  rows = np.arange(val.shape[0])
  pick = lambda d: d[rows, chosen, -1]  # noqa: E731
  return {"rate": regime.rates[chosen[0]],
          "shares": {regime.rates[i]: float(np.mean(chosen[1:] == i))
                     for i in range(len(regime.rates))},
          "accuracy": stats.interval(pick(measures.accuracy(label)), confidence),
          "kl": stats.interval(pick(measures(label, "kl")), confidence),
          "val_accuracy": stats.interval(val[rows, chosen], confidence)}
