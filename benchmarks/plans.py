"""The benchmark plans: plan name -> variants in priority order (a plan's budget skips the tail).

A variant is (name, overrides): the overrides are fields of configs/benchmark.py (the main job's
fields, configs/default.py, plus its `bench` section) written as `--config.<field>=<value>` would
set them. The harness (benchmarks/train_step.py) runs each in a fresh process with exactly those
flags; `bench.framework` picks the script (jax: train_step.py, torch: torch_peer.py, head:
head.py, sampler / generate: sampling.py). Two plan-only values: model.remat="best" (the fastest
ok record of group "policy" before it) and train.global_batch_size="max" (its predicted largest
batch). est_s: process start + init + compile + steps on the plan's GPU.

Data only: nothing here imports jax.
"""
from configs.benchmark import SMOKE_XLA_FLAGS

GIB = 2 ** 30
DOTS_ATTN = "dots_attention_saveable"  # the fastest remat policy on the H100

# Tiny CPU shapes (the smoke plan, and any plan run with --tiny): every path in seconds (est_s:
# its timeout is 2.5 times that, room for a loaded 2-core machine).
TINY = {"model.name": "preset:tiny-qwen2", "model.compute_dtype": "float32",
        "model.lm_head_chunk": 64, "train.seq_len": 128, "train.global_batch_size": 2,
        "lora.block_size": 16, "bench.doc_len": (16, 64), "bench.steps": 3, "bench.warmup": 1,
        "bench.xla_flags": SMOKE_XLA_FLAGS, "bench.est_s": 40, "bench.prompt_len": 16,
        "eval.max_new_tokens": 8, "eval.batch_size": 4}

# The tiny preset a --tiny run gives a plan's model of another family (others: TINY's tiny-qwen2).
TINY_MODELS = {"preset:qwen3-moe-a1.3b": "preset:tiny-qwen3-moe"}

FAST = {"model.remat": DOTS_ATTN, "model.lm_head_impl": "fused", "bench.steps": 8,
        "bench.warmup": 2, "bench.est_s": 25}
TORCH = {"bench.framework": "torch"}
HEAD = {"bench.framework": "head"}


def objective(name, **more):
  return {"objective.name": name, **more}


# The 1.5B shape on one H200, 4 x 4096 packed, DFT, in priority order. Every JAX row runs
# dots_attention_saveable and the fused head unless named otherwise (asft and iw_sft, once on
# the checkpointed head, take the fused one too: h200_objectives compares them with SFT).
PSFT_K4 = {"objective.name": "psft", "train.minibatches": 4, "train.global_batch_size": 16}
H200 = [
    ("torch/dft", {**TORCH, "bench.steps": 8, "bench.est_s": 35}),
    ("jax/dft/fused", {**FAST, "bench.est_s": 45}),  # the first compile fills the autotune cache
    ("jax/dft/checkpointed", {**FAST, "model.lm_head_impl": "checkpointed"}),
    ("jax/sft/fused", {**FAST, **objective("sft")}),
    ("jax/dft/lean", {**FAST, "model.remat": "nothing_saveable",
                      "optimizer.mu_dtype": "bfloat16", "optimizer.nu_dtype": "bfloat16"}),
    ("torch/dft/liger", {**TORCH, "bench.liger": True, "bench.steps": 8, "bench.est_s": 45}),
    ("jax/eaft/fused", {**FAST, **objective("eaft")}),
    ("jax/psft/k4/fused", {**FAST, **PSFT_K4, "bench.est_s": 45}),
    ("jax/psft/k1/fused", {**FAST, **objective("psft")}),
    ("jax/gem/fused", {**FAST, **objective("gem")}),
    ("jax/deft/fused", {**FAST, **objective("deft")}),
    ("jax/power/fused", {**FAST, **objective("power")}),
    ("jax/chord_phi/fused", {**FAST, **objective("chord_phi")}),
    ("jax/prob_threshold/fused", {**FAST, **objective("prob_threshold")}),
    ("jax/sft/checkpointed", {**FAST, **objective("sft"), "model.lm_head_impl": "checkpointed"}),
    ("jax/asft", {**FAST, **objective("asft"), "bench.est_s": 35}),
    ("jax/iw_sft", {**FAST, **objective("iw_sft"), "bench.est_s": 35}),
]

