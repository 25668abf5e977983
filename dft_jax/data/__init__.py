"""Data: HF datasets in, chat-templated, prompt-masked, packed batches out.

Training (the train loop):
  data.validate(config.data, seq_len=T, global_batch_size=G, process_count=P,  # early ConfigError
                max_segments=config.model.max_segments)
  it = data.make_train_iterator(config.data, tokenizer, seq_len=T, global_batch_size=G,
                                seed=config.train.seed,   # process_index/count: jax's by default
                                max_segments=config.model.max_segments)  # docs per row < this
  batch = next(it)   # {tokens, targets, loss_mask, segment_ids, positions}: numpy [G / P, T]
  state = it.state() # small JSON-serialisable dict; save it with the checkpoint
  it.restore(state)  # on a fresh iterator (same data config and tokenizer): it then yields exactly
                     # the batches the saved one would have yielded next
  it.stats           # rows, kept, dropped {reason: n}, tokens, loss_tokens, packed_rows,
                     # most_docs_per_row
                     # (per epoch; running totals when streaming), batches_per_epoch
  it.summary()       # one line: rows kept / dropped, packing efficiency, loss-token fraction
                     # (also logged when the iterator is made)

  The iterator leaves out the held-out rows of data.source (data.eval_holdout, holdout.py), which
  the before/after evaluation scores.

  The stream is endless: epoch e is the source shuffled, best-fit packed and its rows shuffled
  from (seed, e) alone; epochs follow each other without a gap, so a batch may span two. Rows obey
  the Batch contract (packing.py): targets are next tokens within a segment; loss_mask is 0 on
  prompts, padding and each segment's last token; positions restart per segment; segment_ids are
  0 on padding. The trained span of a response is its tokens plus the end-of-turn token
  (ChatML: `{content}<|im_end|>`), see formats.py. Resume semantics: pipeline.py (map-style:
  exact, O(1), independent of process count and batch size; streaming: exact, re-reads the
  epoch's consumed rows, state per process). The state carries the sha256 of the data's files: a
  resume on changed data is refused naming the file (data.allow_changed resumes on it anyway).

  Mixtures (`data.sources`, mixture.py): examples drawn from several sources by weight; batches
  also hold `source_ids` [B, T] (each token's source); `data.mixture.source_names(config.data)`
  names them for the step's per-source metrics.

Examples (evaluation, inspection):
  enc = data.Encoder(config.data, tokenizer)
  enc.encode(row) -> (input_ids, trained)   trained[i] = 1 where token i is a training target
  enc.prompt_ids(prompt) -> ids to generate from, rendered exactly as in training
  data.load_builtin(name) -> list[dict]     names in data.BUILTINS (builtin.py): arith_train/test,
                                            arith_terse_train/test, lookup_train/test/val,
                                            general_prompts, factual_qa, heldout_text
  data.extract_answer(text) -> str | None   last `#### N` (else \\boxed{N}, else 'answer is N')
  data.is_correct(text, answer) -> bool     the extracted answer equals `answer` as a number
  data.matches_fact(text, aliases) -> bool  whole-word, case/accent-insensitive alias match
  python -m dft_jax.data.inspect [--config=...] [--num=3] [--tokenizer=DIR]   marked spans + stats

Bad sources, rows, fields and templates raise `dft_jax.errors.DataError`, bad config values
`ConfigError`: one line naming the field, the file and the row (0-based, as `dataset[row]`).
"""
from dft_jax.data.answers import extract_answer, is_correct, matches_fact, normalize_number
from dft_jax.data.builtin import BUILTINS, load_builtin
from dft_jax.data import mixture
from dft_jax.data.formats import Encoder
from dft_jax.data.pipeline import make_train_iterator, validate

__all__ = ["BUILTINS", "Encoder", "extract_answer", "is_correct", "load_builtin",
           "make_train_iterator", "matches_fact", "mixture", "normalize_number", "validate"]
