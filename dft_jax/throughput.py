"""Training FLOPs per token and the chips' peak rates: the MFU every run and benchmark reports.

MFU = tokens/s x flops_per_token / (peak FLOP/s x devices), flops_per_token = 6 N + 12 L d T
(4 N + 6 N_adapters + 12 L d T with a frozen LoRA base): the standard count (PaLM,
arXiv:2204.02311, appendix B), whose attention term credits every query with all T keys of its
row. Packed rows do less: a query attends to the earlier tokens of its own document only.
`segment_attention_flops` counts that work, for the second MFU the benchmarks report.
"""
import numpy as np

# Dense bf16 peak FLOP/s by device kind (None: MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}
# Nominal HBM bandwidth (bytes/s) by device kind: the sampler's bound (None: not reported).
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def dense_flops_per_token(num_params, num_trainable=None):
  """Training FLOPs of the matmuls with the parameters, per token: 6 N (forward 2 N, backward
  4 N); with a frozen base (LoRA: num_trainable adapter parameters besides the num_params of the
  base) the base forms no weight gradients: 4 N + 6 N_trainable."""
  if num_trainable is None:
    return 6 * num_params
  return 4 * num_params + 6 * num_trainable


def flops_per_token(num_params, model_cfg, seq_len, num_trainable=None):
  """Training FLOPs per token, 6 N + 12 L d T: forward + backward of every parameter and the
  attention scores of a full row of T keys for every query (N counts every parameter once, tied
  embeddings too); with a frozen base 4 N + 6 N_trainable + 12 L d T."""
  attention = 12 * model_cfg.num_layers * model_cfg.hidden_size * seq_len
  return dense_flops_per_token(num_params, num_trainable) + attention


def document_lengths(segment_ids_BxT):
  """Lengths of the documents of packed rows: the runs of equal non-zero segment ids in each row
  (id 0 is padding), row by row, in order."""
  lengths = []
  for row in np.asarray(segment_ids_BxT):
    starts = np.flatnonzero(np.diff(row, prepend=row[0] - 1))
    runs = np.diff(np.append(starts, len(row)))
    lengths.extend(runs[row[starts] != 0].tolist())
  return np.asarray(lengths, np.int64)


def segment_attention_flops(segment_ids_BxT, num_layers, attention_width):
  """Training FLOPs of causal attention over the documents of packed rows, all rows together:
  12 L w sum_docs n (n + 1) / 2. Query i of a document of n tokens attends to its i + 1 keys
  (itself and the earlier ones), n (n + 1) / 2 query-key pairs; a pair costs 2 w FLOPs in q k^T
  and 2 w in p v forward (w = heads x head_dim), three times that for forward + backward.
  Padding (segment id 0) does no counted work. One document of T tokens a row gives
  6 L w (T + 1) a token: about half the standard count's 12 L d T (d = w)."""
  n = document_lengths(segment_ids_BxT)
  return 12 * num_layers * attention_width * int(np.sum(n * (n + 1) // 2))


def peak_flops(device):
  """The device's dense bf16 peak, or None when its kind is not in PEAK_FLOPS."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def hbm_bytes_per_s(device):
  """The device's nominal memory bandwidth, or None when its kind is not in HBM_BYTES_PER_S."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)


def mfu(tokens_per_s, flops, peak, num_devices=1):
  return tokens_per_s * flops / (peak * num_devices)
