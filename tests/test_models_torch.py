"""Every family against live transformers: fresh random weights (not the fixtures'), built by
transformers from make_golden.FAMILIES' configs, saved, loaded by us; logits (max |diff| <= 1e-4
in float32), greedy tokens, the MoE load-balancing loss, and the export read back by transformers.

Needs torch (`pip install torch==2.13.0`, the CPU build is enough); without it the module is
skipped and tests/test_models.py checks the same against the golden fixtures.
"""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: live transformers parity needs it (the golden "
    "fixtures in tests/test_models.py stand in)")

from dft_jax import models  # noqa: E402  pylint: disable=wrong-import-position
from fixtures import make_golden  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("family", list(make_golden.FAMILIES))
def test_live_parity_with_transformers(family, tmp_path):
  seed = 1000 + list(make_golden.FAMILIES).index(family)
  theirs = make_golden.build(family, seed)
  tokens = np.random.RandomState(seed).randint(0, make_golden.VOCAB, (2, make_golden.SEQ))
  golden = make_golden.reference(theirs, tokens.astype(np.int32))
  theirs.save_pretrained(tmp_path)
  ours, _ = models.load(str(tmp_path))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), golden["logits"], atol=1e-4,
                             rtol=0)
  np.testing.assert_array_equal(make_golden.ours_greedy(ours, tokens[:, :make_golden.PROMPT]),
                                golden["greedy"])
  if "aux_loss" in golden:
    _, aux = ours.hidden_states_and_router_loss(jnp.asarray(tokens),
                                                segment_ids_BxT=jnp.asarray(golden["aux_mask"]))
    np.testing.assert_allclose(float(aux), float(golden["aux_loss"]), rtol=1e-5)
  diff, same_greedy = make_golden.check_export(ours, None, golden)
  assert diff <= 1e-4 and same_greedy
