"""`python -m dft_jax.evaluate` (see cli.py)."""
from dft_jax.evaluate import cli

if __name__ == "__main__":
  cli.cli_main()
