"""Weighted mixtures of sources (data.sources): shares, exact resume, source ids, clear errors."""
import json
import statistics

import numpy as np
import pytest

from dft_jax import data
from dft_jax.data import mixture
from dft_jax.errors import ConfigError, DataError

T = 256
TAGS = ("alpha", "beta", "gamma")


def write_source(path, tag, n):
  """n rows {q, a} whose texts name `tag`."""
  path.write_text("".join(json.dumps({"q": f"{tag} question {i}?", "a": f"{tag} answer {i}."})
                          + "\n" for i in range(n)))
  return str(path)


@pytest.fixture
def mixed(cfg, tmp_path):
  """Three sources of 30 / 20 / 10 rows with weights 5 / 3 / 2, the second one streamed."""
  cfg.sources = tuple(
      dict(source=write_source(tmp_path / f"{tag}.jsonl", tag, n), weight=w, prompt_field="q",
           response_field="a", **({"streaming": True} if tag == "beta" else {}))
      for tag, n, w in zip(TAGS, (30, 20, 10), (5, 3, 2)))
  cfg.pack_window, cfg.shuffle_buffer = 500, 8
  return cfg


def make_iter(c, tokenizer, batch=1, process_index=0, process_count=1):
  return data.make_train_iterator(c, tokenizer, seq_len=T, global_batch_size=batch, seed=0,
                                  max_segments=64, process_index=process_index,
                                  process_count=process_count)


def examples_by_source(batch, tokenizer):
  """[(source id, decoded example)] of every segment of a batch."""
  out = []
  for r in range(len(batch["tokens"])):
    for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
      at = batch["segment_ids"][r] == s
      ids = set(batch["source_ids"][r][at].tolist())
      assert len(ids) == 1, "one source per example"
      out.append((ids.pop(), tokenizer.decode(batch["tokens"][r][at])))
  return out


def test_shares_of_examples_are_the_weights_within_sampling_error(tok, mixed):
  """3000 examples (6 whole windows): each source's count is Binomial(3000, w / sum(w)); every
  count within the two-sided bound whose family-wise false-alarm rate is 1e-4 (Bonferroni over the
  3 sources) of its mean, and every example carries its own source's id."""
  it = make_iter(mixed, tok)
  counts = np.zeros(3, np.int64)
  while it.window < 6:
    for source, text in examples_by_source(next(it), tok):
      counts[source] += 1
      assert TAGS[source] in text
  n, p = 6 * mixed.pack_window, np.array([5, 3, 2]) / 10
  assert counts.sum() == n
  z = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * len(p)))
  assert np.all(np.abs(counts - n * p) <= z * np.sqrt(n * p * (1 - p))), (counts, n * p)


def test_draws_follow_the_weights_and_the_seed_alone():
  p = np.array([0.5, 0.3, 0.2])
  a, b = mixture.draws(0, 3, 4000, p), mixture.draws(0, 3, 4000, p)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, mixture.draws(1, 3, 4000, p))
  assert not np.array_equal(a, mixture.draws(0, 4, 4000, p))
  z = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * len(p)))
  counts = np.bincount(a, minlength=3)
  assert np.all(np.abs(counts - 4000 * p) <= z * np.sqrt(4000 * p * (1 - p))), counts


