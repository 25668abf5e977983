"""Embedded default: DFT on SmolLM2-135M-Instruct over the built-in arithmetic set.

  python -m dft_jax.train                                  # this file, CPU-sized
  python -m dft_jax.train --config=configs/default.py:gpu  # same run, GPU-sized
  python -m dft_jax.train --config.objective.name=psft --config.train.num_steps=10

Variants (the part after ':'): cpu (default), gpu, and an objective name
(sft, dft, dft_seq, power, psft, eaft, gem, deft) to switch the objective, e.g. `:psft` or
`gpu,eaft`.
"""
import ml_collections

from dft_jax import evaluate, objectives

OBJECTIVES = tuple(objectives.OBJECTIVES)


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
      lm_head_chunk=1024,            # tokens per chunk of the fused LM head
      tokenizer=ml_collections.FieldReference(None, field_type=str),  # HF folder, for presets
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="builtin:arith_train",  # builtin:NAME | hub name | file | glob | save_to_disk folder
      split="train",                 # hub / save_to_disk split; files: train (or train[:1000])
      subset=ml_collections.FieldReference(None, field_type=str),  # hub dataset config name
      format="prompt_response",      # prompt_response | messages | text
      prompt_field="prompt",         # dotted keys reach nested fields: extra_info.question
      response_field="response",
      messages_field="messages",
      text_field="text",
      loss_on="assistant",           # assistant (all its turns) | last_assistant | all (tokens)
      system_prompt=ml_collections.FieldReference(None, field_type=str),
      # None: the tokenizer's; or Jinja text, a .jinja file, "none" (prompt + response + EOS)
      chat_template=ml_collections.FieldReference(None, field_type=str),
      max_length=192,                # longest example kept (tokens)
      truncation="drop",             # drop | truncate_response | truncate_prompt
      packing=True,                  # best-fit packing; False: one example per row, padded
      streaming=False,
      shuffle_buffer=10_000,         # streaming: rows in the shuffle buffer (0: no shuffle)
      pack_window=4096,              # streaming: rows packed together
      num_proc=1,                    # processes for tokenisation
      max_rows=ml_collections.FieldReference(None, field_type=int),
      shuffle_seed=ml_collections.FieldReference(None, field_type=int),  # None: train.seed
      error_on_dropped=False,        # make dropped rows (too long, empty) an error
      cache_dir=ml_collections.FieldReference(None, field_type=str),  # None: the datasets default
  ))

  c.objective = ml_collections.ConfigDict(dict(
      name="dft",                    # one of OBJECTIVES
      alpha=0.5,                     # power
      eps_low=0.2, eps_high=0.28,    # psft (official run script)
      entropy_coef=0.0,              # entropy bonus  -beta * H_t
      kl_coef=0.0,                   # KL anchor to the starting model  beta_kl * k3
      aggregation="token_mean",      # token_mean | seq_mean | sum_norm
      norm_constant=1.0,             # sum_norm divisor
      # eaft: -sg((H_t / eaft_norm)**eaft_alpha) * logp_t; defaults: the authors' LLaMA-Factory code
      eaft_alpha=1.0,                # gate exponent
      eaft_entropy="topk",           # topk (entropy of the top-eaft_k softmax) | full (exact)
      eaft_k=20,                     # top-k size (references: 20)
      eaft_norm=3.0,                 # entropy divisor (references: 3.0 ~ ln 20; full: ~ln(vocab))
      # gem: q = softmax(logits / gem_beta); defaults of the official train.py
      gem_beta=0.7,                  # 1: SFT's gradient; lower: flatter, more diverse outputs
      gem_h="linear",                # linear | logsigmoid (the paper's released scripts)
      # deft: parameter-free (q-log exponent = sum_v p_v**2 per token)
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-5,
      schedule="cosine",             # cosine | linear | constant
      warmup_steps=3,
      min_lr_ratio=0.1,
      weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-8,
      grad_clip_norm=1.0,
      mu_dtype=ml_collections.FieldReference(None, field_type=str),  # None (= params) | bfloat16
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

  # Before/after evaluation (dft_jax/evaluate.py: every field of its DEFAULTS can be overridden).
  c.eval = ml_collections.ConfigDict(dict(
      evaluate.DEFAULTS, before=True, after=True,
      num_examples=24, max_new_tokens=96, num_general=24, num_factual=32, batch_size=32))

  c.log = ml_collections.ConfigDict(dict(
      every_steps=1, progress=True, jsonl=True, tensorboard=True))

  # Fault injection for tests (dft_jax/faults.py); 0 = off, and then the run is unchanged.
  c.debug = ml_collections.ConfigDict(dict(
      inject_nan_at_step=0,          # NaN in that step's batch: non-finite loss and gradients
      slow_save_at_step=0,           # that step's checkpoint stays uncommitted for save_delay_s
      save_delay_s=0.0,
  ))

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
    elif v in OBJECTIVES:
      c.objective.name = v
    else:
      raise ValueError(
          f"configs/default.py: unknown variant {v!r}; expected cpu, gpu or one of {OBJECTIVES}")
  return c
