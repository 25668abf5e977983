"""LoRA / QLoRA (dft_jax/models/lora.py, quant.py, peft.py) against PEFT golden adapters and float64
numpy references.

Golden fixtures: tests/fixtures/tiny_<family>_lora/ (PEFT's own adapter folder for the tiny model
tiny_<family>/, random nonzero A and B, and the PeftModel's float32 logits), made by
tests/fixtures/make_lora_golden.py, which also checks with torch that transformers loads our merged
export and PEFT loads our adapter export.
"""
import json
import pathlib
from statistics import NormalDist

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dft_jax import export, models
from dft_jax.errors import ConfigError, ModelError
from dft_jax.models import decoder, hf, lora, peft, quant

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "qwen3_moe")  # qwen3_moe: attention targets
# NF4 as printed in the QLoRA paper (arXiv:2305.14314, Appendix E).
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _base(family):
  return str(FIXTURES / f"tiny_{family}")


def _golden(family):
  return np.load(FIXTURES / f"tiny_{family}_lora" / "golden.npz")


@pytest.fixture(scope="module", params=FAMILIES)
def adapted(request):
  """(family, base model, the PEFT golden adapters loaded by our importer, golden npz)."""
  family = request.param
  base, _ = models.load(_base(family))
  model, _ = peft.load(_base(family), FIXTURES / f"tiny_{family}_lora")
  return family, base, model, _golden(family)


# ---------------------------------------------------------------- quantisation (float64 references)


def test_nf4_code_book_is_the_papers():
  np.testing.assert_allclose(quant.NF4, NF4_PAPER, rtol=0, atol=2e-7)
  # The construction, independently: 8 positive and 7 negative normal quantiles, 0, scaled to 1.
  inv = NormalDist().inv_cdf
  ends = inv(quant.NF4_OFFSET)
  np.testing.assert_allclose(quant.NF4[8:], [inv(p) / ends for p in
                                             np.linspace(0.5, quant.NF4_OFFSET, 9)[1:]], atol=1e-7)
  assert quant.NF4[7] == 0 and len(set(quant.NF4)) == 16


def _nf4_reference(w, axis, block):
  """float64 blockwise absmax NF4 (arXiv:2305.14314): (code indices, dequantised), blocks of
  `block` consecutive elements along `axis`."""
  w = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  blocks = w.reshape(*w.shape[:-1], -1, block)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  book = np.asarray(NF4_PAPER)
  index = np.abs((blocks / absmax)[..., None] - book).argmin(-1)
  deq = book[index] * absmax
  back = lambda a: np.moveaxis(a.reshape(w.shape), -1, axis)
  return back(index), back(deq), back(np.broadcast_to(absmax, blocks.shape))


def _unpack(codes, axis):
  """uint8 pairs along `axis` -> 4-bit code indices (high nibble first)."""
  return np.stack([codes >> 4, codes & 15], axis=axis % codes.ndim + 1).reshape(
      *codes.shape[:axis % codes.ndim], -1, *codes.shape[axis % codes.ndim + 1:])


@pytest.mark.parametrize("shape, in_axes", [((2, 128, 3, 4), (-3,)),    # wq-like [L, D, N, H]
                                            ((2, 3, 128, 8), (-3, -2))])  # wo-like [L, N, H, D]
def test_nf4_matches_float64_reference_and_error_bound(shape, in_axes):
  w = np.random.RandomState(0).standard_t(5, size=shape).astype(np.float32)
  codes, scale = quant.quantize(w, "nf4", in_axes, block_size=64)
  assert codes.dtype == jnp.uint8 and codes.shape[in_axes[-1]] == shape[in_axes[-1]] // 2
  assert scale.shape[in_axes[-1]] == shape[in_axes[-1]] // 64
  deq = np.asarray(quant.dequantize(codes, scale, "nf4", in_axes, jnp.float32))
  index, ref, absmax = _nf4_reference(w, in_axes[-1], 64)
  assert np.mean(_unpack(np.asarray(codes), in_axes[-1]) == index) > 0.999  # ties aside
  np.testing.assert_allclose(deq, ref, rtol=0, atol=1e-6 * np.abs(w).max())
  half_gap = np.diff(NF4_PAPER).max() / 2
  assert np.all(np.abs(deq - w) <= absmax * half_gap + 1e-6)


