"""Import hook that registers ``pcallama`` with transformers' Auto classes on first use.

``matryoshka_kv_hook.pth`` (installed into site-packages by setup.py / scripts/install.sh)
runs ``import plugin._import_hook as _h; _h.install()`` at every interpreter start of the
environment.  :func:`install` puts a :class:`_AutoModulesFinder` at the front of
``sys.meta_path``.  It does nothing for any module except
``transformers.models.auto.configuration_auto`` and
``transformers.models.auto.modeling_auto``: for those it wraps the real loader's
``exec_module`` so that, once *both* modules have finished executing, it calls
``plugin.registration.register()``.  Then ``AutoConfig`` / ``AutoModelForCausalLM
.from_pretrained(dir)`` load PcaLlama checkpoints in processes that never imported
``plugin``: LLaMA-Factory and its torchrun / deepspeed children, OpenCompass subprocesses.

Rules this module keeps:

* cheap: only ``sys``, ``os`` and ``contextlib`` (all preloaded by ``site``) are imported at interpreter start (no torch, no
  transformers, not even ``logging``);
* idempotent: ``install()`` may be called any number of times; ``register()`` is called at
  most once per process (successfully);
* never breaks interpreter start: ``install()`` catches everything and prints one line;
* errors are not swallowed silently: a missing ``plugin.registration`` module is ignored
  (the package may be partially installed), any other failure of ``register()`` is logged
  as a one-line warning.

Set ``MKV_DISABLE_IMPORT_HOOK=1`` to switch the hook off.
"""

from __future__ import annotations

import contextlib
import os
import sys

TARGETS = (
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
)
_REGISTRATION_MODULE = "plugin.registration"

_state = {"installed": False, "registered": False, "attempted": False}
_executed: set[str] = set()
_in_find_spec: set[str] = set()


def _warn(message: str) -> None:
    """One-line warning through logging (imported lazily: never at interpreter start)."""
    import logging

    logging.getLogger("matryoshka_kv").warning("matryoshka-kv import hook: %s", message)


def _module_ready(name: str) -> bool:
    """True when ``name`` is in sys.modules and has finished executing."""
    module = sys.modules.get(name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False) or name in _executed


def _register() -> bool:
    """Call ``plugin.registration.register()`` once.  Returns True when it ran."""
    if _state["registered"] or _state["attempted"]:
        return _state["registered"]
    _state["attempted"] = True
    _remove_finder()  # one attempt per process: the finder has done its job
    try:
        import importlib

        registration = importlib.import_module(_REGISTRATION_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in (_REGISTRATION_MODULE, "plugin"):
            return False  # registration not written / not installed yet: nothing to do
        _warn(f"importing {_REGISTRATION_MODULE} failed: {type(exc).__name__}: {exc}")
        return False
    except Exception as exc:  # noqa: BLE001 - reported, never raised into the importer
        _warn(f"importing {_REGISTRATION_MODULE} failed: {type(exc).__name__}: {exc}")
        return False
    try:
        registration.register()
    except Exception as exc:  # noqa: BLE001
        _warn(f"register() failed: {type(exc).__name__}: {exc}")
        return False
    _state["registered"] = True
    return True


def _maybe_register() -> None:
    if all(_module_ready(name) for name in TARGETS):
        _register()


def _remove_finder() -> None:
    for finder in list(sys.meta_path):
        if isinstance(finder, _AutoModulesFinder):
            try:
                sys.meta_path.remove(finder)
            except ValueError:
                pass


def _wrap_loader(fullname: str, loader: object) -> None:
    """Wrap ``loader.exec_module`` in place (the loader type stays what it was)."""
    original = getattr(loader, "exec_module", None)
    if original is None or getattr(original, "_mkv_wrapped", False):
        return

    def exec_module(module: object) -> None:
        original(module)
        _executed.add(fullname)
        _maybe_register()

    exec_module._mkv_wrapped = True  # type: ignore[attr-defined]
    try:
        loader.exec_module = exec_module  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        _warn(f"cannot wrap the loader of {fullname} ({type(loader).__name__})")


class _AutoModulesFinder:
    """Meta-path finder that only watches transformers' two auto modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in _in_find_spec or _state["registered"]:
            return None
        _in_find_spec.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or isinstance(finder, _AutoModulesFinder):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _in_find_spec.discard(fullname)
        if spec is not None and spec.loader is not None:
            _wrap_loader(fullname, spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Install the finder (idempotent, never raises).  Called from the .pth file."""
    try:
        if os.environ.get("MKV_DISABLE_IMPORT_HOOK", "").strip() not in ("", "0"):
            return
        if _state["installed"]:
            return
        _state["installed"] = True
        if all(name in sys.modules for name in TARGETS):
            _register()  # transformers' auto modules are already there: register now
            return
        sys.meta_path.insert(0, _AutoModulesFinder())
    except Exception as exc:  # noqa: BLE001 - must never break interpreter start
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"matryoshka-kv: import hook not installed: {type(exc).__name__}: {exc}\n"
            )


def is_registered() -> bool:
    """Whether ``plugin.registration.register()`` has run in this process via the hook."""
    return bool(_state["registered"])
