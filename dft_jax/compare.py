"""Runs of the main job side by side: one Markdown page with figures.

  python -m dft_jax.compare RUN_DIR RUN_DIR [...] --out=DIR

Reads each run folder that `python -m dft_jax.train` wrote (config.json, summary.json,
metrics.jsonl, eval.jsonl) and writes DIR/compare.md: the runs; the config fields whose values
differ between them; the final evaluation side by side (each run's evaluation after training, the
base model's before it, every set under what it scored); and DIR/curves.png, one line per run:
training loss, entropy, mean target probability p(y_t) per logged step, and KL(base || model)
at every evaluation (eval/kl_to_base of the forgetting suite, else a kl set of eval.sets). The
page links only the figures it wrote, and says what is missing and why.
"""
import json
import os
import sys

from dft_jax import cli
from dft_jax import files
from dft_jax import metrics as metrics_lib
from dft_jax import reporting
from dft_jax.errors import UserInputError

PAGE, CURVES = "compare.md", "curves.png"
TRAINING_CURVES = (("loss", "training loss (objective's own scale)"),
                   ("entropy", "entropy of the next-token distribution, train"),
                   ("target_prob", "mean p(y_t), train"))
KL_TITLE = "KL(base || model), {what}"
RUN_FIGURES = (("train_seconds", "train seconds", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"))


def read_jsonl(path):
  """The rows of a JSON-lines file ([] when absent); a torn last line is left out."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def load_run(folder):
  """{folder, config, summary, metrics, evals} of a run folder; UserInputError when it is none."""
  config = files.read_json(os.path.join(folder, "config.json"))
  if config is None:
    raise UserInputError(f"{folder}: no config.json; expected a run folder written by "
                         "python -m dft_jax.train")
  return dict(folder=folder, config=config,
              summary=files.read_json(os.path.join(folder, "summary.json")) or {},
              metrics=read_jsonl(os.path.join(folder, metrics_lib.METRICS_FILE)),
              evals=read_jsonl(os.path.join(folder, metrics_lib.EVAL_METRICS_FILE)))


def run_labels(folders):
  """A short unique label per run folder: its name, with its parent's when two names repeat."""
  names = [os.path.basename(os.path.normpath(f)) for f in folders]
  return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(f))), n)
          if names.count(n) > 1 else n for f, n in zip(folders, names)]


def kl_key(runs):
  """The KL-to-base figure the runs' evaluations share: eval/kl_to_base (forgetting suite), else the
  first eval/NAME/kl_to_base of a kl set; None when no run evaluated one."""
  keys = [k for r in runs for row in r["evals"] for k in row if k.endswith("kl_to_base")]
  if "eval/kl_to_base" in keys:
    return "eval/kl_to_base"
  return min(keys, default=None)


def curve_panels(runs, labels):
  """[(title, {label: (steps, values)})] of the curves the runs logged: the training curves from
  metrics.jsonl, then KL to the base from eval.jsonl; a panel no run has is left out."""
  panels = []
  for key, title in TRAINING_CURVES:
    lines = {label: ([row["step"] for row in r["metrics"] if key in row],
                     [row[key] for row in r["metrics"] if key in row])
             for label, r in zip(labels, runs)}
    panels.append((title, {label: xy for label, xy in lines.items() if xy[0]}))
  kl = kl_key(runs)
  if kl is not None:
    what = "general prompts" if kl == "eval/kl_to_base" else f"set {kl.split('/')[1]}"
    lines = {label: ([row["step"] for row in r["evals"] if kl in row],
                     [row[kl] for row in r["evals"] if kl in row])
             for label, r in zip(labels, runs)}
    panels.append((KL_TITLE.format(what=what), {k: v for k, v in lines.items() if v[0]}))
  return [(title, lines) for title, lines in panels if lines]


