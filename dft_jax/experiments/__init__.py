"""Experiments built on dft_jax: `python -m dft_jax.experiments.scanner` (SFT vs DFT vs PSFT)."""
