"""Embedded default: DFT on SmolLM2-135M-Instruct over the built-in arithmetic set.

  python -m dft_jax.train                                  # this file, CPU-sized
  python -m dft_jax.train --config=configs/default.py:gpu  # same run, GPU-sized
  python -m dft_jax.train --config.objective.name=psft --config.objective.psft.eps_high=0.3

Variants (the part after ':', comma-separated): cpu (default), gpu, and an objective name to
switch the objective, e.g. `:psft` or `:gpu,eaft`. The objective block (name, aggregation,
coefficients, one sub-block of hyperparameters per objective) comes from the objective registry,
dft_jax/objectives.py, which this file reads without importing jax.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from dft_jax import objectives


def get_config(arg=None):
  variants = [a for a in (arg or "cpu").split(",") if a]
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      name="smollm2-135m-instruct",  # alias | HF dir | .gguf file | preset:NAME (random init)
      param_dtype="float32",         # master weights
      compute_dtype="float32",       # float32 on CPU, bfloat16 on accelerators
      remat="none",                  # none | nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
      scan_layers=True,
      attention="auto",              # auto (cudnn on GPU, xla elsewhere) | xla | cudnn
      lm_head_chunk=1024,            # tokens per chunk of the LM head
      lm_head_impl="checkpointed",   # checkpointed (any objective) | fused (gradient in the
                                     # forward pass: per-token objectives; others fall back)
      max_segments=64,               # most runs of segment ids (documents + padding) in a row:
                                     # cuDNN attention's static bound; the packer keeps under it
      tokenizer=placeholder(str),    # HF tokenizer folder, for presets
  ))

  # LoRA / QLoRA (README "LoRA"): rank 0 trains every parameter; rank > 0 trains low-rank adapters
  # on `targets` and keeps the base frozen (stored in model.param_dtype, or quantised).
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=16.0,                    # scale alpha / rank (PEFT's default)
      targets="q,k,v,o,gate,up,down",
      base_quant="none",             # none | int8 (per channel) | nf4 (QLoRA, blocks of block_size)
      block_size=64,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="builtin:arith_train",  # builtin:NAME | hub name | file | glob | save_to_disk folder
      split="train",                 # hub / save_to_disk split; files: train (or train[:1000])
      subset=placeholder(str),       # hub dataset config name
      format="prompt_response",      # prompt_response | messages | text
      prompt_field="prompt",         # dotted keys reach nested fields: extra_info.question
      response_field="response",
      messages_field="messages",
      text_field="text",
      loss_on="assistant",           # assistant (all its turns) | last_assistant | all (tokens)
      system_prompt=placeholder(str),
      # None: the tokenizer's; or Jinja text, a .jinja file, "none" (prompt + response + EOS)
      chat_template=placeholder(str),
      max_length=192,                # longest example kept (tokens)
      truncation="drop",             # drop | truncate_response | truncate_prompt
      packing=True,                  # best-fit packing; False: one example per row, padded
      streaming=False,
      shuffle_buffer=10_000,         # streaming: rows in the shuffle buffer (0: no shuffle)
      pack_window=4096,              # streaming: rows packed together
      num_proc=1,                    # processes for tokenisation
      max_rows=placeholder(int),
      shuffle_seed=placeholder(int),  # None: train.seed
      error_on_dropped=False,        # make dropped rows (too long, empty) an error
      cache_dir=placeholder(str),    # None: the datasets default
  ))

  # name, aggregation (token_mean | seq_mean | sum_norm), norm_constant, entropy_coef, kl_coef,
  # and objective.<name>.<hyperparameter> for every objective that has some (README "Objectives").
  c.objective = ml_collections.ConfigDict(objectives.config_block("dft"))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-5,
      schedule="cosine",             # cosine | linear | constant
      warmup_steps=3,
      min_lr_ratio=0.1,
      weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8,
      grad_clip_norm=1.0,
      mu_dtype=placeholder(str),     # AdamW first moment: None (= params) | bfloat16
      nu_dtype=placeholder(str),     # second moment: None (optax.adamw) | bfloat16 (b2 <= 0.99)
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=20,
      global_batch_size=4,           # rows of seq_len tokens per optimizer batch
      seq_len=384,                   # two built-in examples fit a row: 82% real tokens
      microbatches=1,                # gradient accumulation inside the step
      minibatches=1,                 # updates per global batch (PSFT's K; old_logp fixed across them)
      seed=0,
      nonfinite="skip",              # skip | stop
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=10, keep=2, async_save=True, export_hf=False))

  # Before/after evaluation (dft_jax/evaluate): suites in_domain | math | forgetting | target_probs.
  c.eval = ml_collections.ConfigDict(dict(
      before=True, after=True,
      suites="in_domain,forgetting",
      in_domain="builtin:arith_test",  # held-out problems {prompt, answer, response}
      num_examples=24, max_new_tokens=96,
      samples=1, temperature=1.0, top_p=1.0, seed=0,  # samples > 1: avg@k / pass@k at temperature
      math_file=placeholder(str),    # MATH500-format rows {problem, answer}: file or hub name
      math_split=placeholder(str),   # hub split (default test; files: train)
      num_math=placeholder(int),     # None: all rows
      math_max_new_tokens=1024,
      general_prompts="builtin:general_prompts", num_general=24,
      factual_qa="builtin:factual_qa", num_factual=32, factual_max_new_tokens=48,
      heldout_text="builtin:heldout_text",
      num_hist=200,                  # held-out responses in the target-probability histogram
      batch_size=32,                 # rows per generation batch
      forced_batch_size=8,           # rows per teacher-forced batch
      progress=True,
  ))

  c.log = ml_collections.ConfigDict(dict(
      every_steps=1, progress=True, jsonl=True, tensorboard=True))

  for v in variants:
    if v == "cpu":
      pass
    elif v == "gpu":
      c.model.compute_dtype = "bfloat16"
      c.model.remat = "nothing_saveable"
      c.train.num_steps = 200
      c.train.global_batch_size = 32
      c.train.seq_len = 1024
      c.checkpoint.every_steps = 100
      c.eval.num_examples = 200
      c.eval.num_general = 64
      c.eval.batch_size = 100
    elif v in objectives.OBJECTIVES:
      c.objective.name = v
    else:
      raise ValueError(f"configs/default.py: unknown variant {v!r}; expected cpu, gpu or one of "
                       f"{', '.join(objectives.OBJECTIVES)}")
  return c
