"""Small helpers for reports in Markdown with figures: tables, overlaid curves, config differences.

  markdown_table(["field", "a", "b"], [["lr", "1e-4", "3e-4"]])  -> lines of a GitHub table
  differences({"a": cfg_a, "b": cfg_b})                           -> [(field, [value per run])]
  fig = plot_overlaid([("loss", {"a": (steps, values), ...}), ...], "curves.png")
"""
from dft_jax import config_files

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
LINESTYLES = ("-", "--", ":", "-.")


def markdown_table(header, rows):
  """Lines of a Markdown table; `|` inside a cell is escaped."""
  cell = lambda value: str(value).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(map(cell, header)) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def differences(configs):
  """[(dotted field, [its value in each config, "-" where absent])] of the fields of the nested
  dicts `configs` ({label: config}) whose values are not all equal, in sorted order."""
  flat = [dict(config_files.flatten(c)) for c in configs.values()]
  fields = sorted(set().union(*flat))
  out = []
  for field in fields:
    values = [f.get(field, "-") for f in flat]
    if any(v != values[0] for v in values[1:]):
      out.append((field, values))
  return out


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def style(i):
  """Line color and style of the i-th run: ten colors, then the same with other line styles."""
  return dict(color=COLORS[i % len(COLORS)], ls=LINESTYLES[(i // len(COLORS)) % len(LINESTYLES)])


def plot_overlaid(panels, path, xlabel="step"):
  """One row of panels, each [(title, {label: (x, y)})] with one line per label in the same style
  across panels, saved to `path`; returns the (open) figure for inspection. Points are marked
  when a line has few of them (an evaluation before and after training)."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  labels = list(dict.fromkeys(label for _, lines in panels for label in lines))
  for ax, (title, lines) in zip(axes[0], panels):
    for label, (x, y) in lines.items():
      ax.plot(x, y, label=label, lw=1.4, marker="o" if len(x) <= 12 else None, ms=3,
              **style(labels.index(label)))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return fig
