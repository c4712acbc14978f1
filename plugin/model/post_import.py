"""Call a function right after chosen modules have executed, from a meta-path finder.

Both import hooks of the project are built on this (``plugin.model.import_hook`` registers
``pcallama`` once transformers' auto modules exist; ``llamafactory_ext._import_hook`` patches
LLaMA-Factory modules). It runs at interpreter start from ``.pth`` files, so it imports only
``sys`` and never raises into an import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

_WRAPPED = "_mkv_post_import"


class PostImportFinder:
    """Meta-path finder that finds nothing itself: for a module in `targets` (or in `packages`) it asks
    the finders after it for the spec and wraps the spec's loader so that `callback(name)` runs right
    after the module's code has executed (then `name` is in `executed`, although importlib still marks
    the module as initializing)."""

    def __init__(self, targets: Iterable[str], callback: Callable[[str], None],
                 warn: Callable[[str], None], packages: Iterable[str] = ()) -> None:
        self.targets = frozenset(targets)
        self.packages = tuple(packages)  # also watch these packages and every module below them
        self.callback = callback
        self.warn = warn
        self.executed: set[str] = set()
        self._searching: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if not self.watches(fullname) or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if isinstance(finder, PostImportFinder) or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching.discard(fullname)
        if spec is not None and spec.loader is not None:
            self._wrap(fullname, spec.loader)
        return spec

    def watches(self, fullname: str) -> bool:
        if fullname in self.targets:
            return True
        return any(fullname == package or fullname.startswith(package + ".") for package in self.packages)

    def invalidate_caches(self) -> None:
        pass

    def _wrap(self, fullname: str, loader: object) -> None:
        """Wrap ``loader.exec_module`` in place (the loader's type stays what it was)."""
        original = getattr(loader, "exec_module", None)
        if original is None or getattr(original, _WRAPPED, False):
            return

        def exec_module(module: object) -> None:
            original(module)
            self.executed.add(fullname)
            self.callback(fullname)

        setattr(exec_module, _WRAPPED, True)
        try:
            loader.exec_module = exec_module  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            self.warn(f"cannot wrap the loader of {fullname} ({type(loader).__name__})")


def module_executed(name: str, finder: PostImportFinder | None = None) -> bool:
    """True when `name` is in sys.modules and its code has run (also inside its own callback)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False) or (finder is not None and name in finder.executed)
