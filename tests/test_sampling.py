"""KV-cache sampling (dft_jax/sampling.py) against full recomputation, batch independence, seeds.

Model: the tiny Llama golden fixture (random weights with O(1) logits, so greedy choices are
well separated and sampling is far from deterministic).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dft_jax import models, sampling
from dft_jax.errors import DataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NEW = 8


@pytest.fixture(scope="module")
def model():
  return models.load(str(FIXTURES / "tiny_llama"))[0]


@pytest.fixture(scope="module")
def prompts():
  tokens = np.load(FIXTURES / "tiny_llama" / "golden.npz")["tokens"]
  return [tokens[0, :3].tolist(), tokens[1, :11].tolist(), tokens[0, 4:21].tolist()]


def _greedy_by_recompute(model, prompt, n):
  """Greedy continuation recomputing the whole forward pass for every new token (no cache)."""
  length = len(prompt) + n
  forward = jax.jit(model.__call__)
  ids = list(prompt)
  for _ in range(n):
    padded = np.array([ids + [0] * (length - len(ids))], np.int32)  # right pad: causal, unseen
    ids.append(int(np.argmax(np.asarray(forward(padded))[0, len(ids) - 1])))
  return ids[len(prompt):]


def test_kv_cache_greedy_equals_recompute(model, prompts):
  ours = sampling.generate(model, prompts[1:2], max_new_tokens=NEW)
  assert ours == [_greedy_by_recompute(model, prompts[1], NEW)]


def test_left_padded_batch_equals_one_by_one(model, prompts):
  batch = sampling.generate(model, prompts, max_new_tokens=NEW)
  alone = [sampling.generate(model, [p], max_new_tokens=NEW)[0] for p in prompts]
  assert batch == alone
  assert len({tuple(x) for x in batch}) == 3 and all(len(x) == NEW for x in batch)


def test_stops_at_eos_per_row(model, prompts):
  free = sampling.generate(model, prompts, max_new_tokens=NEW)
  eos = free[0][3]  # row 0 stops before its 4th token; other rows stop at their own first eos
  stopped = sampling.generate(model, prompts, max_new_tokens=NEW, eos_ids=[eos], pad_id=7)
  assert stopped == [row[:row.index(eos)] if eos in row else row for row in free]
  assert len(stopped[0]) == 3


def test_sampling_deterministic_under_seed(model, prompts):
  kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
  a = sampling.generate(model, prompts, seed=3, **kw)
  assert a == sampling.generate(model, prompts, seed=3, **kw)
  assert a != sampling.generate(model, prompts, seed=4, **kw)


def test_top_p_keeps_the_nucleus_with_renormalised_mass():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draw = jax.vmap(lambda k, p: sampling.sample_token(logits, k, temperature=1.0, top_p=p,
                                                     greedy=False)[0], in_axes=(0, None))
  counts = np.bincount(np.asarray(draw(keys, 0.7)), minlength=4) / 4000
  # Nucleus for 0.7: {0.5, 0.3} (0.5 alone < 0.7); renormalised 0.625 / 0.375.
  np.testing.assert_allclose(counts, [0, 0.625, 0.375, 0], atol=0.03)
  counts = np.bincount(np.asarray(draw(keys, 1.0)), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.05, 0.5, 0.3, 0.15], atol=0.03)
  assert set(np.asarray(draw(keys, 1e-6)).tolist()) == {1}
  hot = sampling.sample_token(logits * 0, keys[0], temperature=1.0, top_p=1.0, greedy=True)
  assert hot.tolist() == [0]


def test_bad_requests(model):
  with pytest.raises(DataError, match="empty prompt"):
    sampling.generate(model, [[1, 2], []], max_new_tokens=2)
  with pytest.raises(DataError, match="top_p"):
    sampling.generate(model, [[1, 2]], max_new_tokens=2, top_p=0.0)
