"""Tables and figures of the scanner study, from its results (OUT/<regime>/results.json).

  OUT/<regime>/results.md   one row per arm: bootstrap intervals over problems and seeds, the
                            difference to the reference arm (the first, sft) with its interval,
                            "≈" where that interval holds 0, and the generated reading
  OUT/<regime>/curves.png   training loss, mean target probability and entropy per global batch
  OUT/<regime>/target_prob_hist.png    held-out target-token probabilities, base vs after
  OUT/<regime>/gain_vs_forgetting.png  in-domain gain against KL(base || tuned) on general prompts,
                            held-out perplexity change and factual QA change, one point per arm
  OUT/results.md            the prior strength of each regime (base accuracy, base target
                            probabilities), then each regime's table

Intervals: two-way percentile bootstrap (Efron & Tibshirani, An Introduction to the Bootstrap,
1993, ch. 13): seeds and items (problems, prompts, questions) are drawn with replacement, the same
seeds for every metric of a run and the same items for the arms compared, so differences between
arms are paired by seed (the same data order) and by problem. A metric with one number per run
(perplexity, entropy) is resampled over seeds alone: with 3 seeds its interval is about the range.
"""
import os

import numpy as np

from dft_jax import objectives

NUM_RESAMPLES = 2000
PER_ITEM = {  # metric -> the per-item list of the same evaluation (evaluate.RunEvaluator)
    "in_domain_accuracy": "in_domain_correct",
    "kl_to_base": "kl_per_prompt",
    "factual_accuracy": "factual_correct",
}
NOT_EVIDENCE = "≈"
CURVES = (("loss", "training loss (objective's own scale)"), ("target_prob", "mean p(y_t), train"),
          ("entropy", "mean entropy H_t, train"))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")
MARKERS = ("o", "s", "^", "D")


# ----------------------------------------------------------------------------- the bootstrap


def bootstrap(statistic, matrices, *, confidence=0.95, num_resamples=NUM_RESAMPLES, seed=0):
  """(point, low, high): statistic(means) and its percentile interval under the two-way bootstrap.

  matrices: {name: values [..., S, N]}: S seeds (the same runs in every matrix) by N items of that
  matrix (problems, prompts); a resample draws S seeds and, per matrix, N items with replacement,
  shared by the matrix's leading entries (two arms on the same problems: a paired difference).
  means[name] = the mean over seeds and items: [...] for the point, [R, ...] over R resamples;
  statistic(means) -> a number per resample (index the leading entries from the back: m[..., 0]).
  """
  arrays = {k: np.asarray(v, np.float64) for k, v in matrices.items()}
  num_seeds = {a.shape[-2] for a in arrays.values()}
  if len(num_seeds) != 1:
    raise ValueError(f"bootstrap: matrices with different numbers of seeds {num_seeds}")
  s = num_seeds.pop()
  rng = np.random.default_rng(seed)
  seed_counts_RxS = rng.multinomial(s, np.full(s, 1.0 / s), size=num_resamples)
  means = {}
  for name, values in arrays.items():
    n = values.shape[-1]
    item_counts_RxN = rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples)
    means[name] = np.einsum("rs,...sn,rn->r...", seed_counts_RxS, values, item_counts_RxN) / (s * n)
  tail = 50.0 * (1.0 - confidence)
  low, high = np.percentile(np.asarray(statistic(means), np.float64), [tail, 100.0 - tail])
  point = statistic({k: a.mean(axis=(-2, -1)) for k, a in arrays.items()})
  return float(point), float(low), float(high)


def mean_interval(values_SxN, **kw):
  """The mean of values [S, N] with its bootstrap interval."""
  return bootstrap(lambda m: m["x"], {"x": values_SxN}, **kw)


def paired_difference(a_SxN, b_SxN, **kw):
  """mean(a) - mean(b) with its interval, a and b paired by seed and item."""
  return bootstrap(lambda m: m["x"][..., 0] - m["x"][..., 1], {"x": np.stack([a_SxN, b_SxN])}, **kw)


def gain_per_unit_kl(means):
  """In-domain gain over KL to the base; NaN (shown as n/a) where the KL is 0: an arm that did not
  move has no gain per unit of drift."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(means["kl"] > 0, means["gain"] / means["kl"], np.nan)


def holds_zero(interval):
  """Whether an interval (point, low, high) contains 0: the difference is not evidence."""
  return interval[1] <= 0.0 <= interval[2]


# ----------------------------------------------------------------------------- runs -> matrices


def arm_order(results):
  seen = [a["label"] for a in results["study"]["arms"]]
  return [a for a in seen if any(r["arm"] == a for r in results["runs"])]


def runs_of(results, arm):
  return sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["seed"])


def item_values(ev, metric):
  """A run's values of `metric` per item (a problem, a prompt), or the one number as [1]."""
  key = PER_ITEM.get(metric)
  return np.asarray(ev[key] if key in ev else [ev[metric]], np.float64)