# Each objective's step time per token against SFT's in one run, the 1.5B shape above (the
# summary's OBJECTIVE_TARGETS): TALR, OTR at its default 8 samples, ASFT and iw-SFT on the fused
# head with the reference's forward, iw-SFT and the KL anchor with the reference's log-probabilities
# precomputed (random ref_logp in the batches, as the data iterator would give). ~4 min.
KL = {"objective.kl_coef": 0.1}
PRECOMPUTED = {"objective.ref_logp": "precomputed"}
H200_OBJECTIVES = [
    ("jax/sft/fused", {**FAST, **objective("sft"), "bench.est_s": 45}),
    ("jax/talr/fused", {**FAST, **objective("talr")}),
    ("jax/otr/fused", {**FAST, **objective("otr")}),
    ("jax/asft/fused", {**FAST, **objective("asft"), "bench.est_s": 35}),
    ("jax/iw_sft/fused", {**FAST, **objective("iw_sft"), "bench.est_s": 35}),
    ("jax/iw_sft/precomputed", {**FAST, **objective("iw_sft"), **PRECOMPUTED}),
    ("jax/dft_kl/fused", {**FAST, **KL, "bench.est_s": 35}),
    ("jax/dft_kl/precomputed", {**FAST, **KL, **PRECOMPUTED}),
]

# The Qwen2.5-7B shape on one H200, DFT, 4 x 4096 unless named otherwise. LoRA: rank 16 on all
# seven projections, alpha 16, bf16 base (the peft peer the same).
SEVEN_B = {"model.name": "preset:qwen2.5-7b", "model.lm_head_impl": "fused", "bench.steps": 8,
           "bench.warmup": 2}
LORA16 = {**SEVEN_B, "lora.rank": 16, "lora.alpha": 16.0, "model.param_dtype": "bfloat16"}
PEFT16 = {**LORA16, **TORCH, "model.lm_head_impl": "checkpointed"}
NOTHING = {"model.remat": "nothing_saveable"}
NF4_B1 = {"lora.base_quant": "nf4", "train.global_batch_size": 1}
H200_7B = [
    ("torch/7b/peft/b4", {**PEFT16, "bench.est_s": 60}),
    ("jax/7b/lora16/b4", {**LORA16, **NOTHING, "bench.est_s": 65}),
    ("jax/7b/qlora_nf4/b1", {**LORA16, **NOTHING, **NF4_B1, "bench.est_s": 55}),
    ("jax/7b/dft/nothing", {**SEVEN_B, **NOTHING, "bench.est_s": 75}),
    ("jax/7b/lora16/b4/attn", {**LORA16, "model.remat": "attention_saveable", "bench.est_s": 60}),
    ("jax/7b/dft/attn_mu_bf16", {**SEVEN_B, "model.remat": "attention_saveable",
                                 "optimizer.mu_dtype": "bfloat16", "bench.est_s": 75}),
    ("torch/7b/peft/b2", {**PEFT16, "train.global_batch_size": 2, "bench.est_s": 45}),
    ("torch/7b/peft/b1", {**PEFT16, "train.global_batch_size": 1, "bench.est_s": 40}),
    ("torch/7b/dft/b1", {**SEVEN_B, **TORCH, "model.lm_head_impl": "checkpointed",
                         "train.global_batch_size": 1, "bench.est_s": 55}),
]

# After the first H200 run (EAFT at 3.4x SFT with top-k in rounds of 16): EAFT's two-stage block
# top-k against one lax.top_k (step, and head alone where the record times the ways), and LoRA /
# QLoRA at 7B with smaller head chunks (the head's [chunk, 152,064] float32 buffers are ~2.3 GiB
# each at 4,096 tokens).
H200_MORE = [
    ("head/eaft/fused", {**HEAD, **objective("eaft"), "model.lm_head_impl": "fused",
                         "bench.compare": True, "bench.est_s": 35}),
    ("jax/eaft/fused", {**FAST, **objective("eaft")}),
    ("jax/eaft/fused/lax_top_k", {**FAST, **objective("eaft"), "bench.topk_method": "lax"}),
    ("jax/sft/fused", {**FAST, **objective("sft")}),
    ("jax/psft/k4/fused", {**FAST, **PSFT_K4, "bench.est_s": 45}),
    ("jax/7b/lora16/b4/chunk1024", {**LORA16, **NOTHING, "model.lm_head_chunk": 1024,
                                    "bench.est_s": 65}),
    ("jax/7b/qlora_nf4/b1/chunk1024", {**LORA16, **NOTHING, **NF4_B1, "model.lm_head_chunk": 1024,
                                       "bench.est_s": 55}),
]

