"""Training FLOPs per token and the chips' peak rates: the MFU every run and benchmark reports.

MFU = tokens/s x flops_per_token / (peak FLOP/s x devices), flops_per_token = 6 N + 12 L d T
(4 N + 6 N_adapters + 12 L d T with a frozen LoRA base).
"""
# Dense bf16 peak FLOP/s by device kind (None: MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def flops_per_token(num_params, model_cfg, seq_len, num_trainable=None):
  """Training FLOPs per token, 6 N + 12 L d T: forward + backward of every parameter and the
  attention scores of a full causal row (N counts every parameter once, tied embeddings too).
  With a frozen base (LoRA: num_trainable adapter parameters besides the num_params of the base)
  the base needs no weight gradients: 4 N + 6 N_trainable + 12 L d T."""
  attention = 12 * model_cfg.num_layers * model_cfg.hidden_size * seq_len
  if num_trainable is None:
    return 6 * num_params + attention
  return 4 * num_params + 6 * num_trainable + attention


def peak_flops(device):
  """The device's dense bf16 peak, or None when its kind is not in PEAK_FLOPS."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def mfu(tokens_per_s, flops, peak, num_devices=1):
  return tokens_per_s * flops / (peak * num_devices)
