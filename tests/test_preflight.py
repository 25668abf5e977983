"""Checks before loading: a wrong data or evaluation file, or a field name it lacks, is one line
naming the file, the row and the config field, before any model is loaded."""
import pytest

from dft_jax import models, preflight, train
from dft_jax.errors import DataError
from test_data import write_jsonl
from test_train import tiny_config


@pytest.fixture
def no_model_loading(monkeypatch):
  """Loading a model fails the test: every error must come before it."""
  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")
  monkeypatch.setattr(models, "load_from_config", refuse)
  monkeypatch.setattr(models, "load", refuse)


def test_training_data_field_errors_come_before_the_model(tmp_path, no_model_loading):
  rows = [{"question": f"{a} + 1?", "solution": f"#### {a + 1}"} for a in range(30)]
  config = tiny_config(tmp_path)
  config.data.update(source=write_jsonl(tmp_path / "mine.jsonl", rows), prompt_field="question")
  with pytest.raises(DataError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(e.value) == (
      f"row 0 of {config.data.source} has no field 'response': data reads the response from "
      "response_field='response'; the row's fields are 'question', 'solution'; name the "
      "response's field: --config.data.response_field=NAME")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_files_are_checked_before_the_model(tmp_path, no_model_loading):
  config = tiny_config(tmp_path)
  config.eval.update(before=True, math_file=str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match=r"eval.math_file='.*missing.jsonl': no such file"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.eval.math_file = write_jsonl(tmp_path / "test.jsonl", [{"question": "1+1?", "answer": 2}])
  with pytest.raises(DataError, match=r"eval.math_file reads the prompt from "
                     r"prompt_field='problem'.*--config.eval.math_file='.*test.jsonl,prompt_field"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_answer_field_is_checked_in_the_first_rows(tmp_path):
  rows = [{"prompt": "1 + 1?", "response": "#### 2", "final": "2"}] * 5 + [
      {"prompt": "2 + 2?", "response": "#### 4"}]
  config = tiny_config(tmp_path)
  config.data.update(source=write_jsonl(tmp_path / "mine.jsonl", rows), answer_field="final")
  with pytest.raises(DataError, match=r"row 5 of .*mine.jsonl has no field 'final'.*"
                     r"--config.data.answer_field=NAME"):
    preflight.check_data(config.data)


def test_loading_a_file_prints_no_library_progress(tmp_path, capfd):
  """The preflight opens every file: `datasets`' own 'Generating train split' bars stay off the
  console (the data summary line says what was read)."""
  rows = [{"prompt": f"{a} + 1?", "response": f"#### {a + 1}"} for a in range(30)]
  config = tiny_config(tmp_path)
  config.data.source = write_jsonl(tmp_path / "fresh.jsonl", rows)
  capfd.readouterr()
  preflight.check_data(config.data)
  assert "Generating" not in capfd.readouterr().err
