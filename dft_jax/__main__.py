"""`dft_jax COMMAND [flags]` (or `python -m dft_jax COMMAND [flags]`): every command, from any folder.

  dft_jax train     fine-tune with one objective, evaluate before and after (dft_jax.train)
  dft_jax evaluate  score a run folder or any model against a base (dft_jax.evaluate)
  dft_jax generate  sample replies (dft_jax.generate)
  dft_jax export    write a Hugging Face folder (dft_jax.export)
  dft_jax inspect   rendered examples with the trained spans marked (dft_jax.data.inspect)
  dft_jax study     every objective in two regimes of prior strength (dft_jax.experiments.scanner)
  dft_jax compare   runs side by side: one Markdown page with figures (dft_jax.compare)

`dft_jax COMMAND --help` lists the command's flags and config fields.
"""
import importlib
import sys

COMMANDS = {"train": "dft_jax.train", "evaluate": "dft_jax.evaluate.cli",
            "generate": "dft_jax.generate", "export": "dft_jax.export",
            "inspect": "dft_jax.data.inspect", "study": "dft_jax.experiments.scanner",
            "compare": "dft_jax.compare"}


def main():
  """Runs the command named by the first argument with the rest of sys.argv."""
  command = sys.argv[1] if len(sys.argv) > 1 else ""
  if command not in COMMANDS:
    known = command in ("-h", "--help", "help")
    print(__doc__.strip() if known else
          f"dft_jax: error: {'no command' if not command else f'unknown command {command!r}'}; "
          f"expected one of {', '.join(COMMANDS)} (dft_jax --help)",
          file=sys.stdout if known else sys.stderr)
    sys.exit(0 if known else 2)
  sys.argv[:] = [f"dft_jax {command}"] + sys.argv[2:]  # the command owns the process (stop signals)
  importlib.import_module(COMMANDS[command]).cli_main()


if __name__ == "__main__":
  main()
