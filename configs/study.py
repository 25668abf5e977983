"""The "SFT under the scanner" study: one base model, two regimes of prior strength, every arm at
every learning rate of one shared grid and over several data orders, evaluated along training
(dft_jax.experiments.scanner; docs/study.md).

  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu   # both regimes, one H200
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --config.study.regimes=model_weak
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu --resume   # add what is missing
  python -m dft_jax.experiments.scanner --config=configs/study.py:gpu,smoke  # the GPU path, tiny, CPU
  python -m dft_jax.train --config=configs/study.py:gpu --config.objective.name=psft  # one run

Variants (the part after ':', comma-separated): cpu (default) | gpu, and smoke (tests/fixtures/
tiny_llama and a tiny budget through the same code path).

Regimes (study.regime_sets; study.regimes says which run, in order), for the same base model:
  model_weak    builtin:arith_*  multi-step word problems, several reasoning paths per problem: the
                base solves almost none (greedy) and many target tokens -- the computed numbers --
                are unlikely under it. Out of distribution: the same stories with numbers one
                digit longer (arith_ood_longer), and the operations without a story
                (arith_ood_expressions)
  model_strong  builtin:lookup_hard_* reading problems answered the way the base replies (two to
                four people's counts, one asked): few target tokens are unlikely under the base,
                which solves a fair share before training and cannot solve them all after it.
                Out of distribution: the facts as a list asked in unseen words (lookup_ood_list),
                and two people's counts added (lookup_ood_sum)
The study measures both ends (base accuracy, base target-probability histogram), so the axis is
measured, not asserted.

Arms (study.arms) are overrides of this config with the main job's field names; study.run_arms
says which run, in order (the budget stops before the later ones). Every arm of a regime trains at
every rate of study.lr_grid and every data seed 0 .. seeds-1 (one vmapped population), on the same
batches in the same order for a seed, for the same number of updates (train.minibatches per
global batch: PSFT's K), evaluated on the test and OOD sets and the forgetting sets every
study.eval_every global batches, and on the validation set at the end (for the secondary table:
each arm at its best validation rate).
"""
import os

import ml_collections

from dft_jax import config_files

# label -> overrides of this config (nested like it; an arm may not set optimizer.learning_rate:
# the grid does). The first six are the seed's question and its controls, then the newest answers
# to "SFT forgets" (TALR, OTR, FINCH's loss-adaptive rate on SFT: its cap stays 2.5 times each
# grid rate, the paper code's 5e-5 over 2e-5), then the registry's other objectives.
ARMS = dict(
    sft=dict(objective=dict(name="sft")),
    sft_kl=dict(objective=dict(name="sft", kl_coef=0.1)),           # SFT + KL anchor (k3)
    dft=dict(objective=dict(name="dft")),
    psft=dict(objective=dict(name="psft")),
    sft_entropy=dict(objective=dict(name="sft", entropy_coef=0.05)),
    asft=dict(objective=dict(name="asft")),
    talr=dict(objective=dict(name="talr")),
    otr=dict(objective=dict(name="otr")),
    sft_finch=dict(objective=dict(name="sft"), optimizer=dict(schedule="finch")),  # FINCH's rate
    dft_kl=dict(objective=dict(name="dft", kl_coef=0.1)),
    power_0_5=dict(objective=dict(name="power", power=dict(alpha=0.5))),
    p=dict(objective=dict(name="power", power=dict(alpha=1.0))),    # Beyond-LL's -p
    top_logp=dict(objective=dict(name="prob_threshold")),
    eaft=dict(objective=dict(name="eaft")),
    gem=dict(objective=dict(name="gem")),
    deft=dict(objective=dict(name="deft")),
    chord_phi=dict(objective=dict(name="chord_phi")),
    iw_sft=dict(objective=dict(name="iw_sft")),
)
FIRST_ARMS = "sft,sft_kl,dft,psft,sft_entropy,asft,talr,otr,sft_finch"

