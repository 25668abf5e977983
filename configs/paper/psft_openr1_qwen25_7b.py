"""PSFT, the paper's official run (arXiv 2508.17784; github.com/zwhong714/PSFT,
verl/recipe/psft/run_psft.sh): Qwen2.5-7B-Instruct fine-tuned with PSFT on OpenR1-Math 4k for
10 epochs.

  hf download Qwen/Qwen2.5-7B-Instruct --local-dir Qwen/Qwen2.5-7B-Instruct  # model.name: a folder
  python -m dft_jax.train --config=configs/paper/psft_openr1_qwen25_7b.py --workdir=runs/psft_openr1
  python -m dft_jax.evaluate --checkpoint=runs/psft_openr1      # MATH-500, avg@32 (eval below)

The authors' script: TRAIN_FILE=wh-zhu/train_openr1_4k (their prepare_data.py: `prompt` = [system
"Please reason step by step, and put your final answer within \\boxed{}.", user problem],
`demonstration` = the reference solution), train_prompt_bsz=256, ppo_mini_batch_size=32 (8
optimizer updates per batch, all against the log-probs of the policy snapshot taken before the
batch), clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=token-mean, lr=1e-6,
lr_warmup_steps=10 (verl steps its scheduler once per batch: 80 updates here, then constant),
weight_decay=0.1, grad_clip=1.0, entropy_coeff=0, no KL, total_epochs=10, max prompt 2048 +
response 6144 tokens, 8 GPUs; AdamW betas are verl's default (0.9, 0.999).

Steps: 10 epochs x floor(rows / 256). The dataset's name says ~4k rows; with 4,000 rows that is 15
batches per epoch, 150 batches, 1,200 updates; set train.num_steps = 10 * (rows // 256) if the copy
you have differs (`python -m dft_jax.data.inspect` prints the row count).

Data layout: the prompt is a message list, so the user turn is field `prompt.1.content` and the
system turn is data.system_prompt (the same text for every row).

Hardware: 7.6B parameters. float32 masters + AdamW moments are ~122 GB and bf16 gradients another
~15 GB, so the states alone need FSDP over at least two 80 GB GPUs; with 8192-token rows (per-layer
remat keeps ~1.6 GB of checkpoints per row, plus one layer's recompute) plan on >= 4 x 80 GB, and
the authors' 8 x 80 GB for their speed (fsdp over all devices, one row per device per microbatch).
"""
from dft_jax import config_files

ASSUMED_ROWS = 4_000
GLOBAL_BATCH = 256
MINIBATCHES = 8  # 256 / ppo_mini_batch_size 32
EPOCHS = 10
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def get_config(arg=None):
  if arg:
    raise ValueError(f"{__file__}: takes no variant (got {arg!r})")
  c = config_files.load("default.py", "gpu")
  c.model.update(name="Qwen/Qwen2.5-7B-Instruct", param_dtype="float32", compute_dtype="bfloat16",
                 remat="nothing_saveable", lm_head_chunk=4096)
  c.data.update(source="wh-zhu/train_openr1_4k", split="train", format="prompt_response",
                prompt_field="prompt.1.content", response_field="demonstration",
                system_prompt=SYSTEM_PROMPT, loss_on="assistant", max_length=8192,
                truncation="truncate_response", packing=False)
  c.objective.update(name="psft", aggregation="token_mean", entropy_coef=0.0, kl_coef=0.0)
  c.objective.psft.update(eps_low=0.2, eps_high=0.28)
  c.optimizer.update(learning_rate=1e-6, schedule="constant", warmup_steps=10 * MINIBATCHES,
                     weight_decay=0.1, b1=0.9, b2=0.999, grad_clip_norm=1.0)
  c.train.update(num_steps=EPOCHS * (ASSUMED_ROWS // GLOBAL_BATCH), global_batch_size=GLOBAL_BATCH,
                 seq_len=8192, minibatches=MINIBATCHES, microbatches=4)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every_steps=15, keep=2)
  c.eval.update(before=False, after=False, suites="math", math_file="HuggingFaceH4/MATH-500",
                samples=32, temperature=0.7, top_p=0.95, math_max_new_tokens=8192, batch_size=128)
  return c
