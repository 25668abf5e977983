"""DFT, the paper's official run (arXiv 2508.05629; github.com/yongliang-wu/DFT, README "Launch
Training"): Qwen2.5-Math-1.5B fine-tuned with token-level DFT on the first 100k rows of
NuminaMath-CoT for one epoch.

  hf download Qwen/Qwen2.5-Math-1.5B --local-dir Qwen/Qwen2.5-Math-1.5B   # model.name is a folder
  python -m dft_jax.train --config=configs/paper/dft_numina_qwen25_math_1p5b.py \
      --workdir=runs/dft_numina
  python -m dft_jax.evaluate --checkpoint=runs/dft_numina     # MATH-500, avg@16 at T=1 (eval below)

The authors' command (verl fsdp_dft_trainer, torchrun on 8 GPUs) sets train_batch_size=256,
max_length=2048, lr=5e-5, model_dtype=bf16, total_epochs=1, prompt/response = extra_info.question /
extra_info.answer of their preprocessed parquet (NuminaMath-CoT's problem / solution); the rest is
verl's sft_trainer.yaml: AdamW betas (0.9, 0.95), weight decay 0.01, 10% linear warmup, cosine decay
to 0, gradient clipping at 1.0, right truncation, one example per row, loss averaged over the
batch's response tokens. 100,000 rows / 256 = 390 full batches (verl drops the last partial one).

Variants (after ':'): `verl` reads their preprocessed parquet (data/numina_cot/train.parquet, as
written by their examples/data_preprocess/numina_cot.py) instead of the hub dataset; `fp32master`
keeps float32 master weights (the official run holds bf16 weights and AdamW moments).

Hardware: 1.54B parameters. bf16 weights + bf16 AdamW moments + bf16 gradients are ~12 GB; with
float32 masters ~25 GB. With per-layer remat a 2048-token row keeps ~6 MB of layer inputs per layer
(~0.2 GB for 28 layers) plus one layer's recompute and one LM-head chunk, so one 80 GB H100 holds
the run with microbatches of 4 rows per device; the authors used 8 GPUs. At the ~37k tokens/s this
code measured for this model shape on one H100, 390 steps x 256 rows x 2048 padded tokens (~204M)
take ~1.5 h on one H100, ~12 min on 8 (data-parallel).
"""
from dft_jax import config_files

NUM_ROWS = 100_000
GLOBAL_BATCH = 256


def get_config(arg=None):
  variants = [a for a in (arg or "").split(",") if a]
  c = config_files.load("default.py", "gpu")
  c.model.update(name="Qwen/Qwen2.5-Math-1.5B", param_dtype="bfloat16", compute_dtype="bfloat16",
                 remat="nothing_saveable", lm_head_chunk=4096)
  c.data.update(source="AI-MO/NuminaMath-CoT", split="train", max_rows=NUM_ROWS,
                format="prompt_response", prompt_field="problem", response_field="solution",
                loss_on="assistant", max_length=2048, truncation="truncate_response",
                packing=False)
  c.objective.update(name="dft", aggregation="token_mean")
  c.optimizer.update(learning_rate=5e-5, schedule="cosine", min_lr_ratio=0.0,
                     warmup_steps=int(0.1 * (NUM_ROWS // GLOBAL_BATCH)), weight_decay=0.01,
                     b1=0.9, b2=0.95, grad_clip_norm=1.0)
  c.train.update(num_steps=NUM_ROWS // GLOBAL_BATCH, global_batch_size=GLOBAL_BATCH, seq_len=2048,
                 microbatches=8, minibatches=1)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every_steps=50, keep=2)
  c.eval.update(before=False, after=False, suites="math", math_file="HuggingFaceH4/MATH-500",
                samples=16, temperature=1.0, top_p=1.0, math_max_new_tokens=3072, batch_size=256)
  for v in variants:
    if v == "verl":
      c.data.update(source="data/numina_cot/train.parquet", prompt_field="extra_info.question",
                    response_field="extra_info.answer", max_rows=None)
    elif v == "fp32master":
      c.model.param_dtype = "float32"
    else:
      raise ValueError(f"{__file__}: unknown variant {v!r}; expected verl or fp32master")
  return c
