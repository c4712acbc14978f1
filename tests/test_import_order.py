"""`pcallama` is registered with transformers whatever a process imports first.

Each case runs in a fresh interpreter of this environment, so the installed ``.pth`` hook is what
registers the type: a library that imports a transformers submodule first (the auto modules then
load from inside a half-executed ``modeling_llama``) must still end up able to load a PcaLlama
checkpoint through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama

from plugin.modeling import PcaLlamaForCausalLM

pytestmark = pytest.mark.slow

FIRST_IMPORTS = {
    "llama-submodule-first": "import transformers.models.llama.modeling_llama",
    "llama-from-import-first": "from transformers.models.llama import modeling_llama",
    "modeling-utils-first": "import transformers.modeling_utils",
    "transformers-first": "import transformers",
    "plugin-first": "import plugin",
    "llamafactory-first": "import llamafactory.model.loader",
    "opencompass-first": "import opencompass.models",
    "peft-first": "import peft",
}

LOAD = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
print("LOADED", type(model).__name__, model.get_kv_ranks()["key"][0][0])
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    # From a neutral directory: the repository root on sys.path would hide a missing .pth install.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          cwd="/", env=environment, check=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("import-order") / "tiny"
    model = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"))
    model.set_kv_budget(0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("first", list(FIRST_IMPORTS), ids=list(FIRST_IMPORTS))
def test_checkpoint_loads_whatever_is_imported_first(checkpoint: Path, first: str) -> None:
    proc = _python(FIRST_IMPORTS[first] + "\n" + LOAD.format(path=str(checkpoint)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED PcaLlamaForCausalLM 8" in proc.stdout  # head_dim 16 at 50%: the saved ranks came back
    assert "register() failed" not in proc.stderr


def test_a_failed_registration_says_how_to_recover() -> None:
    code = """
import os, sys, types
os.environ.pop("MKV_DISABLE_IMPORT_HOOK")
broken = types.ModuleType("plugin.registration")
def register():
    raise ImportError("simulated")
broken.register = register
sys.modules["plugin.registration"] = broken
import plugin._import_hook as hook
hook.install()
from transformers import AutoModelForCausalLM
print("REGISTERED", hook.is_registered())
"""
    proc = _python(code, MKV_DISABLE_IMPORT_HOOK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REGISTERED False" in proc.stdout
    assert "register() failed: ImportError: simulated" in proc.stderr
    assert "plugin.register()" in proc.stderr


def test_register_by_hand_recovers(checkpoint: Path) -> None:
    code = ("import plugin; plugin.register()\n" + LOAD.format(path=str(checkpoint)))
    proc = _python(code, MKV_DISABLE_IMPORT_HOOK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED PcaLlamaForCausalLM" in proc.stdout


def test_hook_costs_no_heavy_import_at_start() -> None:
    proc = _python("import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