def matrix(runs, metric, base=None):
  """[S, N]: the runs' (seeds') per-item values of metric, minus the base model's if given."""
  values = np.stack([item_values(r["eval"], metric) for r in runs])
  return values - item_values(base, metric) if base is not None else values


def has(results, metric):
  return metric in results["base"] and all(metric in r["eval"] for r in results["runs"])


def arm_lr(results, arm):
  """The learning rate the arm's runs used (its own, the tuned one or the study's)."""
  runs = runs_of(results, arm)
  if runs and "lr" in runs[0]:
    return runs[0]["lr"]
  spec = next(a for a in results["study"]["arms"] if a["label"] == arm)
  return spec["lr"] if spec["lr"] is not None else results["study"]["config"]["optimizer"][
      "learning_rate"]


def reference_arm(results):
  """The arm every other is compared with: the study's first (sft in configs/study.py)."""
  return arm_order(results)[0]


def common_seed_runs(results, *arms):
  """The runs of each arm restricted to the seeds all of them have (paired comparisons)."""
  seeds = set.intersection(*({r["seed"] for r in runs_of(results, a)} for a in arms))
  return [[r for r in runs_of(results, a) if r["seed"] in seeds] for a in arms]


def arm_statistics(results, arm, confidence):
  """{statistic: (point, low, high)} of one arm; its differences to the reference arm are
  "vs_ref/<metric>"."""
  base, kw = results["base"], dict(confidence=confidence)
  runs = runs_of(results, arm)
  out = {}
  for metric in ("in_domain_accuracy", "kl_to_base", "entropy_general", "factual_accuracy",
                 "perplexity_heldout", "target_prob_mean", "target_nll"):
    if has(results, metric):
      out[metric] = mean_interval(matrix(runs, metric), **kw)
  if has(results, "in_domain_accuracy"):
    out["in_domain_gain"] = mean_interval(matrix(runs, "in_domain_accuracy", base), **kw)
  if has(results, "factual_accuracy"):
    out["factual_change"] = mean_interval(matrix(runs, "factual_accuracy", base), **kw)
  if has(results, "perplexity_heldout"):
    out["perplexity_change_pct"] = mean_interval(
        100 * (matrix(runs, "perplexity_heldout") / base["perplexity_heldout"] - 1), **kw)
  gain_per_kl = has(results, "in_domain_accuracy") and has(results, "kl_to_base")
  if gain_per_kl:
    out["gain_per_kl"] = bootstrap(gain_per_unit_kl, {
        "gain": matrix(runs, "in_domain_accuracy", base), "kl": matrix(runs, "kl_to_base")}, **kw)
  ref = reference_arm(results)
  if arm != ref:
    mine, theirs = common_seed_runs(results, arm, ref)
    for metric in ("in_domain_accuracy", "kl_to_base", "factual_accuracy"):
      if has(results, metric):
        out[f"vs_ref/{metric}"] = paired_difference(matrix(mine, metric), matrix(theirs, metric),
                                                    **kw)
    if gain_per_kl:
      out["vs_ref/gain_per_kl"] = bootstrap(
          lambda m: gain_per_unit_kl(m)[..., 0] - gain_per_unit_kl(m)[..., 1],
          {"gain": np.stack([matrix(r, "in_domain_accuracy", base) for r in (mine, theirs)]),
           "kl": np.stack([matrix(r, "kl_to_base") for r in (mine, theirs)])}, **kw)
  return out


def summarize(results, confidence=0.95):
  """{arm: {"seeds": n, "lr": lr, statistic: (point, low, high)}} for every arm with runs."""
  return {arm: {"seeds": len(runs_of(results, arm)), "lr": arm_lr(results, arm),
                **arm_statistics(results, arm, confidence)} for arm in arm_order(results)}


def prior_strength(results, confidence=0.95):
  """The base model on the regime: in-domain accuracy (interval over problems), mean probability
  and NLL of the held-out target tokens, the shares of those tokens below 0.1 and above 0.9."""
  base = results["base"]
  out = {}
  if "in_domain_accuracy" in base:
    out["accuracy"] = mean_interval(item_values(base, "in_domain_accuracy")[None],
                                    confidence=confidence)
  if "target_prob_hist" in base:
    hist = np.asarray(base["target_prob_hist"], np.float64)
    centers = (objectives.HIST_EDGES[:-1] + objectives.HIST_EDGES[1:]) / 2
    out.update(target_prob_mean=base["target_prob_mean"], target_nll=base["target_nll"],
               share_below_0_1=float(hist[centers < 0.1].sum() / hist.sum()),
               share_above_0_9=float(hist[centers > 0.9].sum() / hist.sum()))
  return out


