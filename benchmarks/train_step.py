"""Train-step throughput, MFU and peak memory of dft_jax's full step (benchmark issue #8).

  python benchmarks/train_step.py --sweep=gpu --out=DIR     # the GPU plan: every variant, JAX and
                                                            # PyTorch peers, each in a fresh process
  python benchmarks/train_step.py --model=qwen2.5-1.5b --objective=dft --batch=4 \
      --remat=nothing_saveable --lm_head_chunk=4096        # one variant, in this process
  python benchmarks/train_step.py --memory --model=qwen2.5-1.5b   # compile only (no execution):
                                                            # XLA's buffer sizes, CPU is fine
  python benchmarks/train_step.py --sweep=smoke --out=DIR   # tiny shapes on CPU (tests)

The step is dft_jax.step.make_train_step itself (forward, fused LM head, objective, backward,
clip + AdamW, donated state) run by the train job's loop (dft_jax.loop.train_loop) on a
random-init preset, fed random packed rows built on the host: several documents per row
(segment_ids 1..n, positions restarting), loss on ~75% of each document. Timing: compile (AOT),
`warmup` steps, then `steps` timed steps; a step's time is the interval between reading its
metrics and the previous step's (the loop dispatches the next step first, as in training); the
median is the step time. tokens/s = B*T / median (padding included: rows are full).
MFU = tokens/s * (6 N + 12 L d T) / 989e12, N = all parameters including the (tied) embedding,
T = seq_len (dft_jax.throughput). Peak memory is the device allocator's peak_bytes_in_use, which
only grows within a process: hence one process per variant.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from dft_jax import throughput  # noqa: E402  (no jax at import)

PEER_SCRIPT = os.path.join(ROOT, "benchmarks", "torch_peer.py")
HEAD_SCRIPT = os.path.join(ROOT, "benchmarks", "head.py")
GIB = 2 ** 30

# One variant = one dict; unset fields take these values. "best" (remat) and "max" (batch) are
# resolved by the sweep from the records before it (see `resolve`).
DEFAULTS = dict(
    framework="jax",            # jax | torch | head (the LM head alone: benchmarks/head.py)
    model="qwen2.5-1.5b",       # a dft_jax.models.PRESETS name
    objective="dft",            # sft | dft | psft (any objectives.OBJECTIVES name)
    batch=4,                    # rows per optimizer update
    seq_len=4096,
    minibatches=1,              # PSFT's K: the global batch is batch * minibatches rows
    microbatches=1,             # gradient accumulation slices per update
    remat="nothing_saveable",   # a decoder.REMAT_POLICIES name, or "best"
    lm_head_chunk=4096,         # tokens per chunk of the fused LM head
    lm_head="checkpointed",     # checkpointed | fused (lm_head.fused_loss); the step: needs
                                # config.model.lm_head_impl
    w_dtype="bfloat16",         # head: the head weight's dtype (the step passes the compute dtype)
    compare=False,              # head: also the checkpointed head's gradients, their difference
    param_dtype="float32",
    compute_dtype="bfloat16",
    attention="auto",           # cudnn on GPU
    mu_dtype=None,              # AdamW first moment dtype (needs config.optimizer.mu_dtype)
    nu_dtype=None,              # AdamW second moment dtype (config.optimizer.nu_dtype)
    lora_rank=0,                # config.lora.rank: 0 trains every parameter; > 0 LoRA adapters
                                # (torch: the peft peer); param_dtype is the frozen base's dtype
    lora_alpha=16.0,            # config.lora.alpha (scale alpha / rank)
    lora_targets="q,k,v,o,gate,up,down",  # config.lora.targets (peft: <name>_proj)
    base_quant="none",          # config.lora.base_quant: none | int8 | nf4 (QLoRA)
    quant_block_size=64,        # config.lora.block_size: nf4 blocks (input elements)
    doc_len=(256, 2048),        # document lengths drawn uniformly in [lo, hi]; (T, T): 1 per row
    max_segments=None,          # config.model.max_segments; None: the most documents packed_rows
                                # puts in a row, ceil(T / lo) + 1 (cuDNN's packed backward keeps
                                # a float32 [B * max_segments, T, N, H] buffer: 14 GiB at 64 for
                                # the 7B shape at 4 x 4096, benchmarks/README.md)
    steps=10,
    warmup=2,
    xla_flags="",               # appended to XLA_FLAGS for this variant's process
    liger=False,                # torch: Liger's fused linear cross entropy
    probe_batches=(),           # torch: extra batch sizes tried for one step each, until OOM
    est_s=60,                   # sweep: expected wall time (skip if the budget is short)
    group="",                   # sweep: "policy" records compete for remat="best"
    topk_method="blocks",       # lm_head.top_k_values' method: blocks (its default) | lax
)

# CPU smoke runs only: XLA:CPU compiles the tiny step faster, the numbers are not measurements.
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Tiny CPU shapes of the smoke plan's JAX variants.
TINY = dict(model="tiny-qwen2", seq_len=128, batch=2, lm_head_chunk=64, doc_len=(16, 64),
            compute_dtype="float32", steps=3, warmup=1, xla_flags=SMOKE_XLA_FLAGS, est_s=20)
DOTS_ATTN = "dots_attention_saveable"  # the fastest remat policy on the H100
FAST = dict(remat=DOTS_ATTN, lm_head="fused", steps=8, warmup=2, est_s=25)

# The 1.5B shape on one H200 (issues 15 and 16), in priority order (the budget skips the tail).
# est_s: process start + init + compile + 2 + 8 steps (H100 at 2 + 10 steps: 20-25 s a 1.5B
# variant, 30-45 s the first compile and a torch peer, Liger 45 s). Every JAX row runs
# dots_attention_saveable and the fused head unless named otherwise; asft and iw_sft ask for the
# fused head and run the checkpointed one (their lm_head says so): jax/sft/checkpointed is their
# SFT.
H200 = [
    dict(name="torch/dft", framework="torch", objective="dft", steps=8, est_s=35),
    dict(FAST, name="jax/dft/fused", est_s=45),  # the first compile fills the autotune cache
    dict(FAST, name="jax/dft/checkpointed", lm_head="checkpointed"),
    dict(FAST, name="jax/sft/fused", objective="sft"),
    dict(FAST, name="jax/dft/lean", remat="nothing_saveable", mu_dtype="bfloat16",
         nu_dtype="bfloat16"),
    dict(name="torch/dft/liger", framework="torch", objective="dft", liger=True, steps=8,
         est_s=45),
    dict(FAST, name="jax/eaft/fused", objective="eaft"),
    dict(FAST, name="jax/psft/k4/fused", objective="psft", minibatches=4, est_s=45),
    dict(FAST, name="jax/psft/k1/fused", objective="psft"),
    dict(FAST, name="jax/gem/fused", objective="gem"),
    dict(FAST, name="jax/deft/fused", objective="deft"),
    dict(FAST, name="jax/power/fused", objective="power"),
    dict(FAST, name="jax/chord_phi/fused", objective="chord_phi"),
    dict(FAST, name="jax/prob_threshold/fused", objective="prob_threshold"),
    dict(FAST, name="jax/sft/checkpointed", objective="sft", lm_head="checkpointed"),
    dict(FAST, name="jax/asft", objective="asft", est_s=35),
    dict(FAST, name="jax/iw_sft", objective="iw_sft", est_s=35),
]

# The Qwen2.5-7B shape on one H200 (issues 16 and 17), DFT, 4 x 4096 unless named otherwise.
# LoRA: rank 16 on all seven projections, alpha 16, bf16 base (PEFT's peer the same).
SEVEN_B = dict(model="qwen2.5-7b", lm_head="fused", steps=8, warmup=2)
LORA16 = dict(SEVEN_B, lora_rank=16, lora_alpha=16.0, param_dtype="bfloat16")
PEFT16 = dict(LORA16, framework="torch", lm_head="checkpointed")
H200_7B = [
    dict(PEFT16, name="torch/7b/peft/b4", est_s=60),
    dict(LORA16, name="jax/7b/lora16/b4", remat="nothing_saveable", est_s=65),
    dict(LORA16, name="jax/7b/qlora_nf4/b1", remat="nothing_saveable", base_quant="nf4",
         batch=1, est_s=55),
    dict(SEVEN_B, name="jax/7b/dft/nothing", remat="nothing_saveable", est_s=75),
    dict(LORA16, name="jax/7b/lora16/b4/attn", remat="attention_saveable", est_s=60),
    dict(SEVEN_B, name="jax/7b/dft/attn_mu_bf16", remat="attention_saveable",
         mu_dtype="bfloat16", est_s=75),
    dict(PEFT16, name="torch/7b/peft/b2", batch=2, est_s=45),
    dict(PEFT16, name="torch/7b/peft/b1", batch=1, est_s=40),
    dict(SEVEN_B, name="torch/7b/dft/b1", framework="torch", lm_head="checkpointed", batch=1,
         est_s=55),
]

# After the first H200 run (EAFT at 3.4x SFT with top-k in rounds of 16): EAFT's two-stage block
# top-k against one lax.top_k (step, and head alone where the record times the ways), and LoRA /
# QLoRA at 7B with smaller head chunks (the head's [chunk, 152,064] float32 buffers are ~2.3 GiB
# each at 4,096 tokens).
H200_MORE = [
    dict(name="head/eaft/fused", framework="head", objective="eaft", lm_head="fused",
         compare=True, est_s=35),
    dict(FAST, name="jax/eaft/fused", objective="eaft"),
    dict(FAST, name="jax/eaft/fused/lax_top_k", objective="eaft", topk_method="lax"),
    dict(FAST, name="jax/sft/fused", objective="sft"),
    dict(FAST, name="jax/psft/k4/fused", objective="psft", minibatches=4, est_s=45),
    dict(LORA16, name="jax/7b/lora16/b4/chunk1024", remat="nothing_saveable", lm_head_chunk=1024,
         est_s=65),
    dict(LORA16, name="jax/7b/qlora_nf4/b1/chunk1024", remat="nothing_saveable",
         base_quant="nf4", batch=1, lm_head_chunk=1024, est_s=55),
]

# After the buffer assignment showed cuDNN's packed attention backward holding 14.1 of the LoRA
# step's 20 GiB of temporaries (a float32 [B * max_segments, T, N, H] buffer, max_segments 64):
# the LoRA / QLoRA rows with max_segments at the most documents a row holds (17), with their peers
# in the same run, and the 7B full fine-tune's peak at that bound.
H200_LORA = [next(v for v in H200_7B if v["name"] == name) for name in (
    "torch/7b/peft/b4", "jax/7b/lora16/b4", "jax/7b/qlora_nf4/b1", "torch/7b/peft/b1",
    "jax/7b/lora16/b4/attn", "jax/7b/dft/attn_mu_bf16")]

# Qwen3-MoE on one H200: the qwen3-moe-a1.3b preset (Qwen3-30B-A3B's attention and top-8-of-
# 768-wide experts, 64 experts, 12 layers: 1.30B of 4.47B parameters active), 4 x 4096 packed,
# DFT, beside transformers' Qwen3MoeForCausalLM (its grouped_mm experts) in the same run; MFU on
# the active parameters. est_s: process start + init (72 GB of float32 weights and AdamW state) +
# compile (torch: the first steps) + 2 + 5 steps; both rows ~85 s (docs/models.md).
MOE = dict(model="qwen3-moe-a1.3b", steps=5, warmup=2)
H200_MOE = [
    dict(MOE, name="torch/moe/dft", framework="torch", est_s=40),
    dict(MOE, name="jax/moe/dft/fused", remat=DOTS_ATTN, lm_head="fused", est_s=45),
]

PLANS = {
    # The H100 plan, in priority order: when the budget runs short the tail is skipped.
    # est_s: process start + init + compile + steps, H100 (1.5B compile ~30-45 s).
    "gpu": [
        dict(name="torch/dft", framework="torch", objective="dft", est_s=30),
        dict(name="jax/dft/nothing", remat="nothing_saveable", group="policy"),
        dict(name="jax/dft/dots", remat="dots_with_no_batch_dims_saveable", group="policy"),
        dict(name="jax/dft/dots_attn", remat="dots_attention_saveable", group="policy"),
        dict(name="head/dft/checkpointed", framework="head", est_s=30),
        dict(name="head/dft/fused", framework="head", lm_head="fused", compare=True, est_s=40),
        dict(name="jax/dft/fused_head", lm_head="fused", remat="best", est_s=50),
        dict(name="jax/sft", objective="sft", remat="best", est_s=50),
        dict(name="jax/psft/k1", objective="psft", remat="best", est_s=55),
        dict(name="jax/dft/lean", remat="nothing_saveable", mu_dtype="bfloat16", est_s=50),
        dict(name="jax/eaft", objective="eaft", remat="best", est_s=50),
        dict(name="jax/deft", objective="deft", remat="best", est_s=50),
        dict(name="jax/gem", objective="gem", remat="best", est_s=50),
        dict(name="torch/sft", framework="torch", objective="sft", probe_batches=(6, 8),
             est_s=35),
        dict(name="jax/dft/lean_attn", remat="attention_saveable", mu_dtype="bfloat16",
             est_s=50),
        dict(name="torch/dft/liger", framework="torch", objective="dft", liger=True,
             probe_batches=(16, 32), est_s=45),
        dict(name="jax/dft/one_doc", remat="best", doc_len=(4096, 4096)),
        dict(name="jax/0.5b/dft", model="qwen2.5-0.5b", remat="best", est_s=40),
        dict(name="jax/dft/max_batch", remat="best", batch="max", est_s=90),
        dict(name="jax/psft/k4", objective="psft", minibatches=4, remat="best", est_s=80),
        dict(name="jax/dft/no_triton_gemm", remat="best",
             xla_flags="--xla_gpu_enable_triton_gemm=false"),
    ],
    # The second H100 call: what the first one's budget left out (explicit remat, no "best").
    "gpu_extra": [
        dict(name="torch/dft/liger", framework="torch", objective="dft", liger=True,
             probe_batches=(8, 16, 32), est_s=45),
        dict(name="jax/dft/lean_chunk1024", remat="nothing_saveable", mu_dtype="bfloat16",
             lm_head_chunk=1024, est_s=50),
        dict(name="jax/psft/k4", objective="psft", minibatches=4,
             remat="dots_attention_saveable", est_s=60),
        dict(name="jax/dft/nothing_b16", remat="nothing_saveable", batch=16, est_s=70),
        dict(name="jax/0.5b/dft", model="qwen2.5-0.5b", remat="dots_attention_saveable",
             est_s=40),
    ],
    # The LM head alone at the 1.5B shape (4 x 4096 tokens, D 1,536, V 151,936, chunks of 4,096):
    # every per-token objective through both heads (EAFT's records hold the top-k timings).
    "head": [dict(name=f"head/{objective}/{head}", framework="head", objective=objective,
                  lm_head=head, compare=head == "fused" and objective in ("dft", "eaft"),
                  est_s=35 if head == "fused" and objective in ("dft", "eaft") else 25)
             for objective in ("dft", "eaft", "sft", "gem", "deft", "psft", "power")
             for head in ("checkpointed", "fused")],
    # The full step with the fused head next to the checkpointed one, per objective (needs
    # config.model.lm_head_impl; dots_attention_saveable: the fastest policy on the H100).
    "fused_step": [dict(name=f"jax/{objective}/{head}" + ("/k4" if k == 4 else ""),
                        objective=objective, lm_head=head, minibatches=k,
                        remat="dots_attention_saveable", est_s=50 + 20 * (k > 1))
                   for objective, k in (("dft", 1), ("eaft", 1), ("sft", 1), ("psft", 4),
                                        ("gem", 1), ("deft", 1), ("psft", 1))
                   for head in ("fused", "checkpointed")],
    # One H200, one call each (~540 s): the issues' targets side by side with the peers.
    "h200": H200,
    "h200_7b": H200_7B,
    "h200_more": H200_MORE,
    "h200_lora": H200_LORA,
    "h200_moe": H200_MOE,
    # h200_moe at tiny shapes on the CPU (tests): the same rows through the same paths.
    "moe_smoke": [dict(v, **dict(TINY, model="tiny-qwen3-moe")) for v in H200_MOE],
    # Tiny shapes on CPU: the plumbing of every path above in seconds.
    "smoke": [
        dict(name="torch/dft", framework="torch", model="tiny-qwen2", seq_len=128,
             doc_len=(16, 64), compute_dtype="float32", steps=3, warmup=1, probe_batches=(8,),
             est_s=5),
        dict(TINY, name="jax/psft/k2", objective="psft", minibatches=2, group="policy"),
        dict(name="jax/dft/needs_hook", model="tiny-qwen2", remat="no_such_policy", est_s=5),
        dict(name="head/eaft/checkpointed", framework="head", model="tiny-qwen2", seq_len=128,
             batch=2, lm_head_chunk=64, doc_len=(16, 64), objective="eaft",
             compute_dtype="float32", w_dtype="float32", steps=3, warmup=1, est_s=5),
        dict(name="head/eaft/fused", framework="head", model="tiny-qwen2", seq_len=128, batch=2,
             lm_head_chunk=64, doc_len=(16, 64), objective="eaft", lm_head="fused",
             compute_dtype="float32", w_dtype="float32", compare=True, steps=3, warmup=1,
             est_s=5),
        dict(name="jax/dft/over_budget", model="tiny-qwen2", remat="best", est_s=10 ** 6),
        # LoRA rank 4 on a bf16 base, QLoRA nf4, the peft peer, ASFT (the checkpointed head runs)
        dict(TINY, name="jax/lora4", lora_rank=4, lora_alpha=8.0, param_dtype="bfloat16",
             lm_head="fused"),
        dict(TINY, name="jax/qlora_nf4", lora_rank=4, lora_alpha=8.0, param_dtype="bfloat16",
             base_quant="nf4", quant_block_size=16, batch=1, lm_head="fused"),
        dict(TINY, name="torch/peft", framework="torch", lora_rank=4, lora_alpha=8.0,
             xla_flags=""),
        dict(TINY, name="jax/asft", objective="asft", lm_head="fused"),
    ],
}


# Compile-only memory analysis (--memory_sweep, --memory_plan): XLA's buffer sizes per option.
MEMORY_PLANS = {
    "1.5b": [
        dict(name="nothing/chunk4096", remat="nothing_saveable", lm_head_chunk=4096),
        dict(name="nothing/chunk1024", remat="nothing_saveable", lm_head_chunk=1024),
        dict(name="dots/chunk4096", remat="dots_with_no_batch_dims_saveable",
             lm_head_chunk=4096),
        dict(name="nothing/chunk1024/micro2", remat="nothing_saveable", lm_head_chunk=1024,
             microbatches=2),
        dict(name="nothing/chunk1024/b8", remat="nothing_saveable", lm_head_chunk=1024,
             batch=8),
        dict(name="nothing/chunk1024/psft", remat="nothing_saveable", lm_head_chunk=1024,
             objective="psft"),
        dict(name="nothing/chunk1024/bf16_params", remat="nothing_saveable", lm_head_chunk=1024,
             param_dtype="bfloat16"),
    ],
    # What model.max_segments costs on a GPU (cuDNN's packed backward keeps a float32 dQ buffer
    # per segment slot): the 7B LoRA step at the old default 64, the rows' bound 17 and 8.
    "7b_segments": [
        dict(LORA16, name="lora16/b4/segments64", max_segments=64),
        dict(LORA16, name="lora16/b4/segments17", max_segments=17),
        dict(LORA16, name="lora16/b4/segments8", max_segments=8),
        dict(LORA16, name="lora16/b1/segments64", batch=1, max_segments=64),
        dict(LORA16, name="qlora_nf4/b1/segments64", base_quant="nf4", batch=1, max_segments=64),
        dict(LORA16, name="qlora_nf4/b1/segments17", base_quant="nf4", batch=1, max_segments=17),
    ],
    # The 7B rows of the h200_7b plan (and what does not fit), before the GPU run. On CPU the
    # cuDNN-attention policies (attention_saveable) save what nothing_saveable saves.
    "7b": [
        dict(LORA16, name="lora16/nothing/b4", remat="nothing_saveable"),
        dict(LORA16, name="qlora_nf4/nothing/b1", remat="nothing_saveable", base_quant="nf4",
             batch=1),
        dict(SEVEN_B, name="full/nothing/b4", remat="nothing_saveable"),
        dict(SEVEN_B, name="full/nothing/mu_bf16/b4", remat="nothing_saveable",
             mu_dtype="bfloat16"),
        dict(LORA16, name="lora16/dots_attn/micro4/b4", remat=DOTS_ATTN, microbatches=4),
    ],
}


MEMORY_NOTE = (
    "Compile-only. argument_bytes (the donated state) is exact on any backend and "
    "saved_activation_bytes (print_saved_residuals) is backend-independent; on CPU, temp_bytes "
    "holds XLA's explicit [B, N, T, T] attention (attention_temp_bytes; cuDNN flash attention "
    "has none) and bf16 activations widened to f32, so GPU temporaries are smaller. "
    "head_temp_bytes: the LM head's forward + backward alone.")


class NeedsHook(Exception):
  """The variant needs a config knob or registry entry that dft_jax does not have (yet)."""

  def __str__(self):
    return f"needs a dft_jax hook: {self.args[0]}"


# ----------------------------------------------------------------------------- inputs


def segment_bound(v):
  """The variant's model.max_segments: its own, else ceil(T / lo) + 1: `packed_rows` puts at most
  ceil(T / lo) documents in a row (every one but the last has at least lo tokens), and one run
  more is the slot the train packer leaves for padding (these rows have none)."""
  if v["max_segments"]:
    return int(v["max_segments"])
  lo = min(int(v["doc_len"][0]), v["seq_len"])
  return max(2, -(-v["seq_len"] // lo) + 1)


def packed_rows(rng, rows, seq_len, vocab, doc_len=(256, 2048)):
  """Random packed rows {tokens, targets, loss_mask, segment_ids, positions}, numpy [rows, T].

  Each row is filled with documents of uniform random length in doc_len (the last one cut at T);
  targets[t] = tokens[t + 1] within a document; the loss covers the last ~75% of each document
  (the "response"), never its last token (its target would cross into the next document).
  """
  lo, hi = (min(int(x), seq_len) for x in doc_len)
  tokens = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  loss_mask = np.zeros((rows, seq_len), np.float32)
  targets = np.zeros((rows, seq_len), np.int32)
  for r in range(rows):
    start, seg = 0, 1
    while start < seq_len:
      n = min(int(rng.integers(lo, hi + 1)), seq_len - start)
      end = start + n
      segment_ids[r, start:end] = seg
      positions[r, start:end] = np.arange(n)
      targets[r, start:end - 1] = tokens[r, start + 1:end]
      loss_mask[r, start + n // 4:end - 1] = 1.0
      start, seg = end, seg + 1
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
              positions=positions)


def bench_config(v):
  """configs/default.py with the variant's model, dtypes, remat, head chunk, objective, shapes."""
  from dft_jax.data.testing import default_config
  from dft_jax.models import decoder
  c = default_config()
  if v["remat"] not in decoder.REMAT_POLICIES:
    raise NeedsHook(f"remat={v['remat']!r} is not in dft_jax.models.decoder.REMAT_POLICIES "
                    f"({', '.join(decoder.REMAT_POLICIES)})")
  c.model.update(name=f"preset:{v['model']}", param_dtype=v["param_dtype"],
                 compute_dtype=v["compute_dtype"], remat=v["remat"], attention=v["attention"],
                 lm_head_chunk=v["lm_head_chunk"], max_segments=segment_bound(v))
  if v["lm_head"] != "checkpointed":
    if "lm_head_impl" not in c.model:
      raise NeedsHook(f"lm_head={v['lm_head']!r} needs config.model.lm_head_impl "
                      "(checkpointed | fused): the step's choice of LM head")
    c.model.lm_head_impl = v["lm_head"]
  c.objective.name = v["objective"]
  if v["lora_rank"]:
    if "lora" not in c:
      raise NeedsHook("lora_rank needs config.lora (rank, alpha, targets, base_quant)")
    c.lora.update(rank=v["lora_rank"], alpha=float(v["lora_alpha"]), targets=v["lora_targets"],
                  base_quant=v["base_quant"], block_size=v["quant_block_size"])
  c.train.update(global_batch_size=v["batch"] * v["minibatches"], seq_len=v["seq_len"],
                 minibatches=v["minibatches"], microbatches=v["microbatches"], num_steps=1000)
  c.data.max_length = min(c.data.max_length, v["seq_len"])
  for moment in ("mu_dtype", "nu_dtype"):  # AdamW's moments stored in another dtype
    if v[moment]:
      if moment not in c.optimizer:
        raise NeedsHook(f"{moment} needs config.optimizer.{moment}")
      c.optimizer[moment] = v[moment]
  return c


