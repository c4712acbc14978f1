"""matryoshka-kv core: MatryoshkaKV projections, cache and tools for Llama-family models.

The package is imported at every interpreter start by the installed ``.pth`` import hook, so
its top level stays cheap: the public names load on first access (PEP 562), and ``pcallama``
is registered with transformers by the hook as soon as transformers' Auto classes load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PcaCache": "plugin.cache",
    "TieredPcaCache": "plugin.cache",
    "PcaLlamaConfig": "plugin.model.config",
    "PcaLlamaForCausalLM": "plugin.model.modeling",
    "PcaLlamaModel": "plugin.model.modeling",
    "SnapEviction": "plugin.cache.eviction",
    "load_model": "plugin.storage.loading",
    "register": "plugin.model.registration",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
