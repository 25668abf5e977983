"""The train step and the run: sharding, accumulation, PSFT's schedule, resume, logs, config errors.

All on a tiny Llama (tests/fixtures/tiny_llama) with its real tokenizer and a small jsonl file.
"""
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from dft_jax import checkpoint, models, objectives, sharding, train
from dft_jax import step as step_lib
from dft_jax.data.testing import default_config
from dft_jax.errors import ConfigError, UserInputError
from conftest import FAST_COMPILE

REPO = pathlib.Path(__file__).parent.parent
TINY = str(REPO / "tests" / "fixtures" / "tiny_llama")
SLOW = pytest.mark.slow  # the other settings of a parametrised test: the slow tier


def write_rows(path, n=64, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = (int(x) for x in rng.integers(1, 20, size=2))
      f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}. #### {a + b}"}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("rows")


def tiny_config(tmp_path, **overrides):
  """The default config pointed at the tiny model and a jsonl file, evaluation off."""
  c = default_config()
  c.model.name = TINY
  c.model.lm_head_chunk = 96
  c.data.source = write_rows(tmp_path / "rows.jsonl")
  c.data.max_length = 64
  c.model.remat = "none"
  c.train.update(seq_len=64, global_batch_size=8, num_steps=4, microbatches=1)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=0, schedule="constant")
  c.checkpoint.update(every_steps=2, async_save=False)
  c.eval.update(before=False, after=False)
  c.log.progress = False
  for key, value in overrides.items():  # section__field or objective__name__hyperparameter
    *path, field = key.split("__")
    node = c
    for part in path:
      node = node[part]
    node[field] = value
  return c


def batches(config, n):
  from dft_jax import data
  tokenizer = models.load(TINY)[1]
  it = data.make_train_iterator(config.data, tokenizer, seq_len=config.train.seq_len,
                                global_batch_size=config.train.global_batch_size, seed=0,
                                max_segments=config.model.max_segments)
  return [next(it) for _ in range(n)]


def run_steps(config, mesh, host_batches):
  """Trains on host_batches over `mesh`; returns (per-step metrics, final params on the host)."""
  model, _ = models.load(config.model.name, compute_dtype="float32")
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  metrics = []
  for b in host_batches:
    state, m = step(state, step_lib.global_batch(b, mesh), frozen)
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params)


def mesh_of(n, **axes):
  cfg = dict(data=1, fsdp=1, tensor=1)
  cfg.update(axes)
  return sharding.make_mesh(cfg, jax.devices()[:n])