def single_device_mesh():
  import jax
  from dft_jax import sharding
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


# ----------------------------------------------------------------------------- one variant


def memory_stats(compiled):
  """XLA's buffer sizes for a compiled step (bytes); peak_estimate = arguments + outputs -
  aliased (donated) + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
             code_bytes=m.generated_code_size_in_bytes)
  out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                                + out["temp_bytes"])
  return out


def versions(*names):
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in names:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def device_info():
  import jax
  d = jax.devices()[0]
  return dict(device=getattr(d, "device_kind", str(d)), platform=d.platform,
              device_count=jax.device_count())


def timing_fields(times, tokens_per_step, flops_per_token, peak_flops):
  """Median step time, tokens/s and MFU from per-step wall times (seconds)."""
  median = statistics.median(times)
  tokens_per_s = tokens_per_step / median
  return dict(step_time_s=median, step_times_s=[round(t, 6) for t in times],
              step_time_spread=(max(times) - min(times)) / median,
              tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
              peak_flops=peak_flops,
              mfu=tokens_per_s * flops_per_token / peak_flops if peak_flops else None)


def load_model(config):
  """The decoder of config.model with config.lora's adapters (a preset: random init; benchmarks
  need no tokenizer)."""
  from dft_jax import models
  return models.load(config.model.name,
                     **models.decoder_options(config.model, config.get("lora")))[0]


def sharded_model(config, mesh):
  """load_model(config) with each parameter created on its shards: `jit` with out_shardings (a
  partitionable PRNG), so no device holds the whole model and no parameter is materialised in
  float32 before its cast to the base's bf16 or its quantisation (the eager init would hold each
  stacked float32 weight once: 7.6 GB for the 7B shape's MLP)."""
  import jax
  from flax import nnx
  from dft_jax import models, sharding
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: load_model(config)))
  shardings = sharding.param_shardings(abstract, models.logical_specs(abstract), mesh)
  params = jax.jit(lambda: nnx.split(load_model(config))[1], out_shardings=shardings)()
  return nnx.merge(graphdef, params)