REGIME_SETS = dict(
    model_weak=dict(
        train="builtin:arith_train", val="builtin:arith_val", test="builtin:arith_test",
        ood=dict(longer_numbers="builtin:arith_ood_longer",
                 expressions="builtin:arith_ood_expressions"),
        max_new_tokens=128),   # reply length on its test, OOD and validation sets
    model_strong=dict(
        train="builtin:lookup_hard_train", val="builtin:lookup_hard_val",
        test="builtin:lookup_hard_test",
        ood=dict(list_layout="builtin:lookup_ood_list", sums="builtin:lookup_ood_sum"),
        max_new_tokens=48),
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
  # max_new_tokens bounds the base model's replies to the general prompts (the KL set): one value
  # for both regimes keeps that set, and so the forgetting numbers, the same in both.
  c.eval.update(suites="in_domain,forgetting,target_probs",
                in_domain=REGIME_SETS["model_weak"]["test"], samples=1,
                factual_qa="builtin:factual_qa", heldout_text="builtin:heldout_text",
                progress=False)
  c.study = ml_collections.ConfigDict(dict(
      regimes="model_weak,model_strong",  # which regimes run, in this order
      regime_sets=REGIME_SETS,  # name -> train / val / test / ood sets, reply length
      arms=ARMS,               # label -> overrides of this config (ARMS above)
      run_arms=FIRST_ARMS,     # the arms that run, in this order (labels of study.arms)
      lr_grid=(3e-5, 1e-4, 3e-4, 1e-3),  # every arm trains at every one of these peak rates
      seeds=5,                 # data-order seeds (train.seed = 0 .. seeds-1)
      eval_every=3,            # global batches between evaluations (and one at the end)
      ood_examples=150,        # problems of each OOD set
      val_examples=100,        # problems of the validation set (end of training only)
      gain_levels=(0.25, 0.5, 0.8),  # matched gain: these fractions of SFT's best in-domain gain
      confidence=0.95,         # bootstrap intervals; Holm's family-wise level is 1 - this
      resamples=4000,          # bootstrap draws
      budget_s=0.0,            # stop starting arms that would end past this wall time (0: none)
      report=True,             # write results.md and the figures at the end (False: only the
                               # result files; --replot writes the report from them later)
      compilation_cache="~/.cache/dft_jax/xla",  # persistent XLA cache folder ("": none)
      # the study's folder: per regime base.json and arms/LABEL.json, then results.md, figures
      out=os.path.join("results", "scanner", *(["cpu"] if scale == "cpu" else [])),
  ))

  if scale == "gpu":
    # SmolLM2-135M in bf16 on one H200. Each run: 12 global batches of 32 x 512 tokens (~197k
    # tokens: ~0.6 epoch of arith_train) = 48 updates of 8 rows; an arm is 4 rates x 5 seeds = 20
    # runs in one vmapped program, evaluated after 3, 6, 9 and 12 batches. Memory (XLA's analysis
    # of the population step on CPU, xla attention): the 20 states 30 GiB, the step's temporaries
    # 255 GiB with one microbatch and no remat, 94 GiB with 4 microbatches, 66 GiB with 2 and the
    # projections' outputs kept (recomputing attention): 4 microbatches and that policy fit an
    # H200 with room for the evaluation's KV caches.
    # XLA attention: JAX's cuDNN attention has no batching rule for packed rows under vmap (the
    # population's), and at 512 tokens a row XLA's is cheap.
    c.model.update(compute_dtype="bfloat16", remat="dots_with_no_batch_dims_saveable",
                   max_segments=16, attention="xla")
    c.train.update(num_steps=12, global_batch_size=32, seq_len=512, minibatches=4,
                   microbatches=4)
    c.optimizer.update(warmup_steps=5)
    c.eval.update(num_examples=200, batch_size=200, max_new_tokens=128, num_general=64,
                  num_factual=70, factual_max_new_tokens=48, num_hist=200, forced_batch_size=32)
    c.study.update(budget_s=0.0)
  else:
    # SmolLM2-135M in float32 on 2 CPU cores: sft and dft, two rates, two seeds, a small
    # evaluation: the pipeline on the real model, far too short to learn (the GPU scale is the
    # study).
    c.train.update(num_steps=4, global_batch_size=8, seq_len=256, minibatches=2)
    c.optimizer.update(warmup_steps=2)
    c.eval.update(num_examples=16, batch_size=16, max_new_tokens=80, num_general=16,
                  num_factual=16, factual_max_new_tokens=32, num_hist=16, forced_batch_size=8)
    c.study.update(run_arms="sft,dft", lr_grid=(3e-5, 1e-4), seeds=2, eval_every=2,
                   ood_examples=16, val_examples=16)

  if "smoke" in variants:
    # Same code path, tiny model (vocabulary 320: the arithmetic rows are ~280 tokens) and budget.
    c.model.update(name=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "tests", "fixtures", "tiny_llama"), lm_head_chunk=256)
    c.data.update(max_length=384, max_rows=128)
    c.train.update(num_steps=2, global_batch_size=8, seq_len=512, minibatches=2)
    c.optimizer.update(warmup_steps=1)
    c.eval.update(num_examples=8, batch_size=8, max_new_tokens=8, num_general=8, num_factual=8,
                  factual_max_new_tokens=8, num_hist=8, forced_batch_size=8)
    c.study.update(run_arms="sft,dft", lr_grid=(1e-3, 3e-3), seeds=2, eval_every=1,
                   ood_examples=8, val_examples=8, resamples=200,
                   out=os.path.join("runs", "scanner_smoke"))
    for regime in REGIME_SETS:
      c.study.regime_sets[regime].max_new_tokens = 8
  return c
