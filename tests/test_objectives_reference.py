"""Objectives that read the frozen reference (starting) model: on the fused head in the train step
(the same numbers as the checkpointed head), and with the reference's log-probabilities
precomputed once over the data (objective.ref_logp='precomputed'): the same losses as the
reference's forward every step, no reference model in memory, an exact resume."""
import json

import jax
import numpy as np
import pytest

from dft_jax import objectives, reference_logp, train
from dft_jax.data.testing import default_config
from dft_jax.errors import ConfigError
from objectives_testlib import golden_fixture, run_train_steps

TINY = golden_fixture().TINY


@pytest.mark.parametrize("objective", [
    pytest.param(dict(name="asft"), marks=pytest.mark.slow),
    pytest.param(dict(name="iw_sft"), marks=pytest.mark.slow),
    pytest.param(dict(name="dft_seq"), marks=pytest.mark.slow),
    pytest.param(dict(name="dft", kl_coef=0.1), marks=pytest.mark.slow)],
                         ids=lambda o: o["name"] + ("+kl" if "kl_coef" in o else ""))
def test_fused_step_equals_checkpointed(objective):
  """ASFT's KL over the vocabulary from the reference's chunk logits in the fused head's loop,
  iw-SFT's and DFT-seq's sequence gates from a forward-only pass of the head: the fused step's
  losses, metrics and parameters are the checkpointed step's."""
  (fused_metrics, fused_params), (ref_metrics, ref_params) = (
      run_train_steps(objective, lm_head_impl=impl, microbatches=2)
      for impl in ("fused", "checkpointed"))
  for got, want in zip(fused_metrics, ref_metrics):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)
  for got, want in zip(jax.tree.leaves(fused_params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_precomputed_needs_a_target_reference_and_no_distribution():
  for cfg, what in ((dict(name="asft"), "compares whole distributions"),
                    (dict(name="dft"), "reads no reference log-probability")):
    with pytest.raises(ConfigError, match=f"objective.ref_logp='precomputed'.*{what}"):
      objectives.validate(dict(cfg, ref_logp="precomputed"))
  setting = objectives.validate(dict(name="iw_sft", ref_logp="precomputed"))
  assert "ref_logp" in setting.needs and not setting.needs_reference
  assert objectives.validate(dict(name="iw_sft")).needs_reference


def test_documents_and_their_keys():
  """A document is a run of one segment id > 0; its key is its tokens' alone (where it sits in
  a row does not matter)."""
  segment_ids = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  assert list(reference_logp.documents(segment_ids)) == [(0, 0, 2), (0, 2, 5), (1, 0, 6)]
  tokens = np.array([5, 6, 7])
  assert reference_logp.document_key(tokens) == reference_logp.document_key(
      np.array([9, 5, 6, 7])[1:])
  assert reference_logp.document_key(tokens) != reference_logp.document_key(tokens[::-1])


def tiny_run_config(tmp_path, **objective):
  """The train job on the tiny Llama and a small jsonl file (4 steps, checkpoints every 2)."""
  c = default_config()
  c.model.update(name=TINY, lm_head_chunk=96, remat="none", lm_head_impl="fused")
  rows = tmp_path / "rows.jsonl"
  rng = np.random.default_rng(0)
  with open(rows, "w") as f:
    for _ in range(48):
      a, b = (int(x) for x in rng.integers(1, 30, size=2))
      f.write(json.dumps({"prompt": f"What is {a} + {b}?",
                          "response": f"{a} + {b} = {a + b}. #### {a + b}"}) + "\n")
  c.data.update(source=str(rows), max_length=64)
  c.train.update(seq_len=64, global_batch_size=8, num_steps=4, microbatches=1)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=0, schedule="constant")
  c.checkpoint.update(every_steps=2, async_save=False)
  c.eval.update(before=False, after=False)
  c.log.progress = False
  for key, value in objective.items():
    c.objective[key] = value
  return c


def read_jsonl(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [dict(name="iw_sft"), dict(name="dft", kl_coef=0.2)],
                         ids=["iw_sft", "dft+kl"])
def test_precomputed_reference_gives_the_losses_of_its_forward_and_resumes_exactly(
    tmp_path, objective):
  """The train job with the reference's log-probabilities precomputed once over the data trains
  as the one running the reference's forward every step (the same losses, weights and KL
  within float32 rounding: documents are packed differently in the pass and in the steps); a run
  stopped after 2 steps and resumed equals the uninterrupted one bit for bit; the table stays in
  the run folder."""
  forward = tiny_run_config(tmp_path, **objective)
  train.train_and_evaluate(forward, str(tmp_path / "forward"))
  straight = tiny_run_config(tmp_path, ref_logp="precomputed", **objective)
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  assert (tmp_path / "straight" / reference_logp.FILE).exists()
  a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("forward", "straight"))
  keys = ["grad_norm", "nll"] + [k for k in a[0] if k.startswith(("loss", "iw_sft/", "kl_"))]
  assert len(keys) >= 5  # the losses of the terms, and the weights or the k3 estimate
  for ra, rb in zip(a, b):
    for key in keys:
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7, err_msg=key)
  first = tiny_run_config(tmp_path, ref_logp="precomputed", **objective)
  first.train.num_steps = 2
  train.train_and_evaluate(first, str(tmp_path / "resumed"))
  train.train_and_evaluate(straight, str(tmp_path / "resumed"))
  c = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["step"] for r in c] == [1, 2, 3, 4]
  for rb, rc in zip(b, c):
    for key in keys:
      assert rb[key] == rc[key], (rb["step"], key)