def head_that_runs(config):
  """The LM head the step takes: model.lm_head_impl, unless the objective does not fit the fused
  head (a sequence-level or reference-distribution objective: the checkpointed one)."""
  from dft_jax import objectives
  from dft_jax import step as step_lib
  if (config.model.lm_head_impl == "fused"
      and step_lib.fused_head_fits(objectives.validate(config.objective))):
    return "fused"
  return "checkpointed"


def base_param_count(model_cfg):
  """N of the plain decoder (every parameter once, tied embedding once): the base a LoRA run
  freezes, counted from shapes (a quantised base packs two weights a byte)."""
  from flax import nnx
  from dft_jax import models
  from dft_jax import step as step_lib
  return step_lib.count_params(nnx.state(nnx.eval_shape(
      lambda: models.Decoder(model_cfg, rngs=nnx.Rngs(0)))))


def time_train_step(v, config, mesh, make_model, peak_flops):
  """make_model() -> its TrainState -> the compiled train step, timed over v["warmup"] +
  v["steps"] steps on two alternating batches of packed random rows.

  Returns (state, first batch, record fields every benchmark reports): sizes, init and compile
  seconds, losses, XLA's memory analysis, versions, device, and timing_fields over the steps after
  the warm-up (MFU against peak_flops, None: not reported).
  """
  import itertools
  import jax
  from dft_jax import loop
  from dft_jax import objectives
  from dft_jax import step as step_lib
  t0 = time.perf_counter()
  model = make_model()
  model_cfg = model.config
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  del model
  jax.block_until_ready((state, frozen))  # frozen: a LoRA base, or ASFT / iw-SFT's reference
  init_s = time.perf_counter() - t0
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting)
  rng = np.random.default_rng(0)
  rows = config.train.global_batch_size
  batches = [step_lib.global_batch(packed_rows(rng, rows, v["seq_len"], model_cfg.vocab_size,
                                               v["doc_len"]), mesh) for _ in range(2)]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0], frozen).compile()
  compile_s = time.perf_counter() - t0
  # The train job's loop: each step's time is the interval between reading its metrics and the
  # previous step's (the next step is dispatched first, as in training).
  recorder = loop.Recorder(num_steps=v["warmup"] + v["steps"])
  state = loop.train_loop(state, compiled, ((b, None) for b in itertools.cycle(batches)),
                          num_steps=v["warmup"] + v["steps"], record=recorder, frozen=frozen)
  times = [h["step_seconds"] for h in recorder.history]
  losses = [h["loss"] for h in recorder.history]
  lora = frozen.base is not None
  tokens = rows * v["seq_len"]
  record = dict(
      num_params=base_param_count(model_cfg) if lora else step_lib.count_params(state.params),
      trainable_params=step_lib.count_params(state.params), num_layers=model_cfg.num_layers,
      hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, tokens_per_step=tokens,
      init_s=init_s, compile_s=compile_s, losses=losses, memory_analysis=memory_stats(compiled),
      versions=versions("jax", "jaxlib", "flax", "optax", "numpy"), **device_info())
  record.update(timing_fields(times[v["warmup"]:], tokens,
                              step_lib.train_flops_per_token(state, frozen, model_cfg,
                                                             v["seq_len"]),
                              peak_flops))
  return state, batches[0], record


