"""Tables and figures of the scanner study, from its results dict (OUT/results.json).

  results.md              one row per arm: mean +- standard deviation over seeds, the base first
  curves.png              training loss, mean target probability and entropy per update step
  target_prob_hist.png    held-out target-token probabilities, base vs after (DFT paper's picture)
  gain_vs_forgetting.png  in-domain accuracy gain against KL(base || tuned) and the change in
                          held-out perplexity, one point per arm, error bars over seeds
"""
import os

import numpy as np

from dft_jax import objectives

COLUMNS = (  # (key, header, format)
    ("in_domain_accuracy", "in-domain acc", "{:.3f}"),
    ("in_domain_gain", "gain vs base", "{:+.3f}"),
    ("kl_to_base", "KL(base‖tuned), general", "{:.4f}"),
    ("entropy_general", "entropy, general", "{:.3f}"),
    ("factual_accuracy", "factual QA acc", "{:.3f}"),
    ("perplexity_heldout", "held-out ppl", "{:.2f}"),
    ("target_prob_mean", "held-out p(y_t)", "{:.3f}"),
    ("target_nll", "held-out NLL", "{:.3f}"),
)
CURVES = (("loss", "training loss (objective's own scale)"), ("target_prob", "mean p(y_t), train"),
          ("entropy", "mean entropy H_t, train"))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")


def with_gains(ev, base):
  """The run's metrics plus changes against the base model's."""
  out = dict(ev)
  if "in_domain_accuracy" in ev and "in_domain_accuracy" in base:
    out["in_domain_gain"] = ev["in_domain_accuracy"] - base["in_domain_accuracy"]
  if "perplexity_heldout" in ev and "perplexity_heldout" in base:
    out["perplexity_change_pct"] = 100 * (ev["perplexity_heldout"] / base["perplexity_heldout"] - 1)
  if "factual_accuracy" in ev and "factual_accuracy" in base:
    out["factual_change"] = ev["factual_accuracy"] - base["factual_accuracy"]
  return out


def arm_order(results):
  seen = [a["label"] for a in results["study"]["arms"]]
  return [a for a in seen if any(r["arm"] == a for r in results["runs"])]


def runs_of(results, arm):
  return [r for r in results["runs"] if r["arm"] == arm]


def summarize(results):
  """{arm: {"seeds": n, metric: (mean, std)}}; std over seeds (ddof 1; 0 for one seed)."""
  summary = {}
  for arm in arm_order(results):
    evs = [with_gains(r["eval"], results["base"]) for r in runs_of(results, arm)]
    keys = [k for k, v in evs[0].items() if isinstance(v, (int, float))]
    entry = {"seeds": len(evs)}
    for k in keys:
      values = np.asarray([e[k] for e in evs if k in e], np.float64)
      entry[k] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    summary[arm] = entry
  return summary


def one_line(ev):
  parts = [("acc", "in_domain_accuracy", "{:.3f}"), ("KL", "kl_to_base", "{:.4f}"),
           ("H", "entropy_general", "{:.3f}"), ("fact", "factual_accuracy", "{:.3f}"),
           ("ppl", "perplexity_heldout", "{:.2f}"), ("p", "target_prob_mean", "{:.3f}")]
  return " ".join(f"{name} {fmt.format(ev[k])}" for name, k, fmt in parts if k in ev)


def markdown(results):
  summary = summarize(results)
  cfg, study = results["study"]["config"], results["study"]
  t = cfg["train"]
  columns = [c for c in COLUMNS if c[0] in results["base"] or c[0] == "in_domain_gain"]
  lines = [
      f"Base model `{study['model']}`; {t['num_steps']} global batches of "
      f"{t['global_batch_size']} x {t['seq_len']} tokens, {t['minibatches']} updates each, "
      f"on `{cfg['data']['source']}`; mean ± std over seeds "
      f"({results['environment'].get('device') or results['environment'].get('platform')}, "
      f"{results['timing'].get('total_s', 0):.0f} s in all).", "",
      "| arm | objective | lr | seeds | " + " | ".join(h for _, h, _ in columns) + " |",
      "|---|---|---|---|" + "---|" * len(columns)]
  base_cells = [fmt.format(results["base"][k]) if k in results["base"] else "" for k, _, fmt in
                columns if k != "in_domain_gain"]
  base_cells.insert([c[0] for c in columns].index("in_domain_gain"), "")
  lines.append("| base | — | — | — | " + " | ".join(base_cells) + " |")
  arms = {a["label"]: a for a in study["arms"]}
  for arm, entry in summary.items():
    spec = arms[arm]
    objective = ", ".join(f"{k}={v}" if k != "name" else str(v)
                          for k, v in spec["objective"].items())
    lr = spec["lr"] if spec["lr"] is not None else cfg["optimizer"]["learning_rate"]
    cells = []
    for key, _, fmt in columns:
      if key in entry:
        mean, std = entry[key]
        cells.append(f"{fmt.format(mean)} ± {fmt.format(std).lstrip('+')}")
      else:
        cells.append("")
    lines.append(f"| {arm} | {objective} | {lr:g} | {entry['seeds']} | " + " | ".join(cells) + " |")
  if results.get("lr_tuning"):
    lines += ["", *lr_tuning_lines(results["lr_tuning"])]
  if results.get("stopped_early"):
    lines += ["", f"Stopped early: {results['stopped_early']}."]
  return "\n".join(lines) + "\n"


