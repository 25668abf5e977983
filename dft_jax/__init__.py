"""dft_jax: fine-tuning language models with the SFT family of objectives (SFT, DFT, PSFT, ...) in JAX."""
