"""Qwen3-MoE: routed experts, the load-balancing loss, its place in the train step, sharding, LoRA.

References: tests/fixtures/tiny_qwen3_moe/ (transformers' Qwen3MoeForCausalLM, saved by it as a
sharded index; golden.npz: its aux_loss under a padding mask and its logits with norm_topk_prob
flipped, made by tests/fixtures/make_golden.py), a float64 numpy loop over tokens and experts,
the loss's value under uniform routing.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dft_jax import models, objectives, sharding
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError
from dft_jax.models import decoder, hf, quant
from test_train import batches, mesh_of, tiny_config

REPO = pathlib.Path(__file__).parent.parent
FOLDER = REPO / "tests" / "fixtures" / "tiny_qwen3_moe"


@pytest.fixture(scope="module")
def moe():
  return models.load(str(FOLDER))[0], np.load(FOLDER / "golden.npz")


def test_fixture_is_a_sharded_index_written_by_transformers():
  """The parity tests load it through model.safetensors.index.json (several files)."""
  index = json.loads((FOLDER / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]


def test_router_loss_matches_transformers(moe):
  model, golden = moe
  _, loss = model.hidden_states_and_router_loss(jnp.asarray(golden["tokens"]),
                                                segment_ids_BxT=jnp.asarray(golden["aux_mask"]))
  np.testing.assert_allclose(float(loss), float(golden["aux_loss"]), rtol=1e-5)


def test_norm_topk_prob_as_the_config_says(moe):
  """With norm_topk_prob flipped in the config: transformers' logits with it flipped."""
  model, golden = moe
  assert model.config.norm_topk_prob
  flipped = models.from_state_dict(dataclasses.replace(model.config, norm_topk_prob=False),
                                   hf.SafetensorsDict(FOLDER))
  logits = np.asarray(flipped(jnp.asarray(golden["tokens"])))
  np.testing.assert_allclose(logits, golden["logits_topk_flipped"], atol=1e-4, rtol=0)
  assert np.abs(logits - golden["logits"]).max() > 1e-1  # the switch matters here


def _numpy_moe(h_NxD, p, k, norm_topk_prob):
  """float64 loop: each token through its k most probable experts' SwiGLU, weighted."""
  h = h_NxD.astype(np.float64)
  logits = h @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(h)
  for n in range(h.shape[0]):
    top = np.argsort(-probs[n])[:k]
    w = probs[n, top] / (probs[n, top].sum() if norm_topk_prob else 1.0)
    for e, w_e in zip(top, w):
      gate, up = h[n] @ p["experts_gate"][e], h[n] @ p["experts_up"][e]
      out[n] += w_e * ((gate / (1 + np.exp(-gate)) * up) @ p["experts_down"][e])
  return out, probs


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_grouped_matmul_experts_match_a_loop_over_experts(norm_topk_prob):
  c = dataclasses.replace(models.PRESETS["tiny-qwen3-moe"], norm_topk_prob=norm_topk_prob)
  e, d, f, k = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
  rng = np.random.RandomState(0)
  p = dict(router=rng.randn(d, e) / 4, experts_gate=rng.randn(e, d, f) / 8,
           experts_up=rng.randn(e, d, f) / 8, experts_down=rng.randn(e, f, d) / 6)
  p = {name: a.astype(np.float32) for name, a in p.items()}
  h = rng.randn(2, 12, d).astype(np.float32)
  valid = np.ones((2, 12), bool)
  valid[1, 9:] = False
  moe_mlp = jax.jit(lambda h, p, valid: decoder.moe_mlp(h, p, config=c, valid_BxT=valid))
  out, stats = moe_mlp(h, p, valid)
  want, probs = _numpy_moe(h.reshape(-1, d), p, k, norm_topk_prob)
  np.testing.assert_allclose(np.asarray(out).reshape(-1, d), want, atol=2e-5)
  top = np.argsort(-probs, axis=-1)[:, :k]
  counts = np.zeros(e)
  np.add.at(counts, top[valid.reshape(-1)].reshape(-1), 1)
  np.testing.assert_allclose(np.asarray(stats[0]), counts)
  np.testing.assert_allclose(np.asarray(stats[1]), probs[valid.reshape(-1)].sum(0), rtol=1e-5)
  # One grouped matmul per projection over the tokens sorted by expert, no loop over experts.
  jaxpr = str(jax.make_jaxpr(moe_mlp)(h, p, valid))
  assert jaxpr.count("= ragged_dot_general[") == 3