# After the buffer assignment showed cuDNN's packed attention backward holding 14.1 of the LoRA
# step's 20 GiB of temporaries (a float32 [B * max_segments, T, N, H] buffer, max_segments 64):
# the LoRA / QLoRA rows with max_segments at the most documents a row holds (17), with their peers
# in the same run, and the 7B full fine-tune's peak at that bound.
H200_LORA = [next(v for v in H200_7B if v[0] == name) for name in (
    "torch/7b/peft/b4", "jax/7b/lora16/b4", "jax/7b/qlora_nf4/b1", "torch/7b/peft/b1",
    "jax/7b/lora16/b4/attn", "jax/7b/dft/attn_mu_bf16")]

# Qwen3-MoE on one H200: the qwen3-moe-a1.3b preset (Qwen3-30B-A3B's attention and top-8-of-
# 768-wide experts, 64 experts, 12 layers: 1.30B of 4.47B parameters active), 4 x 4096 packed,
# DFT, beside transformers' Qwen3MoeForCausalLM (its grouped_mm experts) in the same run; MFU on
# the active parameters. est_s: process start + init (72 GB of float32 weights and AdamW state) +
# compile (torch: the first steps) + 2 + 5 steps; both rows ~85 s (docs/models.md).
MOE = {"model.name": "preset:qwen3-moe-a1.3b", "bench.steps": 5, "bench.warmup": 2}
H200_MOE = [
    ("torch/moe/dft", {**MOE, **TORCH, "bench.est_s": 40}),
    ("jax/moe/dft/fused", {**MOE, "model.remat": DOTS_ATTN, "model.lm_head_impl": "fused",
                           "bench.est_s": 45}),
]

# The H100 plan, in priority order (1.5B compile ~30-45 s).
GPU = [
    ("torch/dft", {**TORCH, "bench.est_s": 30}),
    ("jax/dft/nothing", {"model.remat": "nothing_saveable", "bench.group": "policy"}),
    ("jax/dft/dots", {"model.remat": "dots_with_no_batch_dims_saveable", "bench.group": "policy"}),
    ("jax/dft/dots_attn", {"model.remat": DOTS_ATTN, "bench.group": "policy"}),
    ("head/dft/checkpointed", {**HEAD, "bench.est_s": 30}),
    ("head/dft/fused", {**HEAD, "model.lm_head_impl": "fused", "bench.compare": True,
                        "bench.est_s": 40}),
    ("jax/dft/fused_head", {"model.lm_head_impl": "fused", "model.remat": "best",
                            "bench.est_s": 50}),
    ("jax/sft", {**objective("sft"), "model.remat": "best", "bench.est_s": 50}),
    ("jax/psft/k1", {**objective("psft"), "model.remat": "best", "bench.est_s": 55}),
    ("jax/dft/lean", {"model.remat": "nothing_saveable", "optimizer.mu_dtype": "bfloat16",
                      "bench.est_s": 50}),
    ("jax/eaft", {**objective("eaft"), "model.remat": "best", "bench.est_s": 50}),
    ("jax/deft", {**objective("deft"), "model.remat": "best", "bench.est_s": 50}),
    ("jax/gem", {**objective("gem"), "model.remat": "best", "bench.est_s": 50}),
    ("torch/sft", {**TORCH, **objective("sft"), "bench.probe_batches": (6, 8), "bench.est_s": 35}),
    ("jax/dft/lean_attn", {"model.remat": "attention_saveable", "optimizer.mu_dtype": "bfloat16",
                           "bench.est_s": 50}),
    ("torch/dft/liger", {**TORCH, "bench.liger": True, "bench.probe_batches": (16, 32),
                         "bench.est_s": 45}),
    ("jax/dft/one_doc", {"model.remat": "best", "bench.doc_len": (4096, 4096)}),
    ("jax/0.5b/dft", {"model.name": "preset:qwen2.5-0.5b", "model.remat": "best",
                      "bench.est_s": 40}),
    ("jax/dft/max_batch", {"model.remat": "best", "train.global_batch_size": "max",
                           "bench.est_s": 90}),
    ("jax/psft/k4", {**PSFT_K4, "model.remat": "best", "bench.est_s": 80}),
    ("jax/dft/no_triton_gemm", {"model.remat": "best",
                                "bench.xla_flags": "--xla_gpu_enable_triton_gemm=false"}),
]

