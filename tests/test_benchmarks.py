"""benchmarks/: packed inputs, the sweep's plumbing, JSON and summary, compile-only memory, peers.

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

from benchmarks import plans, torch_peer
from benchmarks import train_step as bench
from dft_jax import throughput
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
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["tie_word_embeddings"]) == (
                c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                c.num_kv_heads, c.tie_word_embeddings)
    assert c.attention_bias and c.rope_theta == 1e6
  assert {o["model.name"] for _, o in plans.PLANS["h200_7b"]} == {"preset:qwen2.5-7b"}


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
  o = bench.resolve({"model.remat": "best", "train.global_batch_size": "max"}, records)
  # fixed = 3 GiB state + 1 GiB gradients; (12 - 4) / 4 = 2 GiB a row; (0.92 * 40 - 4) / 2 = 16.4
  assert o == {"model.remat": "dots_saveable", "train.global_batch_size": 16}
  assert bench.predicted_max_batch(records[0]) == 36  # (40 - 4) / ((8 - 4) / 4) GiB a row
  torch_record = dict(framework="torch", num_params=gib // 16, batch=2, peak_bytes=5 * gib,
                      bytes_limit=21 * gib)
  assert bench.predicted_max_batch(torch_record) == 10  # 1 GiB fixed, 2 GiB a row


BASE_KNOBS = bench.knobs(bench.variant_config())


def record(name, step_time_s, peak_gib=None, mfu=None, **fields):
  """A finished sweep record: the benchmark config's knobs, fields, and the timing of
  step_time_s."""
  r = dict(BASE_KNOBS, name=name, status="ok", step_time_s=step_time_s, mfu=mfu,
           peak_bytes=peak_gib * 2 ** 30 if peak_gib else None, **fields)
  r["tokens_per_step"] = r["batch"] * r["minibatches"] * r["seq_len"]
  r["tokens_per_s"] = r["tokens_per_step"] / step_time_s
  if r["framework"] == "torch":
    r["lm_head"] = None
  return r


def test_summary_reads_the_targets_off_the_records(tmp_path):
  fast = dict(remat="dots_attention_saveable", lm_head="fused")
  lora = dict(model="qwen2.5-7b", lora_rank=16, param_dtype="bfloat16")
  records = [
      record("torch/dft", 0.6, 48.0, framework="torch"),
      record("torch/dft/liger", 0.8, 25.5, framework="torch", liger=True),
      record("jax/dft/fused", 0.3, 50.0, 0.55, **fast),
      record("jax/dft/checkpointed", 0.4, 51.0, 0.41, remat="dots_attention_saveable"),
      record("jax/sft/fused", 0.3, objective="sft", **fast),
      record("jax/eaft/fused", 0.33, objective="eaft", **fast),
      record("jax/psft/k4/fused", 1.2 * 1.1, objective="psft", minibatches=4, **fast),
      record("jax/dft/lean", 0.35, 24.0, 0.47, lm_head="fused", mu_dtype="bfloat16"),
      record("torch/7b/peft/b4", 2.0, 50.5, framework="torch", **lora),
      record("jax/7b/lora16/b4", 1.25, 30.0, 0.5, lm_head="fused", **lora),
      record("jax/7b/lora16/b4/big", 1.0, 40.0, 0.6, lm_head="fused", remat="dots_saveable",
             **lora),  # faster, over the peak target: not the one the summary reports
      record("jax/7b/qlora_nf4/b1", 0.5, 17.0, lm_head="fused", base_quant="nf4", batch=1,
             **lora),
      record("jax/7b/dft/nothing", 1.6, 120.0, 0.51, model="qwen2.5-7b"),
      record("torch/7b/dft/b1", 0.6, 114.0, framework="torch", model="qwen2.5-7b", batch=1),
      dict(name="jax/iw_sft", status="skipped", error="budget"),
  ]
  s = bench.summarize(records)
  assert s["dft_fastest"] == "jax/dft/fused"
  assert s["dft_speedup_vs_transformers"] == pytest.approx(2.0)
  assert s["fused_vs_checkpointed_time"] == {
      "jax/dft/fused / jax/dft/checkpointed": pytest.approx(0.75)}
  assert s["step_time_per_token_vs_sft"]["jax/eaft/fused"]["ratio"] == pytest.approx(1.1)
  assert s["step_time_per_token_vs_sft"]["jax/psft/k4/fused"]["ratio"] == pytest.approx(1.1)
  assert set(s["step_time_per_token_vs_sft"]) == {"jax/eaft/fused", "jax/psft/k4/fused",
                                                  "jax/dft/fused"}
  assert (s["lean"], s["lean_peak_gib"], s["liger_peak_gib"]) == ("jax/dft/lean", 24.0, 25.5)
  assert (s["large_fastest"], s["large_mfu"]) == ("jax/7b/dft/nothing", 0.51)
  # 4 rows / 1.6 s over 1 row / 0.6 s
  assert s["large_speedup_vs_transformers"] == pytest.approx(1.5)
  assert s["lora_fastest"] == "jax/7b/lora16/b4" and s["lora_peak_gib"] == 30.0
  assert s["lora_speedup_vs_peft"] == pytest.approx(1.6)
  assert s["qlora_peak_gib"] == 17.0 and s["lora"][2].get("peft") is None  # no 1-row peer
  table = bench.format_table(records, s)
  assert "jax/iw_sft                 skipped budget" in table and " fused " in table
  parts = []  # two sweeps' results, merged into one file
  for i, (plan, part) in enumerate((("h200", records[:8]), ("h200_7b", records[8:]))):
    parts.append(tmp_path / f"{i}.json")
    parts[-1].write_text(json.dumps(dict(plan=plan, created="t", wall_s=1.0, records=part,
                                         summary={})))
  merged = bench.merge_results([str(p) for p in parts], str(tmp_path / "h200.json"))
  as_json = lambda x: json.loads(json.dumps(x))
  assert merged["plan"] == "h200+h200_7b" and merged["records"] == as_json(records)
  assert json.loads((tmp_path / "h200.json").read_text())["summary"] == as_json(s)


TINY_64 = {"model.name": "preset:tiny-qwen2", "train.global_batch_size": 2, "train.seq_len": 64,
           "model.lm_head_chunk": 32, "model.compute_dtype": "float32"}


def sampling_record(name, framework, batch, run_s, **fields):
  """A finished sampling record: 1.5B, 256-token prompts, 1,024 new tokens, T = 1."""
  return dict(name=name, framework=framework, status="ok", model="qwen2.5-1.5b", batch=batch,
              prompt_len=256, new_tokens=1024, temperature=1.0, top_p=1.0, run_s=run_s,
              tokens_per_s=batch * 1024 / run_s, problems_500x16_s=-(-8000 // batch) * run_s,
              **fields)


def test_summary_pairs_long_rows_and_sampling_runs_with_their_peers(tmp_path):
  lora = dict(model="qwen2.5-7b", lora_rank=16, param_dtype="bfloat16", batch=1)
  one_doc = lambda tokens: dict(seq_len=tokens, doc_len=[tokens, tokens])
  peft = lambda name, step_s, tokens, **kw: record(name, step_s, 40.0, framework="torch", **lora,
                                                   **one_doc(tokens), **kw)
  records = [
      peft("torch/7b/peft/16k", 2.0, 16384),
      record("jax/7b/lora16/16k", 1.0, 60.0, 0.5, remat="mlp_attention_saveable", **lora,
             **one_doc(16384)),
      record("jax/7b/lora16/16k/nothing", 1.5, 23.0, **lora, **one_doc(16384)),
      peft("torch/7b/peft/32k", 5.0, 32768, longest_seq_fit=49152),
      record("jax/7b/lora16/32k", 4.0, 100.0, **lora, **one_doc(32768)),
      record("jax/7b/lora16/128k", 40.0, 80.0, **lora, **one_doc(131072)),
      record("jax/1.5b/lean/32k", 1.0, 30.0, batch=1, **one_doc(32768)),
      record("jax/dft/fused", 0.3, 50.0, 0.55),  # 4 x 4096: not a long row
      sampling_record("sampler/b256", "sampler", 256, 4.0, bandwidth_fraction=0.45),
      sampling_record("generate/b256/static", "generate", 256, 16.0),
      sampling_record("generate/b256/dynamic", "generate", 256, 30.0),
      sampling_record("sampler/b64", "sampler", 64, 2.0, bandwidth_fraction=0.3),
      dict(name="generate/b64/static", framework="generate", status="error", error="x"),
  ]
  s = bench.summarize(records)
  rows = {x["name"]: x for x in s["long_context"]}
  assert list(rows) == ["jax/7b/lora16/16k", "jax/7b/lora16/16k/nothing", "jax/7b/lora16/32k",
                        "jax/7b/lora16/128k", "jax/1.5b/lean/32k"]
  assert rows["jax/7b/lora16/16k"]["speedup"] == pytest.approx(2.0)
  assert rows["jax/7b/lora16/16k/nothing"]["speedup"] == pytest.approx(2.0 / 1.5)
  assert rows["jax/7b/lora16/32k"]["peer"] == "torch/7b/peft/32k"
  assert "peer" not in rows["jax/7b/lora16/128k"] and "peer" not in rows["jax/1.5b/lean/32k"]
  assert s["long_speedup_vs_peft_16k"] == pytest.approx(2.0)
  assert s["long_speedup_vs_peft_32k"] == pytest.approx(1.25)
  assert s["longest_row"] == {"qwen2.5-7b/lora16": 131072, "qwen2.5-1.5b/full": 32768}
  assert s["peer_longest_row"] == {"qwen2.5-7b/lora16": 49152}
  by_batch = {x["batch"]: x for x in s["sampling"]}
  assert by_batch[256]["peer"] == "generate/b256/static"
  assert by_batch[256]["speedup_vs_transformers"] == pytest.approx(4.0)
  assert by_batch[256]["problems_500x16_s"] == 32 * 4.0 and "peer" not in by_batch[64]
  met = {k: t["met"] for k, t in s["targets"].items()}
  assert {k: met[k] for k in ("long_speedup_vs_peft_16k", "long_speedup_vs_peft_32k",
                              "lora_longest_row", "sampling_speedup_vs_transformers",
                              "sampling_bandwidth_fraction")} == dict(
      long_speedup_vs_peft_16k=True, long_speedup_vs_peft_32k=False, lora_longest_row=True,
      sampling_speedup_vs_transformers=True, sampling_bandwidth_fraction=False)
  table = bench.format_table(records, s)
  assert "sampler/b256" in table.split("\nsampling")[1] and "generate/b64/static        error" in table
  result = dict(plan="p", created="t", records=records, summary=s)
  bench.write_sampling(result, str(tmp_path / "sampling.json"))
  written = json.loads((tmp_path / "sampling.json").read_text())
  assert written["summary"]["speedup_vs_transformers"] == pytest.approx(4.0)
  assert written["summary"]["batch"] == 256 and len(written["records"]) == 5


def test_sampling_bound_sums_the_bytes_each_decode_step_reads():
  from benchmarks import sampling as sampling_bench
  weights, per_token, batch, prompt, new, bandwidth = 3e9, 28672, 4, 7, 5, 4.8e12
  steps = [weights + batch * (prompt + i + 1) * per_token for i in range(new)]
  assert sampling_bench.bound_seconds(weights, per_token, batch, prompt, new, bandwidth) == (
      pytest.approx(sum(steps) / bandwidth))
  cfg = PRESETS["qwen2.5-1.5b"]
  assert sampling_bench.cache_bytes_per_token(cfg, 2) == 28 * 2 * 2 * 128 * 2
  tied = sampling_bench.weight_bytes(cfg, 1000, 2)
  assert tied == 2000 and sampling_bench.weight_bytes(PRESETS["qwen2.5-7b"], 10 ** 10, 2) == (
      2 * (10 ** 10 - 152064 * 3584))  # the untied input embedding: only its rows are read


@pytest.mark.parametrize("targets,met", [
    # bounds met exactly count as met, either way of comparing
    ((("dft_mfu", ">=", 0.55), ("lean_peak_gib", "<=", 24.0), ("lora_peak_gib", "<=", 29.0)),
     dict(dft_mfu=True, lean_peak_gib=True, lora_peak_gib=False)),
    ((("dft_mfu", ">=", 0.56), ("lean_peak_gib", "<=", 23.9), ("qlora_peak_gib", "<=", 17.0)),
     dict(dft_mfu=False, lean_peak_gib=False, qlora_peak_gib=True)),
    # a target whose value no record gives is left out
    ((("large_mfu", ">=", 0.5), ("lora_speedup_vs_peft", ">=", 1.0)), dict(large_mfu=True)),
])
def test_summary_marks_each_target_met_or_not(monkeypatch, targets, met):
  """The targets (made up here, not a campaign's) against the summary of synthetic records: the
  value read off the records, the bound as written, met on the bound's side."""
  monkeypatch.setattr(bench, "TARGETS", targets)
  records = [
      record("jax/dft/fused", 0.3, 50.0, 0.55, remat="dots_attention_saveable", lm_head="fused"),
      record("jax/dft/lean", 0.35, 24.0, 0.47, lm_head="fused", mu_dtype="bfloat16"),
      record("jax/7b/lora16/b4", 1.25, 30.0, 0.5, lm_head="fused", model="qwen2.5-7b",
             lora_rank=16, param_dtype="bfloat16"),
      record("jax/7b/qlora_nf4/b1", 0.5, 17.0, lm_head="fused", base_quant="nf4", batch=1,
             model="qwen2.5-7b", lora_rank=16, param_dtype="bfloat16"),
      record("jax/7b/dft/nothing", 1.6, 120.0, 0.51, model="qwen2.5-7b"),
  ]
  s = bench.summarize(records)
  assert {k: t["met"] for k, t in s["targets"].items()} == met
  for key, op, bound in targets:
    if key in met:
      assert s["targets"][key]["value"] == s[key] and s["targets"][key]["target"] == f"{op} {bound}"


@pytest.mark.slow
def test_compiled_memory_counts_the_donated_state():
  """XLA's argument bytes = fp32 params + AdamW's two fp32 moments (+ counters and the batch)."""
  mem = bench.compiled_memory(bench.variant_config(TINY_64))
  state = 3 * 4 * mem["num_params"]
  assert state <= mem["argument_bytes"] <= state + 4096 + 5 * 2 * 64 * 4
  assert mem["alias_bytes"] >= state  # donated: the new state reuses the old buffers
  assert mem["temp_bytes"] > 0


@pytest.mark.slow
def test_compiled_memory_of_a_lora_step_holds_the_frozen_base():
  """With LoRA the step's arguments are the bf16 base (read, never donated) + the float32 adapters
  and their two AdamW moments (donated); nothing else of the model's size."""
  mem = bench.compiled_memory(bench.variant_config(
      {**TINY_64, "lora.rank": 4, "model.param_dtype": "bfloat16"}))
  base = bench.base_param_count(PRESETS["tiny-qwen2"])
  adapters = mem["num_params"]  # what trains
  # 2 layers x rank 4 x (in + out) of q, o (64, 64), k, v (64, 32), gate, up, down (64, 128)
  assert adapters == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
  state = 3 * 4 * adapters
  assert 2 * base + state <= mem["argument_bytes"] <= 2 * base + state + 4096 + 5 * 2 * 64 * 4
  assert state <= mem["alias_bytes"] <= state + 4096


def test_mlp_policy_saves_the_gate_and_up_projections():
  """mlp_attention_saveable keeps what nothing_saveable keeps plus each layer's two MLP input
  projections, 2 x intermediate_size values a token (on CPU no cuDNN attention to keep)."""
  saved = {remat: bench.saved_activation_bytes(bench.variant_config(
      {**TINY_64, "model.remat": remat})) for remat in ("nothing_saveable",
                                                        "mlp_attention_saveable")}
  layers, rows, tokens, mlp = 2, 2, 64, PRESETS["tiny-qwen2"].intermediate_size
  assert saved["mlp_attention_saveable"] - saved["nothing_saveable"] == (
      layers * rows * tokens * 2 * mlp * 4)


def run_script(args, timeout=120):
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def first_missing(*packages):
  """The first of the packages this Python cannot import, or None."""
  return next((p for p in packages if importlib.util.find_spec(p) is None), None)


def assert_skipped_for(record, package):
  """A peer skipped because `package` is absent here, and for no other reason."""
  assert (record["status"], record["error"]) == ("skipped", f"No module named '{package}'")


@pytest.mark.slow
def test_smoke_sweep_writes_records_and_table(tmp_path):
  proc = run_script(["benchmarks/train_step.py", "--plan=smoke", f"--out={tmp_path}",
                     "--budget_s=600"], timeout=700)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "train_step.json").read_text())
  records = {r["name"]: r for r in result["records"]}
  assert list(records) == [name for name, _ in plans.PLANS["smoke"]]
  psft = records["jax/psft/k2"]
  assert psft["status"] == "ok", psft.get("error")
  for key in RECORD_KEYS:
    assert key in psft, key
  assert len(psft["step_times_s"]) == 3 and psft["tokens_per_step"] == 2 * 2 * 128
  assert psft["tokens_per_s"] == pytest.approx(512 / psft["step_time_s"])
  assert psft["flops_per_token"] == 6 * psft["num_params"] + 12 * 2 * 64 * 128
  rng = np.random.default_rng(0)  # the step's two batches again: their documents' attention
  seg = np.concatenate([bench.packed_rows(rng, 4, 128, 320, (16, 64))["segment_ids"]
                        for _ in range(2)])
  assert psft["flops_per_token_segments"] == pytest.approx(
      6 * psft["num_params"] + throughput.segment_attention_flops(seg, 2, 64) / seg.size)
  assert psft["flops_per_token_segments"] < psft["flops_per_token"]
  assert psft["docs_per_row"] > 1.5 and np.all(np.isfinite(psft["losses"]))
  assert psft["memory_analysis"]["argument_bytes"] > 0
  assert records["jax/dft/needs_hook"]["status"] == "skipped"
  assert "REMAT_POLICIES" in records["jax/dft/needs_hook"]["error"]
  assert records["jax/dft/over_budget"]["status"] == "skipped"
  peer = records["torch/dft"]
  if first_missing("torch", "transformers"):  # CI installs no torch: the peer says so
    assert_skipped_for(peer, first_missing("torch", "transformers"))
  else:  # with torch the peer must run
    assert peer["status"] == "ok", peer.get("error")
    assert peer["num_params"] == psft["num_params"]  # same model, tied embedding counted once
    assert np.all(np.isfinite(peer["losses"])) and peer["probes"][0]["status"] == "ok"
  check_lora_records(records, psft)
  asft = records["jax/asft"]  # a reference copy, its chunk logits in the fused head's loop
  assert asft["status"] == "ok", asft.get("error")
  assert (asft["lm_head_requested"], asft["lm_head"]) == ("fused", "fused")
  assert np.all(np.isfinite(asft["losses"]))
  for name in ("jax/otr/fused", "jax/iw_sft/fused", "jax/iw_sft/precomputed"):
    assert records[name]["status"] == "ok" and np.all(np.isfinite(records[name]["losses"])), name
  assert records["jax/iw_sft/precomputed"]["ref_logp"] == "precomputed"
  assert "variant" in proc.stdout and "summary:" in proc.stdout.splitlines()[-1]
  assert result["summary"]["lora"][0]["name"] == "jax/lora4"


