#!/usr/bin/env bash
# The checks only a CUDA GPU shows, in one run of under 8 minutes on an H100/H200:
#   1. the CUDA tests (tests/test_cuda.py: bf16, SDPA, the projected cache on the GPU);
#   2. benchmarks/gpu_check.py: bf16/SDPA exactness, 20 bf16 distillation steps, decode at 8k and 32k
#      context for the full cache and 50% / 25% (tokens/s, peak CUDA memory), written to
#      $OUT/gpu_check.json and to the "GPU check" section of docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh                  # on a CUDA machine where this project is installed
#   OUT=/tmp/x bash benchmarks/gpu_check.sh       # JSON and logs elsewhere (default outputs/gpu_check)
#
# On a machine whose Python lacks the pinned stack (the lent device: transformers 5.x, no network),
# first run `bash benchmarks/gpu_wheels.sh` here: it downloads the pinned wheels into .whl/, which
# this script installs into /tmp/site when it finds them (carry .whl along).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
set +e
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
tests=${PIPESTATUS[0]}
set -e
timeout 330 "$PY" -m benchmarks.gpu_check --out "$OUT/gpu_check.json" --write-docs "$@" 2>&1 | tee "$OUT/gpu_check.log"
cp docs/benchmarks.md "$OUT/benchmarks.md"
exit "$tests"
