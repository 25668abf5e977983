"""Step-for-step equality with the train step as it was before the objective registry: the losses
and parameters after 3 steps of every objective (tests/fixtures/make_step_golden.py recorded them
at commit aefadf7 in step_golden.json; "deft" since re-recorded, see the script)."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_step_golden", FIXTURES / "make_step_golden.py")
golden_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_lib)
GOLDEN = json.loads((FIXTURES / "step_golden.json").read_text())


def test_every_case_recorded():
  assert sorted(GOLDEN) == sorted(golden_lib.CASES)


FAST_CASES = ("sft", "dft", "dft_kl", "psft_k2")  # the rest in the slow tier


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(golden_lib.CASES)])
def test_three_steps_equal_recorded(case):
  now = golden_lib.run_case(golden_lib.CASES[case])
  np.testing.assert_allclose(now["losses"], GOLDEN[case]["losses"], rtol=2e-6, atol=1e-9)
  assert sorted(now["params"]) == sorted(GOLDEN[case]["params"])
  for name, (total, sumsq, projection) in GOLDEN[case]["params"].items():
    # sums can cancel: compare them on the scale of the parameter's norm (a real change of the
    # update moves them by ~1e-2 of it after 3 steps; float32 reordering by ~1e-7)
    scale = np.sqrt(sumsq)
    got_total, got_sumsq, got_projection = now["params"][name]
    assert abs(got_total - total) <= 1e-5 * scale, name
    assert abs(got_projection - projection) <= 1e-5 * scale, name
    np.testing.assert_allclose(got_sumsq, sumsq, rtol=1e-5, err_msg=name)