def final_table(runs, labels):
  """Lines of the final evaluation table: the base model's evaluation before training (the first
  run's of each model), then each run's after training; every suite and set a section
  (evaluate.table_sections), then the runs' training figures."""
  from dft_jax import evaluate  # pylint: disable=g-import-not-at-top
  bases = {}
  for r in runs:
    if r["summary"].get("before"):
      bases.setdefault(r["config"]["model"]["name"], r["summary"]["before"])
  header = [f"base ({name})" if len(bases) > 1 else "base" for name in bases] + labels
  columns = list(bases.values()) + [r["summary"].get("after") or {} for r in runs]
  rows = []
  for title, section in evaluate.table_sections(columns):
    rows.append([f"**{title}**"] + [""] * len(columns))
    rows += [[label] + cells for label, cells in section]
  rows.append(["**training**"] + [""] * len(columns))
  figures = [(f"train_{key}", f"{key} (last step)", "{:.4f}") for key, _ in TRAINING_CURVES]
  for key, label, fmt in figures + list(RUN_FIGURES):
    values = [r["summary"].get(key) for r in runs]
    values = [v.get("last") if isinstance(v, dict) else v for v in values]
    if any(v is not None for v in values):
      rows.append([label] + [""] * len(bases)
                  + ["-" if v is None else fmt.format(v) for v in values])
  return reporting.markdown_table([""] + header, rows)


def markdown(runs, labels, curves_written):
  lines = [f"# {len(runs)} runs side by side", ""]
  rows = [[label, r["folder"], r["config"]["objective"]["name"], r["config"]["model"]["name"],
           r["summary"].get("steps", "not finished")] for label, r in zip(labels, runs)]
  lines += reporting.markdown_table(["run", "folder", "objective", "model", "steps"], rows)
  lines += ["", "## Config differences", ""]
  diffs = reporting.differences({label: r["config"] for label, r in zip(labels, runs)})
  if diffs:
    lines += reporting.markdown_table(["field"] + labels,
                                      [[field] + [json.dumps(v) for v in values]
                                       for field, values in diffs])
  else:
    lines.append("The runs have the same config.")
  lines += ["", "## Final evaluation", ""]
  if any(r["summary"].get("after") or r["summary"].get("before") for r in runs):
    lines += final_table(runs, labels)
  else:
    lines.append("No run has an evaluation in its summary.json (eval.before / eval.after off, or "
                 "the run has not finished).")
  lines += ["", "## Curves", ""]
  if curves_written:
    lines.append(f"![{', '.join(curves_written)}, one line per run]({CURVES})")
    if not any(title.startswith("KL") for title in curves_written):
      lines += ["", "No run evaluated KL to the base (the forgetting suite, or a kl set of "
                "eval.sets), so there is no KL panel."]
  else:
    lines.append(f"No run logged metrics ({metrics_lib.METRICS_FILE} is missing or empty): no "
                 "figure was drawn.")
  return "\n".join(lines) + "\n"


def compare(folders, out_dir):
  """Writes out_dir/compare.md (and curves.png when the runs logged any curve); returns the path
  of the page."""
  runs = [load_run(f) for f in folders]
  labels = run_labels(folders)
  os.makedirs(out_dir, exist_ok=True)
  panels = curve_panels(runs, labels)
  if panels:
    fig = reporting.plot_overlaid(panels, os.path.join(out_dir, CURVES))
    reporting.pyplot().close(fig)
  path = os.path.join(out_dir, PAGE)
  files.write_text(path, markdown(runs, labels, [title for title, _ in panels]))
  return path


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  folders = argv[1:]
  if not folders:
    raise UserInputError("name the run folders to compare: python -m dft_jax.compare RUN_DIR "
                         "RUN_DIR --out=DIR")
  if not flags.FLAGS.out:
    raise UserInputError("--out: the folder to write compare.md and its figures to")
  print(f"report: {os.path.abspath(compare(folders, flags.FLAGS.out))}", flush=True)


def define_flags(argv):
  del argv
  cli.define("string", "out", None, "folder for compare.md and its figures")


def cli_main(argv=None):
  """`python -m dft_jax.compare RUN_DIR... --out=DIR`."""
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc=__doc__)


if __name__ == "__main__":
  cli_main()
