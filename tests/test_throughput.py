"""dft_jax/throughput.py: the standard FLOP count and the attention work of packed documents.

The segment-aware count is checked against a brute-force count of the query-key pairs the
attention mask allows (dft_jax.models.attention.causal_segment_mask's rule, written out here in
numpy: key j <= query i, same non-zero segment), on hand-made layouts."""
import types

import numpy as np
import pytest

from dft_jax import throughput

CFG = types.SimpleNamespace(num_layers=3, hidden_size=8)


def allowed_pairs(segment_ids_BxT):
  """Query-key pairs a causal packed mask allows, counted one by one (padding: none)."""
  count = 0
  for row in np.asarray(segment_ids_BxT):
    for i in range(len(row)):
      for j in range(i + 1):
        count += row[i] != 0 and row[j] == row[i] and np.all(row[j:i + 1] == row[i])
  return count


LAYOUTS = {
    "one document": [[1] * 7],
    "three documents": [[1, 1, 1, 2, 2, 3, 3]],
    "padding at the end": [[1, 1, 1, 2, 2, 0, 0]],
    "two rows": [[1, 1, 2, 2, 2, 2, 0], [1, 2, 3, 4, 5, 6, 7]],
    "an id seen again after another": [[1, 1, 2, 1, 1, 1, 0]],  # runs, as cuDNN's layout
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_segment_attention_flops_count_the_allowed_pairs(name):
  seg = np.asarray(LAYOUTS[name])
  assert throughput.segment_attention_flops(seg, 3, 8) == 12 * 3 * 8 * allowed_pairs(seg)


def test_document_lengths_of_hand_made_rows():
  assert throughput.document_lengths([[1, 1, 1, 2, 2, 0, 0]]).tolist() == [3, 2]
  assert throughput.document_lengths([[0, 1, 1, 2], [3, 3, 3, 3]]).tolist() == [2, 1, 4]
  assert throughput.document_lengths([[1, 1, 2, 1, 1, 1, 0]]).tolist() == [2, 1, 3]


def test_one_document_a_row_is_about_half_the_standard_attention_count():
  t = 4096
  per_token = throughput.segment_attention_flops(np.ones((2, t), np.int32), 3, 8) / (2 * t)
  standard = throughput.flops_per_token(0, CFG, t)  # N = 0: the attention term alone
  assert per_token == 6 * 3 * 8 * (t + 1)  # 12 L w (T (T + 1) / 2) / T
  assert per_token / standard == pytest.approx(0.5, abs=1e-3)


def test_packed_rows_of_short_documents_do_far_less_attention():
  """A 4,096-token row of 16 documents of 256: 257 / 4,097 (~1/16) of one document's causal
  work."""
  seg = np.repeat(np.arange(1, 17), 256)[None]
  one_doc = throughput.segment_attention_flops(np.ones((1, 4096), np.int32), 3, 8)
  assert throughput.segment_attention_flops(seg, 3, 8) * 4097 == one_doc * 257


def test_dense_count_with_and_without_a_frozen_base():
  assert throughput.dense_flops_per_token(10) == 60
  assert throughput.dense_flops_per_token(10, num_trainable=2) == 52
  assert throughput.flops_per_token(10, CFG, 5, num_trainable=2) == 52 + 12 * 3 * 8 * 5
