"""The benchmarks' config: the main job's fields (configs/default.py) at the benchmark shape, plus a
`bench` section for what only a benchmark has (benchmarks/README.md).

  python benchmarks/train_step.py --config.model.remat=dots_attention_saveable   # one variant
  python benchmarks/train_step.py --config=configs/benchmark.py:smoke           # tiny, on a CPU
  python benchmarks/train_step.py --plan=h200 --out=DIR    # a plan of benchmarks/plans.py

A plan's variant is a name and a dict of overrides of these fields, {"model.remat": "..."}: what
`--config.model.remat=...` sets on the command line. Variants of this file (after ':'): gpu
(default) | smoke (tiny-qwen2, 128 tokens, float32: the CPU dry run).
"""
import ml_collections
from ml_collections.config_dict import placeholder

from dft_jax import config_files

# XLA:CPU compiles the tiny step faster without its LLVM optimisation passes (smoke runs only:
# their numbers are not measurements).
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def get_config(arg=None):
  variants = [a for a in (arg or "gpu").split(",") if a]
  c = config_files.load(config_files.DEFAULT, "gpu")
  c.model.update(name="preset:qwen2.5-1.5b", param_dtype="float32", compute_dtype="bfloat16",
                 remat="nothing_saveable", lm_head_chunk=4096, lm_head_impl="checkpointed")
  c.train.update(global_batch_size=4, seq_len=4096, microbatches=1, minibatches=1,
                 num_steps=1000)
  c.data.max_length = c.train.seq_len
  c.eval.update(batch_size=64, max_new_tokens=1024, temperature=1.0, top_p=1.0)

  # Every field has its meaning in the comment on its line.
  c.bench = ml_collections.ConfigDict(dict(
      name=placeholder(str),         # the record's name (a plan: the variant's name)
      framework="jax",               # jax (our train step) | torch (the transformers / peft
                                     # peer) | head (the LM head alone) | sampler (our KV-cache
                                     # sampler) | generate (transformers' generate)
      steps=10,                      # timed steps (train step, head) or timed runs (sampling)
      warmup=2,                      # steps (runs) before the timed ones
      doc_len=(256, 2048),           # documents of the random packed rows: lengths drawn in
                                     # [lo, hi]; (T, T): one document a row
      xla_flags="",                  # appended to XLA_FLAGS in this variant's process
      est_s=60,                      # a plan's expected wall time of this variant (process start
                                     # + init + compile + steps): the budget skips what won't fit
      group="",                      # "policy": competes for model.remat="best" in a plan
      liger=False,                   # torch: Liger's fused linear cross entropy head
      probe_batches=(),              # torch: afterwards one step at each batch, until one is OOM
      probe_seq_lens=(),             # torch: afterwards one step of one row at each length,
                                     # until one is OOM (the peer's longest row that fits)
      w_dtype="bfloat16",            # head: the head weight's dtype
      compare=False,                 # head: also the checkpointed head's gradients
      topk_method="blocks",          # lm_head.top_k_values: blocks (two stages) | lax
      prompt_len=256,                # sampler, generate: prompt tokens a row (eval.batch_size
                                     # rows, eval.max_new_tokens new tokens, eval.temperature)
      static_cache=False,            # generate: transformers' static KV cache
      hbm_bytes_per_s=placeholder(float),  # sampler: memory bandwidth of the bound (None: the
                                     # device's nominal, throughput.HBM_BYTES_PER_S)
      devices=1,                     # scaling: devices of the mesh (jax.devices()[:devices])
      layout="single",               # scaling: single | data | fsdp | data_fsdp (the mesh's name)
  ))

  for v in variants:
    if v == "gpu":
      pass
    elif v == "smoke":
      c.model.update(name="preset:tiny-qwen2", compute_dtype="float32", lm_head_chunk=64)
      c.train.update(global_batch_size=2, seq_len=128)
      c.data.max_length = 128
      c.lora.block_size = 16
      c.eval.update(batch_size=4, max_new_tokens=8)
      c.bench.update(doc_len=(16, 64), steps=3, warmup=1, xla_flags=SMOKE_XLA_FLAGS, est_s=20,
                     prompt_len=16)
    else:
      raise ValueError(f"configs/benchmark.py: unknown variant {v!r}; expected gpu or smoke")
  return c
