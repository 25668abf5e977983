"""Shows what the loss sees: rendered examples with trained spans marked, counts, packing stats.

  python -m dft_jax.data.inspect [--config=configs/default.py] [--config.data.source=FILE] [--num=3]
                                 [--tokenizer=HF_TOKENIZER_DIR]

Trained tokens (the targets the loss is computed on) are shown green on a terminal and between
[[ and ]] otherwise (--color=always|never|auto). The packing line comes from the real train
iterator at config.train.seq_len / global_batch_size.
"""
import itertools
import sys

from dft_jax import cli
from dft_jax.data import formats
from dft_jax.data import mixture
from dft_jax.data import pipeline
from dft_jax.data import sources
from dft_jax.errors import DataError

MARKS = {False: ("[[", "]]"), True: ("\033[1;32m", "\033[0m")}


def mark_spans(tokenizer, ids, trained, color=False):
  """The decoded example with each run of trained tokens wrapped in MARKS[color]."""
  opening, closing = MARKS[color]
  out = []
  for flag, run in itertools.groupby(zip(ids, trained), key=lambda x: bool(x[1])):
    text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
    out.append(f"{opening}{text}{closing}" if flag else text)
  return "".join(out)


def report(config, tokenizer, *, num=3, color=False):
  """The inspection text for `config` (data, train blocks) with `tokenizer`: the first `num` rows
  of the source (of each source of a mixture) with their trained spans marked, then the train
  iterator's summary (a mixture's: each source's weight and share) and its first batch."""
  data_cfg = config.data
  mixture.validate(data_cfg)
  opening, closing = MARKS[color]
  lines = [f"trained tokens {opening}marked{closing}"]
  if mixture.is_mixture(data_cfg):
    for i, (entry, name) in enumerate(zip(data_cfg.sources, mixture.source_names(data_cfg))):
      cfg = mixture.source_config(data_cfg, entry)
      lines.append(f"data.sources[{i}] {name}: {cfg.source} format={cfg.format} "
                   f"weight={entry['weight']:g}")
      lines += _marked_rows(cfg, tokenizer, num, color)
  else:
    lines.append(f"data.source={data_cfg.source} format={data_cfg.format}")
    lines += _marked_rows(data_cfg, tokenizer, num, color)
  it = pipeline.make_train_iterator(
      data_cfg, tokenizer, seq_len=config.train.seq_len,
      global_batch_size=config.train.global_batch_size, seed=config.train.seed,
      max_segments=config.model.max_segments, process_index=0, process_count=1)
  batch = next(it)
  lines.append("--- " + it.summary())
  for b, seg in enumerate(batch["segment_ids"][:4]):
    lengths = [int((seg == s).sum()) for s in range(1, seg.max() + 1)]
    lines.append(f"first batch, row {b}: segments of {lengths} tokens, {int((seg == 0).sum())} "
                 f"padding, {int(batch['loss_mask'][b].sum())} loss tokens")
  return "\n".join(lines)


def _marked_rows(data_cfg, tokenizer, num, color):
  """The first `num` rows of data_cfg's source, each as a header line and its marked text."""
  source = sources.load_source(data_cfg, streaming=data_cfg.streaming)
  encoder = formats.Encoder(data_cfg, tokenizer, source.locate)
  with source.reading():
    rows = list(itertools.islice(source.dataset, num))
  lines = []
  for i, row in enumerate(rows):
    ids, trained = encoder.encode(row, i)
    lines += [f"--- {source.locate(i)}: {len(ids)} tokens, {sum(trained)} trained",
              mark_spans(tokenizer, ids, trained, color)]
  return lines


def read_tokenizer(config, tokenizer_dir=None):
  """The tokenizer of `tokenizer_dir`, else config.model.name's (read without its weights), else
  config.model.tokenizer's."""
  from dft_jax import models  # pylint: disable=g-import-not-at-top
  from dft_jax.models import hf, loader  # pylint: disable=g-import-not-at-top
  if tokenizer_dir:
    return hf.read_tokenizer(tokenizer_dir)
  tokenizer = models.read(config.model.name)[2]
  if tokenizer is None and config.model.get("tokenizer"):
    tokenizer = loader.tokenizer_for(config.model, None)
  if tokenizer is None:
    raise DataError(f"model.name={config.model.name!r} comes with no tokenizer; pass --tokenizer")
  return tokenizer


def main(argv):
  """Prints the report for --config, with config.model.name's tokenizer or --tokenizer's."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  tokenizer = read_tokenizer(flags_.config, flags_.tokenizer)
  color = {"always": True, "never": False, "auto": sys.stdout.isatty()}[flags_.color]
  print(report(flags_.config, tokenizer, num=flags_.num, color=color), flush=True)


def define_flags(argv):
  cli.define_config(argv)
  cli.define("integer", "num", 3, "examples to print")
  cli.define("string", "tokenizer", None, "a saved HF tokenizer folder (default: "
             "config.model.name's tokenizer)")
  cli.define("enum", "color", "auto", "mark trained spans with ANSI colours (auto: on a "
             "terminal)", enum_values=["auto", "always", "never"])


def cli_main(argv=None):
  """`python -m dft_jax.data.inspect ARGS`. Flags are defined here, not at import, so importing
  this module defines no global flags."""
  cli.prepare_process()
  argv = sys.argv if argv is None else argv
  define_flags(argv)
  cli.run(main, argv, doc=__doc__, sections=("model", "data", "train"))


if __name__ == "__main__":
  cli_main()