def run_jax(v):
  """Builds, compiles and times one variant in this process; returns its record fields."""
  import functools
  import jax
  from dft_jax import lm_head
  from dft_jax import step as step_lib
  if v["topk_method"] != "blocks":  # this process's top-k: one lax.top_k over the vocabulary
    lm_head.top_k_values = functools.partial(lm_head.top_k_values, method=v["topk_method"])
  config = bench_config(v)
  step_lib.validate(config, 1)
  mesh = single_device_mesh()
  _, batch, record = time_train_step(v, config, mesh, lambda: sharded_model(config, mesh),
                                     throughput.peak_flops(jax.devices()[0]))
  stats = jax.devices()[0].memory_stats() or {}
  seg = np.asarray(batch["segment_ids"])
  record.update(docs_per_row=float(np.mean(seg.max(axis=1))),
                loss_token_frac=float(np.asarray(batch["loss_mask"]).mean()),
                peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  return record


def run_variant(v):
  """One variant in this process -> its record (status ok / oom / skipped / error)."""
  v = dict(DEFAULTS, **v)
  record = {k: v[k] for k in DEFAULTS if k not in ("est_s", "group", "probe_batches", "liger")}
  record.update(name=v.get("name") or f"{v['framework']}/{v['model']}/{v['objective']}",
                group=v["group"], status="ok")

  def measure():
    fields = run_jax(v)
    # lm_head: the head that ran (asft, iw_sft, dft_seq keep the checkpointed one)
    fields.update(lm_head=head_that_runs(bench_config(v)), lm_head_requested=v["lm_head"],
                  max_segments=segment_bound(v))
    return fields
  return run_recorded(record, measure, skipped=(NeedsHook,))


def run_recorded(record, measure, skipped=()):
  """`record` with measure()'s fields and status ok; or status skipped (an exception of a
  `skipped` type, its message), oom (RESOURCE_EXHAUSTED / out of memory) or error (the message;
  the traceback printed); wall_s either way."""
  t0 = time.perf_counter()
  try:
    record.update(measure())
  except skipped as e:
    record.update(status="skipped", error=str(e))
  except Exception as e:  # pylint: disable=broad-except
    text = f"{type(e).__name__}: {e}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    record.update(status="oom" if oom else "error", error=text[-2000:])
    if not oom:
      traceback.print_exc()
  record["wall_s"] = time.perf_counter() - t0
  return record


# ----------------------------------------------------------------------------- compile-only memory


def abstract_state(config, mesh):
  """(graphdef, abstract TrainState, abstract Frozen, tx) as step.init_train_state builds them
  (with LoRA the adapters train and the base is Frozen.base; ASFT / iw-SFT without LoRA get the
  copy of the starting parameters in Frozen.reference), but shapes and dtypes only: nothing
  allocated (every leaf on the mesh's one device)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dft_jax import models, objectives, sharding
  from dft_jax import step as step_lib
  model = nnx.eval_shape(lambda: load_model(config))
  graphdef, params, base = step_lib.split_model(model)
  logical = models.logical_specs(params)
  tx, _ = step_lib.make_optimizer(config.optimizer, config.train.num_steps, logical)
  replicated = sharding.replicated(mesh)
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
  state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(tx.init, params))
  needs_reference = objectives.validate(config.objective).needs_reference
  reference = params if base is None and needs_reference else None
  return graphdef, abstract(state), abstract(step_lib.Frozen(base=base, reference=reference)), tx


def compiled_memory(v):
  """XLA's memory analysis of one variant's step, compiled for this machine's default backend
  without running it (the 1.5B step compiles on a CPU with no device memory to spare)."""
  import jax
  from dft_jax import objectives, sharding
  from dft_jax import step as step_lib
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  mesh = single_device_mesh()
  graphdef, state, frozen, tx = abstract_state(config, mesh)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen),
                                  setting=objectives.validate(config.objective))
  rows = config.train.global_batch_size
  batch = {k: jax.ShapeDtypeStruct((rows, v["seq_len"]), x.dtype,
                                   sharding=sharding.batch_sharding(mesh))
           for k, x in packed_rows(np.random.default_rng(0), 1, 8, 8).items()}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  out = memory_stats(compiled)
  out.update(compile_s=time.perf_counter() - t0, backend=jax.default_backend(),
             num_params=step_lib.count_params(state.params))
  return out


def run_memory_sweep(out_path, plan):
  """compiled_memory for every MEMORY_PLANS[plan] option (plus the attention-only temporaries at
  each option's shape); writes a JSON list and prints a table in GiB."""
  rows = []
  for option in MEMORY_PLANS[plan]:
    v = dict(option, model=option.get("model", "qwen2.5-1.5b"))
    mem = compiled_memory(v)
    mem.update(name=option["name"], option=option, attention_temp_bytes=attention_memory(v),
               saved_activation_bytes=saved_activation_bytes(v),
               head_temp_bytes=head_temp_bytes(v))
    rows.append(mem)
    print(f"{mem['name']:32s} " + " ".join(
        f"{k[:-6]}={mem[k] / GIB:6.2f}" for k in (
            "argument_bytes", "temp_bytes", "peak_estimate_bytes", "attention_temp_bytes",
            "saved_activation_bytes", "head_temp_bytes")),
          flush=True)
  with open(out_path, "w") as f:
    json.dump(dict(backend=rows[0]["backend"], plan=plan, compile_only=True, note=MEMORY_NOTE,
                   versions=versions("jax", "jaxlib", "flax", "optax"), rows=rows), f, indent=1)
  return rows


def abstract_batch(rows, seq_len):
  import jax
  return {k: jax.ShapeDtypeStruct((rows, seq_len), x.dtype)
          for k, x in packed_rows(np.random.default_rng(0), 1, 8, 8).items()}


def objective_of(config):
  """(statistics the head computes, fn(stats, batch) -> loss) for config.objective; PSFT's
  old_logp is the current logp (K=1: same shapes as any snapshot)."""
  import jax
  from dft_jax import objectives
  setting = objectives.validate(config.objective)

  def loss(stats, batch):
    if "old_logp" in setting.needs:
      stats = dict(stats, old_logp=jax.lax.stop_gradient(stats["logp"]))
    return objectives.objective_loss(stats, batch, setting)[0]
  return setting.stats, loss


def saved_activation_bytes(v):
  """Bytes the forward leaves for the backward (jax.ad_checkpoint.saved_residuals of one
  microbatch's loss, the step's inputs excluded): the remat policy's saved set over all layers.
  Traced only, so backend-independent except for the attention kernel's own residuals."""
  import contextlib
  import io
  import re
  import jax
  from jax.ad_checkpoint import print_saved_residuals
  from dft_jax import step as step_lib
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  graphdef, state, frozen, _ = abstract_state(config, single_device_mesh())
  stats, objective = objective_of(config)

  def loss(params, base, batch):  # a LoRA run's frozen base an argument: its arrays are no
    model = step_lib.merge_model(graphdef, params, base)  # residuals (the policy saves the same)
    return objective(step_lib.model_token_stats(model, batch, v["lm_head_chunk"], stats), batch)

  batch = abstract_batch(v["batch"] // v["microbatches"], v["seq_len"])
  params, base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                              (state.params, frozen.base))
  text = io.StringIO()
  with contextlib.redirect_stdout(text):  # lines "bf16[28,4,4096,1536] output of ..."
    print_saved_residuals(loss, params, base, batch)
  total = 0
  for dtype, dims, src in re.findall(r"^([a-z]+\d*)\[([\d,]*)\] (.*)$", text.getvalue(), re.M):
    if not src.startswith("from the argument"):
      total += int(np.prod([int(d) for d in dims.split(",") if d])) * RESIDUAL_BYTES[dtype]
  return total


RESIDUAL_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "u32": 4, "i64": 8, "i8": 1,
                  "u8": 1, "bool": 1}


def head_temp_bytes(v):
  """Temporary bytes of the fused LM head's forward + backward alone (token_stats, the variant's
  objective, gradients to hidden and head weight), compiled for this backend."""
  import jax
  import jax.numpy as jnp
  from dft_jax import lm_head
  from dft_jax.models import PRESETS
  v = dict(DEFAULTS, **v)
  config = bench_config(v)
  c, dtype = PRESETS[v["model"]], jnp.dtype(v["compute_dtype"])
  rows = v["batch"] // v["microbatches"]
  stats, objective = objective_of(config)

  def loss(hidden, w, batch):
    return objective(lm_head.token_stats(hidden, w, batch["targets"],
                                         chunk_size=v["lm_head_chunk"], stats=stats), batch)

  hidden = jax.ShapeDtypeStruct((rows, v["seq_len"], c.hidden_size), dtype)
  w = jax.ShapeDtypeStruct((c.hidden_size, c.vocab_size), dtype)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      hidden, w, abstract_batch(rows, v["seq_len"])).compile()
  return memory_stats(compiled)["temp_bytes"]


