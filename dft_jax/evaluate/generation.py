"""Replies for the suites: batched sampling (dft_jax.sampling) with a fixed batch shape and a tqdm
progress bar over replies."""
import functools

import tqdm

from dft_jax import sampling


def _advance(bar, start, n, done):
  """Moves the bar to `done` of the n rows of the batch starting at `start` (called between
  decode blocks); with no new row done it only redraws the elapsed time, and only on a terminal."""
  moved = start + min(done, n) - bar.n
  if moved > 0 or (moved == 0 and bar.fp.isatty()):
    bar.update(max(0, moved))


def generate_ids(model, tokenizer, prompt_ids, *, max_new_tokens, batch_size, temperature=0.0,
                 top_p=1.0, seed=0, label=None):
  """Replies (token ids, EOS cut) for each prompt, in batches of batch_size; a short last batch is
  filled up with copies of its last prompt so every batch has one shape (one compiled program).
  label: the progress bar's title (stderr, counted in replies as they finish); None shows none."""
  replies = []
  with tqdm.tqdm(total=len(prompt_ids), desc=label, unit="reply", disable=label is None) as bar:
    for start in range(0, len(prompt_ids), batch_size):
      part = prompt_ids[start:start + batch_size]
      filled = part + [part[-1]] * (min(batch_size, len(prompt_ids)) - len(part))
      advance = functools.partial(_advance, bar, start, len(part))
      replies += sampling.generate(
          model, filled, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
          eos_ids=sampling.stop_ids(model, tokenizer), pad_id=sampling.pad_id(tokenizer),
          seed=seed + start, on_done=None if label is None else advance)[:len(part)]
      advance(len(part))
  return replies


def sample_texts(model, tokenizer, prompt_ids, *, max_new_tokens, batch_size, samples=1,
                 temperature=0.0, top_p=1.0, seed=0, label=None):
  """Decoded replies [len(prompt_ids)][samples]: greedy when temperature is 0, else `samples`
  independent draws per prompt at (temperature, top_p)."""
  expanded = [p for p in prompt_ids for _ in range(samples)]
  ids = generate_ids(model, tokenizer, expanded, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
                     label=label)
  texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
  return [texts[i * samples:(i + 1) * samples] for i in range(len(prompt_ids))]
