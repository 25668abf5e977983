"""lm_head.fused_loss / fused_objective_loss (gradient formed in the forward pass) against the naive
head (full logits, token_stats_naive + objectives.objective_loss, autodiff); the exact block top-k."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dft_jax import lm_head, objectives
from dft_jax import step as step_lib
from dft_jax.errors import ConfigError

B, T, D, V = 4, 37, 16, 50  # B * T = 148 tokens: no chunk size used here divides them
CHUNK = 16                   # 4 rows x 4 positions per chunk, T padded to 40
# Every objective (the fused head fits them all: closed-form gradients, sequence gates from a
# forward-only pass, the reference's logits in the chunk loop), and other statistics; each with the
# entropy bonus and the KL anchor on, so that their gradients flow too.
PER_TOKEN = [dict(name=name) for name in objectives.OBJECTIVES
             if step_lib.fused_head_fits(objectives.validate(dict(name=name)))] + [
    dict(name="eaft", eaft=dict(entropy="full", norm=4.0)),
    dict(name="eaft", eaft=dict(k=3)),
    dict(name="gem", gem=dict(beta=0.4, h="logsigmoid"))]
CFG_IDS = [f"{c['name']}-{c.get(c['name'], '')}" for c in PER_TOKEN]


def make_data(seed=0):
  """Two packed documents per row, padding (zero hidden states, targets -100, no loss) at the end
  of the last row, one unmasked token per row masked; old_logp / ref_logp near the model's, a
  reference model's hidden states and head weight near the model's."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (2.0 * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, 20:] = 2
  segment_ids[-1, 30:] = 0
  hidden[segment_ids == 0] = 0.0
  targets[segment_ids == 0] = -100
  loss_mask = (segment_ids > 0).astype(np.float32)
  loss_mask[:, 19] = 0.0
  logp = np.asarray(lm_head.token_stats_naive(hidden, w, targets)["logp"])
  extra = {"old_logp": logp + rng.normal(scale=0.3, size=(B, T)).astype(np.float32),
           "ref_logp": logp + rng.normal(scale=0.3, size=(B, T)).astype(np.float32),
           "token_key": np.asarray(step_lib.token_keys(seed, 0, (B, T)))}
  ref_hidden = (hidden + 0.5 * rng.normal(size=hidden.shape)).astype(np.float32)
  ref_w = (w + 0.2 * rng.normal(size=w.shape)).astype(np.float32)
  return dict(hidden=hidden, w=w, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
              ref_hidden=ref_hidden, ref_w=ref_w), extra


def reference_of(batch, setting):
  """The reference model's hidden states and head weight, when a statistic compares with it."""
  if not lm_head.needs_reference(setting.stats):
    return {}
  return dict(ref_hidden_BxTxD=batch["ref_hidden"], ref_w_DxV=batch["ref_w"])


def naive_loss(hidden, w, batch, cfg, extra, compute_dtype=None):
  """(loss, metrics) through the full logits: the reference."""
  setting = objectives.validate(cfg)
  stats = lm_head.token_stats_naive(hidden, w, batch["targets"], compute_dtype=compute_dtype,
                                    stats=setting.stats, extra_BxT=extra,
                                    **reference_of(batch, setting))
  return objectives.objective_loss({**stats, **extra}, batch, setting)


def fused(hidden, w, batch, cfg, extra, **kwargs):
  setting = objectives.validate(cfg)
  needed = {k: v for k, v in extra.items() if k in setting.needs}
  return step_lib.objective_loss_fused(hidden, w, batch, setting, extra_BxT=needed,
                                      chunk_size=kwargs.pop("chunk_size", CHUNK),
                                      **reference_of(batch, setting), **kwargs)


def value_and_grads(loss_fn, data, cfg, extra, **kwargs):
  fn = lambda h, w: loss_fn(h, w, data, cfg, extra, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(data["hidden"], data["w"])


def assert_grads_close(got, want, rtol=1e-4, atol_frac=1e-6):
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol_frac * np.abs(r).max())