# The second H100 call: what the first one's budget left out (explicit remat, no "best").
GPU_EXTRA = [
    ("torch/dft/liger", {**TORCH, "bench.liger": True, "bench.probe_batches": (8, 16, 32),
                         "bench.est_s": 45}),
    ("jax/dft/lean_chunk1024", {"model.remat": "nothing_saveable",
                                "optimizer.mu_dtype": "bfloat16", "model.lm_head_chunk": 1024,
                                "bench.est_s": 50}),
    ("jax/psft/k4", {**PSFT_K4, "model.remat": DOTS_ATTN, "bench.est_s": 60}),
    ("jax/dft/nothing_b16", {"model.remat": "nothing_saveable", "train.global_batch_size": 16,
                             "bench.est_s": 70}),
    ("jax/0.5b/dft", {"model.name": "preset:qwen2.5-0.5b", "model.remat": DOTS_ATTN,
                      "bench.est_s": 40}),
]

# The LM head alone at the 1.5B shape (4 x 4096 tokens, D 1,536, V 151,936, chunks of 4,096):
# every per-token objective through both heads (EAFT's records hold the top-k timings).
HEAD_PLAN = [
    (f"head/{name}/{head}", {**HEAD, **objective(name), "model.lm_head_impl": head,
                             "bench.compare": head == "fused" and name in ("dft", "eaft"),
                             "bench.est_s": 35 if head == "fused" and name in ("dft", "eaft")
                             else 25})
    for name in ("dft", "eaft", "sft", "gem", "deft", "psft", "power")
    for head in ("checkpointed", "fused")]

# The full step with the fused head next to the checkpointed one, per objective.
FUSED_STEP = [
    (f"jax/{name}/{head}" + ("/k4" if k == 4 else ""),
     {**objective(name), "model.lm_head_impl": head, "train.minibatches": k,
      "train.global_batch_size": 4 * k, "model.remat": DOTS_ATTN, "bench.est_s": 50 + 20 * (k > 1)})
    for name, k in (("dft", 1), ("eaft", 1), ("sft", 1), ("psft", 4), ("gem", 1), ("deft", 1),
                    ("psft", 1))
    for head in ("fused", "checkpointed")]

# Tiny shapes on CPU: the plumbing of every path above in seconds.
SMOKE = [
    ("torch/dft", {**TINY, **TORCH, "train.global_batch_size": 4, "bench.probe_batches": (8,),
                   "bench.xla_flags": "", "bench.est_s": 5}),
    ("jax/psft/k2", {**TINY, **objective("psft"), "train.minibatches": 2,
                     "train.global_batch_size": 4, "bench.group": "policy"}),
    ("jax/dft/needs_hook", {**TINY, "model.remat": "no_such_policy", "bench.est_s": 5}),
    ("head/eaft/checkpointed", {**TINY, **HEAD, **objective("eaft"), "bench.w_dtype": "float32",
                                "bench.xla_flags": "", "bench.est_s": 5}),
    ("head/eaft/fused", {**TINY, **HEAD, **objective("eaft"), "model.lm_head_impl": "fused",
                         "bench.w_dtype": "float32", "bench.compare": True, "bench.xla_flags": "",
                         "bench.est_s": 5}),
    ("jax/dft/over_budget", {**TINY, "model.remat": "best", "bench.est_s": 10 ** 6}),
    # LoRA rank 4 on a bf16 base, QLoRA nf4, the peft peer, ASFT; OTR and iw-SFT (h200_objectives)
    ("jax/lora4", {**TINY, "lora.rank": 4, "lora.alpha": 8.0, "model.param_dtype": "bfloat16",
                   "model.lm_head_impl": "fused"}),
    ("jax/qlora_nf4", {**TINY, "lora.rank": 4, "lora.alpha": 8.0, "model.param_dtype": "bfloat16",
                       "lora.base_quant": "nf4", "train.global_batch_size": 1,
                       "model.lm_head_impl": "fused"}),
    ("torch/peft", {**TINY, **TORCH, "lora.rank": 4, "lora.alpha": 8.0, "bench.xla_flags": ""}),
    ("jax/asft", {**TINY, **objective("asft"), "model.lm_head_impl": "fused"}),
    *((name, {**overrides, **TINY}) for name, overrides in H200_OBJECTIVES
      if overrides.get("objective.name") in ("otr", "iw_sft")),
]

