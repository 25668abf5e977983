"""Batched autoregressive sampling with a KV cache: greedy, temperature and top-p (nucleus).

Prompts are left-padded to one length P; pads are masked out of attention and positions count
real tokens only, so a row's output does not depend on its batch-mates. Token i of every row
sits in cache slot P + i.

  prefill   the prompts in chunks of tokens (the scanned layers; a chunk attends to the slots
            before its end), which fill the cache: one buffer a layer, [B, kv heads, slots, H],
            in the compute dtype, allocated once a phase
  decode    jitted blocks of `block` one-token steps (a loop of known length: no host sync inside);
            a step runs the layers one after the other on their own weights (a copy of the layers
            in the compute dtype, made once a call, instead of slices of the stacked arrays every
            step: one more copy of the layer weights while a call runs), writes its key and
            value into each layer's buffer in place and reads each buffer once. The host queues
            the next block before it reads whether every row has stopped, so rows stop early
            without a sync per token and without recompiling.
  phases    the cache first holds the prompt and half the new tokens, then grows once to all of
            them (decodes of 8 blocks or more): the first half's steps read a smaller cache.

Attention over the cache takes the model's softmax scale (config.attention_scale) and, on a
sliding-window layer (Mistral, Gemma 3's local layers), only the window's most recent slots; a
mixture of experts routes each new token as in training. `greedy_tokens` is the greedy decode as
one pure program (prefill, then a lax.while_loop of the same steps): jit it, vmap it over stacked
parameter sets.

Deterministic for a seed: token i is drawn with fold_in(PRNGKey(seed), i) from the batch's
[B, V] logits.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dft_jax.errors import DataError
from dft_jax.models import attention as attn_lib

PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompiles)
DECODE_BLOCK = 16  # one-token steps of one jitted decode call; early stops are seen between calls
PREFILL_TOKENS = 16384  # rows x tokens of a prefill chunk (its scores: rows x heads x chunk x P)
GROW_AT_BLOCKS = 8  # decodes of this many blocks or more run in two cache phases


def sample_token(logits_BxV, key, *, temperature, top_p, greedy: bool):
  """argmax if greedy, else a draw from softmax(logits / temperature); with top_p (not None)
  restricted to the smallest set of top tokens whose mass reaches top_p (nucleus sampling,
  arXiv:1904.09751). top_p None draws from the whole distribution without sorting it."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_p is not None:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p  # mass before this token
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def einsum_f32(spec, a, b):
  """einsum accumulating in float32. XLA:CPU has no batched bf16 x bf16 -> f32 dot (an accelerator
  reads the bf16 operands as they are): on the CPU the operands are cast first."""
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def attend_cache(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale):
  """softmax(scale q k^T) v over the cache slots the mask allows (float32 scores; scale
  1/sqrt(H), or Gemma's 1/sqrt(query_pre_attn_scalar): config.attention_scale). GQA: the query
  heads of kv head k are heads k G .. k G + G - 1 (G = N / K), read against its keys without
  copying them; the cache's [B, K, S, H] layout makes both products plain batched matmuls over
  (B, K)."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxKxSxH.shape[1]
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
  scores = einsum_f32("btkgh,bksh->bkgts", q_BxTxKxGxH, k_BxKxSxH) * scale
  scores = jnp.where(mask_BxTxS[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
  out = einsum_f32("bkgts,bksh->btkgh", probs, v_BxKxSxH)
  return out.reshape(b, t, n, h).astype(q_BxTxNxH.dtype)


def windowed(mask_BxTxS, query_slot_Tx1, key_slot_S, window):
  """The mask, and on a sliding-window layer only the `window` most recent slots (slots are
  positions shifted by the row's left padding: a row's tokens sit in consecutive slots)."""
  if window is None:
    return mask_BxTxS
  return mask_BxTxS & attn_lib.in_window(query_slot_Tx1, key_slot_S, window)


def as_cache_layout(x_BxTxKxH):
  """A chunk's keys or values in the cache layout [B, K, T, H]."""
  return jnp.swapaxes(x_BxTxKxH, 1, 2)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "slots"))
