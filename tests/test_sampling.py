"""KV-cache sampling (dft_jax/sampling.py) against full recomputation, batch independence, seeds.

Model: the tiny Llama golden fixture (random weights with O(1) logits, so greedy choices are
well separated and sampling is far from deterministic). The reference path recomputes the whole
forward pass (model.__call__, the training attention) for every token and draws with the same
key; with small blocks, chunks and phases the sampler's every path runs in a few tokens.
"""
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def reference_generate(model, prompts, new, *, temperature=0.0, top_p=1.0, seed=0, eos=(),
                       pad=0):
  """generate's tokens without a cache: each row's next-token logits from the full forward pass
  over its prompt and tokens so far (rows right-padded to one length: causal, the pads unseen),
  the batch's [B, V] logits drawn with fold_in(PRNGKey(seed), i) for token i."""
  width = max(map(len, prompts)) + new
  forward = jax.jit(model.__call__)
  rows, done = [list(p) for p in prompts], [False] * len(prompts)
  for i in range(new):
    logits = np.asarray(forward(np.array([r + [0] * (width - len(r)) for r in rows], np.int32)))
    last = jnp.asarray(np.stack([logits[b, len(r) - 1] for b, r in enumerate(rows)]))
    draw = sampling.sample_token(last, jax.random.fold_in(jax.random.PRNGKey(seed), i),
                                 temperature=temperature or 1.0,
                                 top_p=top_p if top_p < 1 else None, greedy=temperature == 0)
    for b, token in enumerate(np.asarray(draw).tolist()):
      rows[b].append(pad if done[b] else token)
      done[b] = done[b] or token in eos
  return [next((r[:j] for j, t in enumerate(r) if t in eos), r)
          for r in (row[len(p):] for row, p in zip(rows, prompts))]


@pytest.fixture
def small_steps(monkeypatch):
  """Blocks of 4 tokens, prefill chunks of 16 tokens for 3 rows, two cache phases from 2 blocks:
  12 new tokens cross every boundary."""
  monkeypatch.setattr(sampling, "DECODE_BLOCK", 4)
  monkeypatch.setattr(sampling, "PREFILL_TOKENS", 48)
  monkeypatch.setattr(sampling, "GROW_AT_BLOCKS", 2)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)],
                         ids=["greedy", "T=1", "T=0.7,top_p=0.9"])
def test_cache_chunks_blocks_and_phases_equal_recompute(model, prompts, small_steps, kw):
  assert sampling.cache_phases(32, 3, 4) == [(1, 36), (3, 44)]
  ours = sampling.generate(model, prompts, max_new_tokens=12, seed=5, **kw)
  assert ours == reference_generate(model, prompts, 12, seed=5, **kw)
  assert all(len(x) == 12 for x in ours)


def test_rows_stop_early_without_more_blocks(model, prompts, small_steps, monkeypatch):
  """Every row hits an EOS in the first block: the sampler queues one block more (it reads a
  block's stops while the next runs) and no other; on_done hears the rows done."""
  free = sampling.generate(model, prompts, max_new_tokens=12)
  eos = sorted({row[1] for row in free})  # each row's second token stops it
  calls, heard = [], []
  decode = sampling._decode  # pylint: disable=protected-access
  monkeypatch.setattr(sampling, "_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
  stopped = sampling.generate(model, prompts, max_new_tokens=40, eos_ids=eos, pad_id=7,
                              on_done=heard.append)
  assert stopped == reference_generate(model, prompts, 40, eos=eos, pad=7)
  assert all(len(x) <= 1 for x in stopped) and len(calls) == 2 and heard[-1] == 3


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


def _perturbed(state, seed):
  """Another parameter set of the same model: every float array times (1 + 0.3 N(0, 1))."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x * (1 + 0.3 * jax.random.normal(k, x.shape, x.dtype))
      if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("folder, layer_types", [
    ("tiny_llama", None), ("tiny_mistral", ("sliding_attention", "full_attention"))],
                         ids=["llama", "mistral_windowed_and_global"])
def test_greedy_tokens_equal_generate_alone_and_vmapped(prompts, folder, layer_types):
  """greedy_tokens = generate's greedy tokens, then its EOS and pads, for two parameter sets of a
  model (Llama; Mistral's with its first layer windowed and its second global, Gemma 3's pattern):
  each run alone, and both in one jax.vmap over the stacked sets (each member its own run)."""
  model = models.load(str(FIXTURES / folder))[0]
  state = nnx.state(model)
  if layer_types:
    config = dataclasses.replace(model.config, layer_types=layer_types)
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(
        lambda: models.Decoder(config, rngs=nnx.Rngs(0)))), state)
  graphdef = nnx.graphdef(model)
  states = [state, _perturbed(state, 1)]
  free = sampling.generate(model, prompts, max_new_tokens=NEW)
  eos = [free[0][2], free[1][5]]  # rows 0 and 1 stop early
  pad = 7
  tokens, valid = sampling.prompt_arrays(prompts, pad)
  run = functools.partial(sampling.greedy_tokens, graphdef, tokens_BxP=tokens, valid_BxP=valid,
                          eos_E=sampling.eos_array(eos), pad_id=jnp.int32(pad),
                          max_new_tokens=NEW)
  alone = [np.asarray(jax.jit(lambda s: run(state=s))(s)) for s in states]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  population = jax.vmap(lambda s: run(state=s))
  assert "callback" not in str(jax.make_jaxpr(population)(stacked))  # no host round trip
  together = np.asarray(jax.jit(population)(stacked))
  for member, s in enumerate(states):
    replies = sampling.generate(nnx.merge(graphdef, s), prompts, max_new_tokens=NEW,
                                eos_ids=eos, pad_id=pad)
    assert sampling.cut_at_eos(alone[member], eos) == replies
    for row, reply in zip(alone[member], replies):
      assert row.shape == (NEW,) and row[:len(reply)].tolist() == reply
      if len(reply) < NEW:  # the EOS, then pads
        assert row[len(reply)] in eos and set(row[len(reply) + 1:].tolist()) <= {pad}
    np.testing.assert_array_equal(together[member], alone[member])
  assert min(map(len, sampling.cut_at_eos(alone[0], eos))) < NEW  # an EOS met
  assert not np.array_equal(alone[0], alone[1])