def lr_tuning_lines(tuning):
  """The learning-rate choice as a markdown table: validation accuracy per lr, the chosen one bold."""
  grid = list(next(iter(tuning["arms"].values()))["val_accuracy"])
  lines = [f"Learning rates chosen by in-domain accuracy on `{tuning['tune_on']}` "
           f"({tuning['num_examples']} problems, seed {tuning['seed']}; the table above is on the "
           "test set):", "", "| arm | " + " | ".join(f"lr {lr}" for lr in grid) + " |",
           "|---|" + "---|" * len(grid)]
  for arm, entry in tuning["arms"].items():
    cells = [(f"**{v:.3f}**" if float(lr) == entry["lr"] else f"{v:.3f}")
             for lr, v in entry["val_accuracy"].items()]
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return lines


# ----------------------------------------------------------------------------- figures


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(results, path):
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.3))
  for i, arm in enumerate(arm_order(results)):
    histories = [r["history"] for r in runs_of(results, arm)]
    steps = np.asarray([h["step"] for h in histories[0]])
    for ax, (key, title) in zip(axes, CURVES):
      values = np.asarray([[h[key] for h in hist] for hist in histories if key in hist[0]])
      if not values.size:
        continue
      mean = values.mean(0)
      ax.plot(steps, mean, color=COLORS[i % len(COLORS)], label=arm, lw=1.4)
      if len(values) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=COLORS[i % len(COLORS)],
                        alpha=0.15, lw=0)
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("global batch", fontsize=8)
  axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  for ax in axes:
    ax.tick_params(labelsize=7)
  fig.suptitle("training curves (line: mean over seeds, band: min-max)", fontsize=9)
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
  cols = min(4, len(arms))
  rows = -(-len(arms) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(arms):]:
    ax.axis("off")
  for i, (ax, arm) in enumerate(zip(axes.flat, arms)):
    after = np.mean([r["eval"]["target_prob_hist"] for r in runs_of(results, arm)], axis=0)
    ax.bar(centers, after / after.sum(), width=width, color=COLORS[i % len(COLORS)], alpha=0.75,
           label="after")
    ax.step(edges, np.append(base / base.sum(), base[-1] / base.sum()), where="post",
            color="black", lw=1.0, label="base")
    ax.set_yscale("log")
    ax.set_title(arm, fontsize=9)
    ax.set_xlabel("p(y_t | y_<t, x)", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel("fraction of held-out response tokens", fontsize=7)
  axes[0][0].legend(fontsize=7)
  fig.suptitle("target-token probabilities on held-out responses, teacher-forced", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_gain_vs_forgetting(results, path):
  summary = summarize(results)
  panels = [(k, label) for k, label in (
      ("kl_to_base", "KL(base ‖ tuned), general prompts  (← forgets less)"),
      ("perplexity_change_pct", "held-out perplexity change, %  (← forgets less)"),
      ("factual_change", "factual QA accuracy change  (forgets less →)"))
            if all(k in e for e in summary.values())]
  if not panels or not all("in_domain_gain" in e for e in summary.values()):
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    for i, (arm, e) in enumerate(summary.items()):
      (x, dx), (y, dy) = e[key], e["in_domain_gain"]
      ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", color=COLORS[i % len(COLORS)], capsize=3,
                  label=f"{arm} (n={e['seeds']})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.locator_params(axis="x", nbins=5)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylabel("in-domain accuracy gain over base", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.suptitle("in-domain gain against forgetting (error bars: std over seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_report(results, out_dir, log=print):
  """results.md and the PNG figures in out_dir (figures skipped, with a note, if no matplotlib)."""
  if not results["runs"]:
    return
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(results))
  try:
    plot_curves(results, os.path.join(out_dir, "curves.png"))
    plot_histograms(results, os.path.join(out_dir, "target_prob_hist.png"))
    plot_gain_vs_forgetting(results, os.path.join(out_dir, "gain_vs_forgetting.png"))
  except Exception as e:  # pylint: disable=broad-except  (figures never stop a study)
    log(f"figures skipped ({type(e).__name__}: {e}); make them later with: "
        f"python -m dft_jax.experiments.scanner --replot {out_dir}")