def _prefill(graphdef, state, tokens_BxP, start_B, *, chunk, slots):
  """(per-layer (k, v) cache buffers of `slots` slots holding the prompts, logits of every row's
  last prompt token [B, V]): the prompts in chunks of `chunk` tokens; row b's prompt starts at
  slot start_B[b] (left padding)."""
  model = nnx.merge(graphdef, state)
  scale = model.config.attention_scale
  p = tokens_BxP.shape[1]
  slot_P = jnp.arange(p)
  positions_BxP = jnp.maximum(slot_P[None] - start_B[:, None], 0)
  keys, values = [], []
  for c0 in range(0, p, chunk):
    query_C, key_E = slot_P[c0:c0 + chunk], slot_P[:c0 + chunk]
    mask_BxCxE = (((key_E >= start_B[:, None, None]) & (key_E <= query_C[:, None]))
                  | (key_E == query_C[:, None]))  # a pad query sees itself: no empty softmax
    earlier = (jnp.concatenate(keys, axis=3), jnp.concatenate(values, axis=3)) if keys else None

    def attention_fn(q, k, v, layer_earlier, window, mask=mask_BxCxE, query_C=query_C,
                     key_E=key_E):
      k, v = as_cache_layout(k), as_cache_layout(v)
      k_all, v_all = (k, v) if layer_earlier is None else (
          jnp.concatenate([layer_earlier[0], k], axis=2),
          jnp.concatenate([layer_earlier[1], v], axis=2))
      mask = windowed(mask, query_C[:, None], key_E, window)
      return attend_cache(q, k_all, v_all, mask, scale), (k, v)

    hidden, (k_LxBxKxCxH, v_LxBxKxCxH) = model.run_layers(
        tokens_BxP[:, c0:c0 + chunk], positions_BxP[:, c0:c0 + chunk],
        slot_P[c0:c0 + chunk][None] >= start_B[:, None], attention_fn, earlier)
    keys.append(k_LxBxKxCxH)
    values.append(v_LxBxKxCxH)
  grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, slots - p), (0, 0)))
  k_all, v_all = jnp.concatenate(keys, axis=3), jnp.concatenate(values, axis=3)
  caches = tuple((grow(k_all[i]), grow(v_all[i])) for i in range(k_all.shape[0]))
  return caches, model.logits(hidden[:, -1:])[:, 0]


@functools.partial(jax.jit, static_argnames=("slots",))
def _grow(caches, *, slots):
  """The cache buffers with room for `slots` slots (the new ones empty)."""
  return jax.tree.map(
      lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0))), caches)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _unstacked_layers(graphdef, state):
  return nnx.merge(graphdef, state).decode_layers()


def decode_step(model, layers, caches, token_B, slot, start_B):
  """token_B (every row's token at cache slot `slot`) through the layers (decode_layers()), its
  key and value written into each layer's buffer in place -> (caches, next-token logits [B, V]).
  A row attends to its slots from start_B (its first prompt token) to `slot`, on a sliding-window
  layer only the window's most recent of them."""
  slot_S = jnp.arange(caches[0][0].shape[2])
  mask_Bx1xS = ((slot_S >= start_B[:, None]) & (slot_S <= slot))[:, None]
  scale = model.config.attention_scale

  def attention_fn(q, k, v, layer_cache, window):
    k_cache, v_cache = (jax.lax.dynamic_update_slice_in_dim(old, as_cache_layout(new), slot, 2)
                        for old, new in zip(layer_cache, (k, v)))
    mask = windowed(mask_Bx1xS, slot, slot_S, window)
    return attend_cache(q, k_cache, v_cache, mask, scale), (k_cache, v_cache)

  hidden, caches = model.run_layers(token_B[:, None], (slot - start_B)[:, None],
                                    jnp.ones(token_B.shape + (1,), bool), attention_fn, caches,
                                    layers)
  return caches, model.logits(hidden)[:, 0]


def token_step(model, layers, start_B, prompt_len, eos_E, pad_id, draw, carry):
  """One decode step: token i of every row drawn from the logits (draw(logits_BxV, i); pad_id
  once the row has stopped) and written to out_BxN, the row stopped at an EOS, the token run
  through the layers (cache slot prompt_len + i). carry: (caches, logits_BxV, done_B, out_BxN,
  i), returned for token i + 1."""
  caches, logits_BxV, done_B, out_BxN, i = carry
  token_B = jnp.where(done_B, pad_id, draw(logits_BxV, i))
  out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, token_B[:, None], i, 1)
  done_B = done_B | jnp.isin(token_B, eos_E)
  caches, logits_BxV = decode_step(model, layers, caches, token_B, prompt_len + i, start_B)
  return caches, logits_BxV, done_B, out_BxN, i + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "block", "greedy",
                                             "top_p_on"), donate_argnums=(3,))
def _decode(graphdef, state, layers, caches, logits_BxV, done_B, out_BxN, i, start_B, key,
            temperature, top_p, eos_E, pad_id, *, prompt_len, block, greedy, top_p_on):
  """`block` token_steps from token i on, token i drawn with fold_in(key, i). Returns (caches,
  logits, done, out, i + block)."""
  model = nnx.merge(graphdef, state)
  sample = functools.partial(sample_token, temperature=temperature,
                             top_p=top_p if top_p_on else None, greedy=greedy)
  step = functools.partial(token_step, model, layers, start_B, prompt_len, eos_E, pad_id,
                           lambda logits, i: sample(logits, jax.random.fold_in(key, i)))
  return jax.lax.fori_loop(0, block, lambda _, carry: step(carry),
                           (caches, logits_BxV, done_B, out_BxN, i))