def check_lora_records(records, full):
  """LoRA and QLoRA on the tiny model: what trains is the adapters, the MFU's FLOPs are
  4 N_base + 6 N_adapters + 12 L d T with N_base the full model's N; the peft peer (when torch
  and peft are here) counts the same base and adapters from its own modules."""
  lora, qlora, peft = records["jax/lora4"], records["jax/qlora_nf4"], records["torch/peft"]
  for r in (lora, qlora):
    assert r["status"] == "ok", r.get("error")
    for key in RECORD_KEYS:
      assert key in r, key
    assert r["lm_head"] == "fused" and r["lora_rank"] == 4 and np.all(np.isfinite(r["losses"]))
    assert r["num_params"] == full["num_params"]
    assert r["trainable_params"] == 2 * 4 * 1024  # test_compiled_memory_of_a_lora_step...
    assert r["flops_per_token"] == (4 * r["num_params"] + 6 * r["trainable_params"]
                                    + 12 * 2 * 64 * 128)
  assert qlora["base_quant"] == "nf4" and qlora["tokens_per_step"] == 128
  if first_missing("torch", "transformers", "peft"):
    assert_skipped_for(peft, first_missing("torch", "transformers", "peft"))
    return
  assert peft["status"] == "ok", peft.get("error")
  assert peft["framework"] == "torch" and peft["peft"] is True
  assert (peft["num_params"], peft["trainable_params"], peft["flops_per_token"]) == (
      lora["num_params"], lora["trainable_params"], lora["flops_per_token"])
  assert np.all(np.isfinite(peft["losses"]))


