"""Embedded default: DFT on SmolLM2-135M-Instruct over the built-in arithmetic set.

  python -m dft_jax.train                                  # this file, CPU-sized
  python -m dft_jax.train --config=configs/default.py:gpu  # same run, GPU-sized
  python -m dft_jax.train --config=configs/default.py:psft --config.objective.psft.eps_high=0.3

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

  # Every field has its meaning in the comment on its line (`--help` lists them from here).
  c.model = ml_collections.ConfigDict(dict(
      name="smollm2-135m-instruct",  # alias | HF folder | .gguf file | preset:NAME (random init)
      param_dtype="float32",         # dtype of the master weights
      compute_dtype="float32",       # dtype of the matmuls: float32 on CPU, bfloat16 on accelerators
      remat="dots_with_no_batch_dims_saveable",  # activation checkpointing: none |
                                     # nothing_saveable | dots_saveable |
                                     # dots_with_no_batch_dims_saveable (keeps the projections'
                                     # outputs, recomputes attention: host memory on CPU) |
                                     # attention_saveable | dots_attention_saveable (+ cuDNN
                                     # attention's outputs) | mlp_attention_saveable (long rows:
                                     # the MLP's gate and up projections and attention's outputs)
      scan_layers=True,              # one scanned layer (fast compiles) instead of a Python loop
      attention="auto",              # auto (cudnn on GPU, xla elsewhere) | xla | cudnn
      lm_head_chunk=1024,            # tokens per chunk of the LM head
      lm_head_impl="checkpointed",   # checkpointed (any objective) | fused (gradient in the
                                     # forward pass: per-token objectives; others fall back)
      max_segments=placeholder(int),  # most runs of segment ids (documents + padding) in a row:
                                     # cuDNN attention's static bound; the packer keeps under it.
                                     # On GPU its backward holds B * this * T * heads * head_dim
                                     # float32. None: the data's own bound (the most of its
                                     # shortest documents a row fits, + 1; at most 64; a stream: 64)
      tokenizer=placeholder(str),    # HF tokenizer folder, for presets
      router_aux_loss_coef=placeholder(float),  # mixture-of-experts models: weight of the
                                     # router's load-balancing loss in the total (None: as
                                     # transformers trains the checkpoint: config.json's
                                     # router_aux_loss_coef if its output_router_logits, else 0)
  ))

  # LoRA / QLoRA (docs/models.md "LoRA and QLoRA"): rank 0 trains every parameter; rank > 0 trains low-rank adapters
  # on `targets` and keeps the base frozen (stored in model.param_dtype, or quantised).
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                        # adapter rank; 0: no LoRA, every parameter trains
      alpha=16.0,                    # adapter scale alpha / rank (PEFT's default)
      targets="q,k,v,o,gate,up,down",  # projections that get adapters
      base_quant="none",             # none | int8 (per channel) | nf4 (QLoRA, blocks of block_size)
      block_size=64,                 # nf4 quantisation block
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="builtin:arith_train",  # builtin:NAME | hub name | file | glob | save_to_disk folder
      sources=(),                    # a weighted mixture instead of source: (dict(source=...,
                                     # weight=W, name=..., and any of format, *_field, split,
                                     # subset, max_rows, loss_on, streaming), ...) (docs/data.md)
      split="train",                 # hub / save_to_disk split; files: train (or train[:1000])
      subset=placeholder(str),       # hub dataset config name
      format="prompt_response",      # prompt_response | messages | text
      prompt_field="prompt",         # prompt_response: the prompt's field (dotted: a.b is nested)
      response_field="response",     # prompt_response: the response's field
      messages_field="messages",     # messages: the field holding [{role, content}, ...]
      text_field="text",             # text: the field holding the text
      answer_field=placeholder(str),  # field with each row's final answer, for the held-out
                                     # accuracy (None: the response's last \boxed{} or #### N)
      loss_on="assistant",           # assistant (all its turns) | last_assistant | all (tokens)
      system_prompt=placeholder(str),  # system turn added to every example
      chat_template=placeholder(str),  # None: the tokenizer's; or Jinja text, a .jinja file,
                                     # "none" (prompt + response + EOS)
      max_length=192,                # longest example kept (tokens)
      truncation="drop",             # longer examples: drop | truncate_response | truncate_prompt
      packing=True,                  # best-fit packing; False: one example per row, padded
      eval_holdout=placeholder(int),  # rows of data.source kept out of training and scored
                                     # before/after (0: none; None: 5% of a file's rows, at most
                                     # 100; none of builtin sets and streams)
      streaming=False,               # read the source as a stream (datasets IterableDataset)
      shuffle_buffer=10_000,         # streaming: rows in the shuffle buffer (0: no shuffle)
      pack_window=4096,              # streaming: rows packed together
      num_proc=1,                    # processes for tokenisation
      max_rows=placeholder(int),     # use only the first rows of the source
      shuffle_seed=placeholder(int),  # data order (None: train.seed)
      error_on_dropped=False,        # make dropped rows (too long, empty) an error
      cache_dir=placeholder(str),    # datasets cache folder (None: the datasets default)
      allow_changed=False,           # resume although a data file changed since the checkpoint
                                     # (from its position in the changed data); False: refused
  ))

  # name, aggregation (token_mean | seq_mean | sum_norm), norm_constant, entropy_coef, kl_coef,
  # and objective.<name>.<hyperparameter> for every objective that has some (docs/objectives.md).
  c.objective = ml_collections.ConfigDict(objectives.config_block("dft"))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-5,            # peak learning rate (AdamW)
      schedule="cosine",             # after warmup: cosine | linear | constant | finch (the
                                     # constant rate scaled by the batch's loss, optimizer.finch)
      warmup_steps=3,                # linear warmup from 0
      min_lr_ratio=0.1,              # final learning rate / peak (cosine, linear)
      weight_decay=0.0,              # AdamW decoupled weight decay
      b1=0.9,                        # AdamW first-moment decay
      b2=0.95,                       # AdamW second-moment decay
      eps=1e-8,                      # AdamW epsilon
      grad_clip_norm=1.0,            # clip the global gradient norm to this (0: no clipping)
      max_update_ratio=1.0,          # skip an update moving the parameters by more than this
                                     # times their norm (a learning rate far too large; 0: off)
      mu_dtype=placeholder(str),     # AdamW first moment: None (= params) | bfloat16
      nu_dtype=placeholder(str),     # second moment: None (optax.adamw) | bfloat16 (b2 <= 0.99)
      # FINCH (arXiv 2605.20005): rate = min(learning_rate / sqrt(average loss), max_learning_rate)
      finch=ml_collections.ConfigDict(dict(
          ema=0.9,                   # moving-average coefficient of the batch losses
          max_learning_rate=5e-5,    # cap of the rate
          initial_loss=placeholder(float),  # the average's start (None: the first batch's loss)
      )),
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=20,                  # optimizer batches to train on
      global_batch_size=4,           # rows of seq_len tokens per optimizer batch
      seq_len=384,                   # tokens per row (two built-in examples fit: 82% real tokens)
      microbatches=4,                # gradient accumulation inside the step (CPU: one row at a
                                     # time, for host memory; the gpu variant: 1)
      minibatches=1,                 # updates per global batch (PSFT's K; old_logp fixed across them)
      seed=0,                        # parameter init (presets, LoRA) and data order
      nonfinite="skip",              # a NaN / inf step: skip (the update) | stop (the run)
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                       # data-parallel devices (-1: all the others)
      fsdp=1,                        # devices the parameters and optimizer state are sharded over
      tensor=1,                      # tensor-parallel devices
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=10,                # steps between checkpoints (and one at the end)
      keep=2,                        # checkpoints kept
      async_save=False,              # write checkpoints while training goes on (the gpu
                                     # variant: on CPU the host copy it needs stacks on the
                                     # next step's memory, +2.5 GB at the default)
      export_hf=False,               # also write an HF folder (and a PEFT one for LoRA) at the end
  ))

  # Before/after evaluation (dft_jax/evaluate, docs/evaluation.md).
  c.eval = ml_collections.ConfigDict(dict(
      before=True,                   # evaluate the starting model
      after=True,                    # evaluate the trained model
      suites="auto",                 # holdout,in_domain,math,forgetting,target_probs; auto:
                                     # holdout (a held-out split exists), in_domain (training on
                                     # builtin:arith*), math (math_file set), forgetting;
                                     # none: only eval.sets
      in_domain="builtin:arith_test",  # in_domain set: rows {prompt, answer, response}; any set
                                     # is SOURCE[,FIELD=VALUE...] with its own fields, e.g.
                                     # my_test.jsonl,prompt_field=question (docs/evaluation.md)
      num_examples=24,               # in_domain problems
      max_new_tokens=96,             # reply length, in_domain and forgetting's general prompts
      samples=1,                     # replies per problem; > 1: avg@k / pass@k at temperature
      temperature=1.0,               # sampling temperature when samples > 1
      top_p=1.0,                     # nucleus sampling when samples > 1
      seed=0,                        # sampling seed
      math_file=placeholder(str),    # math set: rows {problem, answer} (file or hub name),
                                     # scored with math-verify
      math_split=placeholder(str),   # math set's hub split (default test; files: train)
      num_math=placeholder(int),     # math problems (None: all rows)
      math_max_new_tokens=1024,      # reply length, math and holdout (at most)
      general_prompts="builtin:general_prompts",  # forgetting: prompts for KL and entropy
      num_general=24,                # forgetting: general prompts used
      factual_qa="builtin:factual_qa",  # forgetting: questions {prompt, aliases}
      num_factual=32,                # forgetting: questions used
      factual_max_new_tokens=48,     # forgetting: reply length for the questions
      heldout_text="builtin:heldout_text",  # forgetting: prose for perplexity
      num_hist=200,                  # target_probs: in_domain responses in the histogram
      batch_size=32,                 # rows per generation batch
      forced_batch_size=8,           # rows per teacher-forced batch
      progress=True,                 # progress bars
      sets=ml_collections.FieldReference((), field_type=object),  # your own sets, each
                                     # NAME=SOURCE,kind=answers|forced|kl[,FIELD=VALUE...]
                                     # (prompt_field, answer_field, format, ...), several joined
                                     # by ';' (or a tuple): scored after the suites, under NAME
      every_steps=0,                 # also evaluate every this many steps while training (0: only
                                     # before and after)
  ))

  c.log = ml_collections.ConfigDict(dict(
      every_steps=1,                 # steps between metric rows
      progress=True,                 # the progress bar
      jsonl=True,                    # metrics.jsonl in the run folder
      tensorboard=True,              # TensorBoard files in the run folder
  ))
  # Weights & Biases beside them (pip install wandb): the same metric names, the full config.
  c.log.wandb = ml_collections.ConfigDict(dict(
      enabled=False,                 # log the run to W&B too
      project="dft_jax",             # W&B project
      entity=placeholder(str),       # W&B team or user (None: your default)
      name=placeholder(str),         # run name (None: the run folder's name)
      tags=(),                       # run tags (several: a,b)
      mode="online",                 # online | offline (only the run folder's wandb/, for
                                     # `wandb sync`)
  ))

  for v in variants:
    if v == "cpu":
      pass
    elif v == "gpu":
      c.model.compute_dtype = "bfloat16"
      c.model.remat = "nothing_saveable"
      c.model.lm_head_impl = "fused"   # 0.86x the checkpointed head's step on an H200
      c.train.microbatches = 1
      c.train.num_steps = 200
      c.train.global_batch_size = 32
      c.train.seq_len = 1024
      c.checkpoint.every_steps = 100
      c.checkpoint.async_save = True
      c.eval.num_examples = 200
      c.eval.num_general = 64
      c.eval.batch_size = 100
    elif v in objectives.OBJECTIVES:
      c.objective.name = v
    else:
      raise ValueError(f"configs/default.py: unknown variant {v!r}; expected cpu, gpu or one of "
                       f"{', '.join(objectives.OBJECTIVES)}")
  if "old_logp" in objectives.OBJECTIVES[c.objective.name].needs:
    # PSFT: several updates per policy snapshot, as the paper's 8 minibatches of each global batch
    # (arXiv 2508.17784); one would make it SFT. One row per update at most keeps the CPU's memory.
    c.train.minibatches = min(8, c.train.global_batch_size)
    c.train.microbatches = 1
  return c
