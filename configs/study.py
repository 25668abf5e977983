"""The "SFT under the scanner" study: one base model, two regimes of prior strength, the same token
budget, learning-rate protocol and evaluation for every objective (dft_jax.experiments.scanner).

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu   # both regimes, one H200
  python -m dft_jax.experiments.scanner                                 # :cpu, SmolLM2 on 2 cores
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --regime=model_strong
  python -m dft_jax.train --config=configs/study.py:gpu --config.objective.name=psft  # one arm

Variants (the part after ':', comma-separated): cpu (default) | gpu, and smoke (tests/fixtures/
tiny_llama and a tiny budget through the same code path).

Regimes (study.regime_sets; study.regimes says which run, in order), for the same base model:
  model_weak    builtin:arith_*  multi-step word problems, several reasoning paths per problem: the
                base solves almost none (greedy) and many target tokens -- the computed numbers --
                are unlikely under it
  model_strong  builtin:lookup_* single-step reading problems answered the way the base replies:
                it solves over a third before training (0.37 greedy on 100 test problems, float32
                on CPU) and few target tokens are unlikely under it (5 % with p < 0.1, against
                23 % for model_weak)
The study measures both ends (base accuracy on the test split, mean base probability of the
held-out target tokens and its histogram), so the axis is measured, not asserted.

Every arm of a regime trains on its train split for the same number of global batches and makes
train.minibatches optimizer updates per global batch, so PSFT's K-update trust region and the
other objectives see the same tokens in the same order and take the same number of steps; only
PSFT uses the per-batch policy snapshot. With study.lr_grid every arm without its own lr first
trains once per grid lr (seed 0) and keeps the lr with the best greedy accuracy on the regime's
validation split; that run, evaluated on the test split, is the arm's seed 0 (training it again
would give the same run), then seeds 1 .. seeds-1 train at the chosen lr.
"""
import os

import ml_collections

from dft_jax import config_files

# Arms: "label=objective[,field=value...]"; fields are the objective's hyperparameters
# (objective.<name>.<field>) or generic config.objective fields, plus lr (this arm's
# optimizer.learning_rate: the arm is then not tuned).
ARMS = (
    "sft=sft",
    "dft=dft",
    "psft=psft",
    "power_0.5=power,alpha=0.5",
    "sft+entropy=sft,entropy_coef=0.05",
    "dft+kl=dft,kl_coef=0.1",
    "eaft=eaft",
    "gem=gem",
    "deft=deft",
    "asft=asft",
    "chord_phi=chord_phi",
    "p=power,alpha=1.0",
    "top_logp=prob_threshold",
    "iw_sft=iw_sft",
)
CPU_ARMS = ("sft=sft", "dft=dft", "psft=psft", "power_0.5=power,alpha=0.5")

