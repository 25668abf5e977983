"""configs/paper: each paper's official settings, and one train step with the config's batch
geometry (global batch, PSFT's minibatches, microbatches, FSDP mesh) on the tiny Llama and a tiny
local file in the config's field names."""
import json
import pathlib

import jax
import numpy as np
import pytest

from dft_jax import config_files, data, loop, models, objectives, sharding
from dft_jax import step as step_lib

ROOT = pathlib.Path(__file__).parent.parent
TINY = str(ROOT / "tests" / "fixtures" / "tiny_llama")


def load(name, arg=None):
  return config_files.load(f"paper/{name}.py", arg)


def test_dft_official_settings():
  """github.com/yongliang-wu/DFT README launch command + verl sft_trainer.yaml defaults."""
  c = load("dft_numina_qwen25_math_1p5b")
  assert c.model.name == "Qwen/Qwen2.5-Math-1.5B" and c.model.compute_dtype == "bfloat16"
  assert (c.data.source, c.data.max_rows, c.data.prompt_field, c.data.response_field) == (
      "AI-MO/NuminaMath-CoT", 100_000, "problem", "solution")
  assert (c.objective.name, c.optimizer.learning_rate, c.train.global_batch_size,
          c.data.max_length, c.train.seq_len) == ("dft", 5e-5, 256, 2048, 2048)
  assert c.train.num_steps == 390  # one epoch of 100k rows, last partial batch dropped
  assert (c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.warmup_steps,
          c.optimizer.schedule, c.optimizer.min_lr_ratio, c.optimizer.grad_clip_norm) == (
              0.95, 0.01, 39, "cosine", 0.0, 1.0)
  verl = load("dft_numina_qwen25_math_1p5b", "verl")
  assert (verl.data.prompt_field, verl.data.response_field) == ("extra_info.question",
                                                               "extra_info.answer")


def test_psft_official_settings():
  """github.com/zwhong714/PSFT verl/recipe/psft/run_psft.sh."""
  c = load("psft_openr1_qwen25_7b")
  assert c.model.name == "Qwen/Qwen2.5-7B-Instruct"
  assert (c.data.source, c.data.response_field) == ("wh-zhu/train_openr1_4k", "demonstration")
  assert (c.objective.name, c.objective.psft.eps_low, c.objective.psft.eps_high,
          c.objective.aggregation) == ("psft", 0.2, 0.28, "token_mean")
  assert c.train.global_batch_size // c.train.minibatches == 32  # ppo_mini_batch_size
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay, c.optimizer.grad_clip_norm) == (
      1e-6, 0.1, 1.0)
  assert c.optimizer.warmup_steps == 10 * c.train.minibatches  # 10 scheduler steps of verl
  assert c.train.num_steps == 10 * (4000 // 256)
  assert c.data.max_length == 2048 + 6144


def write_rows(path, prompt_field, response_field, n=24):
  with open(path, "w") as f:
    for i in range(n):
      answer = f"{i} + {i} = {2 * i}, so the answer is \\boxed{{{2 * i}}}."
      f.write(json.dumps({prompt_field: f"What is {i} + {i}?", response_field: answer}) + "\n")
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name,prompt_field", [
    ("dft_numina_qwen25_math_1p5b", None),
    # The hub rows keep the user turn at prompt[1].content; the local file has it flat.
    ("psft_openr1_qwen25_7b", "prompt"),
])
def test_one_step_with_the_config_geometry(tmp_path, name, prompt_field):
  c = load(name)
  c.model.update(name=TINY, lm_head_chunk=256)
  c.data.update(source=write_rows(tmp_path / "rows.jsonl", prompt_field or c.data.prompt_field,
                                  c.data.response_field),
                prompt_field=prompt_field or c.data.prompt_field, max_rows=None, max_length=128)
  c.train.seq_len = 128
  c.checkpoint.async_save = False
  c.log.update(progress=False, tensorboard=False)
  assert c.train.global_batch_size == 256 and (name.startswith("dft") or c.train.minibatches == 8)
  step_lib.validate(c, jax.device_count())
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.shape["fsdp"] == jax.device_count()
  model, tokenizer = models.load_from_config(c.model)
  setting = objectives.validate(c.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, c, mesh, setting=setting)
  before = jax.tree.map(np.asarray, jax.device_get(state.params))
  rows = data.make_train_iterator(c.data, tokenizer, seq_len=c.train.seq_len,
                                  global_batch_size=c.train.global_batch_size, seed=0,
                                  max_segments=c.model.max_segments)
  train_step = step_lib.make_train_step(graphdef, tx, c, mesh, step_lib.shardings_of(state),
                                        step_lib.shardings_of(frozen), setting=setting)
  state, metrics = train_step(state, step_lib.global_batch(next(rows), mesh), frozen)
  scalars, _ = loop.host_metrics(metrics)
  assert np.isfinite(scalars["loss"]) and scalars["grad_norm"] > 0
  assert scalars["loss_tokens"] > 0 and scalars["skipped"] == 0
  if c.objective.name == "psft":
    assert np.isfinite(scalars["psft/ratio"]) and "psft/clip_frac_high" in scalars
    # K = 8 updates; the first runs at learning rate 0 (warmup), the later ones move the weights.
    after = jax.device_get(state.params)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after),
                                                            jax.tree.leaves(before))) > 0