def attention_memory(v):
  """Temporary bytes of one attention forward + backward at the variant's shape through the same
  `attend` path (on CPU: XLA's explicit [B, N, T, T] scores), to subtract from a CPU analysis."""
  import jax
  import jax.numpy as jnp
  from dft_jax.models import PRESETS, attention
  v = variant = dict(DEFAULTS, **v)
  c = PRESETS[v["model"]]
  b, t = v["batch"] // v["microbatches"], v["seq_len"]
  q = jax.ShapeDtypeStruct((b, t, c.num_heads, c.head_dim), jnp.dtype(v["compute_dtype"]))
  kv = jax.ShapeDtypeStruct((b, t, c.num_kv_heads, c.head_dim), jnp.dtype(v["compute_dtype"]))
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    out = attention.attend(q, k, v, segment_ids_BxT=seg, impl=v_impl,
                           max_segments=segment_bound(variant))
    return jnp.sum(out.astype(jnp.float32))

  v_impl = v["attention"]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
  return memory_stats(compiled)["temp_bytes"]


# ----------------------------------------------------------------------------- the sweep


def fixed_bytes(r):
  """Bytes that do not grow with the batch: parameters, their gradients and the optimizer
  moments (JAX: XLA's argument bytes, i.e. the donated state, plus one gradient per parameter;
  PyTorch: fp32 parameters, gradients, exp_avg, exp_avg_sq = 16 bytes per parameter)."""
  if r["framework"] == "torch":
    return 16 * r["num_params"]
  return r["memory_analysis"]["argument_bytes"] + r["num_params"] * (
      4 if r["param_dtype"] == "float32" else 2)