# ----------------------------------------------------------------------------- tables


def one_line(ev):
  parts = [("acc", "in_domain_accuracy", "{:.3f}"), ("KL", "kl_to_base", "{:.4f}"),
           ("H", "entropy_general", "{:.3f}"), ("fact", "factual_accuracy", "{:.3f}"),
           ("ppl", "perplexity_heldout", "{:.2f}"), ("p", "target_prob_mean", "{:.3f}")]
  return " ".join(f"{name} {fmt.format(ev[k])}" for name, k, fmt in parts if k in ev)


def cell(interval, fmt, difference=False):
  """'0.752 [0.71, 0.79]'; a difference whose interval holds 0 ends with NOT_EVIDENCE; n/a where
  the statistic is undefined (gain / KL at KL 0)."""
  point, low, high = interval
  if np.isnan([point, low, high]).any():
    return "n/a"
  text = f"{fmt.format(point)} [{fmt.format(low)}, {fmt.format(high)}]"
  return f"{text} {NOT_EVIDENCE}" if difference and holds_zero(interval) else text


COLUMNS = (  # (statistic, header, format, is a difference to the reference arm)
    ("in_domain_accuracy", "in-domain acc", "{:.3f}", False),
    ("in_domain_gain", "gain vs base", "{:+.3f}", False),
    ("vs_ref/in_domain_accuracy", "acc − {ref}", "{:+.3f}", True),
    ("kl_to_base", "KL(base‖tuned), general", "{:.3f}", False),
    ("vs_ref/kl_to_base", "KL − {ref}", "{:+.3f}", True),
    ("factual_change", "factual QA change", "{:+.3f}", False),
    ("vs_ref/factual_accuracy", "factual − {ref}", "{:+.3f}", True),
    ("gain_per_kl", "gain / KL", "{:.2f}", False),
    ("vs_ref/gain_per_kl", "gain/KL − {ref}", "{:+.2f}", True),
    ("entropy_general", "entropy, general", "{:.3f}", False),
    ("perplexity_heldout", "held-out ppl", "{:.2f}", False),
    ("target_prob_mean", "held-out p(y_t)", "{:.3f}", False),
)
READING = (  # (statistic, what above the reference means, what below means)
    ("vs_ref/in_domain_accuracy", "more accurate in-domain", "less accurate in-domain"),
    ("vs_ref/kl_to_base", "drifts more from the base (KL)", "drifts less from the base (KL)"),
    ("vs_ref/factual_accuracy", "keeps more factual QA", "keeps less factual QA"),
    ("vs_ref/gain_per_kl", "gains more per unit of KL", "gains less per unit of KL"),
)


def pct(x):
  return f"{100 * x:.0f} %"


def regime_title(results, quote="`"):
  """'model_weak: `builtin:arith_train`' (the regime and its training set)."""
  source = f"{quote}{results['study']['config']['data']['source']}{quote}"
  name = results["study"].get("regime")
  return f"{name}: {source}" if name else source


def prior_line(results, confidence):
  prior = prior_strength(results, confidence)
  parts = []
  if "accuracy" in prior:
    parts.append(f"base greedy accuracy {cell(prior['accuracy'], '{:.3f}')}")
  if "target_prob_mean" in prior:
    parts.append(f"mean base probability of the held-out target tokens "
                 f"{prior['target_prob_mean']:.3f} ({pct(prior['share_below_0_1'])} below 0.1, "
                 f"{pct(prior['share_above_0_9'])} above 0.9)")
  return "; ".join(parts)


