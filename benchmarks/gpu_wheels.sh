#!/usr/bin/env bash
# Downloads the wheels benchmarks/gpu_check.sh needs on a CUDA machine that has torch but not this
# project's pinned stack (Python 3.12, no network there), into .whl/ (git-ignored; carry it along).
# The versions are requirements.txt's pins (tokenizers: the one installed beside them here); torch, numpy,
# safetensors, tqdm and pytest are expected there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
pins=$(grep -oE '^(transformers|huggingface-hub)==[0-9.]+' requirements.txt)
tokenizers=$("$PY" -c "import tokenizers; print(tokenizers.__version__)" 2>/dev/null || echo 0.22.2)
pins="$pins tokenizers==$tokenizers"
[ "$(echo "$pins" | wc -w)" -eq 3 ] || { echo "pins not found in requirements.txt: $pins" >&2; exit 1; }
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls -la .whl
