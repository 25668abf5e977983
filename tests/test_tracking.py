"""Following runs: evaluation sets reported under their own names by every writer (JSONL,
TensorBoard, Weights & Biases offline, read back from the files each wrote), and the comparison
report across runs, on three tiny runs of the main job."""
import importlib.util
import json
import pathlib
import struct

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dft_jax import compare, objectives, train
from dft_jax.errors import ConfigError, UserInputError
from test_data import write_jsonl
from test_train import read_jsonl, tiny_config

STEPS, EVERY = 4, 2
EVAL_STEPS = [0, 2, 4]  # before training, every EVERY steps, after
RUNS = {  # label -> (objective, learning rate, updates per snapshot)
    "sft": ("sft", 1e-3, 1), "dft": ("dft", 1e-3, 1), "psft": ("psft", 2e-3, 2)}


def run_config(tmp_path, objective, lr, minibatches):
  """The tiny run with two evaluation sets of the user's own fields: a teacher-forced one and a
  KL one; evaluated before, at step 2 and after."""
  held = write_jsonl(tmp_path / "held.jsonl", [
      {"q": f"What is {a} + {b}?", "a": f"{a} + {b} = {a + b}. #### {a + b}"}
      for a, b in ((2, 3), (4, 5), (7, 1))])
  prose = write_jsonl(tmp_path / "prose.jsonl", [{"body": "The river runs to the sea."},
                                                  {"body": "Bread is baked in an oven."}])
  config = tiny_config(tmp_path, objective__name=objective, train__num_steps=STEPS,
                       train__minibatches=minibatches, train__global_batch_size=16,
                       optimizer__learning_rate=lr)
  config.eval.update(before=True, after=True, every_steps=EVERY, suites="none", progress=False,
                     sets=(f"held={held},kind=forced,prompt_field=q,response_field=a",
                           f"prose={prose},kind=kl,format=text,text_field=body"))
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three finished tiny runs {label: workdir}."""
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for label, (objective, lr, k) in RUNS.items():
    out[label] = root / label
    train.train_and_evaluate(run_config(root, objective, lr, k), str(out[label]))
  return out


@pytest.mark.slow
def test_each_eval_set_is_logged_under_its_name_in_jsonl_and_tensorboard(runs):
  workdir = runs["dft"]
  evals = read_jsonl(workdir / "eval.jsonl")
  assert [r["step"] for r in evals] == EVAL_STEPS
  summary = json.loads((workdir / "summary.json").read_text())
  for name, phase, row in (("held/target_prob", "before", evals[0]),
                           ("prose/kl_to_base", "after", evals[-1])):
    assert row[f"eval/{name}"] == pytest.approx(summary[phase][name])
  assert evals[0]["eval/prose/kl_to_base"] == 0.0 and evals[-1]["eval/prose/kl_to_base"] > 0
  assert sum(evals[-1]["eval/held/target_prob_hist"]["counts"]) > 0
  assert all("loss" in r for r in read_jsonl(workdir / "metrics.jsonl"))  # one row per step
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  acc.Reload()
  for tag in ("eval/held/target_prob", "eval/held/nll", "eval/prose/kl_to_base",
              "eval/prose/entropy", "eval/prose/perplexity"):
    events = acc.Scalars(tag)
    assert [e.step for e in events] == EVAL_STEPS, tag
    assert [e.value for e in events] == pytest.approx([r[tag] for r in evals], rel=1e-6), tag
  hist = acc.Histograms("eval/held/target_prob_hist")[-1].histogram_value
  assert hist.num == sum(evals[-1]["eval/held/target_prob_hist"]["counts"])
  assert "set held: " in summary["after"]["sets"]["held"]


@pytest.mark.slow
def test_compare_report_lists_config_differences_and_draws_every_run(runs, tmp_path):
  folders = [str(runs[label]) for label in RUNS]
  page = pathlib.Path(compare.compare(folders, str(tmp_path / "report"))).read_text()
  differences = page.split("## Config differences")[1].split("## Final evaluation")[0]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in differences.splitlines() if line.startswith("| ") and "---" not in line}
  assert rows["objective.name"] == ['"sft"', '"dft"', '"psft"']
  assert rows["optimizer.learning_rate"] == ["0.001", "0.001", "0.002"]
  assert rows["train.minibatches"] == ["1", "1", "2"]
  assert "train.seq_len" not in rows  # the same in every run
  table = page.split("## Final evaluation")[1].split("## Curves")[0]
  held = next(line for line in table.splitlines() if line.startswith("| target prob"))
  afters = [json.loads((runs[label] / "summary.json").read_text())["after"]["held/target_prob"]
            for label in RUNS]
  assert [c.strip() for c in held.split("|")[3:-1]] == [f"{v:.4f}" for v in afters]
  assert "![" in page and "(curves.png)" in page and (tmp_path / "report" / "curves.png").exists()
  # The curves drawn are each run's logged values, one line per run in every panel.
  loaded = [compare.load_run(f) for f in folders]
  panels = dict(compare.curve_panels(loaded, list(RUNS)))
  assert len(panels) == 4
  for label, run in zip(RUNS, loaded):
    steps, values = panels["mean p(y_t), train"][label]
    assert values == [r["target_prob"] for r in run["metrics"]] and steps == [1, 2, 3, 4]
    kl_steps, kl = panels["KL(base || model), set prose"][label]
    assert kl_steps == EVAL_STEPS and kl == [r["eval/prose/kl_to_base"] for r in run["evals"]]
  fig = compare.reporting.plot_overlaid(list(panels.items()), str(tmp_path / "again.png"))
  assert [len(ax.lines) for ax in fig.axes[:4]] == [3, 3, 3, 3]
  np.testing.assert_allclose(fig.axes[0].lines[2].get_ydata(), panels[
      "training loss (objective's own scale)"]["psft"][1])


def test_compare_refuses_a_folder_that_is_no_run(tmp_path):
  with pytest.raises(UserInputError, match="no config.json; expected a run folder"):
    compare.compare([str(tmp_path)], str(tmp_path / "out"))


def test_compare_links_no_figure_it_did_not_write(tmp_path):
  """Runs that logged no metrics and have no evaluation: the page says so and links nothing."""
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    config = tiny_config(tmp_path, optimizer__learning_rate=1e-3 if name == "a" else 2e-3)
    (tmp_path / name / "config.json").write_text(config.to_json())
  page = pathlib.Path(compare.compare([str(tmp_path / "a"), str(tmp_path / "b")],
                                      str(tmp_path / "out"))).read_text()
  assert "![" not in page and not (tmp_path / "out" / "curves.png").exists()
  assert "no figure was drawn" in page and "| optimizer.learning_rate | 0.001 | 0.002 |" in page


# ----------------------------------------------------------------------------- Weights & Biases

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def test_wandb_without_the_package_is_one_line_naming_the_field(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "wandb" else find_spec(name, *args))
  config = tiny_config(tmp_path)
  config.log.wandb.enabled = True
  with pytest.raises(ConfigError, match=r"^log.wandb.enabled=True needs the wandb package, which "
                     "is not installed: pip install wandb"):
    train.validate_config(config)
  config.log.wandb.update(enabled=True, mode="cloud")
  with pytest.raises(ConfigError, match="log.wandb.mode='cloud': expected one of online, offline"):
    train.validate_config(config)


def wandb_records(path):
  """The protobuf records of a W&B transaction log (run-ID.wandb): a LevelDB-style log of 32 KiB
  blocks after a 7-byte header, each record a 7-byte header (checksum, length, type: 1 full, 2
  first, 3 middle, 4 last) and its bytes."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data, block = pathlib.Path(path).read_bytes(), 32768
  assert data[:4] == b":W&B"
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record
      pending = b""