def predicted_max_batch(r, margin=1.0):
  """Largest batch whose peak, fixed + (peak - fixed) / batch per row, fits margin * the device
  limit; None without a measured peak."""
  if not r.get("peak_bytes") or not r.get("bytes_limit"):
    return None
  fixed = fixed_bytes(r)
  per_row = (r["peak_bytes"] - fixed) / r["batch"]
  if per_row <= 0:
    return None
  return int((margin * r["bytes_limit"] - fixed) // per_row)


def resolve(v, records):
  """Fills remat="best" (the fastest ok "policy" record's) and batch="max" (that record's
  predicted_max_batch at 92% of the limit, at least its own batch, at most 64)."""
  v = dict(v)
  policy = [r for r in records if r.get("group") == "policy" and r["status"] == "ok"]
  best = max(policy, key=lambda r: r["tokens_per_s"]) if policy else None
  if v.get("remat") == "best":
    v["remat"] = best["remat"] if best else "nothing_saveable"
  if v.get("batch") == "max":
    same = [r for r in policy if r["remat"] == v["remat"]]
    predicted = predicted_max_batch(same[0], margin=0.92) if same else None
    v["batch"] = max(same[0]["batch"], min(64, predicted)) if predicted else 8
  return v


def precheck(v):
  """The NeedsHook reason for a JAX variant this dft_jax cannot build, else None (no process
  needs starting to find out)."""
  if v["framework"] != "jax":
    return None
  try:
    bench_config(v)
  except NeedsHook as e:
    return str(e)
  return None


def subprocess_record(v, timeout_s, log):
  """Runs one variant in a fresh process (fresh peak memory) and parses its RESULT line."""
  v = dict(DEFAULTS, **v)
  script = {"torch": PEER_SCRIPT, "head": HEAD_SCRIPT}.get(v["framework"],
                                                           os.path.abspath(__file__))
  env = dict(os.environ)
  if v["xla_flags"]:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + v["xla_flags"]).strip()
  cmd = [sys.executable, script, "--variant", json.dumps(v)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    out, err, rc = text(e.stdout), text(e.stderr), None
  log.write(f"===== {v['name']} rc={rc}\n{out}\n{err}\n")
  log.flush()
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  if lines:
    return json.loads(lines[-1][len("RESULT "):])
  status = "timeout" if rc is None else "error"
  return dict(name=v["name"], framework=v["framework"], group=v["group"], status=status,
              error=(err or out)[-2000:], wall_s=time.perf_counter() - t0)


def run_sweep(plan, out_dir, budget_s):
  """Runs the plan's variants one process each, within budget_s; writes train_step.json and
  logs.txt under out_dir; returns the result dict."""
  os.makedirs(out_dir, exist_ok=True)
  records, started = [], time.perf_counter()
  with open(os.path.join(out_dir, "logs.txt"), "w") as log:
    for v in PLANS[plan]:
      v = resolve(dict(DEFAULTS, **v), records)
      left = budget_s - (time.perf_counter() - started)
      skip = precheck(v)
      if skip is None and left < v["est_s"]:
        skip = f"budget: {left:.0f} s left, needs ~{v['est_s']} s"
      if skip:
        records.append(dict(name=v["name"], framework=v["framework"], group=v["group"],
                            status="skipped", error=skip))
      else:  # a hung variant may not eat the rest of the budget
        records.append(subprocess_record(v, min(left, max(60.0, 2.5 * v["est_s"])), log))
      r = records[-1]
      print(f"[{time.perf_counter() - started:6.0f} s] {r['name']}: {r['status']}"
            + (f"  {r['tokens_per_s']:,.0f} tok/s" if r["status"] == "ok" else
               f"  {r.get('error', '')[:160]}"), flush=True)
  for r in records:
    if r["status"] == "ok" and r["framework"] != "head":
      r["max_batch_predicted"] = predicted_max_batch(r)
  result = dict(plan=plan, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_s=time.perf_counter() - started, records=records, summary=summarize(records))
  with open(os.path.join(out_dir, "train_step.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(records, result["summary"]), flush=True)
  return result


def merge_results(paths, out_path):
  """One result of several sweeps' train_step.json (e.g. the h200 and h200_7b calls): their
  records in order, the summary over all of them; written to out_path, the table printed."""
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  records = [r for result in results for r in result["records"]]
  merged = dict(plan="+".join(r["plan"] for r in results), created=results[0]["created"],
                wall_s=sum(r["wall_s"] for r in results), parts=list(paths), records=records,
                summary=summarize(records))
  with open(out_path, "w") as f:
    json.dump(merged, f, indent=1)
  print(format_table(records, merged["summary"]), flush=True)
  return merged


def _ok(records, **match):
  return [r for r in records if r["status"] == "ok"
          and all(r.get(k) == want for k, want in match.items())]


# Fields that make two records a like-for-like pair (a fused head against the checkpointed one).
TWIN_KEYS = ("framework", "model", "objective", "batch", "seq_len", "minibatches", "microbatches",
             "remat", "lm_head_chunk", "compute_dtype", "param_dtype", "w_dtype", "mu_dtype",
             "nu_dtype", "xla_flags", "doc_len", "max_segments", "lora_rank", "base_quant")
# An objective's step time per token is compared with SFT's at the same shape, head and remat.
VS_SFT_KEYS = ("model", "batch", "seq_len", "remat", "lm_head", "lm_head_chunk", "param_dtype",
               "mu_dtype", "nu_dtype", "xla_flags", "doc_len", "max_segments", "lora_rank",
               "base_quant")
LORA_PEAK_GIB = 32.0  # a 40 GB card
# The issues' targets: (summary key, comparison, bound).
TARGETS = (
    ("dft_mfu", ">=", 0.52),                       # 1.5B, 4 x 4096, DFT
    ("dft_speedup_vs_transformers", ">=", 1.6),
    ("lean_peak_gib", "<=", 25.5),                 # Liger's peak at 4 x 4096
    ("lean_mfu", ">=", 0.42),
    ("objective_per_token_vs_sft_max", "<=", 1.05),  # PSFT K=4 apart
    ("psft_k4_per_token_vs_sft", "<=", 1.15),
    ("large_mfu", ">=", 0.52),                     # 7B full fine-tune, 4 x 4096
    ("large_speedup_vs_transformers", ">=", 1.5),  # its largest batch that fits
    ("lora_peak_gib", "<=", LORA_PEAK_GIB),        # 7B LoRA rank 16, 4 x 4096
    ("lora_speedup_vs_peft", ">=", 1.5),
    ("qlora_peak_gib", "<=", 16.0),                # 7B QLoRA, 1 x 4096
)


def _same(r, q, keys):
  return all(r.get(k) == q.get(k) for k in keys)


def _brief(r):
  """name, tokens/s, MFU and peak GiB of a record (the summary's rows)."""
  return dict(name=r["name"], tokens_per_s=r["tokens_per_s"], mfu=r.get("mfu"),
              peak_gib=r["peak_bytes"] / GIB if r.get("peak_bytes") else None)


def summarize(records):
  """The issues' targets, read off the records of one run (absent where a record is missing):
  the 1.5B DFT row and its ratio to transformers, fused / checkpointed head, each objective's step
  time per token over SFT's, the lean peak against Liger's, the 7B full fine-tune, LoRA against
  the peft peer at the same batch, QLoRA's peak, and `targets` (value, bound, met)."""
  s = {}
  first = lambda **match: next(iter(_ok(records, **match)), None)
  base = dict(model=DEFAULTS["model"], objective="dft", batch=4, seq_len=DEFAULTS["seq_len"],
              lora_rank=0)
  peer = first(framework="torch", liger=False, **base)
  liger = first(framework="torch", liger=True, **base)
  ours = _ok(records, framework="jax", **base)
  if ours:
    fastest = max(ours, key=lambda r: r["tokens_per_s"])
    s.update(dft_fastest=fastest["name"], dft_tokens_per_s=fastest["tokens_per_s"],
             dft_mfu=fastest["mfu"])
    if peer:
      s["dft_speedup_vs_transformers"] = fastest["tokens_per_s"] / peer["tokens_per_s"]
    lean = [r for r in ours if r.get("peak_bytes")]
    if lean:
      leanest = min(lean, key=lambda r: r["peak_bytes"])
      s.update(lean=leanest["name"], lean_peak_gib=leanest["peak_bytes"] / GIB,
               lean_mfu=leanest["mfu"])
  if liger and liger.get("peak_bytes"):
    s["liger_peak_gib"] = liger["peak_bytes"] / GIB
  s["fused_vs_checkpointed_time"] = {
      f"{r['name']} / {twin['name']}": r["step_time_s"] / twin["step_time_s"]
      for r in _ok(records, framework="jax", lm_head="fused")
      for twin in _ok(records, framework="jax", lm_head="checkpointed")
      if _same(r, twin, TWIN_KEYS)}
  per_token = lambda r: r["step_time_s"] / r["tokens_per_step"]
  vs_sft = {}
  for r in _ok(records, framework="jax"):
    sft = [q for q in _ok(records, framework="jax", objective="sft", minibatches=1)
           if _same(r, q, VS_SFT_KEYS)]
    if r["objective"] != "sft" and sft:
      vs_sft[r["name"]] = dict(sft=sft[0]["name"], lm_head=r["lm_head"],
                               ratio=per_token(r) / per_token(sft[0]))
  s["step_time_per_token_vs_sft"] = vs_sft
  psft_k4 = [x["ratio"] for n, x in vs_sft.items() if first(name=n)["minibatches"] > 1]
  others = [x["ratio"] for n, x in vs_sft.items() if first(name=n)["minibatches"] == 1]
  if others:
    s["objective_per_token_vs_sft_max"] = max(others)
  if psft_k4:
    s["psft_k4_per_token_vs_sft"] = max(psft_k4)
  large = _ok(records, framework="jax", model="qwen2.5-7b", lora_rank=0)
  large_peers = _ok(records, framework="torch", model="qwen2.5-7b", lora_rank=0)
  if large:
    best = max(large, key=lambda r: r["mfu"] or 0)
    s["large"] = [_brief(r) for r in large + large_peers]
    s.update(large_fastest=best["name"], large_mfu=best["mfu"])
    if large_peers:
      s["large_speedup_vs_transformers"] = best["tokens_per_s"] / max(
          r["tokens_per_s"] for r in large_peers)
  lora = [r for r in _ok(records, framework="jax") if r.get("lora_rank")]
  s["lora"] = []
  for r in lora:
    row = dict(_brief(r), batch=r["batch"], base_quant=r["base_quant"])
    peft = [q for q in _ok(records, framework="torch") if q.get("lora_rank")
            and _same(r, q, ("model", "batch", "seq_len", "objective", "lora_rank"))]
    if peft:
      row.update(peft=peft[0]["name"], peft_tokens_per_s=peft[0]["tokens_per_s"],
                 peft_peak_gib=(peft[0]["peak_bytes"] or 0) / GIB,
                 speedup_vs_peft=r["tokens_per_s"] / peft[0]["tokens_per_s"])
    s["lora"].append(row)
  plain = [x for x in s["lora"] if x["base_quant"] == "none" and x["batch"] == 4]
  if plain:  # the fastest within the peak target, else the fastest
    best = max(plain, key=lambda x: (x["peak_gib"] is not None and x["peak_gib"] <= LORA_PEAK_GIB,
                                     x["tokens_per_s"]))
    s.update(lora_fastest=best["name"], lora_peak_gib=best["peak_gib"])
    if "speedup_vs_peft" in best:
      s["lora_speedup_vs_peft"] = best["speedup_vs_peft"]
  quantised = [x for x in s["lora"] if x["base_quant"] != "none" and x["peak_gib"]]
  if quantised:
    s["qlora_peak_gib"] = min(x["peak_gib"] for x in quantised)
  s["peft"] = [_brief(r) for r in _ok(records, framework="torch") if r.get("lora_rank")]
  s["max_batch_predicted"] = {r["name"]: r["max_batch_predicted"] for r in records
                              if r.get("max_batch_predicted")}
  s["max_batch_ran"] = {r["name"]: r["max_batch_fit"] for r in records if r.get("max_batch_fit")}
  s["max_batch_ran"].update({r["name"]: r["batch"] for r in _ok(records, name="jax/dft/max_batch")})
  s["targets"] = {key: dict(value=s[key], target=f"{op} {bound}",
                            met=s[key] >= bound if op == ">=" else s[key] <= bound)
                  for key, op, bound in TARGETS if s.get(key) is not None}
  return s


def format_table(records, summary):
  """The compact table printed last (the device reply keeps the end of the output)."""
  head = (f"{'variant':26s} {'status':7s} {'remat':>9s} {'head':>5s} {'B':>3s} {'tok/s':>8s} "
          f"{'step ms':>8s} {'MFU':>6s} {'peak GiB':>8s} {'maxB':>4s} {'compile':>7s}")
  lines = [head, "-" * len(head)]
  for r in records:
    if r["status"] != "ok":
      lines.append(f"{r['name']:26s} {r['status']:7s} {(r.get('error') or '')[-90:]}")
      continue
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "     -"
    peak = f"{r['peak_bytes'] / GIB:8.1f}" if r.get("peak_bytes") else "       -"
    remat = "-" if r["framework"] == "head" else REMAT_SHORT.get(r["remat"], r["remat"])[:9]
    lm_head = {"fused": "fused", "checkpointed": "ckpt"}.get(r.get("lm_head"), "-")
    if r["framework"] == "torch":
      lm_head = "liger" if r.get("liger") else "full"
    lines.append(f"{r['name']:26s} {'ok':7s} {remat:>9s} {lm_head:>5s} {r['batch']:3d} "
                 f"{r['tokens_per_s']:8,.0f} {1e3 * r['step_time_s']:8.1f} {mfu} {peak} "
                 f"{r.get('max_batch_predicted') or 0:4d} {r.get('compile_s', 0):7.1f}")
  lines.append("summary: " + json.dumps(rounded(summary)))
  return "\n".join(lines)


def rounded(x, digits=4):
  if isinstance(x, float):
    return round(x, digits)
  if isinstance(x, dict):
    return {k: rounded(v, digits) for k, v in x.items()}
  return x


REMAT_SHORT = {"nothing_saveable": "nothing", "dots_with_no_batch_dims_saveable": "dots",
               "dots_attention_saveable": "dots+attn", "checkpoint_layers": "hf-ckpt"}


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", choices=sorted(PLANS), help="run a plan, one process per variant")
  p.add_argument("--out", default="benchmarks/results/latest", help="sweep output folder")
  p.add_argument("--budget_s", type=float, default=450.0, help="sweep wall-time budget")
  p.add_argument("--variant", help="one variant as JSON (what the sweep passes to a subprocess)")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="merge these sweeps' train_step.json into --out (a file), summary redone")
  p.add_argument("--memory", action="store_true",
                 help="compile only and print XLA's memory analysis (no execution)")
  p.add_argument("--memory_plan", choices=sorted(MEMORY_PLANS), default="1.5b",
                 help="the options --memory_sweep compiles")
  p.add_argument("--memory_sweep", metavar="OUT_JSON",
                 help="compile-only memory analysis of every --memory_plan option")
  for key, value in DEFAULTS.items():
    if key in ("framework", "group", "est_s", "liger", "probe_batches", "doc_len"):
      continue
    kind = type(value) if value is not None else str
    p.add_argument(f"--{key}", type=kind, default=value)
  p.add_argument("--name", default=None)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.sweep:
    run_sweep(args.sweep, args.out, args.budget_s)
    return
  if args.merge:
    merge_results(args.merge, args.out)
    return
  if args.memory_sweep:
    run_memory_sweep(args.memory_sweep, args.memory_plan)
    return
  if args.variant:
    v = json.loads(args.variant)
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
  else:
    v = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    v["name"] = args.name
  if args.memory:
    print("MEMORY " + json.dumps(dict(v, **compiled_memory(v))), flush=True)
    return
  print("RESULT " + json.dumps(run_variant(v)), flush=True)


if __name__ == "__main__":
  main()