def greedy_tokens(graphdef, state, tokens_BxP, valid_BxP, eos_E, pad_id, *, max_new_tokens):
  """int32 [B, max_new_tokens]: the greedy new tokens of the model (graphdef, state) after the
  left-padded prompts (prompt_arrays), pad_id after a row's EOS (eos_array) -- generate's greedy
  tokens, from the same prefill and token_step, in one program: no host callback or sync inside
  (a lax.while_loop of steps that ends when every row has stopped), so a caller may jit it and
  vmap it over stacked parameter sets. The cache holds P + max_new_tokens slots; the decode reads
  a copy of the layers in the compute dtype (decode_layers), one a parameter set under vmap."""
  model = nnx.merge(graphdef, state)
  rows, p = tokens_BxP.shape
  start_B = p - jnp.sum(valid_BxP, axis=1, dtype=jnp.int32)
  caches, logits_BxV = prefill(graphdef, state, tokens_BxP, start_B, p + max_new_tokens)
  step = functools.partial(token_step, model, model.decode_layers(), start_B, p, eos_E, pad_id,
                           lambda logits, _: sample_token(logits, None, temperature=1.0,
                                                          top_p=None, greedy=True))
  carry = (caches, logits_BxV, jnp.zeros((rows,), bool),
           jnp.full((rows, max_new_tokens), pad_id, jnp.int32), jnp.zeros((), jnp.int32))
  running = lambda carry: (carry[4] < max_new_tokens) & ~jnp.all(carry[2])
  return jax.lax.while_loop(running, step, carry)[3]


def prefill(graphdef, state, tokens_BxP, start_B, slots):
  """(per-layer (k, v) cache buffers of `slots` slots holding the prompts, the next-token logits
  [B, V]) of left-padded prompts (row b's starts at start_B[b]), in chunks of at most
  PREFILL_TOKENS tokens over all rows (a multiple of PROMPT_BUCKET)."""
  rows, p = tokens_BxP.shape
  chunk = min(p, max(PROMPT_BUCKET, PREFILL_TOKENS // rows // PROMPT_BUCKET * PROMPT_BUCKET))
  return _prefill(graphdef, state, tokens_BxP, start_B, chunk=chunk, slots=slots)


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
  """The stop ids as an int32 array (one id -1, which no token has, when there are none)."""
  return np.asarray(sorted(set(eos_ids)) or [-1], np.int32)


def cut_at_eos(rows, eos_ids):
  """Rows of new tokens (greedy_tokens', generate's) -> lists cut before the first EOS."""
  eos = set(np.asarray(eos_ids).tolist())
  return [row[:next((j for j, t in enumerate(row) if t in eos), len(row))]
          for row in np.asarray(rows).tolist()]


def cache_phases(prompt_len, blocks, block):
  """[(blocks decoded by the end of the phase, cache slots)]: one phase, or two when the decode
  runs GROW_AT_BLOCKS blocks or more (the first holds the prompt and half the new tokens)."""
  last = (blocks, prompt_len + blocks * block)
  if blocks < GROW_AT_BLOCKS:
    return [last]
  return [(blocks // 2, prompt_len + blocks // 2 * block), last]


def generate(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_ids=(), pad_id: int = 0, seed: int = 0,
             on_done=None) -> list[list[int]]:
  """New token ids per prompt, cut before the first EOS (EOS itself not included).

  temperature 0 is greedy; otherwise temperature / top_p sampling, deterministic for `seed`.
  on_done(n), if given, is called between decode blocks with the number of rows done so far
  (e.g. to move a progress bar)."""
  if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
    raise DataError("generate needs at least one prompt and no empty prompt")
  if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
    raise DataError(f"generate: need temperature >= 0 (got {temperature}), 0 < top_p <= 1 "
                    f"(got {top_p}), max_new_tokens >= 1 (got {max_new_tokens})")
  rows = len(prompt_ids)
  tokens, valid = prompt_arrays(prompt_ids, pad_id)
  p = tokens.shape[1]
  start = p - valid.sum(axis=1, dtype=np.int32)
  eos = eos_array(eos_ids)
  block = DECODE_BLOCK
  blocks = -(-max_new_tokens // block)
  phases = cache_phases(p, blocks, block)

  graphdef, state = nnx.split(model)
  caches, logits = prefill(graphdef, state, tokens, start, slots=phases[0][1])
  layers = _unstacked_layers(graphdef, state)
  carry = (logits, jnp.zeros((rows,), bool), jnp.full((rows, blocks * block), pad_id, jnp.int32),
           jnp.zeros((), jnp.int32))
  constants = (jnp.asarray(start), jax.random.PRNGKey(seed), jnp.float32(temperature or 1.0),
               jnp.float32(top_p), jnp.asarray(eos), jnp.int32(pad_id))
  decode = functools.partial(_decode, graphdef, state, layers, prompt_len=p, block=block,
                             greedy=temperature == 0, top_p_on=top_p < 1)

  def all_stopped(done_B):
    done = np.asarray(done_B)
    if on_done is not None:
      on_done(int(done.sum()))
    return bool(done.all())

  ran, previous, stopped = 0, None, False
  for phase_end, slots in phases:
    while ran < phase_end and not stopped:
      if caches[0][0].shape[2] < slots:
        caches = _grow(caches, slots=slots)
      caches, *carry = decode(caches, *carry, *constants)
      ran += 1
      stopped = previous is not None and all_stopped(previous)  # read while this block runs
      previous = carry[1]
  all_stopped(carry[1])
  return cut_at_eos(np.asarray(carry[2])[:, :max_new_tokens], eos)
