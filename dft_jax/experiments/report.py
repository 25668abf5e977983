"""The study's report, from its result files (analysis.py computes, this writes):

  OUT/results.md                  the verdict table on the seed's claims, each regime's prior
                                  strength, then per regime: forgetting at matched gain (primary),
                                  the per-rate tables at the end of training, each arm at its best
                                  validation rate (secondary), update sizes, the generated reading
  OUT/summary.json                the same numbers for machines
  OUT/<regime>/frontier.png       in-domain gain against KL(base‖model): every (rate, step) point
                                  of every arm and each arm's lower envelope (its trade-off frontier)
  OUT/<regime>/curves.png         in-domain accuracy and KL along training, one panel per rate
  OUT/<regime>/target_prob_hist.png  held-out target-token probabilities, base vs each arm

Intervals: two-way bootstrap over data seeds and items (stats.py). Every difference marked as
evidence is Holm-corrected within its family (the claims of the verdict table; the other
matched-gain comparisons; the per-rate comparisons), its interval shown at the level it is tested
at; the number of comparisons in each family is stated.
"""
import os

import numpy as np

from dft_jax import files
from dft_jax import objectives
from dft_jax.experiments import analysis
from dft_jax.experiments import stats

NOT_EVIDENCE = "≈"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


# ----------------------------------------------------------------------------- console lines


def one_line(ev):
  parts = [("acc", "in_domain_accuracy", "{:.3f}"), ("KL", "kl_to_base", "{:.4f}"),
           ("H", "entropy_general", "{:.3f}"), ("fact", "factual_accuracy", "{:.3f}"),
           ("ppl", "perplexity_heldout", "{:.2f}"), ("p", "target_prob_mean", "{:.3f}")]
  parts += [(k[4:-9], k, "{:.3f}") for k in sorted(ev) if k.startswith("ood_")
            and k.endswith("_accuracy")]
  return " ".join(f"{name} {fmt.format(ev[k])}" for name, k, fmt in parts if k in ev)


def population_line(evals, members):
  """The members' mean in-domain accuracy and KL per rate: 'lr 1e-4: acc 0.41 KL 0.12 | ...'."""
  rates = sorted({m.lr for m in members})
  cells = []
  for lr in rates:
    chosen = [e for e, m in zip(evals, members) if m.lr == lr]
    cells.append(f"lr {lr:g}: acc {np.mean([e['in_domain_accuracy'] for e in chosen]):.3f} "
                 f"KL {np.mean([e['kl_to_base'] for e in chosen]):.3f}")
  return " | ".join(cells)


# ----------------------------------------------------------------------------- cells


def cell(interval, fmt):
  point, low, high = interval
  if not np.isfinite(point):
    return "not reached"
  if not (np.isfinite(low) and np.isfinite(high)):
    return fmt.format(point)
  return f"{fmt.format(point)} [{fmt.format(low)}, {fmt.format(high)}]"


def difference_cell(c, fmt):
  """A paired difference with its (Holm-level) interval; NOT_EVIDENCE unless significant."""
  if not np.isfinite(c.difference[0]):
    return "n/a"
  return cell(c.difference, fmt) + ("" if c.significant else f" {NOT_EVIDENCE}")


def fmt_of(measure):
  return "{:+.3f}" if measure == "gain" or measure.startswith("ood_") else (
      analysis.MEASURES[measure][2])


def label_of(measure):
  if measure == "gain":
    return "in-domain gain"
  if measure.startswith("ood_"):
    return f"OOD gain, {measure[4:]}"
  return analysis.MEASURES[measure][1]


# ----------------------------------------------------------------------------- the analysis


def analyse(regimes, study_cfg):
  """{regime: per-regime numbers} with every comparison Holm-corrected in its family."""
  alpha = 1.0 - study_cfg.confidence
  out, claims, others, per_rate = {}, [], [], []
  for name, results in regimes.items():
    if not results["arms"] or analysis.REFERENCE not in results["arms"]:
      continue
    regime = analysis.regime_arrays(name, results)
    measures = analysis.Measures(regime, study_cfg.resamples)
    matched = analysis.matched_comparisons(measures, study_cfg.gain_levels, study_cfg.confidence)
    claimed = analysis.claim_comparisons(matched, regime.ood)
    in_claims = {id(c) for cs in claimed.values() for c in cs}
    claims += [c for c in matched if id(c) in in_claims]
    others += [c for c in matched if id(c) not in in_claims]
    rates = analysis.rate_comparisons(measures, study_cfg.confidence)
    per_rate += rates
    out[name] = dict(regime=regime, measures=measures, matched=matched, claimed=claimed,
                     per_rate=rates, best_gain=analysis.best_sft_gain(measures),
                     best_val={a: analysis.best_validation_rate(measures, a, study_cfg.confidence)
                               for a in regime.labels},
                     speedup=results.get("speedup"), arms=results["arms"], base=results["base"])
  families = {"claims": claims, "matched gain, other arms and measures": others,
              "per learning rate": per_rate}
  for family, comparisons in families.items():
    analysis.apply_holm(comparisons, alpha, family)
  return out, {f: len(c) for f, c in families.items()}


