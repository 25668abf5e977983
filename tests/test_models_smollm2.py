"""The embedded SmolLM2-135M-Instruct (GGUF, Q4_1) through our decoder vs transformers' GGUF loader.

Reference: tests/fixtures/smollm2_golden.npz (transformers 5.23 float32 logits and greedy
continuations; made by tests/fixtures/make_gguf_golden.py). Measured on CPU, float32: max |logit
diff| 1.1e-4 over the stored full rows, 7.3e-5 over the top-64 logits of every position, with the
same argmax everywhere; we allow 5e-4 (logits reach |25|).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import generate, models, sampling
from dft_jax.data import testing

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 5e-4


@pytest.fixture(scope="module")
def smollm2():
  return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURES / "smollm2_golden.npz"))


@pytest.fixture(scope="module")
def logits(smollm2, golden):
  return np.asarray(smollm2[0](jnp.asarray(golden["prompt_ids"])))


@pytest.mark.slow
def test_logits_match_transformers_gguf(logits, golden):
  real = np.arange(logits.shape[1])[None] < golden["prompt_lengths"][:, None]  # right padding
  np.testing.assert_array_equal(logits.argmax(-1)[real], golden["argmax"][real])
  top = np.take_along_axis(logits, golden["topk_indices"], -1)
  assert np.abs(top - golden["topk_values"])[real].max() <= ATOL
  lse = np.asarray(jax.scipy.special.logsumexp(logits, axis=-1))
  assert np.abs(lse - golden["logsumexp"])[real].max() <= ATOL
  at = golden["full_logits_at"]
  assert np.abs(logits[at[:, 0], at[:, 1]] - golden["full_logits"]).max() <= ATOL


@pytest.mark.slow
def test_greedy_continuations_match_transformers(smollm2, golden):
  """Theirs ran on past EOS (min_new_tokens masks it); ours stops at the first EOS it picks. So
  the rows agree up to our stop, and our stop is an EOS of our own greedy choice (row 0 stops
  after 7 tokens: EOS 17.3 against 14.4 for theirs, ' It')."""
  model, tokenizer = smollm2
  prompts = [row[:n].tolist() for row, n in zip(golden["prompt_ids"], golden["prompt_lengths"])]
  kw = dict(max_new_tokens=golden["greedy_ids"].shape[1], pad_id=tokenizer.pad_token_id)
  ours = sampling.generate(model, prompts, eos_ids=[tokenizer.eos_token_id], **kw)
  unstopped = sampling.generate(model, prompts, **kw)
  for row, whole, reference in zip(ours, unstopped, golden["greedy_ids"].tolist()):
    assert row == reference[:len(row)] == whole[:len(row)]
    assert whole[len(row):len(row) + 1] in ([], [tokenizer.eos_token_id])


@pytest.mark.slow
def test_config_from_gguf_metadata(smollm2):
  path = models.ALIASES["smollm2-135m-instruct"]()
  assert models.ModelConfig.from_gguf(path) == smollm2[0].config
  assert smollm2[0].config.tie_word_embeddings and smollm2[0].config.num_kv_heads == 3


@pytest.mark.slow
def test_chat_template_prompt_matches_golden(smollm2, golden):
  _, tokenizer = smollm2
  config = testing.default_config()
  [ids] = generate.prompt_ids(config, tokenizer, [str(golden["prompt_texts"][0])])
  assert ids == golden["prompt_ids"][0, :golden["prompt_lengths"][0]].tolist()


@pytest.mark.slow
def test_generate_cli_answers_paris(capsys):
  generate.cli_main(["dft_jax.generate", "--model=smollm2-135m-instruct",
                     "--prompt=What is the capital of France?", "--max_new_tokens=16"])
  assert "Paris" in capsys.readouterr().out
