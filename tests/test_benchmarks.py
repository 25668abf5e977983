"""benchmarks/: packed inputs, the sweep's plumbing and JSON, compile-only memory, the peer's shapes.

The numbers themselves come from GPU runs (benchmarks/README.md); here tiny shapes on the CPU check
that both scripts run end to end and write what the README promises.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import torch_peer
from benchmarks import train_step as bench
from dft_jax.models import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = ("name", "framework", "model", "objective", "batch", "seq_len", "status",
               "step_time_s", "step_times_s", "tokens_per_s", "flops_per_token", "mfu",
               "peak_bytes", "num_params", "device", "versions", "wall_s")


def test_packed_rows_are_consistent():
  rows = bench.packed_rows(np.random.default_rng(1), 3, 300, 50, doc_len=(20, 90))
  seg, pos, tgt, tok, mask = (rows[k] for k in ("segment_ids", "positions", "targets", "tokens",
                                                "loss_mask"))
  assert all(v.shape == (3, 300) for v in rows.values())
  for r in range(3):
    starts = np.flatnonzero(np.diff(seg[r], prepend=0))
    assert seg[r, 0] == 1 and np.all(np.diff(seg[r]) >= 0) and seg[r].min() >= 1
    ends = np.append(starts[1:], 300)
    for s, e in zip(starts, ends):
      np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))
      np.testing.assert_array_equal(tgt[r, s:e - 1], tok[r, s + 1:e])
      assert mask[r, e - 1] == 0  # the last token's target would cross into the next document
      assert mask[r, s] == 0 and mask[r, s + (e - s) // 4:e - 1].all()
    assert all(20 <= e - s <= 90 for s, e in zip(starts[:-1], ends[:-1]))


def test_peer_shapes_match_presets():
  for name, hf in torch_peer.SHAPES.items():
    c = PRESETS[name]
    assert (hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
            hf["num_attention_heads"], hf["num_key_value_heads"]) == (
                c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                c.num_kv_heads)
    assert c.tie_word_embeddings and c.attention_bias and c.rope_theta == 1e6


def test_resolve_picks_fastest_policy_and_predicts_max_batch():
  gib = 2 ** 30
  records = [
      dict(name="a", framework="jax", group="policy", status="ok", remat="nothing_saveable",
           tokens_per_s=10.0, batch=4, num_params=gib // 4, param_dtype="float32",
           memory_analysis=dict(argument_bytes=3 * gib), peak_bytes=8 * gib, bytes_limit=40 * gib),
      dict(name="b", framework="jax", group="policy", status="ok", remat="dots_saveable",
           tokens_per_s=12.0, batch=4, num_params=gib // 4, param_dtype="float32",
           memory_analysis=dict(argument_bytes=3 * gib), peak_bytes=12 * gib, bytes_limit=40 * gib),
      dict(name="c", framework="jax", group="policy", status="oom", remat="dots_saveable"),
  ]
  v = bench.resolve(dict(remat="best", batch="max"), records)
  # fixed = 3 GiB state + 1 GiB gradients; (12 - 4) / 4 = 2 GiB a row; (0.92 * 40 - 4) / 2 = 16.4
  assert v == dict(remat="dots_saveable", batch=16)
  assert bench.predicted_max_batch(records[0]) == 36  # (40 - 4) / ((8 - 4) / 4) GiB a row
  torch_record = dict(framework="torch", num_params=gib // 16, batch=2, peak_bytes=5 * gib,
                      bytes_limit=21 * gib)
  assert bench.predicted_max_batch(torch_record) == 10  # 1 GiB fixed, 2 GiB a row


def test_compiled_memory_counts_the_donated_state():
  """XLA's argument bytes = fp32 params + AdamW's two fp32 moments (+ counters and the batch)."""
  v = dict(model="tiny-qwen2", batch=2, seq_len=64, lm_head_chunk=32, compute_dtype="float32")
  mem = bench.compiled_memory(v)
  state = 3 * 4 * mem["num_params"]
  assert state <= mem["argument_bytes"] <= state + 4096 + 5 * 2 * 64 * 4
  assert mem["alias_bytes"] >= state  # donated: the new state reuses the old buffers
  assert mem["temp_bytes"] > 0


def run_script(args, timeout=120):
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_smoke_sweep_writes_records_and_table(tmp_path):
  proc = run_script(["benchmarks/train_step.py", "--sweep=smoke", f"--out={tmp_path}",
                     "--budget_s=240"], timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "train_step.json").read_text())
  records = {r["name"]: r for r in result["records"]}
  assert list(records) == [v["name"] for v in bench.PLANS["smoke"]]
  psft = records["jax/psft/k2"]
  assert psft["status"] == "ok", psft.get("error")
  for key in RECORD_KEYS:
    assert key in psft, key
  assert len(psft["step_times_s"]) == 3 and psft["tokens_per_step"] == 2 * 2 * 128
  assert psft["tokens_per_s"] == pytest.approx(512 / psft["step_time_s"])
  assert psft["flops_per_token"] == 6 * psft["num_params"] + 12 * 2 * 64 * 128
  assert psft["docs_per_row"] > 1.5 and np.all(np.isfinite(psft["losses"]))
  assert psft["memory_analysis"]["argument_bytes"] > 0
  assert records["jax/dft/needs_hook"]["status"] == "skipped"
  assert "REMAT_POLICIES" in records["jax/dft/needs_hook"]["error"]
  assert records["jax/dft/over_budget"]["status"] == "skipped"
  peer = records["torch/dft"]
  if importlib.util.find_spec("torch") is None:  # CI installs no torch: the peer says so
    assert (peer["status"], peer["error"]) == ("skipped", "No module named 'torch'")
  else:  # with torch the peer must run
    assert peer["status"] == "ok", peer.get("error")
    assert peer["num_params"] == psft["num_params"]  # same model, tied embedding counted once
    assert np.all(np.isfinite(peer["losses"])) and peer["probes"][0]["status"] == "ok"
  assert "variant" in proc.stdout and "summary:" in proc.stdout.splitlines()[-1]


def test_head_benchmark_compares_the_heads():
  """benchmarks/head.py, the LM head alone (EAFT, tiny shapes): the fused head's record with its
  three matmuls a chunk, its gradients against the checkpointed head's, the top-k timings."""
  variant = next(v for v in bench.PLANS["smoke"] if v["name"] == "head/eaft/fused")
  proc = run_script(["benchmarks/head.py", "--variant", json.dumps(variant)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.splitlines()[-1][len("RESULT "):])
  assert record["status"] == "ok", record.get("error")
  assert record["framework"] == "head" and record["lm_head"] == "fused"
  assert record["dot_generals"] == 3 and record["sorts"] == 0
  assert max(record["grad_max_rel_diff_vs_checkpointed"].values()) < 1e-5
  assert record["top_k_equal"] and len(record["top_k_s"]) == 3
  assert record["tokens_per_s"] == pytest.approx(2 * 128 / record["step_time_s"])


def test_breakdown_times_every_part(tmp_path):
  """benchmarks/breakdown.py --smoke: each part and the whole step timed, one JSON record."""
  out = tmp_path / "breakdown.jsonl"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.breakdown", "--smoke", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  seconds = record["seconds"]
  assert {"trunk fwd+bwd", "optimizer (clip + AdamW)", "whole train step"} <= set(seconds)
  assert sum(k.startswith("head+objective") for k in seconds) == 3  # checkpointed x 2, fused
  assert all(np.isfinite(t) and t > 0 for t in seconds.values())