def assert_trees_close(a, b, rtol=2e-5, atol=1e-5):
  """Equal up to summation order: Adam divides by sqrt(v), so where a gradient is ~0 a reordered
  sum moves that element's update by a fraction of it; atol is 1 % of one update at lr 1e-3."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@functools.cache
def reference_run(objective, rows_path):
  """Two steps of K=2 minibatch updates on one device: the sharded runs must match it."""
  config = tiny_config(pathlib.Path(rows_path), objective__name=objective, train__minibatches=2)
  host = batches(config, 2)
  return config, host, run_steps(config, mesh_of(1), host)


@pytest.mark.parametrize("objective,layout", [
    pytest.param("dft", dict(data=8), marks=SLOW), pytest.param("dft", dict(fsdp=8), marks=SLOW),
    pytest.param("dft", dict(data=2, tensor=4), marks=SLOW),
    pytest.param("psft", dict(data=2, fsdp=2, tensor=2), marks=SLOW)])
def test_sharded_equals_single_device(rows_dir, objective, layout):
  config, host, (single_metrics, single_params) = reference_run(objective, str(rows_dir))
  metrics, params = run_steps(config, mesh_of(8, **layout), host)
  for m1, m8 in zip(single_metrics, metrics):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  assert_trees_close(params, single_params)


def test_params_really_sharded(tmp_path):
  config = tiny_config(tmp_path)
  model, _ = models.load(TINY)
  _, state, _, _, _ = step_lib.init_train_state(model, config, mesh_of(8, fsdp=4, tensor=2),
                                                setting=objectives.validate(config.objective))
  spec = jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  wq = state.params["layers"]["wq"]  # [L, D, N, H]: embed on fsdp, q_heads on tensor
  assert wq.sharding.spec == spec
  assert wq.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
  adam = state.opt_state[1][0]  # AdamW's moments follow the parameters they belong to
  for moment in (adam.mu, adam.nu):
    assert moment["layers"]["wq"].sharding.spec == spec
  assert adam.count.sharding.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("aggregation", [
    "token_mean", pytest.param("seq_mean", marks=SLOW), pytest.param("sum_norm", marks=SLOW)])
def test_microbatches_equal_one_big_batch(tmp_path, aggregation):
  base = tiny_config(tmp_path, objective__aggregation=aggregation)
  host = batches(base, 1)
  one_metrics, one = run_steps(base, mesh_of(1), host)
  acc_metrics, acc = run_steps(tiny_config(tmp_path, objective__aggregation=aggregation,
                                           train__microbatches=4), mesh_of(1), host)
  np.testing.assert_allclose(acc_metrics[0]["loss"], one_metrics[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc_metrics[0]["target_prob"], one_metrics[0]["target_prob"], rtol=1e-5)
  assert_trees_close(acc, one)


@pytest.mark.slow
def test_psft_first_update_equals_sft(tmp_path):
  """With K=1 the snapshot is the current policy: r = 1, so PSFT's gradient is SFT's."""
  host = batches(tiny_config(tmp_path), 1)
  _, sft = run_steps(tiny_config(tmp_path, objective__name="sft"), mesh_of(1), host)
  _, psft = run_steps(tiny_config(tmp_path, objective__name="psft"), mesh_of(1), host)
  assert_trees_close(psft, sft)


@pytest.mark.slow
def test_psft_snapshot_is_held_across_minibatches(tmp_path):
  """K=4 updates against one old_logp: later minibatches see r != 1, so the mean ratio moves and
  the update differs from K=4 updates of SFT."""
  host = batches(tiny_config(tmp_path), 1)
  psft_metrics, psft = run_steps(tiny_config(tmp_path, objective__name="psft", train__minibatches=4),
                                 mesh_of(1), host)
  _, sft = run_steps(tiny_config(tmp_path, objective__name="sft", train__minibatches=4),
                     mesh_of(1), host)
  assert abs(psft_metrics[0]["psft/ratio"] - 1.0) > 1e-3
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(psft), jax.tree.leaves(sft)))
  assert diff > 1e-6


@pytest.mark.slow
def test_psft_default_updates_per_snapshot_differ_from_sft(tmp_path):
  """configs/default.py:psft takes several updates per policy snapshot (the paper's recipe), so
  the main job's PSFT does not reproduce SFT's numbers; the main job refuses the K = 1 setting that
  would, naming the field."""
  from dft_jax import config_files
  variant = config_files.load("default.py", "psft")
  assert variant.train.minibatches > 1 and config_files.load("default.py").train.minibatches == 1
  geometry = dict(train__minibatches=variant.train.minibatches,
                  train__microbatches=variant.train.microbatches)
  host = batches(tiny_config(tmp_path), 1)
  psft_config = tiny_config(tmp_path, objective__name="psft", **geometry)
  train.check_updates_per_snapshot(objectives.validate(psft_config.objective), psft_config.train)
  psft_metrics, psft = run_steps(psft_config, mesh_of(1), host)
  sft_metrics, sft = run_steps(tiny_config(tmp_path, objective__name="sft", **geometry),
                               mesh_of(1), host)
  assert psft_metrics[0]["loss"] != sft_metrics[0]["loss"]
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(psft), jax.tree.leaves(sft)))
  assert diff > 1e-6
  with pytest.raises(ConfigError, match=r"objective.name='psft' with train.minibatches=1 is SFT.*"
                     "set train.minibatches"):
    train.validate_config(tiny_config(tmp_path, objective__name="psft"))


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [
    ("sft", {}), ("dft", {}), ("power", {}), ("psft", {}),
    ("sft", {"objective__entropy_coef": 0.01}), ("dft", {"objective__kl_coef": 0.001})])
def test_each_objective_learns(tmp_path, objective, extra):
  """A few steps on one repeated batch raise the target probability (lower the NLL)."""
  config = tiny_config(tmp_path, objective__name=objective, **extra)
  host = batches(config, 1) * 6
  metrics, _ = run_steps(config, mesh_of(1), host)
  nll = [-np.log(m["target_prob"]) for m in metrics]
  assert nll[-1] < nll[0] - 0.05, nll


@pytest.mark.slow
def test_dft_seq_stalls_when_the_sequence_probability_underflows(tmp_path):
  """The sequence-level weight sg(pi(y|x)) is exp(sum of ~20 logps of about -6) = 0 in float32 for
  a fresh tiny model: no gradient, no update -- the instability that makes DFT token-level."""
  config = tiny_config(tmp_path, objective__name="dft_seq")
  host = batches(config, 1)
  model, _ = models.load(TINY)
  start = jax.device_get(nnx.state(model))
  metrics, params = run_steps(config, mesh_of(1), host)
  assert metrics[0]["dft_seq/seq_prob"] == 0.0
  assert metrics[0]["grad_norm"] == 0.0
  assert_trees_close(params, start, rtol=0, atol=0)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
  straight = tiny_config(tmp_path, train__num_steps=4)
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  first = tiny_config(tmp_path, train__num_steps=2)
  train.train_and_evaluate(first, str(tmp_path / "resumed"))
  train.train_and_evaluate(straight, str(tmp_path / "resumed"))
  a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
  b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for key in ("loss", "grad_norm", "target_prob", "entropy"):
      assert ra[key] == rb[key], (ra["step"], key)
  params = [nnx.state(checkpoint.restore_model(str(tmp_path / d))[0])
            for d in ("straight", "resumed")]
  assert_trees_close(*params, rtol=0, atol=0)


def test_logs_tensorboard_and_jsonl(tmp_path):
  config = tiny_config(tmp_path, train__num_steps=2, objective__name="psft", train__minibatches=2,
                       train__global_batch_size=16)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("loss", "target_prob", "entropy", "grad_norm", "learning_rate", "tokens_per_s",
              "psft/clip_frac_high", "psft/ratio", "p_below_0.1"):
    assert np.isfinite(rows[-1][key]), key
  assert sum(rows[-1]["hist/target_prob"]["counts"]) == rows[-1]["num_tokens"]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [1, 2]
  assert acc.Scalars("loss")[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
  hist = acc.Histograms("hist/target_prob")[-1].histogram_value
  assert hist.num == pytest.approx(rows[-1]["num_tokens"])


@pytest.mark.parametrize("override,message", [
    (dict(objective__name="ppo"), "objective.name='ppo' is unknown"),
    (dict(objective__psft__eps_high=1.5), "objective.psft.eps_high=1.5"),
    (dict(train__global_batch_size=12), "train.global_batch_size=12 must be divisible"),
    (dict(train__microbatches=0), "train.microbatches=0"),
    (dict(optimizer__schedule="step"), "optimizer.schedule='step'"),
    (dict(train__nonfinite="ignore"), "train.nonfinite='ignore'"),
    (dict(mesh__data=3), "mesh"),
    (dict(model__name="/no/such/model"), "model '/no/such/model' not found"),
    (dict(optimizer__warmup_steps=4), "optimizer.warmup_steps=4 must be below train.num_steps=4: "
                                      "the run would end before its learning rate reaches "
                                      "optimizer.learning_rate=0.001"),
    (dict(optimizer__warmup_steps=9, train__minibatches=2, train__global_batch_size=16),
     "optimizer.warmup_steps=9 must be below train.num_steps=4 x train.minibatches=2 = 8 updates"),
])
def test_config_errors_name_the_field(tmp_path, override, message):
  config = tiny_config(tmp_path, **override)
  with pytest.raises(UserInputError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert message in str(e.value)


# Among 0, -1, NaN and inf, the values each numeric field accepts; every other one is refused.
ACCEPTED = {"train.seed": (0,), "optimizer.warmup_steps": (0,), "optimizer.min_lr_ratio": (0,),
            "optimizer.weight_decay": (0,), "optimizer.b1": (0,), "optimizer.b2": (0,),
            "optimizer.grad_clip_norm": (0,), "optimizer.max_update_ratio": (0,),
            "data.shuffle_buffer": (0,),
            "data.shuffle_seed": (0,), "data.eval_holdout": (0,), "eval.temperature": (0,),
            "eval.seed": (0,), "eval.every_steps": (0,), "model.router_aux_loss_coef": (0,),
            "mesh.data": (-1,)}


def numeric_fields(config):
  """section.field of every int or float field (placeholders included) of the checked sections."""
  for section in ("train", "optimizer", "data", "eval", "log", "checkpoint", "mesh", "model"):
    for name in config[section]:
      if config[section].get_ref(name).get_type() in (int, float):
        yield f"{section}.{name}"


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_every_numeric_field_is_checked_before_anything_loads(tmp_path, value):
  """Each numeric field set to `value` as a config file could set it (a float in an int field
  too): validate_config accepts it or raises one ConfigError line naming the field."""
  config = tiny_config(tmp_path)
  fields = list(numeric_fields(config))
  assert len(fields) >= 41
  for field in fields:
    section, name = field.split(".")
    tree = config.to_dict()
    tree[section][name] = value
    changed = ml_collections.ConfigDict(tree)
    if value in ACCEPTED.get(field, ()):
      train.validate_config(changed)
      continue
    with pytest.raises(ConfigError) as e:
      train.validate_config(changed)
    assert field in str(e.value) and "\n" not in str(e.value), (field, str(e.value))


@pytest.mark.slow
def test_workdir_of_another_run_is_refused(tmp_path):
  train.train_and_evaluate(tiny_config(tmp_path, train__num_steps=2), str(tmp_path / "run"))
  with pytest.raises(ConfigError, match="objective.name='dft'"):
    train.train_and_evaluate(tiny_config(tmp_path, objective__name="sft"), str(tmp_path / "run"))


def free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def cli_flags(config):
  """--config.* overrides reproducing `config` from configs/default.py on the command line."""
  def differences(node, default, path):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from differences(value, default[key], f"{path}.{key}")
      elif value != default[key]:
        yield f"--{path}.{key}={value}"
  return list(differences(config, default_config(), "config"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  """jax.distributed over 2 CPU processes (one device each, gloo collectives), each reading half of
  the global batch: same losses as one process with the same global batch on 2 devices."""
  config = tiny_config(tmp_path, train__num_steps=2)
  command = [sys.executable, "-m", "dft_jax.train", *cli_flags(config)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  single = subprocess.run(
      command + [f"--workdir={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True,
      env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"),
      timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"
  procs = [subprocess.Popen(
      command + [f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
  two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
  assert [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [
    ("dft", {}), ("psft", {"train__minibatches": 2}), ("eaft", {"objective__kl_coef": 0.05}),
    ("asft", {})])  # asft: the fused head does not fit it, the step takes the checkpointed one
def test_fused_head_step_equals_checkpointed(tmp_path, objective, extra):
  """model.lm_head_impl=fused (the gradient formed in the head's forward pass) trains like the
  checkpointed head: same losses, same parameters after two steps."""
  config = tiny_config(tmp_path, objective__name=objective, **extra)
  host = batches(config, 2)
  plain_metrics, plain = run_steps(config, mesh_of(1), host)
  fused_metrics, fused = run_steps(tiny_config(tmp_path, objective__name=objective,
                                               model__lm_head_impl="fused", **extra),
                                   mesh_of(1), host)
  for a, b in zip(plain_metrics, fused_metrics):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  assert_trees_close(fused, plain, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- LoRA


def lora_config(tmp_path, **overrides):
  return tiny_config(tmp_path, lora__rank=4, lora__alpha=8.0, **overrides)


def test_lora_trains_only_the_adapters_and_step_zero_is_the_base(tmp_path):
  """The train state holds the adapters (and their AdamW moments) only; the frozen base stays bit
  for bit; before any step the adapted model computes the base's logits."""
  config = lora_config(tmp_path)
  model, _ = models.load_from_config(config.model, config.lora)
  base, _ = models.load(TINY)
  tokens = np.arange(16, dtype=np.int32)[None] % 300
  np.testing.assert_array_equal(model(tokens), base(tokens))
  _, state, frozen, _, _ = step_lib.init_train_state(
      model, config, mesh_of(1), setting=objectives.validate(config.objective))
  assert all("lora" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(state.params))
  assert frozen.reference is None and jax.tree.leaves(frozen.base)
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)


def run_lora(config, mesh, host_batches):
  """Like run_steps, for a LoRA config: (metrics, adapters, frozen) on the host."""
  model, _ = models.load_from_config(config.model, config.lora)
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  before = jax.device_get(frozen.base)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  metrics = []
  for b in host_batches:
    state, m = step(state, step_lib.global_batch(b, mesh), frozen)
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params), before, jax.device_get(frozen.base)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dft", "psft", "asft"])
def test_lora_step_moves_adapters_keeps_base_and_uses_the_base_as_reference(tmp_path, objective):
  """Gradients reach the adapters only; with a KL anchor / ASFT the reference is the base with the
  adapters off, so at step 1 (B = 0) its KL to the policy is 0."""
  extra = {"train__minibatches": 2} if objective == "psft" else {}
  config = lora_config(tmp_path, objective__name=objective, objective__kl_coef=0.1, **extra)
  metrics, adapters, frozen_before, frozen_after = run_lora(config, mesh_of(1), batches(config, 2))
  assert_trees_close(frozen_after, frozen_before, rtol=0, atol=0)
  lora_b = [v for p, v in jax.tree_util.tree_leaves_with_path(adapters)
            if "lora_b" in jax.tree_util.keystr(p)]
  assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)  # B left zero after 2 steps
  if objective != "psft":  # psft: step 1's second update already runs on moved adapters
    assert metrics[0]["kl_anchor/k3"] == pytest.approx(0.0, abs=1e-6)
  if objective == "asft":
    assert metrics[0]["asft/kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[1]["asft/kl"] > 0


@pytest.mark.slow
def test_lora_run_resumes_exports_merged_and_peft(tmp_path):
  """The whole job with LoRA: checkpoints hold the adapters, resume continues exactly, the merged
  HF export reproduces the adapted model's logits and the PEFT folder holds the adapters."""
  straight = lora_config(tmp_path, train__num_steps=4, checkpoint__export_hf=True,
                         eval__before=True, eval__after=True, eval__suites="target_probs",
                         eval__num_hist=4)
  summary = train.train_and_evaluate(straight, str(tmp_path / "straight"))
  assert summary["after"]["target_nll"] != summary["before"]["target_nll"]
  train.train_and_evaluate(lora_config(tmp_path, train__num_steps=2), str(tmp_path / "resumed"))
  train.train_and_evaluate(straight, str(tmp_path / "resumed"))
  a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
  b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  trained, _, _, _ = checkpoint.restore_model(str(tmp_path / "straight"))
  merged, _ = models.load(str(tmp_path / "straight" / "hf"))
  tokens = np.arange(24, dtype=np.int32)[None] % 300
  np.testing.assert_allclose(merged(tokens), trained(tokens), rtol=1e-5, atol=1e-5)
  assert (tmp_path / "straight" / "peft" / "adapter_config.json").exists()
  base, _ = models.load(TINY)
  assert np.abs(np.asarray(trained(tokens)) - np.asarray(base(tokens))).max() > 1e-4


def test_adam_with_moments_stored_in_float32_is_optax_adamw(tmp_path):
  """step.scale_by_adam_stored_in (the lean mode's optimizer) with float32 moments equals
  optax.adamw update for update; with bfloat16 moments it stays close over a few steps."""
  config = tiny_config(tmp_path, optimizer__weight_decay=0.1)
  params = {"w": jax.numpy.linspace(-1.0, 1.0, 24).reshape(4, 6), "b": jax.numpy.ones(6)}
  P = jax.sharding.PartitionSpec
  logical = {"w": P("embed", "mlp"), "b": P("mlp")}
  reference, _ = step_lib.make_optimizer(config.optimizer, 10, logical)
  results = {}
  for nu in ("float32", "bfloat16"):
    tx, _ = step_lib.make_optimizer(_with(config.optimizer, nu), 10, logical)
    p, q = params, params
    s, r = tx.init(p), reference.init(q)
    for i in range(5):
      g = jax.tree.map(lambda x, i=i: jax.numpy.sin(3.0 * x + i), p)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      gq = jax.tree.map(lambda x, i=i: jax.numpy.sin(3.0 * x + i), q)
      v, r = reference.update(gq, r, q)
      q = optax.apply_updates(q, v)
    results[nu] = (p, q, s)
  p, q, _ = results["float32"]
  assert_trees_close(p, q, rtol=1e-6, atol=1e-7)
  p, q, s = results["bfloat16"]
  assert_trees_close(p, q, rtol=2e-3, atol=2e-4)
  adam = s[1][0]
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves((adam.mu, adam.nu)))


