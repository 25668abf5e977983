"""Teacher-forced statistics: per-token log pi(target), entropy H(pi) and KL(pi_base || pi) on
given replies, through the chunked LM head (`dft_jax.lm_head.token_stats`, never the full
[B, T, V] logits; the base model enters as the reference's final hidden states and head weight).

  H(pi)            = -sum_v pi(v|.) log pi(v|.)
  KL(base || pi)   = sum_v pi_base(v|.) [log pi_base(v|.) - log pi(v|.)]
"""

import jax
import numpy as np
import tqdm
from flax import nnx

from dft_jax import lm_head
from dft_jax import objectives
from dft_jax.data import packing

LENGTH_BUCKET = 64  # rows are padded to a multiple of this many tokens (fewer recompiles)


def encoded_batch(examples, pad):
  """Rows of encoded examples (input ids, trained flags: data.Encoder.encode), right-padded;
  loss_mask marks the positions whose target is a trained token (loss_mask[t] = trained[t + 1]),
  as in training. Returns the Batch-contract dict (numpy, one segment per row)."""
  length = max(len(ids) for ids, _ in examples)
  n = len(examples)
  tokens = np.full((n, length), pad, np.int32)
  targets = np.full((n, length), pad, np.int32)
  loss_mask = np.zeros((n, length), np.float32)
  segment_ids = np.zeros((n, length), np.int32)
  positions = np.zeros((n, length), np.int32)
  for i, (ids, trained) in enumerate(examples):
    k = len(ids)
    tokens[i, :k] = ids
    targets[i, :k - 1] = ids[1:]
    loss_mask[i, :k - 1] = np.asarray(trained[1:], np.float32)
    segment_ids[i, :k] = 1
    positions[i, :k] = np.arange(k)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
              positions=positions)


def teacher_forced_batch(prompt_ids, reply_ids, pad):
  """Rows prompt + reply, right-padded; loss_mask marks the positions whose target is a reply
  token (encoded_batch with every reply token trained)."""
  return encoded_batch([(list(p) + list(r), [0] * len(p) + [1] * len(r))
                        for p, r in zip(prompt_ids, reply_ids)], pad)


def padded(batch, rows, length):
  """The batch padded with masked-out rows / positions to [rows, length]."""
  n, t = batch["tokens"].shape
  return {k: np.pad(v, [(0, rows - n), (0, length - t)]) for k, v in batch.items()}


def _trunk(graphdef, params, batch):
  """(final hidden states [B, T, D], head weight [D, V]) of the model `params` on the batch."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(batch["tokens"], positions_BxT=batch["positions"],
                                     segment_ids_BxT=batch["segment_ids"])
  return hidden_BxTxD, model.head_weight()


def token_stats(graphdef, params, base_params, batch):
  """float32 [B, T] logp, entropy and, with base_params, kl_from_ref = KL(base || model)."""
  hidden_BxTxD, w_DxV = _trunk(graphdef, params, batch)
  if base_params is None:
    return lm_head.token_stats(hidden_BxTxD, w_DxV, batch["targets"], stats=("logp", "entropy"))
  ref_hidden_BxTxD, ref_w_DxV = _trunk(graphdef, base_params, batch)
  return lm_head.token_stats(hidden_BxTxD, w_DxV, batch["targets"],
                             stats=("logp", "entropy", "kl_from_ref"),
                             ref_hidden_BxTxD=ref_hidden_BxTxD, ref_w_DxV=ref_w_DxV)


_token_stats = jax.jit(token_stats, static_argnames="graphdef")


def forced_stats(graphdef, params, base_params, batch, *, batch_size, label=None):
  """Per-token logp, entropy and (base_params given) kl_from_ref at the batch's loss_mask
  positions (flat numpy), batch_size rows at a time, rows and length padded to fixed buckets.
  label: the title of a progress bar over rows (stderr); None shows none.

  `batch` is any Batch-contract dict; DataError if a row has more segment runs than the model's
  max_segments (packing.check_segment_runs)."""
  packing.check_segment_runs(batch["segment_ids"], nnx.merge(graphdef, params).max_segments)
  n, t = batch["tokens"].shape
  length = -(-t // LENGTH_BUCKET) * LENGTH_BUCKET
  out = {}
  with tqdm.tqdm(total=n, desc=label, unit="row", disable=label is None) as bar:
    for start in range(0, n, batch_size):
      part = padded({k: v[start:start + batch_size] for k, v in batch.items()},
                     min(batch_size, n), length)
      stats = jax.device_get(_token_stats(graphdef, params, base_params, part))
      mask = part["loss_mask"] > 0
      for key, value in stats.items():
        out.setdefault(key, []).append(np.asarray(value)[mask])
      bar.update(min(batch_size, n - start))
  return {k: np.concatenate(v) for k, v in out.items()}


def per_row(values, loss_mask_NxT):
  """forced_stats' flat per-token values (row-major over loss_mask) -> one array per row."""
  counts = np.asarray(loss_mask_NxT > 0).sum(axis=1)
  return np.split(np.asarray(values, np.float64), np.cumsum(counts)[:-1])


def forgetting_measures(drift, prose):
  """The forgetting measures from per-row teacher-forced values ({stat: [row values]}) on the
  base's replies to general prompts (`drift`) and on held-out prose: KL(base || model) on the
  replies, token-weighted -- the sum over every reply token over the number of tokens, the one
  definition everything reports -- with each prompt's sum and token count (a bootstrap over
  prompts keeps the token weighting); the model's entropy there; perplexity and KL on the
  prose."""
  flat = lambda rows: np.concatenate([np.asarray(r, np.float64) for r in rows])  # noqa: E731
  kl_sums = [float(np.sum(r)) for r in drift["kl_from_ref"]]
  counts = [len(r) for r in drift["kl_from_ref"]]
  return {"kl_to_base": sum(kl_sums) / sum(counts), "kl_sum_per_prompt": kl_sums,
          "tokens_per_prompt": counts, "entropy_general": float(flat(drift["entropy"]).mean()),
          "perplexity_heldout": float(np.exp(-flat(prose["logp"]).mean())),
          "kl_heldout": float(flat(prose["kl_from_ref"]).mean())}


def target_prob_histogram(logp):
  """Counts of exp(logp) over objectives.HIST_EDGES (the train metric's bins; the last bin
  includes 1.0)."""
  bins = len(objectives.HIST_EDGES) - 1
  index = np.clip(np.floor(np.exp(logp) * bins), 0, bins - 1).astype(int)
  return np.bincount(index, minlength=bins)
