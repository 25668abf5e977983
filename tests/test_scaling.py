"""benchmarks/scaling.py: the multi-GPU plan, its efficiency arithmetic, and the whole pipeline
(device probe, one process per case, meshes over jax.devices()[:n], JSON, table) on 8 fake CPU
devices. That sharded steps give the single-device loss and parameters is
tests/test_train.py::test_sharded_equals_single_device; here the smoke records must agree with
each other wherever they saw the same global batch."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import scaling
from dft_jax import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_NS = (1, 8)
RECORD_KEYS = (
    "name", "layout", "n_gpus", "mesh", "batch", "rows_per_gpu", "model", "objective", "seq_len",
    "remat", "xla_flags", "status", "step_time_s", "step_times_s", "tokens_per_step",
    "tokens_per_s", "tokens_per_s_per_gpu", "flops_per_token", "peak_flops", "mfu", "peak_bytes",
    "peak_bytes_per_device", "bytes_limit", "state_bytes_per_device", "state_bytes_total",
    "train_bytes_per_device", "train_bytes_one_gpu", "weak_efficiency", "strong_efficiency",
    "losses", "devices_used", "device", "platform", "device_count", "num_params", "init_s",
    "compile_s", "wall_s", "memory_analysis", "versions")


# ----------------------------------------------------------------------------- the plan


def names(ns):
  return [c["name"] for c in scaling.plan("gpu", ns)]


def test_plan_on_8_gpus_covers_every_layout_and_count():
  cases = scaling.plan("gpu", (1, 2, 4, 8))
  assert len(names((1, 2, 4, 8))) == len(set(names((1, 2, 4, 8))))
  by_name = {c["name"]: c for c in cases}
  for n in (2, 4, 8):
    for layout in ("data", "fsdp") + (("data_fsdp",) if n >= 4 else ()):
      c = by_name[f"1.5b/{layout}/{n}x/b{4 * n}"]  # weak: 4 rows of 4096 per GPU
      assert (c["model"], c["seq_len"], c["objective"]) == ("qwen2.5-1.5b", 4096, "dft")
    assert (f"1.5b/data_fsdp/{n}x/b{4 * n}" in by_name) == (n >= 4)
  assert by_name["1.5b/data_fsdp/8x/b32"]["mesh"] == dict(data=2, fsdp=4, tensor=1)
  assert by_name["1.5b/data_fsdp/4x/b16"]["mesh"] == dict(data=2, fsdp=2, tensor=1)
  for n in (1, 4, 8):  # strong: 8 rows whatever n; fsdp at n=2 is the weak case itself
    assert f"1.5b/{'single' if n == 1 else 'fsdp'}/{n}x/b8" in by_name
  order = names((1, 2, 4, 8))
  assert order[:3] == ["1.5b/single/1x/b4", "1.5b/data_fsdp/8x/b32", "7b/fsdp/8x/b32"]
  assert order[-1] == "7b/single/1x/b4"
  assert by_name["1.5b/data_fsdp/8x/b32/overlap"]["xla_flags"] == scaling.OVERLAP_FLAGS
  assert by_name["7b/fsdp/8x/b32"]["remat"] == "nothing_saveable"
  for c in cases:  # every mesh is what dft_jax's own config checks accept for n devices
    assert math.prod(c["mesh"].values()) == c["n_gpus"]
    config = scaling.bench.bench_config(c)
    config.mesh.update(c["mesh"])
    step_lib.validate(config, c["n_gpus"])


def test_plan_on_fewer_gpus():
  assert names((1, 2)) == ["1.5b/single/1x/b4", "1.5b/data/2x/b8", "1.5b/fsdp/2x/b8",
                           "7b/fsdp/2x/b8", "1.5b/single/1x/b8", "1.5b/fsdp/2x/b8/overlap",
                           "7b/single/1x/b4"]
  assert names((1,)) == ["1.5b/single/1x/b4", "7b/single/1x/b4"]
  assert names((2,)) == names((1, 2))  # the 1-GPU base always runs
  assert scaling.skip_reason(scaling.case("gpu", "fsdp", 4, 16), 2) == (
      "needs 4 devices, this machine has 2")
  assert scaling.skip_reason(scaling.case("gpu", "fsdp", 2, 8), 2) is None


def record(name, layout, n, batch, tps_per_gpu, model="qwen2.5-1.5b", xla_flags="", status="ok"):
  return dict(name=name, layout=layout, n_gpus=n, batch=batch, rows_per_gpu=batch // n,
              model=model, objective="dft", seq_len=4096, remat="dots_attention_saveable",
              xla_flags=xla_flags, status=status, tokens_per_s_per_gpu=tps_per_gpu,
              tokens_per_s=tps_per_gpu * n)


def test_efficiency_against_the_matching_one_gpu_record():
  records = [
      record("base4", "single", 1, 4, 1000.0),
      record("data2", "data", 2, 8, 960.0),
      record("fsdp2", "fsdp", 2, 8, 940.0),
      record("df8", "data_fsdp", 8, 32, 880.0),
      record("base8", "single", 1, 8, 1200.0),
      record("fsdp8s", "fsdp", 8, 8, 300.0),
      record("df8o", "data_fsdp", 8, 32, 920.0, xla_flags="--x"),
      record("base4o", "single", 1, 4, 5000.0, xla_flags="--x"),  # never a base
      record("big8", "fsdp", 8, 32, 700.0, model="qwen2.5-7b"),
      record("big1", "single", 1, 4, 750.0, model="qwen2.5-7b", status="oom"),
  ]
  scaling.add_efficiency(records)
  r = {x["name"]: x for x in records}
  assert r["data2"]["weak_efficiency"] == pytest.approx(0.96)
  assert r["data2"]["strong_efficiency"] == pytest.approx(960 / 1200)
  assert r["df8"]["weak_efficiency"] == pytest.approx(0.88)
  assert r["df8"]["strong_efficiency"] is None  # no 1-GPU record with 32 rows
  assert r["fsdp8s"]["weak_efficiency"] is None  # 1 row a GPU: no 1-GPU record with 1 row
  assert r["fsdp8s"]["strong_efficiency"] == pytest.approx(300 / 1200)  # speed-up 2 on 8
  assert r["df8o"]["weak_efficiency"] == pytest.approx(0.92)
  assert r["big8"]["weak_efficiency"] is None  # the 7B on one GPU did not run
  assert "weak_efficiency" not in r["big1"]
  s = scaling.summarize(records)
  assert s["weak_efficiency"] == {"data": {"2": 0.96}, "fsdp": {"2": 0.94},
                                  "data_fsdp": {"8": 0.88}, "data_fsdp+overlap": {"8": 0.92}}
  assert s["strong_efficiency"]["fsdp"] == {"2": 940 / 1200, "8": 300 / 1200}
  assert [(t["n_gpus"], t["layout"], t["met"]) for t in s["targets"]] == [
      (2, "data", True), (2, "fsdp", False), (8, "data_fsdp", False)]
  assert [x["name"] for x in s["large"]] == ["big8", "big1"]


# ----------------------------------------------------------------------------- the smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("scaling")
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "benchmarks/scaling.py", "--smoke", f"--out={out}",
       "--ns=" + ",".join(map(str, SMOKE_NS)), "--budget_s=600"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "scaling.json").read_text())
  return result, {r["name"]: r for r in result["records"]}, proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_case_on_its_own_devices(smoke):
  result, records, stdout = smoke
  assert list(records) == [c["name"] for c in scaling.plan("smoke", SMOKE_NS)]
  assert result["machine"]["device_count"] == scaling.SMOKE_DEVICES
  for name, r in records.items():
    assert r["status"] == "ok", (name, r.get("error"))
    for key in RECORD_KEYS:
      assert key in r, (name, key)
    n, rows = r["n_gpus"], r["batch"]
    assert math.prod(r["mesh"].values()) == n and r["rows_per_gpu"] * n == rows
    assert len(set(r["devices_used"])) == n and r["device_count"] == scaling.SMOKE_DEVICES
    assert len(r["step_times_s"]) == r["steps"] == 3 and len(r["losses"]) == 4
    assert r["tokens_per_step"] == rows * r["seq_len"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / n)
    assert r["flops_per_token"] == 6 * r["num_params"] + 12 * 2 * 64 * r["seq_len"]
    assert np.all(np.isfinite(r["losses"])) and r["step_time_s"] > 0
    assert r["mfu"] is None and r["peak_bytes"] is None  # CPU: no peak FLOP/s, no allocator
    # The compiled SPMD step's arguments per device: the state as measured, plus its batch rows.
    batch_bytes = 5 * 4 * r["rows_per_gpu"] * r["seq_len"]
    assert r["state_bytes_per_device"] <= r["memory_analysis"]["argument_bytes"] <= (
        r["state_bytes_per_device"] + batch_bytes)
  assert stdout.splitlines()[-1].startswith("targets: ")
  assert "tok/s/GPU" in stdout


@pytest.mark.slow
def test_smoke_losses_agree_for_the_same_global_batch(smoke):
  _, records, _ = smoke
  by_batch = {}
  for r in records.values():
    by_batch.setdefault((r["model"], r["batch"]), []).append(r)
  same_data = by_batch[("tiny-qwen2", 8)]  # 1 device and data / fsdp / data x fsdp over 8
  assert sorted((r["layout"], r["n_gpus"]) for r in same_data) == [
      ("data", 8), ("data_fsdp", 8), ("fsdp", 8), ("single", 1)]
  for r in same_data:  # the first loss: the forward; the rest: after sharded updates
    np.testing.assert_allclose(r["losses"], same_data[-1]["losses"], rtol=2e-5)


@pytest.mark.slow
def test_smoke_efficiency_and_summary(smoke):
  result, records, _ = smoke
  base1, base8 = records["tiny-qwen2/single/1x/b1"], records["tiny-qwen2/single/1x/b8"]
  for layout in ("data", "fsdp", "data_fsdp"):
    r = records[f"tiny-qwen2/{layout}/8x/b8"]
    assert r["weak_efficiency"] == pytest.approx(r["tokens_per_s_per_gpu"] / base1["tokens_per_s"])
    assert r["strong_efficiency"] == pytest.approx(
        r["tokens_per_s_per_gpu"] / base8["tokens_per_s"])
    assert result["summary"]["weak_efficiency"][layout]["8"] == r["weak_efficiency"]
  target = result["summary"]["targets"][-1]
  assert target["weak_efficiency"] == records["tiny-qwen2/data_fsdp/8x/b8"]["weak_efficiency"]
  large = {x["name"]: x for x in result["summary"]["large"]}
  assert large["tiny-llama/fsdp/8x/b8"]["status"] == "ok"


@pytest.mark.slow
def test_smoke_fsdp_shards_the_parameters(smoke):
  _, records, _ = smoke
  param_bytes = lambda r: r["train_bytes_per_device"] - r["state_bytes_per_device"]
  data, fsdp = records["tiny-qwen2/data/8x/b8"], records["tiny-qwen2/fsdp/8x/b8"]
  assert data["state_bytes_per_device"] == data["state_bytes_total"]
  assert param_bytes(data) == 4 * data["num_params"]
  # Every weight matrix has an "embed" dimension (64 = 8 x 8); norms and biases (576 of 94,784
  # parameters) stay whole.
  assert param_bytes(fsdp) == 4 * ((fsdp["num_params"] - 576) // 8 + 576)


@pytest.mark.slow
def test_smoke_fsdp_shards_the_optimizer_state(smoke):
  _, records, _ = smoke
  fsdp, data_fsdp = records["tiny-qwen2/fsdp/8x/b8"], records["tiny-qwen2/data_fsdp/8x/b8"]
  whole = 12 * fsdp["num_params"]  # fp32 parameters, AdamW mu and nu
  assert fsdp["state_bytes_per_device"] <= whole // 8 + 12 * 576 + 16
  assert data_fsdp["state_bytes_per_device"] <= whole // 4 + 12 * 576 + 16
