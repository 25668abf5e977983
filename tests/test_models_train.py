"""Each new family end to end from the command line (slow tier): `python -m dft_jax.train` with
DFT on the tiny saved HF model, then `python -m dft_jax.export` of the run: a folder transformers
reads (its config; with torch, the model and its logits), holding the trained weights.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from dft_jax import checkpoint, models
from test_train import cli_flags, tiny_config
from conftest import FAST_COMPILE

REPO = pathlib.Path(__file__).parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
  done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _params(model):
  return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2_yarn", "qwen3_moe", "gemma3"])
def test_train_with_dft_then_export_a_folder_transformers_reads(family, tmp_path):
  folder = FIXTURES / f"tiny_{family}"
  config = tiny_config(tmp_path, model__name=str(folder), train__num_steps=3)
  moe = family == "qwen3_moe"
  if moe:
    config.model.router_aux_loss_coef = 0.01
  _run("dft_jax.train", *cli_flags(config), f"--workdir={tmp_path / 'run'}")
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()
             if '"loss"' in line]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) for r in records)
  assert all(r.get("router_aux_loss", 0) > 0 for r in records) == moe
  out = _run("dft_jax.export", f"--model={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}")
  hf_config = json.loads((folder / "config.json").read_text())
  assert f"exported {hf_config['model_type']}" in out
  theirs = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
  assert theirs.model_type == hf_config["model_type"]
  assert theirs.architectures == hf_config["architectures"]
  back, _ = models.load(str(tmp_path / "hf"))
  trained, _, _, _ = checkpoint.restore_model(str(tmp_path / "run"))
  start, _ = models.load(str(folder))
  moved = False
  for a, b, c in zip(_params(back), _params(trained), _params(start)):
    np.testing.assert_array_equal(a, b)
    moved |= not np.array_equal(a, c)
  assert moved
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return  # the config above is what transformers reads without torch
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                            dtype=torch.float32).eval()
  tokens = np.load(folder / "golden.npz")["tokens"]
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, np.asarray(back(jnp.asarray(tokens))), atol=1e-4)