REGIME_SETS = dict(
    model_weak=dict(train="builtin:arith_train", val="builtin:arith_val",
                    test="builtin:arith_test"),
    model_strong=dict(train="builtin:lookup_train", val="builtin:lookup_val",
                      test="builtin:lookup_test"),
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
  c.data.update(source=REGIME_SETS["model_weak"]["train"], max_length=192)  # each regime its own
  c.optimizer.update(schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0)
  # max_new_tokens also bounds the base model's replies to the general prompts (the KL set): one
  # value for both regimes keeps that set, and so the forgetting numbers, the same in both.
  c.eval.update(
      suites="in_domain,forgetting,target_probs",
      in_domain=REGIME_SETS["model_weak"]["test"], samples=1, factual_qa="builtin:factual_qa",
      heldout_text="builtin:heldout_text", progress=False)
  c.study = ml_collections.ConfigDict(dict(
      regimes="model_weak,model_strong",  # which regimes run, in this order (--regime)
      regime_sets=REGIME_SETS,  # name -> train / val / test sets (builtin:NAME, file, hub name)
      seeds=3,                 # data-order seeds (train.seed = 0 .. seeds-1)
      arms=ARMS,               # label=objective[,field=value...][,lr=X] per arm (ARMS above)
      lr_grid=(),              # learning rates to choose each arm's from (--tune_lr; () none)
      tune_examples=200,       # ... on this many problems of the regime's validation set
      confidence=0.95,         # bootstrap intervals (over problems and seeds) in the tables
      budget_s=0.0,            # stop starting runs past this wall time (0: no limit)
      compilation_cache="~/.cache/dft_jax/xla",  # persistent XLA cache folder ("": none)
      compile_workers=-1,      # threads tracing + compiling train steps (-1 auto, 0 none)
      # folder of results.md, the regimes' results.json and figures
      out=os.path.join("results", "scanner", *(["cpu"] if scale == "cpu" else [])),
  ))

  if scale == "gpu":
    # SmolLM2-135M in bf16 on one H200. Each run: 12 global batches of 32 x 512 tokens (~197k
    # tokens: ~0.6 epoch of arith_train, ~1.2 of lookup_train) = 48 updates of 8 rows.
    # Time, estimated from the H100 run of 36 such batches (0.18 s a batch, +25 % for arms with
    # a reference forward: dft+kl, asft, iw_sft; +20 % for psft's snapshot; ~1 s of evaluation a
    # run; model load 11 s, base evaluation 30 s):
    #   one run ~2.6 s of training; evaluation on the test split ~1.1 s (model_weak) / ~0.6 s
    #   (model_strong: short replies), on the validation split ~0.65 / ~0.15 s (tuning only)
    #   tuning (seed 0): 14 arms x 2 lr x 2 regimes = 56 runs, the 28 chosen evaluated on test:
    #     ~105 s (model_weak) + ~85 s (model_strong)
    #   seeds 1-2: 14 arms x 2 seeds x 2 regimes = 56 runs: ~100 s + ~85 s
    #   model load ~11 s, base evaluations ~45 s, tokenising (each regime and seed) ~12 s,
    #   figures ~10 s
    #   => ~460 s (7.7 min) in all. The 28 train steps (14 arms x 2 lr, shared by both regimes)
    #   are traced and compiled in 4 background threads meanwhile (~15 s each, 7 rounds, done
    #   before the last arm's tuning needs them). budget_s stops starting runs that would end past
    #   510 s, so that the whole command, figures included, stays under 10 minutes; `--resume`
    #   adds whatever is missing.
    c.model.update(compute_dtype="bfloat16", remat="none")
    c.train.update(num_steps=12, global_batch_size=32, seq_len=512, minibatches=4)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=5)
    c.eval.update(num_examples=200, batch_size=200, max_new_tokens=128, num_general=64,
                  num_factual=70, factual_max_new_tokens=48, num_hist=200, forced_batch_size=16)
    c.study.update(seeds=3, lr_grid=(1e-4, 3e-4), budget_s=510.0)
  else:
    # SmolLM2-135M in float32 on 2 CPU cores (~12 s per 8 x 256-token batch): 4 global batches of
    # 8 x 256 tokens = 8 updates of 4 rows, one seed, four arms, a small evaluation: the pipeline
    # on the real model in about 20 minutes, far too short to learn (the GPU scale is the study).
    c.train.update(num_steps=4, global_batch_size=8, seq_len=256, minibatches=2)
    c.optimizer.update(learning_rate=5e-5, warmup_steps=2)
    c.eval.update(num_examples=16, batch_size=16, max_new_tokens=80, num_general=16,
                  num_factual=16, factual_max_new_tokens=32, num_hist=16, forced_batch_size=8)
    c.study.update(seeds=1, arms=CPU_ARMS, budget_s=0.0, tune_examples=16)

  if "smoke" in variants:
    # Same code path, tiny model (vocabulary 320: the arithmetic rows are ~280 tokens) and budget.
    c.model.update(name=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "tests", "fixtures", "tiny_llama"), lm_head_chunk=256)
    c.data.max_length = 384
    c.train.update(num_steps=2, global_batch_size=32, seq_len=512, minibatches=4)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=1)
    c.eval.update(num_examples=8, batch_size=8, max_new_tokens=8, num_general=8, num_factual=8,
                  factual_max_new_tokens=8, num_hist=8, forced_batch_size=8)
    c.study.update(seeds=2, lr_grid=(1e-3, 3e-3), budget_s=0.0, tune_examples=8,
                   out=os.path.join("runs", "scanner_smoke"))
  return c