# ----------------------------------------------------------------------------- markdown


def verdict_lines(analysed):
  names = list(analysed)
  lines = ["| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for claim, arm, _, statement in analysis.CLAIMS:
    cells = []
    for name in names:
      comparisons = analysed[name]["claimed"][claim, arm]
      if arm not in analysed[name]["regime"].labels:
        cells.append("not run")
        continue
      shown = sorted((c for c in comparisons if np.isfinite(c.p)), key=lambda c: c.p)[:2]
      evidence = "; ".join(f"{label_of(c.measure)} at {c.where[5:]}: "
                           f"{difference_cell(c, fmt_of(c.measure))}" for c in shown)
      cells.append(f"**{analysis.verdict(comparisons)}**" + (f" ({evidence})" if evidence else
                                                               ""))
    lines.append(f"| {claim} ({arm}): {statement} | " + " | ".join(cells) + " |")
  return lines


def prior_lines(analysed, confidence):
  lines = ["| regime | test set | base accuracy | OOD base accuracy | mean base p(y_t), held-out "
           "targets | p < 0.1 / p > 0.9 |", "|---|---|---|---|---|---|"]
  for name, a in analysed.items():
    m, regime = a["measures"], a["regime"]
    acc = m.accuracy(analysis.REFERENCE)[:, 0, 0]
    ood = ", ".join(f"{o[4:]} {m.accuracy(analysis.REFERENCE, o)[0, 0, 0]:.3f}"
                    for o in regime.ood)
    base = regime.base
    hist = np.asarray(base["target_prob_hist"], np.float64)
    centers = (objectives.HIST_EDGES[:-1] + objectives.HIST_EDGES[1:]) / 2
    shares = (f"{100 * hist[centers < 0.1].sum() / hist.sum():.0f} % / "
              f"{100 * hist[centers > 0.9].sum() / hist.sum():.0f} %")
    lines.append(f"| {name} | {a['base']['sets']['in_domain']} | "
                 f"{cell(stats.interval(acc, confidence), '{:.3f}')} | {ood} | "
                 f"{base['target_prob_mean']:.3f} | {shares} |")
  return lines


def matched_lines(a, levels):
  """Per gain level: each arm's best value of every measure at that in-domain gain."""
  regime, measures = a["regime"], a["measures"]
  ms = [*analysis.MEASURES, *regime.ood]
  by = {(c.arm, c.measure, c.where): c for c in a["matched"]}
  lines = []
  for level in levels:
    where = f"gain {level:.0%}"
    target = level * a["best_gain"]
    lines += ["", f"**At {level:.0%} of SFT's best gain** (in-domain gain {target:+.3f}): each "
              "arm's best value over its rates; arm − sft below it (Holm-level interval, "
              f"{NOT_EVIDENCE}: not significant).", "",
              "| arm | " + " | ".join(label_of(m) for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for label in regime.labels:
      cells = []
      for m in ms:
        value, rate = analysis.matched(measures, label, m, target)
        text = cell((value[0], np.nan, np.nan), fmt_of(m))
        if np.isfinite(value[0]):
          text += f" @{regime.rates[rate]:g}"
        c = by.get((label, m, where))
        if c is not None:
          text += f"<br>{difference_cell(c, fmt_of(m))}"
        cells.append(text)
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def rate_lines(a):
  regime, measures = a["regime"], a["measures"]
  ms = ["gain", *regime.ood, *analysis.MEASURES]
  by = {(c.arm, c.measure, c.where): c for c in a["per_rate"]}
  lines = []
  for i, lr in enumerate(regime.rates):
    where = f"rate {lr:g}"
    lines += ["", f"**Learning rate {lr:g}**, after {regime.steps[-1]} global batches:", "",
              "| arm | " + " | ".join(label_of(m) for m in ms) + " | update norm / sft's |",
              "|---|" + "---|" * (len(ms) + 1)]
    sft_norm = regime.update_norm[analysis.REFERENCE][i].mean()
    for label in regime.labels:
      cells = []
      for m in ms:
        text = cell(stats.interval(measures(label, m)[:, i, -1]), fmt_of(m))
        c = by.get((label, m, where))
        if c is not None:
          text += f"<br>{difference_cell(c, fmt_of(m))}"
        cells.append(text)
      ratio = regime.update_norm[label][i].mean() / sft_norm
      lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
  return lines


def best_val_lines(a):
  lines = ["| arm | chosen rate | share of draws choosing each rate | test accuracy (selection "
           "included) | KL |", "|---|---|---|---|---|"]
  for label, b in a["best_val"].items():
    shares = ", ".join(f"{lr:g}: {s:.0%}" for lr, s in b["shares"].items())
    lines.append(f"| {label} | {b['rate']:g} | {shares} | {cell(b['accuracy'], '{:.3f}')} | "
                 f"{cell(b['kl'], '{:.3f}')} |")
  return lines


def reading_lines(a):
  """The matched-gain comparisons that are significant after Holm, per arm."""
  lines = []
  for label in a["regime"].labels:
    if label == analysis.REFERENCE:
      continue
    found = [c for c in a["matched"] if c.arm == label and c.significant]
    if not found:
      lines.append(f"- {label}: no difference to sft at matched gain survives the correction.")
      continue
    parts = [f"{label_of(c.measure)} at {c.where[5:]} "
             f"{'better' if c.favours_arm else 'worse'} ({difference_cell(c, fmt_of(c.measure))})"
             for c in found]
    lines.append(f"- {label}: " + "; ".join(parts) + ".")
  return lines


def markdown(analysed, counts, study_cfg, command):
  levels = study_cfg.gain_levels
  lines = ["# SFT under the scanner, measured", "",
           f"Generated by `{command}` from the result files beside this page.", "",
           "## Verdicts on the seed's claims", "",
           "Each cell: the verdict at matched in-domain gain (forgetting, OOD gain or entropy of "
           "the arm against sft, each at its best rate, where both reach "
           + ", ".join(f"{x:.0%}" for x in levels) + " of SFT's best gain), Holm-corrected over "
           f"the {counts['claims']} comparisons behind this table; in brackets the one or two "
           "comparisons with the smallest p-values (difference arm − sft, interval at its Holm "
           f"level, {NOT_EVIDENCE}: not significant). *Not testable*: the arm never reaches "
           "the matched gain at any rate.", "", *verdict_lines(analysed), "",
           "## Prior strength of each regime", "", *prior_lines(analysed, study_cfg.confidence)]
  for name, a in analysed.items():
    regime = a["regime"]
    arms = a["arms"]
    first = next(iter(arms.values()))
    lines += ["", f"## {name}", "",
              f"Arms {', '.join(regime.labels)}; each at rates "
              f"{', '.join(f'{r:g}' for r in regime.rates)} x seeds {len(regime.seeds)}, "
              f"evaluated after {', '.join(map(str, regime.steps[1:]))} global batches. Sets: "
              + "; ".join(f"{k}: {v}" for k, v in a["base"]["sets"].items()) + ".",
              "", "### Forgetting at matched gain (primary)", *matched_lines(a, levels), "",
              "### Per learning rate, end of training", "",
              "Differences to sft at the same rate (paired by seed and item), Holm-corrected over "
              f"the {counts['per learning rate']} per-rate comparisons of all regimes.",
              *rate_lines(a), "",
              "### Each arm at its best validation rate (secondary)", "",
              "The rate with the best validation accuracy at the end (the smaller on a tie), "
              "chosen again in every bootstrap draw: the intervals include the choice.", "",
              *best_val_lines(a), "",
              f"### Reading (generated; matched gain, Holm over "
              f"{counts['matched gain, other arms and measures'] + counts['claims']} comparisons "
              "in two families)", "", *reading_lines(a), "",
              f"![{name}: trade-off frontier]({name}/frontier.png)",
              f"![{name}: learning curves]({name}/curves.png)",
              f"![{name}: held-out target probabilities]({name}/target_prob_hist.png)"]
    if a["speedup"]:
      s = a["speedup"]
      lines += ["", f"Speed: {s['members']} runs in one vmapped program trained in "
                f"{s['population_train_s']:.1f} s; one run alone in {s['one_run_train_s']:.1f} s "
                f"({s['speedup']}x faster than one at a time; {s['environment']['device']})."]
    seconds = sum(r["seconds"]["total"] for r in arms.values())
    lines += [f"Time: {seconds:.0f} s for the arms' training and evaluation on "
              f"{first['environment']['device'] or first['environment']['platform']}."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def pareto(points):
  """The lower envelope of (gain, kl) points: for increasing gain, the least KL reaching it."""
  order = sorted(points, key=lambda p: (-p[0], p[1]))
  front, best = [], np.inf
  for gain, kl in order:
    if kl < best:
      front.append((gain, kl))
      best = kl
  return sorted(front)


def frontier_figure(a, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 5))
  for i, label in enumerate(a["regime"].labels):
    gain, kl = a["measures"](label, "gain")[0], a["measures"](label, "kl")[0]
    color = COLORS[i % len(COLORS)]
    ax.scatter(gain.ravel(), kl.ravel(), s=10, color=color, alpha=0.35)
    front = np.asarray(pareto(zip(gain.ravel(), kl.ravel())))
    ax.plot(front[:, 0], front[:, 1], "-o", ms=3, color=color, label=label)
  for level in (0.5, 0.8):
    ax.axvline(level * a["best_gain"], color="#999999", lw=0.8, ls="--")
  ax.set_xlabel("in-domain gain (accuracy − base)")
  ax.set_ylabel("KL(base ‖ model), general prompts")
  ax.set_title(f"{a['regime'].name}: every rate and step; lines: each arm's frontier")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def curves_figure(a, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  regime = a["regime"]
  fig, axes = plt.subplots(2, len(regime.rates), figsize=(3.2 * len(regime.rates), 6),
                           squeeze=False, sharey="row")
  for i, label in enumerate(regime.labels):
    acc, kl = a["measures"].accuracy(label)[0], a["measures"](label, "kl")[0]
    for j, lr in enumerate(regime.rates):
      color = COLORS[i % len(COLORS)]
      axes[0, j].plot(regime.steps, acc[j], "-o", ms=3, color=color, label=label)
      axes[1, j].plot(regime.steps, kl[j], "-o", ms=3, color=color)
      axes[0, j].set_title(f"lr {lr:g}")
      axes[1, j].set_xlabel("global batches")
  axes[0, 0].set_ylabel("in-domain accuracy")
  axes[1, 0].set_ylabel("KL(base ‖ model)")
  axes[0, -1].legend(fontsize=7)
  fig.suptitle(f"{regime.name}: mean over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def hist_figure(a, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  regime = a["regime"]
  centers = (objectives.HIST_EDGES[:-1] + objectives.HIST_EDGES[1:]) / 2
  fig, axes = plt.subplots(1, len(regime.rates), figsize=(3.2 * len(regime.rates), 3.4),
                           squeeze=False, sharey=True)
  base = np.asarray(regime.base["target_prob_hist"], np.float64)
  for j, lr in enumerate(regime.rates):
    ax = axes[0, j]
    ax.plot(centers, base / base.sum(), "k--", label="base")
    for i, label in enumerate(regime.labels):
      h = regime.hist[label][j].sum(0).astype(np.float64)
      ax.plot(centers, h / h.sum(), color=COLORS[i % len(COLORS)], label=label)
    ax.set_yscale("log")
    ax.set_title(f"lr {lr:g}")
    ax.set_xlabel("p(y_t), held-out reference tokens")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- writing


def summary(analysed, counts):
  def comparison(c):
    return {"arm": c.arm, "measure": c.measure, "where": c.where, "value": c.value,
            "reference": c.reference, "difference": c.difference, "p": c.p, "level": c.level,
            "significant": c.significant, "family": c.family}
  return {"families": counts, "regimes": {
      name: {"best_sft_gain": a["best_gain"],
             "verdicts": {f"{claim} {arm}": analysis.verdict(a["claimed"][claim, arm])
                          for claim, arm, _, _ in analysis.CLAIMS},
             "matched": [comparison(c) for c in a["matched"]],
             "per_rate": [comparison(c) for c in a["per_rate"]],
             "best_validation_rate": a["best_val"], "speedup": a["speedup"]}
      for name, a in analysed.items()}}


def write_report(regimes, out_dir, study_cfg, log=print,
                 command="python -m dft_jax.experiments.scanner --config=configs/study.py:gpu"):
  """OUT/results.md, OUT/summary.json and each regime's figures."""
  analysed, counts = analyse(regimes, study_cfg)
  if not analysed:
    log(f"{out_dir}: no regime with an sft arm yet; no report")
    return
  for name, a in analysed.items():
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    frontier_figure(a, os.path.join(folder, "frontier.png"))
    curves_figure(a, os.path.join(folder, "curves.png"))
    hist_figure(a, os.path.join(folder, "target_prob_hist.png"))
  files.write_text(os.path.join(out_dir, "results.md"),
                   markdown(analysed, counts, study_cfg, command))
  files.write_json(os.path.join(out_dir, "summary.json"), summary(analysed, counts))
