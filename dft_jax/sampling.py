"""Batched autoregressive sampling with a KV cache: greedy, temperature and top-p (nucleus).

Prompts are left-padded to one length; pads are masked out of attention and positions count real
tokens only, so a row's output does not depend on its batch-mates. One jitted program: a prefill
over the prompts, then a `lax.while_loop` of one-token steps until every row hit EOS or
max_new_tokens. Deterministic for a seed (step i draws with fold_in(PRNGKey(seed), i)).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import DataError

PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompiles)


def sample_token(logits_BxV, key, *, temperature, top_p, greedy: bool):
  """argmax if greedy, else a draw from softmax(logits / temperature) restricted to the smallest
  set of top tokens whose mass reaches top_p (nucleus sampling, arXiv:1904.09751)."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p  # mass before this token
  cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


_listeners = []  # on_done callbacks of the generate calls running now (innermost last)


def _rows_done(n):
  if _listeners:
    _listeners[-1](int(n))


def decode(graphdef, state, tokens_BxP, valid_BxP, key, temperature, top_p, eos_E, pad_id, *,
           max_new_tokens, greedy, report=False):
  """new tokens [B, max_new_tokens] of the model (graphdef, state) after the left-padded prompts
  (prompt_arrays); pad_id after a row's EOS. report: tells _rows_done how many rows have finished
  after every token (a host callback). Pure: jitted by `generate`, vmapped over models by the
  study."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_BxP.shape
  positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
  cache = model.init_cache(b, p + max_new_tokens)
  hidden, cache = model.forward_cached(tokens_BxP, positions_BxP, valid_BxP, cache)
  sample = functools.partial(sample_token, temperature=temperature, top_p=top_p, greedy=greedy)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, logits_BxV, done_B, position_B, out_BxN = carry
    token_B = jnp.where(done_B, pad_id, sample(logits_BxV, jax.random.fold_in(key, i)))
    out_BxN = out_BxN.at[:, i].set(token_B)
    done_B = done_B | jnp.isin(token_B, eos_E)
    if report:
      jax.debug.callback(_rows_done, jnp.sum(done_B))
    hidden, cache = model.forward_cached(token_B[:, None], position_B[:, None],
                                         jnp.ones((b, 1), bool), cache)
    return i + 1, cache, model.logits(hidden)[:, 0], done_B, position_B + 1, out_BxN

  carry = (jnp.zeros((), jnp.int32), cache, model.logits(hidden[:, -1:])[:, 0],
           jnp.zeros((b,), bool), positions_BxP[:, -1] + 1,
           jnp.full((b, max_new_tokens), pad_id, jnp.int32))
  return jax.lax.while_loop(cond, body, carry)[-1]


_generate = jax.jit(decode, static_argnames=("graphdef", "max_new_tokens", "greedy", "report"))


def prompt_arrays(prompt_ids, pad_id):
  """(tokens, valid) [B, P] numpy: the prompts left-padded to one length, a multiple of
  PROMPT_BUCKET (fewer compiled shapes)."""
  p = -(-max(map(len, prompt_ids)) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens = np.full((len(prompt_ids), p), pad_id, np.int32)
  valid = np.zeros((len(prompt_ids), p), bool)
  for row, ids in enumerate(prompt_ids):
    tokens[row, p - len(ids):], valid[row, p - len(ids):] = ids, True
  return tokens, valid


def eos_array(eos_ids):
  return np.asarray(sorted(set(eos_ids)) or [-1], np.int32)


def cut_at_eos(rows, eos_ids):
  """decode's rows of new tokens -> lists cut before the first EOS."""
  eos = set(np.asarray(eos_ids).tolist())
  return [row[:next((j for j, t in enumerate(row) if t in eos), len(row))]
          for row in np.asarray(rows).tolist()]


def stop_ids(model, tokenizer) -> list[int]:
  """EOS ids from the model config and the tokenizer: generation stops at any of them."""
  ids = set(model.config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  return sorted(ids)


def pad_id(tokenizer) -> int:
  """The tokenizer's pad id, else its EOS id, else 0 (pads are masked out; any id works)."""
  for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if token_id is not None:
      return token_id
  return 0


def generate(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_ids=(), pad_id: int = 0, seed: int = 0,
             on_done=None) -> list[list[int]]:
  """New token ids per prompt, cut before the first EOS (EOS itself not included).

  temperature 0 is greedy; otherwise temperature / top_p sampling, deterministic for `seed`.
  on_done(n), if given, is called from the runtime as rows finish (n: rows done so far), e.g. to
  move a progress bar while the one compiled call runs."""
  if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
    raise DataError("generate needs at least one prompt and no empty prompt")
  if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
    raise DataError(f"generate: need temperature >= 0 (got {temperature}), 0 < top_p <= 1 "
                    f"(got {top_p}), max_new_tokens >= 1 (got {max_new_tokens})")
  tokens, valid = prompt_arrays(prompt_ids, pad_id)
  eos = eos_array(eos_ids)
  graphdef, state = nnx.split(model)
  if on_done is not None:
    _listeners.append(on_done)
  try:
    out = np.asarray(_generate(
        graphdef, state, tokens, valid, jax.random.PRNGKey(seed), jnp.float32(temperature or 1.0),
        jnp.float32(top_p), eos, jnp.int32(pad_id), max_new_tokens=max_new_tokens,
        greedy=temperature == 0, report=on_done is not None))
  finally:
    if on_done is not None:
      _listeners.remove(on_done)
  return cut_at_eos(out, eos)