def _with(opt_cfg, dtype):
  c = opt_cfg.copy_and_resolve_references()
  c.mu_dtype, c.nu_dtype = dtype, dtype
  return c


@pytest.mark.slow
def test_a_resumed_runs_summary_covers_the_whole_run(tmp_path):
  """First loss from step 1 (not the resumed process's first step), tokens/s and time of every
  step, and what this process did beside it."""
  straight = train.train_and_evaluate(tiny_config(tmp_path, train__num_steps=4),
                                      str(tmp_path / "straight"))
  train.train_and_evaluate(tiny_config(tmp_path, train__num_steps=2), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(tiny_config(tmp_path, train__num_steps=4),
                                     str(tmp_path / "resumed"))
  rows = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  for key in ("loss", "target_prob", "entropy"):
    assert resumed[f"train_{key}"] == straight[f"train_{key}"] == {
        "first": rows[0][key], "last": rows[-1][key]}
  seconds = sum(r["step_seconds"] for r in rows)
  assert resumed["train_seconds"] == pytest.approx(seconds, abs=0.1)
  tokens = sum(r["tokens"] for r in rows)
  assert resumed["tokens_per_s"] == pytest.approx(tokens / seconds, rel=1e-3)
  this = resumed["this_process"]
  assert this["steps"] == [3, 4] and this["train_seconds"] == pytest.approx(
      sum(r["step_seconds"] for r in rows[2:]), abs=0.1)
  assert "this process: steps 3-4 in" in train.format_summary(resumed)


@pytest.mark.slow
def test_a_run_resumed_at_its_last_step_keeps_its_training_figures(tmp_path):
  """Killed after its last checkpoint, before summary.json (say, in the final evaluation): the
  same command trains no step and reports the run's figures, not 0 tokens/s."""
  config = tiny_config(tmp_path, train__num_steps=2)
  first = train.train_and_evaluate(config, str(tmp_path / "run"))
  (tmp_path / "run" / "summary.json").unlink()
  again = train.train_and_evaluate(config, str(tmp_path / "run"))
  for key in ("train_loss", "train_target_prob", "train_entropy", "tokens_per_s", "steps",
              "skipped_steps"):
    assert again[key] == first[key], key
  assert again["train_seconds"] == pytest.approx(first["train_seconds"], abs=0.1)
  assert again["this_process"] == {"steps": [], "train_seconds": 0.0, "tokens_per_s": None}
  table = train.format_summary(again)
  assert "loss (first -> last step)" in table and " 0 tokens/s" not in table
  assert "this process: no step left to train" in table


@pytest.mark.slow
def test_a_learning_rate_far_too_large_never_reaches_a_checkpoint(tmp_path, caplog):
  """lr = 1e30 makes a finite update of parameters ~1e30: every update is skipped for its size
  (optimizer.max_update_ratio), said on each step, and the checkpoint holds the starting
  parameters; a sane learning rate skips nothing."""
  import logging  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path, train__num_steps=3, optimizer__learning_rate=1e30)
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(config, str(tmp_path / "huge"))
  assert summary["skipped_steps"] == 3
  warned = [r.getMessage() for r in caplog.records if "times their norm" in r.getMessage()]
  assert warned[0].startswith("step 1: the update would move the parameters by ")
  assert len(warned) == 3 and "more than optimizer.max_update_ratio=1.0 allows" in warned[0]
  rows = read_jsonl(tmp_path / "huge" / "metrics.jsonl")
  assert all(r["update_ratio"] > 1e20 and r["oversized"] == 1 for r in rows)
  trained = nnx.state(checkpoint.restore_model(str(tmp_path / "huge"))[0])
  assert_trees_close(trained, nnx.state(models.load(TINY)[0]), rtol=0, atol=0)
  sane = train.train_and_evaluate(tiny_config(tmp_path, train__num_steps=3),
                                  str(tmp_path / "sane"))
  assert sane["skipped_steps"] == 0
  assert all(0 < r["update_ratio"] < 0.1 for r in read_jsonl(tmp_path / "sane" / "metrics.jsonl"))