def test_load_balancing_loss_is_top_k_under_uniform_routing():
  """P_e = 1/E for every expert and the f_e sum to k: E * sum_e f_e P_e = k, however ties go."""
  c = models.PRESETS["tiny-qwen3-moe"]
  p = dict(router=np.zeros((c.hidden_size, c.num_experts), np.float32),
           experts_gate=np.zeros((c.num_experts, c.hidden_size, c.moe_intermediate_size)),
           experts_up=np.zeros((c.num_experts, c.hidden_size, c.moe_intermediate_size)),
           experts_down=np.zeros((c.num_experts, c.moe_intermediate_size, c.hidden_size)))
  h = np.random.RandomState(1).randn(1, 5, c.hidden_size).astype(np.float32)
  valid = np.ones((1, 5), bool)
  _, stats = decoder.moe_mlp(h, p, config=c, valid_BxT=valid)
  loss = decoder.load_balancing_loss(jnp.stack([stats, stats]), valid.sum(), c.num_experts)
  np.testing.assert_allclose(float(loss), c.num_experts_per_tok, rtol=1e-6)


def test_active_parameters_leave_out_the_unrouted_experts():
  c = models.PRESETS["qwen3-moe-a1.3b"]
  model = nnx.eval_shape(lambda: models.Decoder(c, rngs=nnx.Rngs(0)))
  layers = nnx.state(model, nnx.Param)["layers"]
  experts = sum(layers[n].get_value().size for n in ("experts_gate", "experts_up", "experts_down"))
  unrouted = experts * (c.num_experts - c.num_experts_per_tok) // c.num_experts
  assert models.inactive_param_count(c) == unrouted
  total = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 1e9 < total - unrouted < 3e9  # the benchmark's "1-3B active" shape


@pytest.mark.slow
def test_train_step_adds_the_router_loss_with_its_coefficient(tmp_path, microbatches=2):
  """The step's loss = the objective's terms (loss/*) + coef * router_aux_loss, the metric being
  the mean over the update's slices of each forward's load-balancing loss."""
  config = tiny_config(tmp_path, model__name=str(FOLDER), train__num_steps=1,
                       train__microbatches=microbatches)
  batch = batches(config, 1)[0]
  mesh = mesh_of(1)
  model = models.load(str(FOLDER), compute_dtype="float32", router_aux_loss_coef=0.5)[0]
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  _, metrics = jax.device_get(step(state, step_lib.global_batch(batch, mesh), frozen))
  model = models.load(str(FOLDER), compute_dtype="float32")[0]  # the step donated the first
  slices = [{k: step_lib.split_rows(jnp.asarray(v), microbatches)[i] for k, v in batch.items()}
            for i in range(microbatches)]
  forward = [model.hidden_states_and_router_loss(s["tokens"], positions_BxT=s["positions"],
                                                 segment_ids_BxT=s["segment_ids"])[1]
             for s in slices]
  np.testing.assert_allclose(metrics["router_aux_loss"], np.mean(forward), rtol=1e-5)
  objective = sum(v for k, v in metrics.items() if k.startswith("loss/"))
  assert objective > 0
  np.testing.assert_allclose(metrics["loss"] - objective, 0.5 * metrics["router_aux_loss"],
                             rtol=1e-4)


def test_router_loss_coefficient_defaults_as_transformers_trains():
  """None: config.json's coefficient when its output_router_logits is true, else 0."""
  c = models.PRESETS["tiny-qwen3-moe"]
  build = lambda c, **kw: nnx.eval_shape(lambda: models.Decoder(c, rngs=nnx.Rngs(0), **kw))
  assert build(c).router_aux_loss_coef == 0.0
  assert build(dataclasses.replace(c, output_router_logits=True)).router_aux_loss_coef == 0.001
  assert build(c, router_aux_loss_coef=0.02).router_aux_loss_coef == 0.02