def markdown(results, confidence=0.95):
  """The regime's results.md: protocol, prior strength, the arm table, the reading, LR tuning."""
  summary = summarize(results, confidence)
  cfg, study = results["study"]["config"], results["study"]
  t, ref = cfg["train"], reference_arm(results)
  columns = [c for c in COLUMNS if any(c[0] in e for e in summary.values())]
  lines = [
      f"## {regime_title(results)}", "",
      f"Base model `{study['model']}`; {prior_line(results, confidence)}.", "",
      f"Each run: {t['num_steps']} global batches of {t['global_batch_size']} x {t['seq_len']} "
      f"tokens, {t['minibatches']} updates each; evaluated on `{cfg['eval']['in_domain']}` "
      f"({results['environment'].get('device') or results['environment'].get('platform')}, "
      f"{results['timing'].get('total_s', 0):.0f} s for the whole study). Cells: value "
      f"[{confidence:.0%} bootstrap interval over problems and seeds]; columns `… − {ref}` are "
      f"paired differences to {ref}, marked {NOT_EVIDENCE} where the interval holds 0: closer "
      "than the interval is not evidence.", "",
      "| arm | lr | seeds | " + " | ".join(c[1].format(ref=ref) for c in columns) + " |",
      "|---|---|---|" + "---|" * len(columns)]
  base = results["base"]
  base_cells = {"in_domain_accuracy": f"{base.get('in_domain_accuracy', float('nan')):.3f}",
                "kl_to_base": "0", "entropy_general": f"{base.get('entropy_general', 0):.3f}",
                "perplexity_heldout": f"{base.get('perplexity_heldout', 0):.2f}",
                "target_prob_mean": f"{base.get('target_prob_mean', 0):.3f}"}
  lines.append("| base | — | — | " + " | ".join(base_cells.get(c[0], "") for c in columns) + " |")
  for arm, entry in summary.items():
    cells = [cell(entry[key], fmt, difference) if key in entry else ""
             for key, _, fmt, difference in columns]
    lines.append(f"| {arm} | {entry['lr']:g} | {entry['seeds']} | " + " | ".join(cells) + " |")
  lines += ["", *reading_lines(summary, ref)]
  if results.get("lr_tuning", {}).get("arms"):
    lines += ["", *lr_tuning_lines(results["lr_tuning"])]
  if results.get("stopped_early"):
    lines += ["", f"Stopped early: {results['stopped_early']}."]
  return "\n".join(lines) + "\n"


def reading_lines(summary, ref):
  """The reading rule applied: per comparison with the reference arm, the arms beyond the interval
  on either side and those within it (not evidence)."""
  lines = [f"Reading (generated; against {ref}, {NOT_EVIDENCE} = within the interval):"]
  for key, above, below in READING:
    entries = {a: e[key] for a, e in summary.items() if key in e}
    if not entries:
      continue
    up = [a for a, i in entries.items() if i[1] > 0]
    down = [a for a, i in entries.items() if i[2] < 0]
    within = [a for a, i in entries.items() if holds_zero(i)]
    lines.append(f"- {above}: {', '.join(up) or 'none'}; {below}: {', '.join(down) or 'none'}; "
                 f"not distinguishable: {', '.join(within) or 'none'}.")
  return lines


def lr_tuning_lines(tuning):
  """The learning-rate choice as a markdown table: validation accuracy per lr, the chosen bold."""
  grid = [f"{float(lr):g}" for lr in tuning["grid"]]
  lines = [f"Learning rates chosen by greedy accuracy on `{tuning['tune_on']}` "
           f"({tuning['num_examples']} problems, seed {tuning['seed']}; the smaller lr on a tie; "
           "the chosen run is the arm's seed 0 above, evaluated on the test split):", "",
           "| arm | " + " | ".join(f"lr {lr}" for lr in grid) + " |", "|---|" + "---|" * len(grid)]
  for arm, entry in tuning["arms"].items():
    scores = {f"{float(lr):g}": v for lr, v in entry["val_accuracy"].items()}
    cells = [(f"**{scores[lr]:.3f}**" if float(lr) == entry["lr"] else f"{scores[lr]:.3f}")
             for lr in grid]
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return lines