def test_nf4_represents_its_own_values_exactly():
  """Blocks made of NF4 values times a scale, each holding a 1.0: codes and values round-trip."""
  rng = np.random.RandomState(1)
  index = rng.randint(0, 16, size=(4, 32))
  index[:, 5] = 15
  w = (quant.NF4[index] * rng.uniform(0.5, 2, size=(4, 1)).astype(np.float32)).T  # [in=32, 4]
  codes, scale = quant.quantize(w, "nf4", (-2,), block_size=32)
  np.testing.assert_array_equal(_unpack(np.asarray(codes), -2), index.T)
  np.testing.assert_array_equal(quant.dequantize(codes, scale, "nf4", (-2,), jnp.float32), w)
  zeros = quant.dequantize(*quant.quantize(np.zeros((64, 2)), "nf4", (-2,)), "nf4", (-2,),
                           jnp.float32)
  np.testing.assert_array_equal(zeros, 0)


def test_int8_per_channel_matches_float64_reference():
  w = np.random.RandomState(2).randn(2, 3, 16, 8).astype(np.float32)  # wo-like [L, N, H, D]
  codes, scale = quant.quantize(w, "int8", (-3, -2))
  assert codes.dtype == jnp.int8 and scale.shape == (2, 1, 1, 8)
  w64 = w.astype(np.float64)
  ref_scale = np.abs(w64).max(axis=(1, 2), keepdims=True) / 127
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  np.testing.assert_array_equal(codes, np.round(w64 / ref_scale))
  deq = np.asarray(quant.dequantize(codes, scale, "int8", (-3, -2), jnp.float32))
  assert np.all(np.abs(deq - w64) <= ref_scale / 2 * (1 + 1e-5))
  assert np.abs(codes).max() == 127


# ---------------------------------------------------------------- the adapted decoder vs PEFT


def test_delta_equations():
  assert lora.delta_equations("btd,dnh->btnh") == ("btd,dr->btr", "btr,rnh->btnh")
  assert lora.delta_equations("btnh,nhd->btd") == ("btnh,nhr->btr", "btr,rd->btd")


def test_fresh_adapters_give_the_base_logits_exactly(family="qwen2"):
  tokens = jnp.asarray(_golden(family)["tokens"])
  base, _ = models.load(_base(family))
  model, _ = models.load(_base(family), lora=models.LoRAConfig(rank=4, alpha=8.0), seed=3)
  a = model.layers["wq_lora_a"][...]
  assert a.dtype == jnp.float32 and float(jnp.abs(a).max()) > 0 and float(
      jnp.abs(a).max()) <= 1 / np.sqrt(model.config.hidden_size)
  np.testing.assert_array_equal(model(tokens), base(tokens))


def test_adapted_logits_match_peft(adapted):
  _, _, model, golden = adapted
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(golden["tokens"]))), golden["logits"],
                             rtol=0, atol=1e-4)


def test_adapters_off_is_the_base_model(adapted):
  """The reference policy (adapters=False) is the base, from the same weights."""
  _, base, model, golden = adapted
  tokens = jnp.asarray(golden["tokens"])
  np.testing.assert_array_equal(model.hidden_states(tokens, adapters=False),
                                base.hidden_states(tokens))
  np.testing.assert_array_equal(model(tokens, adapters=False), base(tokens))
  assert np.abs(np.asarray(model(tokens)) - np.asarray(base(tokens))).max() > 0.5


def test_merged_export_reproduces_the_adapted_logits(adapted, tmp_path):
  family, _, model, golden = adapted
  tokens = jnp.asarray(golden["tokens"])
  export.export_hf(model, None, tmp_path)
  merged, _ = models.load(str(tmp_path))
  assert merged.lora is None
  np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)), atol=2e-5,
                             rtol=2e-6)
  written = load_file(tmp_path / "model.safetensors")
  original = dict(hf.SafetensorsDict(FIXTURES / f"tiny_{family}"))
  targets = {peft.module_name(t) for t in model.lora.targets}
  for name, value in original.items():
    adapted_weight = name.endswith(".weight") and name.split(".")[-2] in targets
    assert np.array_equal(written[name], value) != adapted_weight, name


def test_peft_export_is_pefts_own_format(adapted, tmp_path):
  family, _, model, golden = adapted
  export.export_peft(model, tmp_path, base_model_name_or_path=f"tiny_{family}")
  theirs_dir = FIXTURES / f"tiny_{family}_lora"
  ours, theirs = (load_file(d / peft.WEIGHTS_FILE) for d in (tmp_path, theirs_dir))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert ours[name].dtype == np.float32
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  ours_cfg, theirs_cfg = (json.loads((d / peft.CONFIG_FILE).read_text())
                          for d in (tmp_path, theirs_dir))
  assert set(ours_cfg) <= set(theirs_cfg)
  for key in ours_cfg:
    if key != "target_modules":
      assert ours_cfg[key] == theirs_cfg[key], key
  assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
  back, _ = peft.load(_base(family), tmp_path)
  assert back.lora == model.lora
  tokens = jnp.asarray(golden["tokens"])
  np.testing.assert_array_equal(back(tokens), model(tokens))


