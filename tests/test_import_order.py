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

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama

import plugin
from plugin.model.modeling import PcaLlamaForCausalLM

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


# One fresh interpreter imports torch (and the libraries below it that no case is about), then forks a child
# per case: each child starts with the .pth hook installed and nothing of transformers, plugin, PEFT,
# LLaMA-Factory or OpenCompass imported, as a fresh interpreter does, without paying torch's import again.
ZYGOTE = """
import json, os, sys, traceback
import numpy, safetensors.torch, tokenizers, torch  # noqa: F401  (what every case imports first anyway)
HOOKS = ("plugin", "plugin.model", "plugin.model.import_hook", "plugin.model.post_import", "llamafactory_ext",
         "llamafactory_ext._import_hook")
assert not [name for name in sys.modules if name.split(".")[0] in ("transformers", "plugin", "peft", "llamafactory",
            "llamafactory_ext", "opencompass") and name not in HOOKS], "the zygote must not import what the cases order"
for line in sys.stdin:
    code, out = json.loads(line)
    pid = os.fork()
    if pid == 0:
        with open(out, "w") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
            try:
                exec(compile(code, "<case>", "exec"), {"__name__": "__main__"})
                code_out = 0
            except BaseException:
                traceback.print_exc()
                code_out = 1
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code_out)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def zygote() -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd="/", env=environment)
    yield process
    process.stdin.close()
    process.wait(timeout=60)


def _forked(zygote: subprocess.Popen, code: str, tmp_path: Path) -> tuple[int, str]:
    """(exit code, combined output) of `code` run in a child of the zygote."""
    out = tmp_path / "case.log"
    zygote.stdin.write(json.dumps([code, str(out)]) + "\n")
    zygote.stdin.flush()
    status = json.loads(zygote.stdout.readline())
    return status, out.read_text()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("import-order") / "tiny"
    model = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"))
    model.set_kv_budget(0.5)
    model.save_pretrained(out)
    return out


def _assert_loads(zygote: subprocess.Popen, first: str, checkpoint: Path, tmp_path: Path) -> None:
    status, output = _forked(zygote, first + "\n" + LOAD.format(path=str(checkpoint)), tmp_path)
    assert status == 0, output[-3000:]
    assert "LOADED PcaLlamaForCausalLM 8" in output  # head_dim 16 at 50%: the saved ranks came back
    assert "register() failed" not in output


@pytest.mark.parametrize("first", list(FIRST_IMPORTS), ids=list(FIRST_IMPORTS))
def test_checkpoint_loads_whatever_is_imported_first(zygote, checkpoint: Path, first: str, tmp_path: Path) -> None:
    _assert_loads(zygote, FIRST_IMPORTS[first], checkpoint, tmp_path)


@pytest.mark.parametrize("module", PLUGIN_MODULES)
def test_checkpoint_loads_after_any_plugin_submodule(zygote, checkpoint: Path, module: str, tmp_path: Path) -> None:
    _assert_loads(zygote, f"import {module}", checkpoint, tmp_path)


def test_a_forked_case_starts_as_fresh_as_a_new_interpreter(zygote, tmp_path: Path) -> None:
    """What the cases rely on: no library the cases put in order is there yet, and the .pth hook is."""
    code = ("import sys\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'plugin', 'peft', 'llamafactory', 'opencompass') and m not in "
            "('plugin', 'plugin.model', 'plugin.model.import_hook', 'plugin.model.post_import'))\n"
            "print('HEAVY', heavy)\nprint('HOOK', any(type(f).__name__ == 'PostImportFinder' for f in sys.meta_path))")
    status, output = _forked(zygote, code, tmp_path)
    assert status == 0, output
    assert "HEAVY []" in output and "HOOK True" in output
    assert _forked(zygote, "raise SystemExit(3)", tmp_path)[0] != 0  # a failing case is reported as failing


def test_the_walk_finds_the_modules_that_broke_loading() -> None:
    # plugin.attention imported first once left pcallama unregistered; the walk reaches subpackages too.
    assert {"plugin.attention", "plugin.model.modeling", "plugin.cache.quant_codec", "plugin.families.mistral",
            "plugin.commands.eval"} <= set(PLUGIN_MODULES)
    assert len(PLUGIN_MODULES) == len(set(PLUGIN_MODULES)) > 40


def test_a_failed_registration_says_how_to_recover() -> None:
    code = """
import os, sys, types
os.environ.pop("MKV_DISABLE_IMPORT_HOOK")
broken = types.ModuleType("plugin.model.registration")
def register():
    raise ImportError("simulated")
broken.register = register
sys.modules["plugin.model.registration"] = broken
import plugin.model.import_hook as hook
hook.install()
from transformers import AutoModelForCausalLM
print("REGISTERED", hook.is_registered())
"""
    proc = _python(code, MKV_DISABLE_IMPORT_HOOK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REGISTERED False" in proc.stdout
    assert "register() failed: ImportError: simulated" in proc.stderr
    assert "plugin.register()" in proc.stderr


def test_the_hooks_old_address_still_installs_it(checkpoint: Path) -> None:
    """A matryoshka_kv_hook.pth written before the hook moved to plugin.model.import_hook still registers."""
    code = ("import os\nos.environ.pop('MKV_DISABLE_IMPORT_HOOK')\n"
            "import plugin._import_hook as _h; _h.install()\n" + LOAD.format(path=str(checkpoint)))
    proc = _python(code, MKV_DISABLE_IMPORT_HOOK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED PcaLlamaForCausalLM" in proc.stdout


def test_register_by_hand_recovers(checkpoint: Path) -> None:
    code = ("import plugin; plugin.register()\n" + LOAD.format(path=str(checkpoint)))
    proc = _python(code, MKV_DISABLE_IMPORT_HOOK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED PcaLlamaForCausalLM" in proc.stdout


def test_hook_costs_no_heavy_import_at_start() -> None:
    proc = _python("import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
