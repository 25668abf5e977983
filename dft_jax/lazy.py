"""A module imported on first attribute access.

The objective registry (objectives.py) is read by the config files, which must load without jax
(`--help`, config checks and launch scripts stay fast); its functions use jax only when called.
"""
import importlib


class LazyModule:
  """`LazyModule("jax.numpy").exp` imports jax.numpy at that access, not before."""

  def __init__(self, name):
    self._name = name

  def __getattr__(self, attr):
    return getattr(importlib.import_module(self._name), attr)