# Long rows, one document a row (batch 1; the peers' rows are causal over the whole row too):
# the 7B LoRA r16 and the 1.5B lean full fine-tune at 16k-128k tokens beside the peft /
# transformers peers with gradient checkpointing. mlp_attention_saveable keeps each layer's MLP
# gate and up projections and cuDNN attention's outputs (2.1 MB a token at 7B: ~35 GiB at 16k,
# ~70 at 32k), so the backward recomputes only the attention projections; past 32k the rows fit
# with nothing_saveable (the layer inputs: 0.2 MB a token). est_s from the 4 x 4096 rows of
# results/h200_2026-12-01_lora.json scaled by the attention work.
def long_row(tokens, steps=3, warmup=1):
  return {"train.seq_len": tokens, "bench.doc_len": (tokens, tokens),
          "train.global_batch_size": 1, "bench.steps": steps, "bench.warmup": warmup}


MLP_ATTN = "mlp_attention_saveable"
LEAN = {"model.remat": "nothing_saveable", "model.lm_head_impl": "fused",
        "optimizer.mu_dtype": "bfloat16", "optimizer.nu_dtype": "bfloat16"}
LONG = [
    ("torch/7b/peft/16k", {**PEFT16, **long_row(16384), "bench.est_s": 30}),
    ("jax/7b/lora16/16k", {**LORA16, **long_row(16384), "model.remat": MLP_ATTN,
                           "bench.est_s": 45}),
    ("torch/7b/peft/32k", {**PEFT16, **long_row(32768, steps=2),
                           "bench.probe_seq_lens": (65536,), "bench.est_s": 45}),
    ("jax/7b/lora16/32k", {**LORA16, **long_row(32768, steps=2), "model.remat": MLP_ATTN,
                           "bench.est_s": 45}),
    ("jax/7b/lora16/128k", {**LORA16, **long_row(131072, steps=1, warmup=0), **NOTHING,
                            "bench.est_s": 80}),
    ("jax/1.5b/lean/32k", {**LEAN, **long_row(32768), "bench.est_s": 25}),
    ("torch/1.5b/32k", {**TORCH, **long_row(32768, steps=2),
                        "bench.probe_seq_lens": (65536, 131072), "bench.est_s": 35}),
    ("jax/1.5b/lean/128k", {**LEAN, **long_row(131072, steps=1, warmup=0), "bench.est_s": 45}),
    ("jax/7b/lora16/64k", {**LORA16, **long_row(65536, steps=1), "model.remat":
                           "attention_saveable", "bench.est_s": 60}),
    ("jax/1.5b/lean/64k", {**LEAN, **long_row(65536, steps=2), "bench.est_s": 35}),
    ("jax/7b/lora16/16k/nothing", {**LORA16, **long_row(16384), **NOTHING, "bench.est_s": 40}),
    ("jax/7b/lora16/32k/attn", {**LORA16, **long_row(32768, steps=2),
                                "model.remat": "attention_saveable", "bench.est_s": 45}),
]

# Sampling at the 1.5B shape in bf16: 256-token prompts, 1,024 new tokens, T = 1, no stop token,
# our sampler beside transformers' generate (static cache: generate compiles it with CUDA graphs).
# Ours: the first run compiles (warm-up), the next is timed; the peer: a 16-token warm-up compiles
# its cache, one run is timed.
SAMPLE = {"model.param_dtype": "bfloat16", "model.compute_dtype": "bfloat16",
          "bench.prompt_len": 256, "eval.max_new_tokens": 1024, "eval.temperature": 1.0,
          "eval.top_p": 1.0, "bench.warmup": 1, "bench.steps": 1}
SAMPLER = {**SAMPLE, "bench.framework": "sampler"}
GENERATE = {**SAMPLE, "bench.framework": "generate", "bench.static_cache": True}
SAMPLING = [
    ("sampler/b256", {**SAMPLER, "eval.batch_size": 256, "bench.est_s": 60}),
    ("generate/b256/static", {**GENERATE, "eval.batch_size": 256, "bench.est_s": 100}),
    ("sampler/b64", {**SAMPLER, "eval.batch_size": 64, "bench.est_s": 45}),
    ("generate/b64/static", {**GENERATE, "eval.batch_size": 64, "bench.est_s": 70}),
    ("generate/b256/dynamic", {**GENERATE, "eval.batch_size": 256, "bench.static_cache": False,
                               "bench.est_s": 60}),
]

