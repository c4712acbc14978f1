"""`pcallama` is registered with transformers whatever a process imports first.

Each case runs in a fresh interpreter of this environment, so the installed ``.pth`` hook is what
registers the type: a library that imports a transformers submodule first (the auto modules then
load from inside a half-executed ``modeling_llama``), or a ``plugin`` submodule that loads transformers
from inside itself (``plugin.attention``), must still end up able to load a PcaLlama checkpoint
through ``AutoModelForCausalLM``.  Every submodule of ``plugin`` is a case of its own, found by walking
the package's files (so a new module is covered without editing this test), one interpreter per case:
two imports in one interpreter would hide the order effect of the second.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama

import plugin
from plugin.modeling import PcaLlamaForCausalLM

pytestmark = pytest.mark.slow

# The libraries' modules on the way to the Llama model (each imports transformers' Llama code or the auto
# classes that load it), as LLaMA-Factory, OpenCompass and PEFT reach them.
FIRST_IMPORTS = {
    "llama-submodule-first": "import transformers.models.llama.modeling_llama",
    "llama-from-import-first": "from transformers.models.llama import modeling_llama",
    "llama-class-first": "from transformers import LlamaForCausalLM",
    "modeling-auto-first": "import transformers.models.auto.modeling_auto",
    "modeling-utils-first": "import transformers.modeling_utils",
    "transformers-first": "import transformers",
    "plugin-first": "import plugin",
    "llamafactory-first": "import llamafactory.model.loader",
    "llamafactory-longlora-first": "import llamafactory.model.model_utils.longlora",
    "llamafactory-chat-first": "import llamafactory.chat.hf_engine",
    "llamafactory-api-first": "import llamafactory.api.app",
    "opencompass-first": "import opencompass.models",
    "opencompass-hf-first": "import opencompass.models.huggingface_above_v4_33",
    "peft-first": "import peft",
    "peft-lora-first": "import peft.tuners.lora",
}


def plugin_submodules() -> list[str]:
    """Every module below ``plugin``, from the package's files (nothing is imported to find them)."""
    names, folders = [], [(list(plugin.__path__), "plugin.")]
    while folders:
        path, prefix = folders.pop()
        for info in pkgutil.iter_modules(path, prefix):
            names.append(info.name)
            if info.ispkg:
                folders.append(([os.path.join(path[0], info.name.rsplit(".", 1)[1])], info.name + "."))
    return sorted(names)


PLUGIN_MODULES = plugin_submodules()

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


def _assert_loads(first: str, checkpoint: Path) -> None:
    proc = _python(first + "\n" + LOAD.format(path=str(checkpoint)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED PcaLlamaForCausalLM 8" in proc.stdout  # head_dim 16 at 50%: the saved ranks came back
    assert "register() failed" not in proc.stderr


@pytest.mark.parametrize("first", list(FIRST_IMPORTS), ids=list(FIRST_IMPORTS))
def test_checkpoint_loads_whatever_is_imported_first(checkpoint: Path, first: str) -> None:
    _assert_loads(FIRST_IMPORTS[first], checkpoint)


@pytest.mark.parametrize("module", PLUGIN_MODULES)
def test_checkpoint_loads_after_any_plugin_submodule(checkpoint: Path, module: str) -> None:
    _assert_loads(f"import {module}", checkpoint)


def test_the_walk_finds_the_modules_that_broke_loading() -> None:
    # plugin.attention imported first once left pcallama unregistered; the walk reaches subpackages too.
    assert {"plugin.attention", "plugin.modeling", "plugin.cache.quantize", "plugin.families.mistral",
            "plugin.commands.eval"} <= set(PLUGIN_MODULES)
    assert len(PLUGIN_MODULES) == len(set(PLUGIN_MODULES)) > 40


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
