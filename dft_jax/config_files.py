"""The config files (configs/*.py), loaded by path as ml_collections' `--config=FILE[:ARG]` does."""
import importlib.util
import os

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT = os.path.join(CONFIGS_DIR, "default.py")  # the main job's config
STUDY = os.path.join(CONFIGS_DIR, "study.py")      # the scanner study's


def load(path, arg=None):
  """The ConfigDict of `path`'s get_config(arg) (get_config() without arg); a relative path is
  taken under configs/."""
  path = os.path.join(CONFIGS_DIR, path)
  name = "dft_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ImportError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