# One H200 call of ~6 minutes: the long-row and sampling targets first (the budget skips the
# tail), then a second call for the rest of both plans.
ROUND = [(name, dict(LONG + SAMPLING)[name]) for name in (
    "sampler/b256", "generate/b256/static", "jax/7b/lora16/128k", "torch/7b/peft/16k",
    "jax/7b/lora16/16k", "torch/7b/peft/32k", "jax/7b/lora16/32k")]
ROUND_MORE = [v for v in LONG + SAMPLING if v[0] not in dict(ROUND)]

PLANS = {
    "gpu": GPU,
    "gpu_extra": GPU_EXTRA,
    "head": HEAD_PLAN,
    "fused_step": FUSED_STEP,
    # One H200, one call each (~540 s): the issues' targets side by side with the peers.
    "h200": H200,
    "h200_7b": H200_7B,
    "h200_more": H200_MORE,
    "h200_lora": H200_LORA,
    "h200_moe": H200_MOE,
    "h200_objectives": H200_OBJECTIVES,
    "h200_long": LONG,
    "h200_sampling": SAMPLING,
    "h200_round": ROUND,
    "h200_round_more": ROUND_MORE,
    "smoke": SMOKE,
}

# Compile-only memory analysis (--memory_sweep, --memory_plan): XLA's buffer sizes per option.
MEMORY_PLANS = {
    "1.5b": [
        ("nothing/chunk4096", {"model.remat": "nothing_saveable", "model.lm_head_chunk": 4096}),
        ("nothing/chunk1024", {"model.remat": "nothing_saveable", "model.lm_head_chunk": 1024}),
        ("dots/chunk4096", {"model.remat": "dots_with_no_batch_dims_saveable",
                            "model.lm_head_chunk": 4096}),
        ("nothing/chunk1024/micro2", {"model.remat": "nothing_saveable",
                                      "model.lm_head_chunk": 1024, "train.microbatches": 2}),
        ("nothing/chunk1024/b8", {"model.remat": "nothing_saveable", "model.lm_head_chunk": 1024,
                                  "train.global_batch_size": 8}),
        ("nothing/chunk1024/psft", {"model.remat": "nothing_saveable",
                                    "model.lm_head_chunk": 1024, **objective("psft")}),
        ("nothing/chunk1024/bf16_params", {"model.remat": "nothing_saveable",
                                           "model.lm_head_chunk": 1024,
                                           "model.param_dtype": "bfloat16"}),
    ],
    # What model.max_segments costs on a GPU (cuDNN's packed backward keeps a float32 dQ buffer
    # per segment slot): the 7B LoRA step at the old default 64, the rows' bound 17 and 8.
    "7b_segments": [
        ("lora16/b4/segments64", {**LORA16, "model.max_segments": 64}),
        ("lora16/b4/segments17", {**LORA16, "model.max_segments": 17}),
        ("lora16/b4/segments8", {**LORA16, "model.max_segments": 8}),
        ("lora16/b1/segments64", {**LORA16, "train.global_batch_size": 1,
                                  "model.max_segments": 64}),
        ("qlora_nf4/b1/segments64", {**LORA16, **NF4_B1, "model.max_segments": 64}),
        ("qlora_nf4/b1/segments17", {**LORA16, **NF4_B1, "model.max_segments": 17}),
    ],
    # The 7B rows of the h200_7b plan (and what does not fit), before the GPU run. On CPU the
    # cuDNN-attention policies (attention_saveable) save what nothing_saveable saves.
    "7b": [
        ("lora16/nothing/b4", {**LORA16, **NOTHING}),
        ("qlora_nf4/nothing/b1", {**LORA16, **NOTHING, **NF4_B1}),
        ("full/nothing/b4", {**SEVEN_B, **NOTHING}),
        ("full/nothing/mu_bf16/b4", {**SEVEN_B, **NOTHING, "optimizer.mu_dtype": "bfloat16"}),
        ("lora16/dots_attn/micro4/b4", {**LORA16, "model.remat": DOTS_ATTN,
                                        "train.microbatches": 4}),
    ],
}