# ----------------------------------------------------------------------------- exact top-k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 16, 17, 20, 33, 47])
def test_top_k_values_equal_lax_top_k(k, dtype):
  """The block method gives lax.top_k's values exactly: ties (also across blocks), rows with
  fewer finite entries than k, k equal maxima, k >= the number of blocks (one lax.top_k)."""
  rng = np.random.default_rng(k)
  x = rng.normal(size=(3, 5, 5000)).astype(np.float32)  # 40 blocks of TOPK_BLOCK
  x[0] = np.round(x[0] * 2)       # many ties
  x[1, :, :4990] = -np.inf        # fewer finite entries than k in some rows
  x[2, 0, 1000:1040] = 7.0        # the k largest all equal, spread over blocks
  x = jnp.asarray(x, dtype)
  got = jax.jit(lm_head.top_k_values, static_argnums=(1,))(x, k)
  want = jax.lax.top_k(x, k)[0]
  assert got.shape == want.shape == (3, 5, k) and got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_top_k_values_sort_blocks_not_the_vocabulary():
  """EAFT's k = 20 over a 151,936-entry vocabulary: the top_k calls run over the 1,187 block
  maxima and the 20 x 128 candidate entries of a row, never over the whole row."""
  x = jax.ShapeDtypeStruct((2, 8, 151_936), jnp.bfloat16)
  lowered = jax.jit(lambda x: lm_head.top_k_values(x, 20)).lower(x).as_text()
  pattern = r"chlo.top_k\(%\w+, k = 20\) : tensor<\d+x\d+x(\d+)x"
  widths = sorted(int(n) for n in re.findall(pattern, lowered))
  assert widths == sorted([20 * lm_head.TOPK_BLOCK, -(-151_936 // lm_head.TOPK_BLOCK)]), widths


# ----------------------------------------------------------------------------- fused == naive


@pytest.mark.parametrize("cfg", PER_TOKEN, ids=CFG_IDS)
def test_loss_gradients_and_metrics_match_naive(cfg):
  data, extra = make_data()
  cfg = dict(cfg, entropy_coef=0.05, kl_coef=0.1)
  (ref_loss, ref_metrics), ref_grads = value_and_grads(naive_loss, data, cfg, extra)
  (loss, metrics), grads = value_and_grads(fused, data, cfg, extra)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)
  assert np.abs(ref_grads[1]).max() > 0
  assert np.all(np.asarray(grads[0])[data["loss_mask"] == 0] == 0)  # no loss, no gradient
  assert set(metrics) == set(ref_metrics)
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  forward_only = jax.jit(lambda h, w: fused(h, w, data, cfg, extra)[0])(data["hidden"], data["w"])
  np.testing.assert_allclose(forward_only, loss, rtol=1e-6)


def test_psft_with_the_current_policy_as_snapshot():
  """One update per batch: old_logp = sg(logp) of the same forward (the train step's K = 1)."""
  data, _ = make_data()
  cfg = dict(name="psft", kl_coef=0.1)

  def naive_current(hidden, w, batch, cfg, extra):
    setting = objectives.validate(cfg)
    stats = lm_head.token_stats_naive(hidden, w, batch["targets"], stats=setting.stats,
                                      extra_BxT=extra)
    stats = dict(stats, old_logp=jax.lax.stop_gradient(stats["logp"]), **extra)
    return objectives.objective_loss(stats, batch, setting)

  ref_logp = {"ref_logp": make_data()[1]["ref_logp"]}
  (ref_loss, ref_metrics), ref_grads = value_and_grads(naive_current, data, cfg, ref_logp)
  (loss, metrics), grads = value_and_grads(fused, data, cfg, ref_logp, current_old_logp=True)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)
  np.testing.assert_allclose(metrics["tok/psft/ratio"], ref_metrics["tok/psft/ratio"])
  assert float(ref_metrics["tok/psft/ratio"]) == float(ref_metrics["num_tokens"])


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_sizes(chunk_size):
  data, extra = make_data(1)
  cfg = dict(name="dft", entropy_coef=0.05)
  (ref_loss, _), ref_grads = value_and_grads(naive_loss, data, cfg, extra)
  (loss, _), grads = value_and_grads(fused, data, cfg, extra, chunk_size=chunk_size)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


def resolved_stats(*cfgs):
  """The resolved statistics of the objective configs, each once."""
  return tuple(dict.fromkeys(s for cfg in cfgs for s in objectives.validate(cfg).stats))


# logp, entropy, topk_entropy:20, renyi2_entropy, gem_cross_entropy:0.7:linear and :logsigmoid,
# gem_mass:0.7:logsigmoid
FAMILY = {s.name: s for s in resolved_stats(dict(name="eaft"), dict(name="deft"), dict(name="gem"),
                                            dict(name="gem", gem=dict(h="logsigmoid")))}


def test_statistics_are_returned_without_gradient():
  data, _ = make_data()
  names = ("logp", "entropy", "topk_entropy:20", "renyi2_entropy", "gem_cross_entropy:0.7:linear",
           "gem_mass:0.7:logsigmoid")
  stats = tuple(FAMILY[n] for n in names)
  kwargs = dict(weights_BxT=data["loss_mask"], stats=stats, chunk_size=CHUNK)
  loss, values = jax.jit(lambda h, w: lm_head.fused_loss(
      h, w, data["targets"], per_token_loss=lambda v: -v["logp"], **kwargs))(data["hidden"],
                                                                             data["w"])
  naive = lm_head.token_stats_naive(data["hidden"], data["w"], data["targets"], stats=stats)
  for name in names:
    np.testing.assert_allclose(values[name], naive[name], rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(loss, -np.sum(naive["logp"] * data["loss_mask"]), rtol=1e-5)
  through_stats = jax.jit(jax.grad(lambda h: jnp.sum(lm_head.fused_loss(
      h, data["w"], data["targets"], per_token_loss=lambda v: -v["logp"], **kwargs)[1]["logp"])))
  assert np.abs(through_stats(data["hidden"])).max() == 0


@pytest.mark.parametrize("name", ["renyi2_entropy", "topk_entropy:20", "gem_mass:0.7:logsigmoid",
                                  "entropy", "gem_cross_entropy:0.7:logsigmoid"])
def test_gate_statistics_get_no_gradient(name):
  """A loss that reads a gate statistic without stop_gradient still gets no gradient from it."""
  data, _ = make_data()
  loss = lambda h: lm_head.fused_loss(h, data["w"], data["targets"],
                                      per_token_loss=lambda v: v[name],
                                      weights_BxT=data["loss_mask"], stats=(FAMILY[name],),
                                      chunk_size=CHUNK)[0]
  grad = jax.jit(jax.grad(loss))(data["hidden"])
  assert (np.abs(grad).max() == 0) == (not FAMILY[name].gradient)


@pytest.mark.parametrize("cfg, read", [
    (dict(name="dft"), ("logp",)),
    (dict(name="eaft", eaft=dict(entropy="full")), ("logp",)),  # the entropy only as a gate
    (dict(name="sft", entropy_coef=0.1), ("logp", "entropy")),
    (dict(name="gem"), ("logp", "gem_cross_entropy:0.7:linear"))], ids=lambda x: str(x))
def test_only_statistics_read_with_gradient_enter_dlogits(cfg, read):
  setting = objectives.validate(cfg)
  names = ("logp", "entropy", "gem_cross_entropy:0.7:linear")
  values = {n: jnp.zeros((2, 3)) for n in names + ("old_logp",)}
  assert set(names) <= set(FAMILY)
  per_token = lambda v: sum(objectives.per_token_terms(v, {}, setting).values())
  read_with_gradient = lm_head._read_with_gradient  # pylint: disable=protected-access
  assert read_with_gradient(per_token, values, names) == read


# ----------------------------------------------------------------------------- dtypes, padding


def test_bfloat16_close_to_float32():
  data, extra = make_data()
  cfg = dict(name="dft", entropy_coef=0.05)
  (ref_loss, _), ref_grads = value_and_grads(naive_loss, data, cfg, extra)
  (loss, _), grads = value_and_grads(fused, data, cfg, extra, compute_dtype=jnp.bfloat16)
  np.testing.assert_allclose(loss, ref_loss, rtol=0.02)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == jnp.float32  # cotangents in the inputs' dtype
    np.testing.assert_allclose(g, r, atol=0.03 * np.abs(r).max())
  bf16 = {k: data[k].astype(jnp.bfloat16) for k in ("hidden", "w")}
  grads = jax.jit(jax.grad(lambda h, w: fused(h, w, data, cfg, extra)[0], argnums=(0, 1)))(
      bf16["hidden"], bf16["w"])
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=0.03 * np.abs(r).max())


@pytest.mark.parametrize("cfg", [dict(name="psft"), dict(name="eaft"),
                                 dict(name="gem", gem=dict(h="logsigmoid"))],
                         ids=lambda c: c["name"])
def test_padding_tokens_give_finite_values(cfg):
  data, extra = make_data()
  data["hidden"][data["segment_ids"] == 0] = 1e4  # garbage on padding must not leak
  cfg = dict(cfg, entropy_coef=0.05, kl_coef=0.1)
  (loss, metrics), grads = value_and_grads(fused, data, cfg, extra, compute_dtype=jnp.bfloat16)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  assert all(np.all(np.isfinite(v)) for v in metrics.values())


def test_tokens_without_weight_add_nothing_even_if_their_loss_is_infinite():
  data, _ = make_data()
  mask = data["loss_mask"]

  def loss(hidden, w):  # -logp / mask: inf on the masked tokens, and so is its gradient
    return lm_head.fused_loss(hidden, w, data["targets"],
                              per_token_loss=lambda v: -v["logp"] / v["mask"], weights_BxT=mask,
                              extra_BxT={"mask": mask}, chunk_size=CHUNK)[0]
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(data["hidden"], data["w"])
  ref = lambda hidden, w: -jnp.sum(mask * lm_head.token_stats_naive(hidden, w,
                                                                    data["targets"])["logp"])
  ref_value, ref_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(data["hidden"],
                                                                          data["w"])
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


# ----------------------------------------------------------------------------- in the train step


def test_microbatches_in_a_scan_sum_to_the_whole_batch():
  """Microbatches under lax.scan with the global batch's denominators (as the train step runs
  them) give the whole batch's loss and gradients."""
  data, extra = make_data()
  cfg = dict(name="psft", kl_coef=0.1, aggregation="seq_mean")
  (ref_loss, _), ref_grads = value_and_grads(naive_loss, data, cfg, extra)
  denominators = objectives.global_denominators(data["loss_mask"], data["segment_ids"])
  rows = {k: data[k] for k in ("targets", "loss_mask", "segment_ids")}
  micro = jax.tree.map(lambda v: v.reshape(2, B // 2, *v.shape[1:]),
                       dict(rows, hidden=data["hidden"], **extra))

  def accumulated(w):
    def step(acc, mb):
      fn = lambda h, w: step_lib.objective_loss_fused(
          h, w, mb, objectives.validate(cfg), extra_BxT={k: mb[k] for k in extra},
          denominators=denominators, chunk_size=CHUNK)[0]
      loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(mb["hidden"], w)
      return (acc[0] + loss, acc[1] + grads[1]), grads[0]
    (loss, d_w), d_hidden = jax.lax.scan(step, (0.0, jnp.zeros_like(w)), micro)
    return loss, (d_hidden.reshape(B, T, D), d_w)

  loss, grads = jax.jit(accumulated)(data["w"])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


def test_batch_sharded_over_devices():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  data, extra = make_data()
  cfg = dict(name="eaft", kl_coef=0.1)
  (ref_loss, _), ref_grads = value_and_grads(naive_loss, data, cfg, extra)
  batch = {k: jax.device_put(data[k], rows) for k in ("targets", "loss_mask", "segment_ids")}
  extra = {k: jax.device_put(v, rows) for k, v in extra.items()}
  fn = jax.jit(jax.value_and_grad(lambda h, w, b, e: fused(h, w, b, cfg, e)[0], argnums=(0, 1)),
               out_shardings=(replicated, (rows, replicated)))
  loss, grads = fn(jax.device_put(data["hidden"], rows), jax.device_put(data["w"], replicated),
                   batch, extra)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


def count_dots(loss_fn, cfg, chunk_size=32):
  """dot_general ops of d loss / d (hidden, w) as lowered for XLA (the scans' bodies once)."""
  shapes = dict(hidden=((2, 64, 16), jnp.bfloat16), w=((16, 300), jnp.float32),
                targets=((2, 64), jnp.int32), loss_mask=((2, 64), jnp.float32))
  args = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}

  def loss(hidden, w, batch):
    return loss_fn(hidden, w, batch, cfg, {}, chunk_size=chunk_size)[0]
  batch = {k: args[k] for k in ("targets", "loss_mask")}
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(args["hidden"], args["w"], batch).as_text()
  return text.count("stablehlo.dot_general")


def checkpointed_loss(hidden, w, batch, cfg, extra, chunk_size):
  setting = objectives.validate(cfg)
  stats = lm_head.token_stats(hidden, w, batch["targets"], chunk_size=chunk_size,
                              stats=setting.stats, extra_BxT=extra)
  return objectives.objective_loss({**stats, **extra}, batch, setting)


@pytest.mark.parametrize("cfg", [dict(name="dft"), dict(name="eaft", entropy_coef=0.05)],
                         ids=lambda c: c["name"])
def test_three_matmuls_a_chunk_instead_of_four(cfg):
  assert count_dots(checkpointed_loss, cfg) == 4  # forward, recomputed forward, two gradients
  assert count_dots(fused, cfg) == 3


# ----------------------------------------------------------------------------- refusals


def test_what_the_fused_head_refuses():
  data, extra = make_data()
  assert all(step_lib.fused_head_fits(objectives.validate(dict(name=name)))
             for name in objectives.OBJECTIVES)
  without_gradient = lm_head.Statistic("sum_of_logits", lambda logp_xV, _: logp_xV.sum(-1))
  assert not step_lib.fused_head_fits(dataclasses.replace(
      objectives.validate(dict(name="sft")), stats=(lm_head.LOGP, without_gradient)))
  with pytest.raises(ConfigError, match="'sum_of_logits' is not available in fused_loss .*"
                                       "token_stats has it"):
    lm_head.fused_loss(data["hidden"], data["w"], data["targets"], per_token_loss=lambda v: 0.0,
                       weights_BxT=data["loss_mask"], stats=("logp", without_gradient))
  with pytest.raises(ConfigError, match="compare with a reference model: pass its"):
    lm_head.fused_loss(data["hidden"], data["w"], data["targets"], per_token_loss=lambda v: 0.0,
                       weights_BxT=data["loss_mask"], stats=("logp", "kl_from_ref"))
  with pytest.raises(ConfigError, match="chunk_size=0"):
    fused(data["hidden"], data["w"], data, dict(name="sft"), extra, chunk_size=0)


def test_reference_objectives_cost_one_more_matmul_a_chunk():
  """ASFT forms the reference's chunk logits in the loop, iw-SFT a forward-only pass of the head
  for its sequence gates: four matmuls a chunk where SFT's per-token objectives take three (the
  reference's own forward runs outside the head)."""
  shapes = dict(hidden=((2, 64, 16), jnp.bfloat16), w=((16, 300), jnp.float32),
                targets=((2, 64), jnp.int32), loss_mask=((2, 64), jnp.float32),
                segment_ids=((2, 64), jnp.int32), ref_logp=((2, 64), jnp.float32))
  args = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
  batch = {k: args[k] for k in ("targets", "loss_mask", "segment_ids")}
  dots = {}
  for name in ("sft", "asft", "iw_sft"):
    setting = objectives.validate(dict(name=name))
    extra = {"ref_logp": args["ref_logp"]} if "ref_logp" in setting.needs else {}
    ref = (dict(ref_hidden_BxTxD=args["hidden"], ref_w_DxV=args["w"])
           if lm_head.needs_reference(setting.stats) else {})
    loss = lambda h, w, b, e, r, s=setting: step_lib.objective_loss_fused(
        h, w, b, s, extra_BxT=e, chunk_size=32, **r)[0]
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        args["hidden"], args["w"], batch, extra, ref).as_text()
    dots[name] = text.count("stablehlo.dot_general")
  assert dots == {"sft": 3, "asft": 4, "iw_sft": 4}
