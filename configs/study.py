"""The "SFT under the scanner" study: one base model, the same data, token budget, learning-rate
protocol and evaluation for every objective (run by dft_jax.experiments.scanner).

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu \
      --config.model.name=PATH/SmolLM2-135M-Instruct.Q4_1.gguf
  python -m dft_jax.experiments.scanner                              # :cpu, SmolLM2 on 2 CPU cores
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny
  python -m dft_jax.train --config=configs/study.py:gpu --config.objective.name=psft  # one arm

Variants (the part after ':', comma-separated): cpu (default) | gpu, and smoke (tests/fixtures/
tiny_llama and a tiny budget through the same code path).

Every arm trains on builtin:arith_train (multi-step word problems, several reasoning paths per
problem: the regime where the DFT paper reports its gains) for the same number of global batches.
Every arm makes train.minibatches optimizer updates per global batch, so PSFT's K-update trust
region and the other objectives see the same tokens in the same order and take the same number of
steps; only PSFT uses the per-batch policy snapshot.
"""
import os

import ml_collections

from dft_jax import config_files

# Arms: "label=objective[,field=value...]"; fields are the objective's hyperparameters
# (objective.<name>.<field>) or generic config.objective fields, plus lr (this arm's
# optimizer.learning_rate).
ARMS = (
    "sft=sft",
    "dft=dft",
    "psft=psft",
    "power_0.5=power,alpha=0.5",
    "sft+entropy=sft,entropy_coef=0.05",
    "dft+kl=dft,kl_coef=0.1",
    "eaft=eaft",
    "asft=asft",
    "chord_phi=chord_phi",
    "p=power,alpha=1.0",
    "top_logp=prob_threshold",
    "iw_sft=iw_sft",
)


def get_config(arg=None):
  variants = [a for a in (arg or "cpu").split(",") if a]
  unknown = [v for v in variants if v not in ("cpu", "gpu", "smoke")]
  if unknown:
    raise ValueError(f"configs/study.py: unknown variant(s) {unknown}; expected cpu or gpu, "
                     "optionally with smoke")
  scale = "gpu" if "gpu" in variants else "cpu"
  c = config_files.load("default.py", scale)
  c.objective.name = "sft"  # each arm sets its own
  c.checkpoint.update(every_steps=10**9, async_save=False)  # the study keeps no checkpoints
  c.log.update(progress=False, tensorboard=False)
  c.data.update(source="builtin:arith_train", max_length=192)
  c.optimizer.update(schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0)
  c.eval.update(
      suites="in_domain,forgetting,target_probs",
      in_domain="builtin:arith_test", samples=1, factual_qa="builtin:factual_qa",
      heldout_text="builtin:heldout_text", progress=False)
  c.study = ml_collections.ConfigDict(dict(
      seeds=3,                 # data-order seeds (train.seed = 0 .. seeds-1)
      arms=ARMS,               # label=objective[,field=value...][,lr=X] per arm (ARMS above)
      lr_grid=(),              # learning rates to choose each arm's from first (--tune_lr)
      tune_on="builtin:arith_val",  # ... by in-domain accuracy on this validation set
      tune_examples=200,       # ... of this many problems
      budget_s=0.0,            # stop starting runs past this wall time (0: no limit)
      compilation_cache="~/.cache/dft_jax/xla",  # persistent XLA cache folder ("": none)
      compile_workers=-1,      # threads compiling train steps in the background (-1 auto, 0 none)
      # folder of results.json, results.md and the figures
      out=os.path.join("results", "scanner", *(["cpu"] if scale == "cpu" else [])),
  ))

  if scale == "gpu":
    # SmolLM2-135M in bf16 on one H100: 36 global batches of 32 x 512 tokens (about 2 epochs of
    # arith_train, ~560k tokens) = 144 updates of 8 rows; evaluation on 200 held-out problems.
    c.model.update(compute_dtype="bfloat16", remat="none")
    c.train.update(num_steps=36, global_batch_size=32, seq_len=512, minibatches=4)
    c.optimizer.update(learning_rate=5e-5, warmup_steps=10)
    c.eval.update(num_examples=200, batch_size=200, max_new_tokens=128, num_general=64,
                  num_factual=70, factual_max_new_tokens=48, num_hist=200, forced_batch_size=16)
    c.study.update(seeds=3, budget_s=480.0)  # leaves ~2 min of a 10-minute call for the rest
  else:
    # SmolLM2-135M in float32 on 2 CPU cores (~12 s per 8 x 256-token batch): 4 global batches of
    # 8 x 256 tokens = 8 updates of 4 rows, one seed, a small evaluation: the pipeline on the real
    # model in under 20 minutes, far too short to learn the task (the GPU scale is the study).
    c.train.update(num_steps=4, global_batch_size=8, seq_len=256, minibatches=2)
    c.optimizer.update(learning_rate=5e-5, warmup_steps=2)
    c.eval.update(num_examples=16, batch_size=16, max_new_tokens=80, num_general=16,
                  num_factual=16, factual_max_new_tokens=32, num_hist=16, forced_batch_size=8)
    c.study.update(seeds=1, budget_s=0.0, tune_examples=16)

  if "smoke" in variants:
    # Same code path, tiny model (vocabulary 320: the arithmetic rows are ~280 tokens) and budget.
    c.model.update(name=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "tests", "fixtures", "tiny_llama"), lm_head_chunk=256)
    c.data.max_length = 384
    c.train.update(num_steps=2, global_batch_size=32, seq_len=512, minibatches=4)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=1)
    c.eval.update(num_examples=8, batch_size=8, max_new_tokens=8, num_general=8, num_factual=8,
                  factual_max_new_tokens=8, num_hist=8, forced_batch_size=8)
    c.study.update(budget_s=0.0, tune_examples=8, out=os.path.join("runs", "scanner_smoke"))
  return c
