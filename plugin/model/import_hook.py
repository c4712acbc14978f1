"""Import hook that registers ``pcallama`` with transformers' Auto classes on first use.

``matryoshka_kv_hook.pth`` (installed into site-packages by setup.py / scripts/install.sh)
runs ``import plugin.model.import_hook as _h; _h.install()`` at every interpreter start of the
environment.  :func:`install` puts a :class:`~plugin.model.post_import.PostImportFinder` at the
front of ``sys.meta_path``, watching the modules of ``transformers``: after each one has
executed, once ``transformers.models.auto.configuration_auto`` and ``...modeling_auto`` exist
*and no transformers module is still executing*, it calls ``plugin.model.registration.register()``.
Then ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load PcaLlama checkpoints
in processes that never imported ``plugin``: LLaMA-Factory and its torchrun / deepspeed
children, OpenCompass subprocesses.

Registration waits for the outermost transformers import to finish because ``PcaLlama``
subclasses Llama's classes: when a library imports ``transformers.models.llama.modeling_llama``
first, the auto modules load from inside it, and registering at that moment would import a
half-executed ``modeling_llama`` ("cannot import name 'LlamaForCausalLM'").  For the same reason
it waits for every ``plugin`` module still executing: ``import plugin.attention`` loads transformers
from inside ``plugin.attention``, and registering then would import ``plugin.model.modeling``, which needs
the half-executed ``plugin.attention``; so the finder watches ``plugin``'s modules too and registers
once the outermost of them has finished.

Rules this module keeps:

* cheap: only the standard library's ``sys``, ``os``, ``contextlib`` and ``importlib`` are imported
  at interpreter start (no torch, no transformers, not even ``logging``);
* idempotent: ``install()`` may be called any number of times; ``register()`` is called at
  most once per process (successfully);
* never breaks interpreter start: ``install()`` catches everything and prints one line;
* errors are not swallowed silently: a missing ``plugin.model.registration`` module is ignored
  (the package may be partially installed), any other failure of ``register()`` is logged
  as a one-line warning that says how to recover (``import plugin; plugin.register()``).

Set ``MKV_DISABLE_IMPORT_HOOK=1`` to switch the hook off.
"""

from __future__ import annotations

import contextlib
import os
import sys

from plugin.model.post_import import PostImportFinder, module_executed

PACKAGES = ("transformers", "plugin")  # registration waits until no module of these is executing
TARGETS = (
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
)
RECOVERY = "load PcaLlama checkpoints after `import plugin; plugin.register()`"
_REGISTRATION_MODULE = "plugin.model.registration"

_state = {"installed": False, "registered": False, "attempted": False}
_finder: PostImportFinder | None = None


def _warn(message: str) -> None:
    """One-line warning through logging (imported lazily: never at interpreter start)."""
    import logging

    logging.getLogger("matryoshka_kv").warning("matryoshka-kv import hook: %s", message)


def _register() -> bool:
    """Call ``plugin.model.registration.register()`` once.  Returns True when it ran."""
    if _state["registered"] or _state["attempted"]:
        return _state["registered"]
    _state["attempted"] = True
    if _finder in sys.meta_path:  # one attempt per process: the finder has done its job
        sys.meta_path.remove(_finder)
    try:
        import importlib

        registration = importlib.import_module(_REGISTRATION_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in (_REGISTRATION_MODULE, "plugin.model", "plugin"):
            return False  # registration not written / not installed yet: nothing to do
        _warn(f"importing {_REGISTRATION_MODULE} failed: {type(exc).__name__}: {exc}; {RECOVERY}")
        return False
    except Exception as exc:  # noqa: BLE001 - reported, never raised into the importer
        _warn(f"importing {_REGISTRATION_MODULE} failed: {type(exc).__name__}: {exc}; {RECOVERY}")
        return False
    try:
        registration.register()
    except Exception as exc:  # noqa: BLE001
        _warn(f"register() failed: {type(exc).__name__}: {exc}; {RECOVERY}")
        return False
    _state["registered"] = True
    return True


def _busy() -> bool:
    """Whether some transformers or plugin module is still executing (an import further up the stack)."""
    for name, module in list(sys.modules.items()):
        if _finder is not None and _finder.watches(name) and not module_executed(name, _finder):
            return True
    return False


def _on_executed(_name: str) -> None:
    if all(module_executed(name, _finder) for name in TARGETS) and not _busy():
        _register()


def install() -> None:
    """Install the finder (idempotent, never raises).  Called from the .pth file."""
    global _finder
    try:
        if os.environ.get("MKV_DISABLE_IMPORT_HOOK", "").strip() not in ("", "0"):
            return
        if _state["installed"]:
            return
        _state["installed"] = True
        if all(name in sys.modules for name in TARGETS):
            _register()  # transformers' auto modules are already there: register now
            return
        _finder = PostImportFinder(TARGETS, _on_executed, _warn, packages=PACKAGES)
        sys.meta_path.insert(0, _finder)
    except Exception as exc:  # noqa: BLE001 - must never break interpreter start
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"matryoshka-kv: import hook not installed: {type(exc).__name__}: {exc}\n"
            )


def is_registered() -> bool:
    """Whether ``plugin.model.registration.register()`` has run in this process via the hook."""
    return bool(_state["registered"])