# ---------------------------------------------------------------- training: only adapters move


def _loss(graphdef, tokens):
  def loss(adapters, frozen):
    logits = nnx.merge(graphdef, adapters, frozen)(tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))
  return loss


@pytest.mark.parametrize("base_quant", [None, pytest.param("nf4", marks=pytest.mark.slow)])
def test_gradients_reach_only_the_adapters(base_quant):
  golden = _golden("qwen3")
  tokens = jnp.asarray(golden["tokens"])
  model, _ = peft.load(_base("qwen3"), FIXTURES / "tiny_qwen3_lora")
  if base_quant:  # the same adapters on a quantised base
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["layers"]
    config = models.LoRAConfig(rank=8, alpha=4.0, base_quant=base_quant, block_size=16)
    model, _ = models.load(_base("qwen3"), lora=config)
    peft.set_adapters(model, adapters)
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  assert all(lora.is_adapter(k) for k in adapters["layers"])
  assert not any(lora.is_adapter(k) for k in frozen["layers"])
  loss = jax.jit(_loss(graphdef, tokens))
  grad = jax.jit(jax.grad(_loss(graphdef, tokens)))
  grads = grad(adapters, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for path, g in jax.tree.leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, path
  # Central difference along the gradient: d/de loss(adapters + e u) = |g| for u = g / |g|.
  norm = _global_norm(grads)
  eps = 1e-2
  shifted = [loss(jax.tree.map(lambda a, g: a + s * eps * g / norm, adapters, grads), frozen)
             for s in (1, -1)]
  np.testing.assert_allclose((shifted[0] - shifted[1]) / (2 * eps), norm, rtol=2e-2)
  # At B = 0 (fresh adapters) A gets no gradient (d/dA of x A B is x^T g B^T) and B does.
  pure = nnx.to_pure_dict(adapters)["layers"]
  nnx.replace_by_pure_dict(adapters, {"layers": {
      k: jnp.zeros_like(v) if k.endswith("_lora_b") else v for k, v in pure.items()}})
  grads = grad(adapters, frozen)["layers"]
  for name in model.lora.adapted():
    a, b = lora.adapter_names(name)
    assert float(jnp.abs(grads[a][...]).max()) == 0 and float(jnp.abs(grads[b][...]).max()) > 0


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- QLoRA in the decoder


@pytest.mark.parametrize("base_quant, close", [
    ("int8", 0.05), pytest.param("nf4", 0.5, marks=pytest.mark.slow)])
def test_quantised_base_is_the_dequantised_model(base_quant, close, tmp_path):
  """QLoRA with fresh adapters computes the model whose weights are the dequantised ones (the
  merged export holds them), close to the float base; adapters=False gives the same."""
  golden = np.load(FIXTURES / "tiny_qwen3" / "golden.npz")
  tokens = jnp.asarray(golden["tokens"])
  config = models.LoRAConfig(rank=4, base_quant=base_quant, block_size=16)
  model, _ = models.load(_base("qwen3"), lora=config, param_dtype="bfloat16")
  kinds = {type(v) for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda v: isinstance(
      v, nnx.Variable))}
  assert kinds == {nnx.Param, nnx.LoRAParam, quant.QuantizedWeight}
  assert "wq" not in model.layers and model.layers["wq_codes"][...].dtype == (
      jnp.int8 if base_quant == "int8" else jnp.uint8)
  export.export_hf(model, None, tmp_path, dtype="float32")
  dequantised, _ = models.load(str(tmp_path))
  logits = np.asarray(model(tokens))
  np.testing.assert_allclose(logits, np.asarray(dequantised(tokens)), atol=1e-4)
  np.testing.assert_array_equal(model(tokens, adapters=False), logits)
  assert np.abs(logits - golden["logits"]).max() < close * np.abs(golden["logits"]).max()


