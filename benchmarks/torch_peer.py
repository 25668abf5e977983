"""The PyTorch peers of benchmarks/train_step.py: transformers' Qwen2ForCausalLM, same shapes (and
Qwen3MoeForCausalLM for the MoE preset).

  python benchmarks/torch_peer.py --model=qwen2.5-1.5b --objective=dft --batch=4   # on a GPU
  python benchmarks/torch_peer.py --liger ...          # Liger's fused linear cross entropy head
  python benchmarks/torch_peer.py --model=qwen2.5-7b --lora_rank=16 --batch=4    # the peft peer
  python benchmarks/torch_peer.py --smoke              # tiny shape on the CPU (tests)

Full fine-tuning, the setting of the benchmark issue's reference table: random init from a
Qwen2Config (no download), float32 master weights + bf16 autocast, SDPA attention, gradient
checkpointing (non-reentrant), torch.optim.AdamW(fused=True) after clip_grad_norm_(1.0).
LoRA (lora_rank > 0, the LoRA issue's peer): the base built in param_dtype (bfloat16, as
from_pretrained(dtype=torch.bfloat16) loads it), peft.get_peft_model with LoraConfig(r, alpha,
target_modules = the <name>_proj of lora_targets, dropout 0, no bias; peft keeps the adapters in
float32), the same autocast, checkpointing and fused AdamW over the adapters only.
Rows are causal over the whole 4096 tokens (input_ids only: SDPA's flash kernel; passing
restarting position_ids would make transformers build a packed block mask and leave the flash
kernel, slower).
Loss, token mean over the loss mask:
  sft: -log p(y_t);  dft (arXiv:2508.05629): -sg(p(y_t)) log p(y_t).
Plain: full bf16 logits from the model, log_softmax in float32 (what the reference measured).
--liger: hidden states -> LigerFusedLinearCrossEntropyLoss (use_token_scaling=True is DFT).
Timing as in train_step.py: warm-up steps, then timed steps ended by torch.cuda.synchronize;
median. Peak memory: torch.cuda.max_memory_allocated. --probe_batches: afterwards, one step at
each larger batch (peak reset before each) until one runs out of memory. MFU: tokens/s x
dft_jax.throughput.flops_per_token (6 N + 12 L d T; with LoRA 4 N_base + 6 N_adapters + 12 L d T),
as for our records; for a mixture of experts N counts active parameters (the experts outside a
token's top k left out) and the record names transformers' experts implementation (grouped_mm
where torch has it). A missing package (torch, transformers, peft, liger_kernel) makes the record
`skipped`, naming it.
"""
import argparse
import importlib
import json
import os
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import train_step as bench  # pylint: disable=wrong-import-position
from dft_jax import throughput  # pylint: disable=wrong-import-position  (no jax at import)

# HF Qwen2Config fields of the dft_jax presets (tests check they match dft_jax.models.PRESETS).
SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
    "tiny-qwen2": dict(vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True),
}


# Presets of other families: their transformers config is the preset's own config.json
# (dft_jax.models.ModelConfig.to_hf).
OTHER_PRESETS = ("qwen3-moe-a1.3b", "tiny-qwen3-moe")


def hf_config(name):
  """The transformers config of preset `name`, SDPA attention, no KV cache."""
  import transformers
  common = dict(use_cache=False, attn_implementation="sdpa")
  if name in SHAPES:
    return transformers.Qwen2Config(**SHAPES[name], rope_theta=1e6, rms_norm_eps=1e-6,
                                    max_position_embeddings=32768, **common)
  from dft_jax.models import PRESETS  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in PRESETS[name].to_hf().items() if k != "torch_dtype"}
  fields.update(common)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def inactive_params(name):
  """Parameters a token does not use (experts outside its top k; 0 for SHAPES' dense models)."""
  if name in SHAPES:
    return 0
  from dft_jax.models import PRESETS, inactive_param_count  # pylint: disable=g-import-not-at-top
  return inactive_param_count(PRESETS[name])