@pytest.mark.parametrize("skip", [3, 9])
def test_resume_mid_mixture_yields_the_same_batches(tok, mixed, skip):
  """Across window boundaries, a streamed source among them."""
  mixed.pack_window = 24
  it = make_iter(mixed, tok, batch=4)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(12)]
  assert it.window > state["window"] + 1
  resumed = make_iter(mixed, tok, batch=4)
  resumed.restore(state)
  for want, got in zip(expected, [next(resumed) for _ in range(12)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_processes_share_a_mixed_global_batch_and_its_state(tok, mixed):
  mixed.pack_window = 24
  whole = make_iter(mixed, tok, batch=4)
  next(whole)
  state = whole.state()
  expected = next(whole)
  halves = []
  for p in range(2):
    part = make_iter(mixed, tok, batch=4, process_index=p, process_count=2)
    part.restore(state)
    halves.append(next(part))
  for key in expected:
    np.testing.assert_array_equal(expected[key], np.concatenate([h[key] for h in halves]))


def test_a_changed_source_of_a_mixture_is_named_on_resume(tok, mixed):
  it = make_iter(mixed, tok)
  state = it.state()
  path = mixed.sources[2]["source"]
  with open(path, "a") as f:
    f.write(json.dumps({"q": "gamma?", "a": "gamma."}) + "\n")
  with pytest.raises(DataError, match=f"^{path} has .* bytes appended"):
    make_iter(mixed, tok).restore(state)


def test_summary_shows_each_sources_weight_and_share(tok, mixed):
  it = make_iter(mixed, tok)
  summary = it.summary()
  assert summary.startswith("data mixture of 3 sources (data.sources), 500 examples drawn: ")
  for name, tag, weight in (("alpha", "alpha", "5 (50% of examples)"),
                            ("beta", "beta", "3 (30% of examples)"),
                            ("gamma", "gamma", "2 (20% of examples)")):
    drawn = it.stats["sources"][name]["examples"] / 500
    assert f"{name} = {mixed.sources[TAGS.index(tag)]['source']} (weight {weight}): " in summary
    assert f"{drawn:.1%} of the examples drawn" in summary


@pytest.mark.parametrize("change,message", [
    (dict(weight=0), "data.sources[1].weight=0: must be a finite number > 0"),
    (dict(weight=-2.0), "data.sources[1].weight=-2.0: must be a finite number > 0"),
    (dict(weight=float("nan")), "data.sources[1].weight=nan: must be a finite number > 0"),
    (dict(weight=None), "data.sources[1].weight=None: must be a finite number > 0"),
    (dict(chat_template="none"), "data.sources[1].chat_template: the chat template is the run's"),
    (dict(system_prompt="Be brief."), "data.sources[1].system_prompt: the system prompt is the "
                                      "run's"),
    (dict(promt_field="q"), "data.sources[1] has no field 'promt_field'; a source takes source, "
                            "weight, name, format"),
    (dict(name="alpha"), "data.sources[0] and data.sources[1] are both named 'alpha'"),
    (dict(name="a b"), "data.sources[1].name='a b': use letters, digits"),
])
def test_bad_sources_are_one_line_naming_the_entry(tok, mixed, change, message):
  entries = [dict(e) for e in mixed.sources]
  entries[1].update(change)
  mixed.sources = tuple(entries)
  with pytest.raises(ConfigError) as e:
    make_iter(mixed, tok)
  assert str(e.value).startswith(message)


def test_a_source_without_a_weight_or_with_a_holdout_is_refused(tok, mixed):
  entries = [dict(e) for e in mixed.sources]
  del entries[2]["weight"]
  mixed.sources = tuple(entries)
  with pytest.raises(ConfigError, match=r"^data.sources\[2\] \(.*gamma.jsonl\) has no weight"):
    make_iter(mixed, tok)
  del entries[2]
  mixed.sources, mixed.eval_holdout = tuple(entries), 5
  with pytest.raises(ConfigError, match="^data.eval_holdout=5 holds out rows of data.source"):
    make_iter(mixed, tok)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_source_with_no_usable_row_is_named(tok, mixed, tmp_path, streaming):
  empty = tmp_path / "blank.jsonl"
  empty.write_text("".join(json.dumps({"q": f"q{i}", "a": " "}) + "\n" for i in range(5)))
  mixed.sources = mixed.sources[:2] + (dict(source=str(empty), weight=1, prompt_field="q",
                                            response_field="a", streaming=streaming),)
  with pytest.raises(DataError, match=f"^no usable rows in {empty}: 5 rows read, 5 dropped "
                                      r"\(5 empty"):
    for _ in range(200):
      next(make_iter(mixed, tok))


def test_each_source_reads_its_own_format_and_fields(tok, mixed, tmp_path):
  chat = tmp_path / "chat.jsonl"
  chat.write_text("".join(json.dumps({"conv": [{"role": "user", "content": f"delta {i}?"},
                                                {"role": "assistant", "content": f"delta {i}."}]})
                          + "\n" for i in range(6)))
  mixed.sources = mixed.sources[:1] + (dict(source=str(chat), weight=1, format="messages",
                                            messages_field="conv"),)
  it = make_iter(mixed, tok, batch=8)
  seen = {source: text for source, text in examples_by_source(next(it), tok)}
  assert "alpha question" in seen[0] and "delta" in seen[1]


@pytest.mark.slow
@pytest.mark.parametrize("lm_head_impl", ["checkpointed", "fused"])
def test_the_step_reports_each_sources_tokens_and_mean_loss(tmp_path, lm_head_impl):
  """Against a float64 reference from the model's own per-token log-probabilities: DFT's per-token
  loss -p log p averaged over each source's loss tokens, and each source's token counts."""
  import jax  # pylint: disable=g-import-not-at-top
  from dft_jax import models, objectives, sharding  # pylint: disable=g-import-not-at-top
  from dft_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from test_train import TINY, tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path, model__lm_head_impl=lm_head_impl)
  config.data.sources = tuple(
      dict(source=write_source(tmp_path / f"{tag}.jsonl", tag, 12), weight=w, prompt_field="q",
           response_field="a") for tag, w in zip(TAGS, (1, 1, 2)))
  names = data.mixture.source_names(config.data)
  model, tokenizer = models.load(TINY, compute_dtype="float32")
  batch = next(data.make_train_iterator(config.data, tokenizer, seq_len=64, global_batch_size=8,
                                        seed=0, max_segments=64, process_index=0, process_count=1))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  setting = objectives.validate(config.objective)
  graphdef, state, frozen, tx, _ = step_lib.init_train_state(model, config, mesh, setting=setting)
  logp = np.asarray(step_lib.model_token_stats(model, batch, 96, setting.stats)["logp"],
                    np.float64)
  step = step_lib.make_train_step(graphdef, tx, config, mesh, step_lib.shardings_of(state),
                                  step_lib.shardings_of(frozen), setting=setting, sources=names)
  _, metrics = step(state, step_lib.global_batch(batch, mesh), frozen)
  metrics = jax.device_get(metrics)
  mask, per_token = batch["loss_mask"] > 0, -np.exp(logp) * logp
  for s, name in enumerate(names):
    mine = batch["source_ids"] == s
    assert metrics[f"source/{name}/tokens"] == np.sum(mine & (batch["segment_ids"] > 0))
    assert metrics[f"source/{name}/loss_tokens"] == np.sum(mine & mask) > 0
    np.testing.assert_allclose(metrics[f"source/{name}/loss"], per_token[mine & mask].mean(),
                               rtol=2e-5)


def test_inspect_shows_each_sources_rows_weight_and_share(tok, mixed):
  from dft_jax.data import inspect as data_inspect  # pylint: disable=g-import-not-at-top
  from dft_jax.data import testing  # pylint: disable=g-import-not-at-top
  config = testing.default_config()
  config.data = mixed
  config.train.seq_len = T
  text = data_inspect.report(config, tok, num=1)
  for i, (tag, weight) in enumerate(zip(TAGS, (5, 3, 2))):
    assert f"data.sources[{i}] {tag}: {mixed.sources[i]['source']} format=prompt_response " \
           f"weight={weight}" in text
    assert f"[[{tag} answer 0.<|im_end|>]]" in text
  assert f"alpha = {mixed.sources[0]['source']} (weight 5 (50% of examples)): 30 rows read" in text


def test_a_mixture_holds_no_rows_of_data_source_out(mixed, tmp_path):
  """data.source is not a mixture's data: scoring 'its held-out rows' would score rows of a file
  the run may have trained on whole (as one of its sources)."""
  from dft_jax.data import holdout  # pylint: disable=g-import-not-at-top
  mixed.source = mixed.sources[0]["source"]
  assert holdout.holdout_size(mixed, 30) == 0
  mixed.sources = ()
  assert holdout.holdout_size(mixed, 30) == 1  # 5 % of a file's rows otherwise
