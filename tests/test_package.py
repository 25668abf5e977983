"""The installable package: pyproject.toml's dependencies are requirements.txt's, every subpackage
and the config files are in it, and an installed copy runs its commands from another folder."""
import os
import pathlib
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def requirement_lines(section):
  """The requirements of requirements.txt's runtime part (before '# Tests') or test part."""
  text = (ROOT / "requirements.txt").read_text()
  runtime, _, tests = text.partition("# Tests")
  lines = [re.sub(r"#.*", "", line).strip() for line in (runtime if section == "runtime" else
                                                         tests).splitlines()]
  return sorted(line for line in lines if line)


def pyproject():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_are_requirements_txt():
  project = pyproject()["project"]
  extras = project["optional-dependencies"]
  assert sorted(project["dependencies"] + extras["wandb"]) == requirement_lines("runtime")
  assert sorted(extras["test"]) == requirement_lines("tests")


def test_every_subpackage_and_the_configs_are_packaged():
  setup = pyproject()["tool"]["setuptools"]
  found = sorted(".".join(p.parent.relative_to(ROOT).parts)
                 for p in (ROOT / "dft_jax").rglob("__init__.py"))
  configs = sorted("dft_jax." + ".".join(p.relative_to(ROOT).parts)
                   for p in [ROOT / "configs", *(ROOT / "configs").glob("*/")] if p.is_dir())
  assert sorted(setup["packages"]) == sorted(found + configs)
  assert setup["package-dir"] == {"dft_jax.configs": "configs"}


@pytest.mark.slow
def test_installed_package_runs_its_commands_from_another_folder(tmp_path):
  """A wheel built from the clone, installed apart from it: `dft_jax COMMAND --help` and
  `--config=configs/default.py:gpu` (the packaged config files) work from an empty folder."""
  wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "-q", "-w", str(wheels), str(ROOT)], check=True, capture_output=True,
                 timeout=600)
  wheel = next(wheels.glob("dft_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert {"dft_jax/configs/default.py", "dft_jax/configs/study.py",
          "dft_jax/configs/paper/psft_openr1_qwen25_7b.py", "dft_jax/evaluate/sets.py"} <= set(names)
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(site), str(wheel)], check=True, capture_output=True, timeout=600)
  env = dict(os.environ, PYTHONPATH=str(site))
  def command(*argv):
    return subprocess.run([sys.executable, str(site / "bin" / "dft_jax"), *argv], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  done = command("train", "--config=configs/default.py:gpu", "--help")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "train.global_batch_size=32" in done.stdout  # the gpu variant, read from the package
  assert "log.wandb.mode=online" in done.stdout
  for name in ("evaluate", "generate", "export", "inspect", "study", "compare"):
    done = command(name, "--help")
    assert done.returncode == 0 and "flags:" in done.stdout, (name, done.stderr[-2000:])
  done = command("tune")
  assert done.returncode == 2 and "unknown command 'tune'" in done.stderr
  imported = subprocess.run([sys.executable, "-c", "import dft_jax, sys; print(dft_jax.__file__)"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert imported.stdout.startswith(str(site))