@pytest.mark.slow
def test_gpu_round_command_runs_end_to_end_at_tiny_shapes(tmp_path):
  """`PLAN=h200_round TINY=1 bash benchmarks/run_gpu.sh`: the GPU round's one command, every row
  at tiny shapes on the CPU: train_step.json (every row, in order), sampling.json (the sampling
  summary with speedup_vs_transformers), the tables printed last."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, OUT=str(tmp_path),
             PLAN="h200_round", TINY="1", BUDGET_S="1500", PYTHON=sys.executable)
  proc = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "train_step.json").read_text())
  records = {r["name"]: r for r in result["records"]}
  assert list(records) == [name for name, _ in plans.PLANS["h200_round"]] and result["tiny"]
  missing = first_missing("torch", "transformers", "peft")
  for name, r in records.items():
    if r["framework"] in ("torch", "generate") and missing:
      assert_skipped_for(r, first_missing("torch", "transformers") or missing)
    else:
      assert r["status"] == "ok", (name, r.get("error"))
  lora = records["jax/7b/lora16/16k"]
  assert (lora["model"], lora["seq_len"], lora["remat"]) == ("tiny-qwen2", 128,
                                                             "mlp_attention_saveable")
  assert lora["docs_per_row"] == 1 and lora["overrides"]["lora.rank"] == 16
  assert records["sampler/b256"]["new_tokens"] == 8 and records["sampler/b256"]["batch"] == 4
  if not missing:
    assert records["torch/7b/peft/32k"]["seq_probes"][0]["seq_len"] == 256
  sampling = json.loads((tmp_path / "sampling.json").read_text())
  assert "speedup_vs_transformers" in sampling["summary"]
  assert [r["name"] for r in sampling["records"]] == ["sampler/b256", "generate/b256/static"]
  assert proc.stdout.splitlines()[-1].startswith("summary: ") and "sampling " in proc.stdout


@pytest.mark.slow
def test_head_benchmark_compares_the_heads():
  """benchmarks/head.py, the LM head alone (EAFT, tiny shapes): the fused head's record with its
  three matmuls a chunk, its gradients against the checkpointed head's, the top-k timings."""
  overrides = dict(plans.SMOKE)["head/eaft/fused"]
  proc = run_script(["benchmarks/head.py", *bench.override_flags(overrides)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.splitlines()[-1][len("RESULT "):])
  assert record["status"] == "ok", record.get("error")
  assert record["framework"] == "head" and record["lm_head"] == "fused"
  assert record["dot_generals"] == 3 and record["sorts"] == 0
  assert max(record["grad_max_rel_diff_vs_checkpointed"].values()) < 1e-5
  assert record["top_k_equal"] and len(record["top_k_s"]) == 3
  assert record["tokens_per_s"] == pytest.approx(2 * 128 / record["step_time_s"])


@pytest.mark.slow
def test_breakdown_times_every_part(tmp_path):
  """benchmarks/breakdown.py at configs/benchmark.py:smoke: each part and the whole step timed, one JSON record."""
  out = tmp_path / "breakdown.jsonl"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.breakdown",
                         "--config=configs/benchmark.py:smoke", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  seconds = record["seconds"]
  assert {"trunk fwd+bwd", "optimizer (clip + AdamW)", "whole train step"} <= set(seconds)
  assert sum(k.startswith("head+objective") for k in seconds) == 3  # checkpointed x 2, fused
  assert all(np.isfinite(t) and t > 0 for t in seconds.values())


@pytest.mark.slow
def test_host_memory_puts_each_peak_after_the_line_of_its_phase(capsys):
  """A child that prints "small", holds 64 MB, prints "large", holds 400 MB: the sampler's peak is
  the large phase's and each phase's peak reads after its own line."""
  from benchmarks import host_memory
  child = ("import time, numpy as np\n"
           "print('small', flush=True); a = np.ones(8 * 2**20); time.sleep(1.5)\n"
           "print('large', flush=True); b = np.ones(50 * 2**20); time.sleep(1.5)\n")
  code, lines, samples = host_memory.sample([sys.executable, "-c", child], every_s=0.05)
  assert code == 0 and [line for _, line in lines] == ["small", "large"]
  peaks = dict(host_memory.peak_after_each_line(lines, samples))
  assert peaks["large"] - peaks["small"] > 300e6  # the 400 MB array
  assert max(rss for _, rss in samples) == peaks["large"]
  assert host_memory.main(["--every_s=0.05", "--min_gb=0", "--", sys.executable, "-c", child]) == 0
  out = capsys.readouterr().out
  assert "peak" in out and "GB after: large" in out


def test_segment_bound_holds_every_packed_row_and_reaches_the_config():
  """packed_rows never puts more documents in a row than segment_bound (so cuDNN's packed layout
  keeps them apart), it is one run above the most a row can hold, and step_config hands it to
  model.max_segments."""
  from dft_jax.data import packing
  v = {"train.seq_len": 300, "bench.doc_len": (20, 90)}
  rows = bench.packed_rows(np.random.default_rng(0), 400, 300, 50, doc_len=(20, 90))
  runs = packing.segment_runs_per_row(rows["segment_ids"])
  bound = bench.segment_bound(bench.variant_config(v))
  assert bound == 16 and runs.max() <= bound
  fixed = bench.packed_rows(np.random.default_rng(0), 4, 300, 50, doc_len=(22, 22))
  assert packing.segment_runs_per_row(fixed["segment_ids"]).max() == 14  # 13 x 22 + a cut 14th
  assert bench.segment_bound(bench.variant_config({**v, "bench.doc_len": (22, 22)})) == 15
  assert bench.step_config(bench.variant_config(v)).model.max_segments == bound
  assert bench.segment_bound(bench.variant_config({**v, "model.max_segments": 40})) == 40
