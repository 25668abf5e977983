"""Decoder (dft_jax/models) against HF PyTorch golden logits, and its own invariances.

References: tests/fixtures/tiny_<family>/ (tiny random transformers models + PyTorch float32 logits
and greedy tokens, made by tests/fixtures/make_golden.py), float64 numpy attention, separate
forwards of packed docs. tests/test_models_torch.py checks the same against live transformers
where torch is installed; tests/test_models_moe.py the experts.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dft_jax import export, models, sampling
from dft_jax.errors import ConfigError, ModelError
from dft_jax.models import attention, hf

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# Fixture folder tiny_<name>: what it checks beyond the common decoder (make_golden.FAMILIES).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen2_yarn", "qwen3_moe", "gemma3")
LOGICAL_NAMES = {"layers", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm",
                 "expert"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  folder = FIXTURES / f"tiny_{request.param}"
  model, tokenizer = models.load(str(folder))
  golden = np.load(folder / "golden.npz")
  return folder, model, tokenizer, golden


def _pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------- parity with transformers


def test_logits_match_transformers(family):
  _, model, _, golden = family
  logits = model(jnp.asarray(golden["tokens"]))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)


def _greedy(model, golden, prompt_len=8):
  """Our greedy tokens after golden's first prompt_len tokens (make_golden.PROMPT)."""
  return sampling.generate(model, golden["tokens"][:, :prompt_len].tolist(),
                           max_new_tokens=golden["greedy"].shape[1])


def test_greedy_tokens_match_transformers(family):
  """Greedy continuation through the KV cache (prefill + one-token steps, sliding windows over
  cache slots) = transformers' argmax of full forwards."""
  _, model, _, golden = family
  np.testing.assert_array_equal(_greedy(model, golden), golden["greedy"])


# model_type, switches and pattern each fixture's config.json must give (an independent record:
# the fixtures' configs are written in make_golden.FAMILIES).
SWITCHES = {
    "llama": dict(model_type="llama", rope="llama3", tied=False),
    "qwen2": dict(model_type="qwen2", attention_bias=True, tied=True),
    "qwen3": dict(model_type="qwen3", qk_norm=True, tied=False),
    "mistral": dict(model_type="mistral", tied=False, window=6, sliding=(True, True)),
    "qwen2_yarn": dict(model_type="qwen2", attention_bias=True, rope="yarn", tied=True),
    "qwen3_moe": dict(model_type="qwen3_moe", qk_norm=True, tied=True, experts=(8, 2, 16, True)),
    "gemma3": dict(model_type="gemma3_text", qk_norm=True, gemma=True, rope="linear", tied=True,
                   window=6, sliding=(True, False), local_theta=1e4, act="gelu_pytorch_tanh",
                   scale=24 ** -0.5),
}


def test_family_switches_from_config(family):
  folder, model, tokenizer, _ = family
  c = model.config
  want = SWITCHES[folder.name.removeprefix("tiny_")]
  hf_config = json.loads((folder / "config.json").read_text())
  assert c.model_type == want["model_type"] == hf_config["model_type"]
  assert c.attention_bias == want.get("attention_bias", False)
  assert c.qk_norm == want.get("qk_norm", False)
  assert c.norm_plus_one == c.sandwich_norms == c.embed_scale == want.get("gemma", False)
  assert c.tie_word_embeddings == want["tied"] == (model.lm_head is None)
  assert models.config.rope_type(c.rope_scaling) == want.get("rope", "default")
  assert c.sliding_layers == want.get("sliding", (False, False))
  assert c.sliding_window == want.get("window")
  assert c.local_rope_theta == want.get("local_theta")
  assert c.hidden_act == want.get("act", "silu")
  assert c.attention_scale == pytest.approx(want.get("scale", c.head_dim ** -0.5))
  experts = (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob)
  assert experts == want.get("experts", (0, 0, 0, False))
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module", params=["gemma3", "qwen3_moe"])
def loss_and_grad(request):
  """(remat, scan_layers) -> jitted (loss, grads) of a tiny fixture (train-step style): a dense
  MLP under per-layer windows (a lax.cond in the scanned layer), and experts."""
  folder = FIXTURES / f"tiny_{request.param}"
  graphdef, params = nnx.split(models.load(str(folder))[0], nnx.Param)
  tokens = jnp.asarray(np.load(folder / "golden.npz")["tokens"])

  def run(remat, scan_layers):
    def loss(params):
      m = nnx.merge(graphdef, params)
      m.remat, m.scan_layers = remat, scan_layers
      return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  return run