def _float_shapes(jaxpr):
  """(shape, dtype) of every value any equation of jaxpr (and its sub-jaxprs) produces."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "shape")}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _float_shapes(sub)
  return out


def test_quantised_weights_are_dequantised_one_layer_at_a_time():
  """The training gradient never holds all layers of a projection dequantised: no float value
  shaped like a stacked weight [L, ...] appears anywhere in its program (remat off)."""
  config = models.PRESETS["tiny-qwen3"]
  model = models.Decoder(config, lora=models.LoRAConfig(rank=2, base_quant="nf4", block_size=16),
                         rngs=nnx.Rngs(0))
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  grad = jax.grad(_loss(graphdef, jnp.zeros((1, 8), jnp.int32)))
  produced = _float_shapes(jax.make_jaxpr(grad)(adapters, frozen).jaxpr)
  stacked = {(config.num_layers, *shape) for name, (shape, _) in
             decoder.layer_param_shapes(config).items() if name in decoder.PROJECTIONS}
  per_layer = {shape[1:] for shape in stacked}
  floats = {shape for shape, dtype in produced if jnp.issubdtype(dtype, jnp.floating)}
  assert per_layer <= floats  # the scan body does dequantise each layer
  assert not stacked & floats


# ---------------------------------------------------------------- sharding


def test_adapters_and_quantised_base_shard_by_logical_rules():
  from dft_jax import sharding
  golden = _golden("qwen3")
  tokens = jnp.asarray(golden["tokens"])
  config = models.LoRAConfig(rank=8, alpha=4.0, base_quant="nf4", block_size=16)
  model, _ = models.load(_base("qwen3"), lora=config)
  peft.set_adapters(model, peft.from_peft(model.config, config, load_file(
      FIXTURES / "tiny_qwen3_lora" / peft.WEIGHTS_FILE)))
  graphdef, state = nnx.split(model)
  specs = models.logical_specs(state)
  assert specs["layers"]["wq_lora_a"].get_value() == jax.sharding.PartitionSpec(
      "layers", "embed", "lora_rank")
  assert specs["layers"]["wo_lora_b"].get_value() == jax.sharding.PartitionSpec(
      "layers", "lora_rank", "embed")
  assert specs["layers"]["wq_codes"].get_value() == jax.sharding.PartitionSpec(
      "layers", "embed", "q_heads", "head_dim")
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  sharded = jax.device_put(state, sharding.param_shardings(state, specs, mesh))
  assert sharded["layers"]["wq_lora_a"].get_value().sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  assert sharded["layers"]["wq_codes"].get_value().sharding.spec[1] == "fsdp"
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(sharded, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "lora.rank must be a positive integer"),
    (dict(alpha=0.0), "lora.alpha must be a finite number > 0, got 0.0"),
    (dict(targets=("q", "qkv")), "lora.targets.*among q, k, v, o, gate, up, down"),
    (dict(targets=()), "lora.targets"),
    (dict(base_quant="fp8"), "lora.base_quant 'fp8' is not supported; supported: None, int8, nf4"),
    (dict(block_size=3), "lora.block_size must be an even number"),
])
def test_bad_lora_config(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    models.LoRAConfig(**kwargs)


def test_block_size_must_divide_the_inputs():
  with pytest.raises(ConfigError, match="lora.block_size=64 must be even and divide the input "
                                        "size 16"):
    models.load("preset:tiny-llama", lora=models.LoRAConfig(base_quant="nf4"))


def _copy_adapters(tmp_path, family="qwen2"):
  folder = tmp_path / f"tiny_{family}_lora"
  folder.mkdir()
  for f in (FIXTURES / f"tiny_{family}_lora").iterdir():
    (folder / f.name).write_bytes(f.read_bytes())
  return folder


def test_peft_folder_errors(tmp_path):
  folder = _copy_adapters(tmp_path)
  config = json.loads((folder / peft.CONFIG_FILE).read_text())
  for field, value in [("use_dora", True), ("use_rslora", True), ("peft_type", "IA3"),
                       ("target_modules", ["lm_head"]), ("layers_to_transform", [0])]:
    (folder / peft.CONFIG_FILE).write_text(json.dumps(dict(config, **{field: value})))
    with pytest.raises(ModelError, match=f"{field}.*not supported"):
      peft.read_config(folder)
  (folder / peft.CONFIG_FILE).write_text(json.dumps(config))
  tensors = load_file(folder / peft.WEIGHTS_FILE)
  name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
  save_file({k: v for k, v in tensors.items() if k != name}, folder / peft.WEIGHTS_FILE)
  with pytest.raises(ModelError, match=f"lacks the tensor '{name}'"):
    peft.load(_base("qwen2"), folder)
  save_file(dict(tensors, **{name: np.zeros((64, 3), np.float32)}), folder / peft.WEIGHTS_FILE)
  with pytest.raises(ModelError, match=rf"'{name}' has shape \(64, 3\), expected \(64, 2\)"):
    peft.load(_base("qwen2"), folder)
  extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
  save_file(dict(tensors, **{extra: np.zeros((2, 64), np.float32)}), folder / peft.WEIGHTS_FILE)
  with pytest.raises(ModelError, match=extra):
    peft.load(_base("qwen2"), folder)
  with pytest.raises(ModelError, match="has no adapter_config.json"):
    peft.read_config(tmp_path)


def test_export_peft_needs_adapters(tmp_path):
  model, _ = models.load(_base("qwen3"))
  with pytest.raises(ModelError, match="no LoRA adapters"):
    export.export_peft(model, tmp_path)