def history_rows(records):
  """{step: {key: value}} of the logged rows (nested keys joined with '/')."""
  rows = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
      rows.setdefault(items["_step"], {}).update(items)
  return rows


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="the wandb package is not installed (pip install wandb; "
                    "requirements.txt has it)")
def test_wandb_offline_run_holds_the_same_metrics_config_and_histograms(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = run_config(tmp_path, "dft", 1e-3, 1)
  config.log.wandb.update(enabled=True, mode="offline", project="dft_jax_test", name="tiny",
                          tags=("ci,tiny",))
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  logs = list((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
  assert len(logs) == 1
  records = list(wandb_records(logs[0]))
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert run.run_id == (workdir / "wandb_run_id").read_text().strip()
  assert (run.display_name, list(run.tags), run.project) == ("tiny", ["ci", "tiny"], "dft_jax_test")
  logged_config = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert logged_config["objective"]["name"] == "dft" and logged_config["train"]["num_steps"] == STEPS
  assert logged_config["eval"]["sets"] == list(config.eval.sets)
  rows = history_rows(records)
  jsonl = {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl")}
  evals = {r["step"]: r for r in read_jsonl(workdir / "eval.jsonl")}
  assert sorted(rows) == sorted(set(jsonl) | set(evals)) == [0, 1, 2, 3, 4]
  for step, row in jsonl.items():
    for key in ("loss", "target_prob", "entropy", "grad_norm", "learning_rate"):
      assert rows[step][key] == pytest.approx(row[key], rel=1e-6), (step, key)
    hist = rows[step]
    assert hist["hist/target_prob/_type"] == "histogram"
    assert hist["hist/target_prob/values"] == row["hist/target_prob"]["counts"]
    np.testing.assert_allclose(hist["hist/target_prob/bins"], objectives.HIST_EDGES)
  for step, row in evals.items():
    assert rows[step]["eval/held/target_prob"] == pytest.approx(row["eval/held/target_prob"])
    assert rows[step]["eval/prose/kl_to_base"] == pytest.approx(row["eval/prose/kl_to_base"])