@pytest.mark.parametrize("remat, scan_layers", [
    ("nothing_saveable", True),
    pytest.param("dots_with_no_batch_dims_saveable", False, marks=pytest.mark.slow)])
def test_remat_and_unrolled_layers_same_loss_and_grads(loss_and_grad, remat, scan_layers):
  ref_loss, ref_grad = loss_and_grad("none", True)
  loss, grad = loss_and_grad(remat, scan_layers)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)  # a few float32 ulps of a sum
  assert jax.tree.structure(grad) == jax.tree.structure(ref_grad)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", [
    "tiny_llama",      # llama3 RoPE: positions must restart per segment
    "tiny_mistral",    # windows of 6 inside 7- and 9-token documents
    "tiny_gemma3",     # a windowed and a global layer
    "tiny_qwen3_moe",  # routing per token, padding routed but out of the statistics
])
def test_packed_segments_equal_separate_forwards(name):
  folder = FIXTURES / name
  model, _ = models.load(str(folder))
  golden = np.load(folder / "golden.npz")
  doc1, doc2 = golden["tokens"][0, :7], golden["tokens"][1, :9]
  pad = 4
  tokens = np.concatenate([doc1, doc2, np.zeros(pad, np.int32)])[None]
  segments = np.array([[1] * 7 + [2] * 9 + [0] * pad], np.int32)
  positions = np.array([list(range(7)) + list(range(9)) + [0] * pad], np.int32)
  packed = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
  assert np.all(np.isfinite(packed))
  one = np.asarray(model(jnp.asarray(doc1[None])))[0]
  two = np.asarray(model(jnp.asarray(doc2[None])))[0]
  np.testing.assert_allclose(packed[0, :7], one, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(packed[0, 7:16], two, rtol=1e-6, atol=1e-5)
  # Without segment ids doc2 would see doc1: the test can tell the difference.
  unmasked = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions)))
  assert np.abs(unmasked[0, 7:16] - two).max() > 1e-2


def test_bfloat16_compute_and_params(family):
  folder, model, _, golden = family
  tokens = jnp.asarray(golden["tokens"])
  bf16, _ = models.load(str(folder), param_dtype="bfloat16", compute_dtype="bfloat16")
  assert {a.dtype for a in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("bfloat16")}
  assert bf16.hidden_states(tokens).dtype == jnp.bfloat16
  logits = bf16(tokens)
  assert logits.dtype == jnp.float32
  scale = np.abs(golden["logits"]).max()
  assert np.abs(np.asarray(logits) - golden["logits"]).max() < 0.05 * scale
  assert np.mean(np.asarray(logits).argmax(-1) == golden["logits"].argmax(-1)) > 0.9


def test_hidden_states_and_head_weight_give_logits(family):
  _, model, _, golden = family
  tokens = jnp.asarray(golden["tokens"])
  hidden = model.hidden_states(tokens)
  w = model.head_weight()
  assert hidden.shape == (*tokens.shape, model.config.hidden_size)
  assert w.shape == (model.config.hidden_size, model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(hidden @ w), golden["logits"], atol=1e-4)


def test_logical_specs_name_every_axis(family):
  _, model, _, _ = family
  params = nnx.state(model, nnx.Param)
  specs = models.logical_specs(params)
  pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(specs)))
  assert len(pairs) == len(jax.tree.leaves(params))
  for array, spec in pairs:
    assert isinstance(spec, jax.sharding.PartitionSpec)
    assert len(spec) == array.ndim and set(spec) <= LOGICAL_NAMES
  assert models.logical_specs(params)["layers"]["wq"].get_value() == jax.sharding.PartitionSpec(
      "layers", "embed", "q_heads", "head_dim")