def overview(regime_results, confidence=0.95):
  """OUT/results.md: the prior strength of every regime, then every regime's table."""
  lines = ["# SFT under the scanner: results per regime", "",
           "Prior strength of the base model on each regime (measured by the study: greedy "
           f"accuracy on the test split [{confidence:.0%} interval over problems]; probability of "
           "the held-out reference target tokens, teacher-forced):", "",
           "| regime | train set | base accuracy | mean p(y_t) | p < 0.1 | p > 0.9 | target NLL |",
           "|---|---|---|---|---|---|---|"]
  for name, results in regime_results.items():
    prior = prior_strength(results, confidence)
    acc = cell(prior["accuracy"], "{:.3f}") if "accuracy" in prior else ""
    probs = ([f"{prior['target_prob_mean']:.3f}", pct(prior["share_below_0_1"]),
              pct(prior["share_above_0_9"]), f"{prior['target_nll']:.3f}"]
             if "target_prob_mean" in prior else [""] * 4)
    lines.append(f"| {name} | `{results['study']['config']['data']['source']}` | {acc} | "
                 + " | ".join(probs) + " |")
  for name, results in regime_results.items():
    if results["runs"]:
      lines += ["", markdown(results, confidence).rstrip("\n"), "",
                f"Figures: `{name}/gain_vs_forgetting.png`, `{name}/curves.png`, "
                f"`{name}/target_prob_hist.png`."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _style(i):
  return dict(color=COLORS[i % len(COLORS)], marker=MARKERS[(i // len(COLORS)) % len(MARKERS)])


def plot_curves(results, path):
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.3))
  for i, arm in enumerate(arm_order(results)):
    histories = [r["history"] for r in runs_of(results, arm)]
    steps = np.asarray([h["step"] for h in histories[0]])
    color = _style(i)["color"]
    linestyle = "-" if i < len(COLORS) else "--"
    for ax, (key, title) in zip(axes, CURVES):
      values = np.asarray([[h[key] for h in hist] for hist in histories if key in hist[0]])
      if not values.size:
        continue
      ax.plot(steps, values.mean(0), color=color, ls=linestyle, label=arm, lw=1.4)
      if len(values) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.12, lw=0)
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("global batch", fontsize=8)
  axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  for ax in axes:
    ax.tick_params(labelsize=7)
  fig.suptitle(f"{regime_title(results, quote='')} — training curves (line: mean over seeds, band: "
               "min-max)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_histograms(results, path):
  if "target_prob_hist" not in results["base"]:
    return False
  plt = _pyplot()
  arms = arm_order(results)
  edges = objectives.HIST_EDGES
  centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  base = np.asarray(results["base"]["target_prob_hist"], np.float64)
  cols = min(5, len(arms))
  rows = -(-len(arms) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(arms):]:
    ax.axis("off")
  for i, (ax, arm) in enumerate(zip(axes.flat, arms)):
    after = np.mean([r["eval"]["target_prob_hist"] for r in runs_of(results, arm)], axis=0)
    ax.bar(centers, after / after.sum(), width=width, color=_style(i)["color"], alpha=0.75,
           label="after")
    ax.step(edges, np.append(base / base.sum(), base[-1] / base.sum()), where="post",
            color="black", lw=1.0, label="base")
    ax.set_yscale("log")
    ax.set_title(arm, fontsize=9)
    ax.set_xlabel("p(y_t | y_<t, x)", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel("fraction of held-out response tokens", fontsize=7)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"{regime_title(results, quote='')} — target-token probabilities on held-out "
               "responses, teacher-forced", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_gain_vs_forgetting(results, path, confidence=0.95):
  summary = summarize(results, confidence)
  panels = [(k, label) for k, label in (
      ("kl_to_base", "KL(base ‖ tuned), general prompts  (← forgets less)"),
      ("perplexity_change_pct", "held-out perplexity change, %  (← forgets less)"),
      ("factual_change", "factual QA accuracy change  (forgets less →)"))
            if all(k in e for e in summary.values())]
  if not panels or not all("in_domain_gain" in e for e in summary.values()):
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
  error = lambda i: [[i[0] - i[1]], [i[2] - i[0]]]  # noqa: E731
  for ax, (key, label) in zip(axes[0], panels):
    for i, (arm, e) in enumerate(summary.items()):
      x, y = e[key], e["in_domain_gain"]
      style = _style(i)
      ax.errorbar(x[0], y[0], xerr=error(x), yerr=error(y), fmt=style["marker"],
                  color=style["color"], capsize=2, ms=4, lw=0.9, label=f"{arm} (n={e['seeds']})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.locator_params(axis="x", nbins=5)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylabel("in-domain accuracy gain over base", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.suptitle(f"{regime_title(results, quote='')} — in-domain gain against forgetting (bars: "
               f"{confidence:.0%} bootstrap intervals over problems and seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_report(results, out_dir, *, confidence=0.95, figures=True, log=print):
  """results.md (and with figures the PNGs) in out_dir; figures are skipped, with a note, when
  they fail (e.g. no matplotlib)."""
  if not results["runs"]:
    return
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(results, confidence))
  if not figures:
    return
  try:
    plot_curves(results, os.path.join(out_dir, "curves.png"))
    plot_histograms(results, os.path.join(out_dir, "target_prob_hist.png"))
    plot_gain_vs_forgetting(results, os.path.join(out_dir, "gain_vs_forgetting.png"), confidence)
  except Exception as e:  # pylint: disable=broad-except  (figures never stop a study)
    log(f"figures skipped ({type(e).__name__}: {e}); make them later with: "
        f"python -m dft_jax.experiments.scanner --replot {out_dir}")


def write_overview(regime_results, out_dir, confidence=0.95):
  """OUT/results.md over every regime's results."""
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(overview(regime_results, confidence))
