"""The study's statistics: a two-way bootstrap over data seeds and items, forgetting at matched
in-domain gain, and Holm's correction for the comparisons a reading makes.

Bootstrap (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13): a resample draws
the S data seeds with replacement and, for every item set (test problems, general prompts,
factual questions), its N items with replacement; the same draw serves every arm, rate and step,
so differences between arms are paired by seed and by item. `Resamples` holds B draws as counts
(how often each seed / item was drawn) with draw 0 the data as they are (every count 1): every
statistic is computed once over [B + 1] draws, entry 0 its point estimate.

Matched gain (the comparison of "RL's Razor", arXiv 2509.04259: forgetting at equal task
performance). A run's trajectory is its (in-domain gain, measure) at the evaluation steps,
starting from the base model (gain 0). At a target gain g the run's measure is interpolated
linearly at the trajectory's first crossing of g; an arm's value is the best over its learning
rates (`frontier_at`), NaN where no rate reaches g. Every arm has the same grid of rates, so the
best-of-rates selection favours none; the bootstrap repeats it in every draw.

Holm (Holm 1979, "A simple sequentially rejective multiple test procedure"): m comparisons with
two-sided bootstrap p-values sorted p_(1) <= ... <= p_(m); the k-th is significant at family-wise
level alpha if p_(j) <= alpha / (m - j + 1) for every j <= k. Its interval is shown at confidence
1 - alpha / (m - k + 1), the level it is tested at (`holm`).
"""
import dataclasses

import numpy as np

NUM_RESAMPLES = 4000


@dataclasses.dataclass
class Resamples:
  """B bootstrap draws (plus draw 0, the data) of S seeds and of the items of named sets."""
  seeds: np.ndarray   # [B + 1, S] counts
  items: dict         # set name -> [B + 1, N] counts

  @classmethod
  def draw(cls, num_seeds, set_sizes, num_resamples=NUM_RESAMPLES, seed=0):
    rng = np.random.default_rng(seed)

    def counts(n):
      drawn = rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples)
      return np.concatenate([np.ones((1, n), np.int64), drawn])

    return cls(counts(num_seeds), {name: counts(n) for name, n in sorted(set_sizes.items())})

  def mean(self, values, item_set=None):
    """values [..., S, N] (or [..., S] for one number per run) -> [B + 1, ...]: the mean over the
    drawn seeds and items of each draw."""
    values = np.asarray(values, np.float64)
    s = self.seeds.shape[1]
    if item_set is None:
      return np.einsum("bs,...s->b...", self.seeds, values, optimize=True) / s
    items = self.items[item_set]
    return np.einsum("bs,...sn,bn->b...", self.seeds, values, items, optimize=True) / (
        s * items.shape[1])

  def ratio(self, numerators, denominators, item_set):
    """sum / sum over the drawn seeds and items: a token-weighted mean from per-item sums and
    token counts."""
    return self.mean(numerators, item_set) / self.mean(denominators, item_set)


def interval(draws, confidence=0.95):
  """(point, low, high): draw 0 and the percentile interval of the others (NaN draws left out:
  a target gain some draws do not reach); NaNs where fewer than half the draws are defined."""
  draws = np.asarray(draws, np.float64)
  rest = draws[1:][np.isfinite(draws[1:])]
  if not np.isfinite(draws[0]) or rest.size < (draws.size - 1) / 2:
    return (float(draws[0]), float("nan"), float("nan"))
  tail = 50.0 * (1.0 - confidence)
  low, high = np.percentile(rest, [tail, 100.0 - tail])
  return (float(draws[0]), float(low), float(high))


def p_value(draws):
  """Two-sided bootstrap p-value of "the difference is 0": twice the smaller share of defined
  draws on either side of 0 (ties count on both), at most 1; NaN when the point is undefined."""
  draws = np.asarray(draws, np.float64)
  rest = draws[1:][np.isfinite(draws[1:])]
  if not np.isfinite(draws[0]) or rest.size == 0:
    return float("nan")
  return float(min(1.0, 2.0 * min(np.mean(rest <= 0), np.mean(rest >= 0))))


def holm(p_values, alpha=0.05):
  """(adjusted p-values, confidence levels, significant) of m comparisons: Holm's step-down
  adjustment p~_(k) = max_{j<=k} min(1, (m - j + 1) p_(j)), the level 1 - alpha / (m - k + 1)
  each is tested at, and whether it is significant. NaN p-values (nothing to compare) are left out
  of m and stay NaN / not significant."""
  p = np.asarray(p_values, np.float64)
  defined = np.flatnonzero(np.isfinite(p))
  m = defined.size
  adjusted = np.full(p.shape, np.nan)
  levels = np.full(p.shape, 1.0 - alpha)
  order = defined[np.argsort(p[defined], kind="stable")]
  running = 0.0
  for k, i in enumerate(order):
    running = max(running, min(1.0, (m - k) * p[i]))
    adjusted[i] = running
    levels[i] = 1.0 - alpha / (m - k)
  return adjusted, levels, np.isfinite(adjusted) & (adjusted <= alpha)


def first_crossing(gains, values, target):
  """values [..., T] interpolated linearly where gains [..., T] first reach `target`; NaN where
  they never do. The trajectories start at step 0 (the base: gain 0), so a target <= 0 is met at
  once."""
  gains, values = np.asarray(gains, np.float64), np.asarray(values, np.float64)
  reached = gains >= target
  first = np.argmax(reached, axis=-1)
  ever = reached.any(axis=-1)
  before = np.maximum(first - 1, 0)
  take = lambda a, i: np.take_along_axis(a, i[..., None], axis=-1)[..., 0]  # noqa: E731
  g0, g1 = take(gains, before), take(gains, first)
  v0, v1 = take(values, before), take(values, first)
  with np.errstate(divide="ignore", invalid="ignore"):
    w = np.where(g1 > g0, (target - g0) / (g1 - g0), 1.0)
  w = np.where(first == 0, 1.0, np.clip(w, 0.0, 1.0))
  return np.where(ever, v0 + w * (v1 - v0), np.nan)


def frontier_at(gains, values, target, better="min"):
  """An arm's best value over its learning rates at matched gain: gains, values [..., L, T] (L
  rates, T steps) -> [...], the min (better="min": forgetting) or max ("max": what should stay
  high) of first_crossing over the rates that reach the target, NaN if none does. Also the index
  of the rate that attains it (-1 where none)."""
  at = first_crossing(gains, values, target)
  filled = np.where(np.isfinite(at), at, np.inf if better == "min" else -np.inf)
  best = (np.argmin if better == "min" else np.argmax)(filled, axis=-1)
  value = np.take_along_axis(at, best[..., None], axis=-1)[..., 0]
  return value, np.where(np.isfinite(value), best, -1)