def test_params_shard_by_logical_rules_on_a_mesh():
  """Rules over the logical names shard every parameter; the sharded forward is unchanged."""
  folder = FIXTURES / "tiny_qwen3"
  model, _ = models.load(str(folder))
  tokens = jnp.asarray(np.load(folder / "golden.npz")["tokens"])
  graphdef, params = nnx.split(model, nnx.Param)
  rules = dict(embed="fsdp", q_heads="tensor", kv_heads="tensor", mlp="tensor", vocab="tensor")
  # Auto axes: the decoder has no sharding code and leaves propagation to the compiler (GSPMD).
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          *(rules.get(name) for name in spec))), models.logical_specs(params))
  sharded = jax.device_put(params, shardings)
  assert sharded["layers"]["wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(sharded, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5)


# ---------------------------------------------------------------- export round trip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_import_identical_params(family, tmp_path, dtype):
  folder, model, tokenizer, _ = family
  export.export_hf(model, tokenizer, tmp_path, dtype=dtype)
  back, back_tokenizer = models.load(str(tmp_path), param_dtype=dtype)
  assert back.config == model.config
  for a, b in zip(jax.tree.leaves(_pure(back)), jax.tree.leaves(_pure(model))):
    assert a.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(a, b.astype(dtype))
  hf_config = json.loads((tmp_path / "config.json").read_text())
  assert hf_config["torch_dtype"] == dtype
  # Same tensors, names and layout as the transformers checkpoint we imported.
  ours, theirs = load_file(tmp_path / "model.safetensors"), dict(hf.SafetensorsDict(folder))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value.astype(dtype))
  assert back_tokenizer.chat_template == tokenizer.chat_template
  assert back_tokenizer("Paris 42").input_ids == tokenizer("Paris 42").input_ids


def test_export_round_trip_keeps_logits_and_greedy(family, tmp_path):
  """Export, then load what was written (its config.json included): transformers' logits and
  greedy tokens still."""
  _, model, tokenizer, golden = family
  export.export_hf(model, tokenizer, tmp_path)
  back, _ = models.load(str(tmp_path))
  np.testing.assert_allclose(np.asarray(back(jnp.asarray(golden["tokens"]))), golden["logits"],
                             atol=1e-4, rtol=0)
  np.testing.assert_array_equal(_greedy(back, golden), golden["greedy"])


def test_export_cli(tmp_path, capsys):
  folder = FIXTURES / "tiny_qwen3"
  export.cli_main(["dft_jax.export", f"--model={folder}", f"--out={tmp_path / 'out'}"])
  assert "exported qwen3" in capsys.readouterr().out
  back, _ = models.load(str(tmp_path / "out"))
  original, _ = models.load(str(folder))
  for a, b in zip(jax.tree.leaves(_pure(back)), jax.tree.leaves(_pure(original))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_export_cli_from_a_training_checkpoint(tmp_path, capsys):
  """A trained workdir exports to an HF folder that loads back to the checkpoint's weights."""
  from dft_jax import checkpoint, train
  from test_train import tiny_config
  config = tiny_config(tmp_path, train__num_steps=1)
  config.log.tensorboard = False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  export.cli_main(["dft_jax.export", f"--model={tmp_path / 'run'}", f"--out={tmp_path / 'out'}"])
  assert "exported llama" in capsys.readouterr().out
  trained, _, _, _ = checkpoint.restore_model(str(tmp_path / "run"))
  back, _ = models.load(str(tmp_path / "out"))
  original, _ = models.load(str(FIXTURES / "tiny_llama"))
  moved = False
  for a, b, c in zip(*(jax.tree.leaves(_pure(m)) for m in (back, trained, original))):
    np.testing.assert_array_equal(a, b)
    moved |= not np.array_equal(a, c)
  assert moved  # the exported weights are the trained ones, not the starting model's


# ---------------------------------------------------------------- attention


def _numpy_attention(q, k, v, mask, scale=None):
  """float64 reference: softmax(scale q k^T masked) v (scale 1/sqrt(H)), k/v heads repeated for
  GQA."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * (scale or q.shape[-1] ** -0.5)
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("window, scale", [(None, None), (3, 0.2)])
def test_xla_attention_matches_numpy_with_segments(window, scale):
  rng = np.random.RandomState(0)
  q = rng.randn(2, 10, 4, 8).astype(np.float32)
  k, v = (rng.randn(2, 10, 2, 8).astype(np.float32) for _ in range(2))
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1] * 10], np.int32)
  out = attention.attend(q, k, v, segment_ids_BxT=jnp.asarray(seg), impl="xla", window=window,
                         scale=scale)
  i, j = np.arange(10)[:, None], np.arange(10)[None]
  near = np.ones((10, 10), bool) if window is None else i - j < window
  mask = (((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (j <= i) & near)
          | (i == j))[:, None]
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask, scale), atol=1e-5)
  causal = attention.attend(q, k, v, impl="xla", window=window, scale=scale)
  np.testing.assert_allclose(np.asarray(causal[1]), np.asarray(out[1]), atol=1e-6)


def test_segment_runs_describe_the_same_mask():
  """cuDNN's packed arguments, expanded back to a mask, give causal-within-run attention."""
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [5] * 8, [1, 2, 3, 4, 5, 6, 7, 7]], np.int32)
  seqlen, offsets = (np.asarray(a) for a in attention.segment_runs(jnp.asarray(seg), 4))
  np.testing.assert_array_equal(seqlen, [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 1, 5]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1],
                                          [0, 1, 2, 3, -1]])
  for b in range(2):  # within max_segments: runs are exactly the segments
    run = np.zeros(8, int)
    for r, (start, n) in enumerate(zip(offsets[b], seqlen[b])):
      if n > 0:
        run[start:start + n] = r
    np.testing.assert_array_equal(run[:, None] == run[None], seg[b][:, None] == seg[b][None])


