"""The committed files speak only of the product: no absolute path of a development machine (its
home, its work or scratch folders) and no reference to this project's issue tracker by number.

Upstream citations stay: another project's issue or pull request is written `owner/repo#N`.
"""
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).parent.parent

# A path rooted at a machine's home or work folders (/root, /home/NAME, /Users/NAME, /work, /mnt,
# /scratch, ...), not a relative one (`a/home/b`) and not a user-relative one (`~/...`).
ROOTED = r"(?<![\w.~$}/-])/"
MACHINE_PATH = re.compile(ROOTED + r"(?:root|home|Users|work|mnt|scratch|workspace|content)/[\w.-]"
                          + r"|[A-Za-z]:\\\\?Users\\")
# In data (results, fixtures) a scratch path too: where a file once lay on the machine that wrote it.
SCRATCH_PATH = re.compile(ROOTED + r"(?:tmp|var/folders|private/var)/[\w.-]")
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv")
# "issue 16", "issues 15 and 16", "Issue #9", a bare "#20"; `owner/repo#N` is a citation.
# A six-digit "#RRGGBB" is a colour, not an issue.
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|(?<![\w/.#&-])#(?![0-9a-f]{6}\b)\d+\b",
                          re.IGNORECASE)
# Citations of other projects written otherwise: (path, text on the line).
CITATIONS = {("dft_jax/models/attention.py", "jax PR #39521")}
THIS_FILE = "tests/test_repository.py"  # its patterns and examples name what they look for


def committed_text_files():
  """(path, text) of every file git tracks that reads as UTF-8 text."""
  names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                         text=True).stdout.split("\0")
  for name in filter(None, names):
    data = (REPO / name).read_bytes() if (REPO / name).is_file() else b""
    try:
      yield name, data.decode("utf-8") if b"\0" not in data[:8192] else None
    except UnicodeDecodeError:
      continue


def offending_lines(files):
  """'path:line: text' of each line naming a machine path or an issue number."""
  found = []
  for name, text in files:
    if text is None or name == THIS_FILE:
      continue
    patterns = [MACHINE_PATH, ISSUE_NUMBER]
    if name.endswith(DATA_SUFFIXES):
      patterns.append(SCRATCH_PATH)
    for number, line in enumerate(text.splitlines(), 1):
      if any(p.search(line) for p in patterns) and not any(
          name == path and cited in line for path, cited in CITATIONS):
        found.append(f"{name}:{number}: {line.strip()[:160]}")
  return found


def test_no_machine_path_or_issue_number_is_committed():
  files = list(committed_text_files())
  assert len(files) > 100  # git listed the repository
  found = offending_lines(files)
  assert not found, "\n".join(found)


@pytest.mark.parametrize("line,offends", [
    ('  "_name_or_path": "/work/venv/lib/python3.11/site-packages/x",', True),
    ("HF_HUB_OFFLINE=1 /root/venv/bin/python make.py", True),
    ("see /home/alice/runs/dft", True),
    ("C:\\Users\\alice\\runs", True),
    ("the targets of the performance issue (#16)", True),
    ("issues 15 and 16", True),
    ("Issue #9: scaling", True),
    ("its PRs huggingface/trl#4802 and huggingface/trl#5823", False),
    ("yongliang-wu/DFT#27", False),
    ("tests/fixtures/home/x and ~/.cache/dft_jax", False),
    ("color='#1f77b4'  # 3 layers", False),
    ('ax.axvline(x, color="#999999")', False),
    ("see #123456 and #12", True),
    ("lm_head/work/x", False),
])
def test_the_check_finds_what_it_should(line, offends):
  assert bool(offending_lines([("README.md", line)])) == offends


def test_scratch_paths_count_in_data_files_only():
  line = '"parts": ["/tmp/h200_a.json"]'
  assert offending_lines([("benchmarks/results/x.json", line)])
  assert not offending_lines([("benchmarks/run_gpu.sh", "OUT=${OUT:-/tmp/dft_jax_bench}")])