def test_experts_shard_by_the_logical_rules_on_a_mesh(moe):
  """Experts whole per fsdp device, their width over tensor; the sharded forward is unchanged."""
  model, golden = moe
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  sharded = jax.device_put(params, sharding.param_shardings(params, models.logical_specs(params),
                                                            mesh))
  spec = sharded["layers"]["experts_gate"].get_value().sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
  assert sharded["layers"]["router"].get_value().sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  tokens = jnp.asarray(golden["tokens"])
  logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(sharded, tokens)
  np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4)


@pytest.mark.slow
def test_lora_targets_of_a_moe_family():
  """Adapters on the attention projections; the experts take none (a clear error names the
  targets that exist); QLoRA quantises the attention projections only."""
  with pytest.raises(ConfigError, match="lora.targets gate,up: qwen3_moe layers have no such "
                     "projection .* targets for qwen3_moe: q,k,v,o"):
    models.load(str(FOLDER), lora=models.LoRAConfig(targets=("q", "gate", "up")))
  golden = np.load(FOLDER / "golden.npz")
  tokens = jnp.asarray(golden["tokens"])
  lora = models.LoRAConfig(rank=4, targets=("q", "k", "v", "o"))
  model, _ = models.load(str(FOLDER), lora=lora)
  adapters = nnx.state(model, nnx.LoRAParam)["layers"]
  assert sorted(adapters) == sorted(f"w{t}_lora_{ab}" for t in "qkvo" for ab in "ab")
  np.testing.assert_allclose(np.asarray(model(tokens)), golden["logits"], atol=1e-4)  # B = 0
  qlora, _ = models.load(str(FOLDER), lora=dataclasses.replace(lora, base_quant="nf4",
                                                                 block_size=16))
  stored = set(qlora.layers)
  assert {"wq", "wo"}.isdisjoint(stored) and set(quant.stored_names("wq")) <= stored
  assert qlora.layers["experts_gate"].get_value().dtype == jnp.float32
  # What it computes is the plain decoder of its dequantised weights.
  plain = models.from_state_dict(qlora.config, hf.params_to_hf(qlora.config,
                                                               qlora.merged_params()))
  np.testing.assert_allclose(np.asarray(qlora(tokens)), np.asarray(plain(tokens)), atol=1e-4)


@pytest.mark.slow
def test_moe_benchmark_plan_runs_at_tiny_shapes(tmp_path):
  """`PLAN=h200_moe TINY=1 bash benchmarks/run_gpu.sh`: the plan's rows at the tiny MoE shape on
  the CPU (--tiny takes the tiny preset of the plan's family): our step and transformers' peer
  (skipped, naming torch, where it is absent) with MFU's FLOPs per token over the active
  parameters."""
  from benchmarks import plans  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
  from dft_jax import throughput  # pylint: disable=g-import-not-at-top
  path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, OUT=str(tmp_path),
             PLAN="h200_moe", TINY="1", BUDGET_S="600", PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "train_step.json").read_text())
  assert result["tiny"] and [r["name"] for r in result["records"]] == [
      name for name, _ in plans.PLANS["h200_moe"]]
  records = {r["name"]: r for r in result["records"]}
  c = models.PRESETS["tiny-qwen3-moe"]
  model = nnx.eval_shape(lambda: models.Decoder(c, rngs=nnx.Rngs(0)))
  active = (sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
            - models.inactive_param_count(c))
  ours = records["jax/moe/dft/fused"]
  assert ours["status"] == "ok" and ours["tokens_per_s"] > 0 and ours["model"] == "tiny-qwen3-moe"
  assert ours["flops_per_token"] == throughput.flops_per_token(active, c, ours["seq_len"])
  assert ours["active_params"] == active
  rng = np.random.default_rng(0)  # the step's two batches again: their documents' attention
  seg = np.concatenate([bench.packed_rows(rng, ours["batch"], ours["seq_len"], c.vocab_size,
                                          ours["doc_len"])["segment_ids"] for _ in range(2)])
  assert ours["flops_per_token_segments"] == pytest.approx(
      6 * active + throughput.segment_attention_flops(seg, c.num_layers, c.num_heads * c.head_dim)
      / seg.size)
  peer = records["torch/moe/dft"]
  if peer["status"] == "skipped":
    assert "torch" in peer["error"]
  else:
    assert peer["status"] == "ok" and peer["experts_implementation"]
    assert peer["active_params"] == active and peer["flops_per_token"] == ours["flops_per_token"]