def test_attention_impl_resolution():
  assert attention.resolve_impl("auto", jnp.float32) == "xla"
  assert attention.resolve_impl("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ModelError, match="supported: auto, xla, cudnn"):
    attention.resolve_impl("flash", jnp.bfloat16)


# ---------------------------------------------------------------- config and errors


def test_from_hf_reads_both_rope_layouts():
  base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2)
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64)
  legacy = models.ModelConfig.from_hf(
      dict(base, rope_theta=5e5, rope_scaling=dict(rope_type="llama3", **scaling)))
  v5 = models.ModelConfig.from_hf(
      dict(base, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **scaling)))
  assert legacy == v5
  assert legacy.rope_scaling == models.Llama3RopeScaling(8.0, 1.0, 4.0, 64)
  assert legacy.num_kv_heads == 2 and legacy.head_dim == 8
  assert models.ModelConfig.from_hf(legacy.to_hf()) == legacy


def test_from_hf_reads_yarn_as_qwen25_writes_it():
  """Qwen2.5's documented YaRN block (legacy "type" key; original length defaults as in
  transformers)."""
  hf_config = json.loads((FIXTURES / "tiny_qwen2" / "config.json").read_text())
  hf_config.pop("rope_parameters")
  c = models.ModelConfig.from_hf(dict(hf_config, rope_theta=1e6, max_position_embeddings=131072,
                                      rope_scaling=dict(type="yarn", factor=4.0)))
  assert c.rope_scaling == models.YarnRopeScaling(factor=4.0,
                                                  original_max_position_embeddings=131072)
  c = models.ModelConfig.from_hf(dict(hf_config, rope_scaling=dict(
      type="yarn", factor=4.0, original_max_position_embeddings=32768, beta_fast=16)))
  assert c.rope_scaling.beta_fast == 16 and c.rope_scaling.original_max_position_embeddings == 32768
  assert models.ModelConfig.from_hf(c.to_hf()) == c


def test_from_hf_reads_gemma3_hub_and_transformers5_layouts():
  """Gemma 3 as the hub has it (rope_theta, rope_local_base_freq, rope_scaling, a
  sliding_window_pattern instead of layer_types) = as transformers 5 saves it."""
  v5 = json.loads((FIXTURES / "tiny_gemma3" / "config.json").read_text())
  hub = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
  hub.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2,
             rope_scaling=dict(rope_type="linear", factor=8.0))
  assert models.ModelConfig.from_hf(hub) == models.ModelConfig.from_hf(v5)
  c = models.ModelConfig.from_hf(v5)
  assert c.rope_scaling == models.LinearRopeScaling(8.0) and c.local_rope_theta == 1e4
  assert models.ModelConfig.from_hf(c.to_hf()) == c


FAMILY_NAMES = "llama, mistral, qwen2, qwen3, qwen3_moe, gemma3_text"