def build_model(name, device, dtype="float32"):
  """Random-init transformers model of preset `name` (Qwen2ForCausalLM for SHAPES) with
  parameters in `dtype` on `device` (built in that dtype, as from_pretrained(dtype=...) does: no
  float32 copy first), SDPA attention, checkpointing on."""
  import torch
  import transformers
  config = hf_config(name)
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, dtype))
  try:
    with torch.device(device):
      model = transformers.AutoModelForCausalLM.from_config(config)
  finally:
    torch.set_default_dtype(default)
  enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
  if enable:
    enable(activation_checkpointing_kwargs={"use_reentrant": False})
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  return model


def with_lora(model, v):
  """peft.get_peft_model: LoRA adapters of rank v["lora_rank"] on the <name>_proj modules of
  v["lora_targets"] (q,k,v,o,gate,up,down), alpha v["lora_alpha"], no dropout, no bias; the base
  frozen, the adapters float32 (peft's autocast_adapter_dtype)."""
  import peft
  targets = [f"{t.strip()}_proj" for t in v["lora_targets"].split(",") if t.strip()]
  config = peft.LoraConfig(r=v["lora_rank"], lora_alpha=v["lora_alpha"], target_modules=targets,
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
  return peft.get_peft_model(model, config)


def token_loss(logp_N, mask_N, objective):
  """Token-mean loss over the mask: sft -logp, dft -sg(p) logp."""
  per_token = -logp_N if objective == "sft" else -(logp_N.detach().exp() * logp_N)
  return (per_token * mask_N).sum() / mask_N.sum().clamp(min=1.0)


def make_loss_fn(model, objective, liger):
  """batch -> scalar loss for the plain head (full logits) or Liger's fused head."""
  import torch
  if liger:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    flce = LigerFusedLinearCrossEntropyLoss(reduction="mean",
                                            use_token_scaling=objective == "dft")

    def loss_fn(b):
      hidden = model.model(input_ids=b["tokens"]).last_hidden_state
      labels = torch.where(b["loss_mask"] > 0, b["targets"], -100)
      return flce(model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
    return loss_fn

  def loss_fn(b):
    logits = model(input_ids=b["tokens"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = logp.gather(-1, b["targets"].unsqueeze(-1)).squeeze(-1)
    return token_loss(logp.reshape(-1), b["loss_mask"].reshape(-1), objective)
  return loss_fn


def device_batch(rng, rows, seq_len, vocab, doc_len, device):
  import torch
  host = bench.packed_rows(rng, rows, seq_len, vocab, doc_len)
  return {k: torch.as_tensor(host[k], dtype=torch.long if k != "loss_mask" else torch.float32,
                             device=device) for k in ("tokens", "targets", "loss_mask")}


def run_torch(v):
  """Builds and times one peer variant; returns its record fields."""
  import torch
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  # a missing optional package skips the record before the model is built
  for package, needed in (("peft", v["lora_rank"]), ("liger_kernel", v["liger"])):
    if needed:
      importlib.import_module(package)
  t0 = time.perf_counter()
  model = build_model(v["model"], device, v["param_dtype"])
  if v["lora_rank"]:
    model = with_lora(model, v)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          fused=cuda)
  loss_fn = make_loss_fn(model, v["objective"], v["liger"])
  dtype = getattr(torch, v["compute_dtype"])
  autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else (
      lambda: torch.autocast(device, enabled=False))
  vocab = model.config.vocab_size
  rng = np.random.default_rng(0)

  def step(b):
    with autocast():
      loss = loss_fn(b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=cuda)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  batches = [device_batch(rng, v["batch"], v["seq_len"], vocab, v["doc_len"], device)
             for _ in range(2)]
  sync()
  init_s = time.perf_counter() - t0
  times, losses = [], []
  for i in range(v["warmup"] + v["steps"]):
    t0 = time.perf_counter()
    loss = step(batches[i % 2])
    sync()
    times.append(time.perf_counter() - t0)
    losses.append(float(loss.detach()))
  trainable = sum(p.numel() for p in params)
  num_params = sum(p.numel() for p in model.parameters() if not p.requires_grad) or trainable
  s = model.config
  active = num_params - inactive_params(v["model"])
  flops = throughput.flops_per_token(
      active, types.SimpleNamespace(num_layers=s.num_hidden_layers, hidden_size=s.hidden_size),
      v["seq_len"], num_trainable=trainable if v["lora_rank"] else None)
  name = torch.cuda.get_device_name() if cuda else "cpu"
  peak_flops = next((f for k, f in throughput.PEAK_FLOPS.items() if k in name), None)
  record = dict(num_params=num_params, trainable_params=trainable, active_params=active,
                experts_implementation=getattr(s, "_experts_implementation", None),
                num_layers=s.num_hidden_layers, hidden_size=s.hidden_size, vocab_size=vocab,
                tokens_per_step=v["batch"] * v["seq_len"], init_s=init_s, losses=losses,
                peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                bytes_limit=torch.cuda.mem_get_info()[1] if cuda else None,
                device=name, platform="gpu" if cuda else "cpu", fused_adamw=cuda,
                versions=bench.versions("torch", "transformers", "peft", "liger_kernel",
                                        "triton", "numpy"))
  record.update(bench.timing_fields(times[v["warmup"]:], v["batch"] * v["seq_len"], flops,
                                    peak_flops))
  record["probes"] = probe(step, v, rng, vocab, device, cuda)
  fits = [p["batch"] for p in record["probes"] if p["status"] == "ok"]
  record["max_batch_fit"] = max([v["batch"]] + fits)
  return record


def probe(step, v, rng, vocab, device, cuda):
  """One step at each of v["probe_batches"] (ascending) until one runs out of memory."""
  import torch
  out = []
  for rows in sorted(v["probe_batches"]):
    b = None
    try:
      if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
      b = device_batch(rng, rows, v["seq_len"], vocab, v["doc_len"], device)
      t0 = time.perf_counter()
      step(b)
      if cuda:
        torch.cuda.synchronize()
      out.append(dict(batch=rows, status="ok", step_time_s=time.perf_counter() - t0,
                      peak_bytes=torch.cuda.max_memory_allocated() if cuda else None))
    except torch.OutOfMemoryError as e:
      out.append(dict(batch=rows, status="oom", error=str(e)[:300]))
      break
    finally:
      del b
  return out


def run_variant(v):
  v = dict(bench.DEFAULTS, **v)
  record = {k: v[k] for k in bench.DEFAULTS if k not in ("est_s", "group")}
  record.update(name=v.get("name") or f"torch/{v['model']}/{v['objective']}", group=v["group"],
                framework="torch", peft=bool(v["lora_rank"]), remat="checkpoint_layers",
                attention="sdpa", lm_head=None, lm_head_chunk=None, status="ok")
  return bench.run_recorded(record, lambda: run_torch(v), skipped=(ModuleNotFoundError,))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", help="one variant as JSON (what the sweep passes)")
  p.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(SHAPES) + list(OTHER_PRESETS))
  p.add_argument("--objective", default="dft", choices=("sft", "dft"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--liger", action="store_true")
  p.add_argument("--lora_rank", type=int, default=0, help="> 0: the peft peer (bf16 base)")
  p.add_argument("--probe_batches", default="", help="comma-separated, e.g. 6,8")
  p.add_argument("--smoke", action="store_true", help="tiny-qwen2, T=128, float32, CPU-sized")
  args = p.parse_args(argv)
  if args.variant:
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in json.loads(args.variant).items()}
  else:
    v = dict(model=args.model, objective=args.objective, batch=args.batch, seq_len=args.seq_len,
             steps=args.steps, warmup=args.warmup, liger=args.liger, lora_rank=args.lora_rank,
             param_dtype="bfloat16" if args.lora_rank else "float32",
             probe_batches=tuple(int(b) for b in args.probe_batches.split(",") if b))
    if args.smoke:
      v.update(model="tiny-qwen2", seq_len=128, compute_dtype="float32", param_dtype="float32",
               steps=3, warmup=1)
  print("RESULT " + json.dumps(run_variant(v)), flush=True)


if __name__ == "__main__":
  main()