@pytest.mark.parametrize("fixture, field, value, shown, supported", [
    ("llama", "model_type", "gemma2", "'gemma2'", FAMILY_NAMES),
    ("llama", "model_type", "gemma3", "multimodal Gemma 3", FAMILY_NAMES),
    ("llama", "rope_scaling", {"rope_type": "longrope", "factor": 4.0}, "'longrope'",
     "default, linear, llama3, yarn"),
    ("llama", "hidden_act", "gelu", "'gelu'", "'silu', 'gelu_pytorch_tanh'"),
    ("llama", "attention_bias", True, "True", "False"),
    ("qwen2", "layer_types", ["chunked_attention"] * 2, "'chunked_attention'",
     "'full_attention', 'sliding_attention'"),
    ("gemma3", "final_logit_softcapping", 30.0, "30.0", "None"),
    ("gemma3", "attn_logit_softcapping", 50.0, "50.0", "None"),
    ("gemma3", "use_bidirectional_attention", True, "True", "False"),
    ("qwen3_moe", "mlp_only_layers", [0], "[0]", "[]"),
    ("qwen3_moe", "decoder_sparse_step", 2, "2", "1"),
])
def test_unsupported_config_fields_name_field_and_options(fixture, field, value, shown,
                                                          supported):
  hf_config = json.loads((FIXTURES / f"tiny_{fixture}" / "config.json").read_text())
  if field == "rope_scaling":
    hf_config.pop("rope_parameters")
  hf_config[field] = value
  with pytest.raises(ModelError) as e:
    models.ModelConfig.from_hf(hf_config)
  message = str(e.value)
  assert f"{field}" in message and shown in message and f"supported: {supported}" in message


def _copy_fixture(tmp_path, family="tiny_qwen2"):
  folder = tmp_path / family
  folder.mkdir()
  for f in (FIXTURES / family).iterdir():
    (folder / f.name).write_bytes(f.read_bytes())
  return folder


def test_load_errors(tmp_path):
  with pytest.raises(ModelError, match="not found.*smollm2-135m-instruct"):
    models.load(str(tmp_path / "nope"))
  with pytest.raises(ModelError, match="presets: qwen2.5-0.5b"):
    models.load("preset:qwen9")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ModelError, match="has no config.json"):
    models.load(str(empty))
  folder = _copy_fixture(tmp_path)
  (folder / "model.safetensors").unlink()
  with pytest.raises(ModelError, match="has no model.safetensors"):
    models.load(str(folder))


def test_truncated_safetensors(tmp_path):
  folder = _copy_fixture(tmp_path)
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ModelError, match="model.safetensors"):
    models.load(str(folder))


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
  folder = _copy_fixture(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  name = "model.layers.1.self_attn.k_proj.bias"
  save_file({k: v for k, v in tensors.items() if k != name}, folder / "model.safetensors")
  with pytest.raises(ModelError, match=f"lacks the tensor '{name}'"):
    models.load(str(folder))
  save_file(dict(tensors, **{name: np.zeros(3, np.float32)}), folder / "model.safetensors")
  with pytest.raises(ModelError, match=rf"'{name}' has shape \(3,\), expected \(32,\)"):
    models.load(str(folder))
  extra = "model.layers.0.self_attn.o_proj.bias"
  save_file(dict(tensors, **{extra: np.zeros(64, np.float32)}), folder / "model.safetensors")
  with pytest.raises(ModelError, match=extra):
    models.load(str(folder))


def test_sharded_index(tmp_path):
  folder = _copy_fixture(tmp_path, "tiny_llama")
  tensors = load_file(folder / "model.safetensors")
  (folder / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, folder / file)
  weight_map = {k: f for f, keys in shards.items() for k in keys}
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model, _ = models.load(str(folder))
  golden = np.load(folder / "golden.npz")
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(golden["tokens"]))), golden["logits"],
                             atol=1e-4)
  (folder / "b.safetensors").unlink()
  with pytest.raises(ModelError, match="b.safetensors does not exist"):
    models.load(str(folder))


def test_bad_decoder_options():
  config = models.PRESETS["tiny-llama"]
  with pytest.raises(ConfigError, match="remat 'all' is not supported; supported: none"):
    models.Decoder(config, remat="all", rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="attention 'flash'"):
    models.Decoder(config, attention="flash", rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="param_dtype 'float16'"):
    models.Decoder(config, param_dtype="float16", rngs=nnx.Rngs(0))


def test_presets():
  for name, n_params in [("qwen2.5-0.5b", 494e6), ("qwen2.5-1.5b", 1544e6), ("qwen2.5-7b", 7616e6)]:
    model = nnx.eval_shape(lambda name=name: models.Decoder(models.PRESETS[name], rngs=nnx.Rngs(0)))
    n = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(n / n_params - 1) < 0.005, (name, n)  # published parameter counts
  model, tokenizer = models.load("preset:tiny-qwen3", seed=1)
  assert tokenizer is None
  assert model.config == models.PRESETS["tiny-qwen3"]
  assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 320)
