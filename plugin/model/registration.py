"""Registers every converted type (`pcallama`, `pcamistral`, `pcaqwen2`, ...) with transformers' Auto classes (idempotent).

Two ways in: the `.pth` import hook (plugin.model.import_hook) as soon as transformers' Auto classes load, and
`plugin.register()` by hand where the hook is switched off (MKV_DISABLE_IMPORT_HOOK=1) or not installed.
"""

from __future__ import annotations

import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from ..families import FAMILIES

    families = {family.pca_type: family for family in FAMILIES.values()}
    for family in families.values():
        module = sys.modules.get(family.module)
        if module is not None and not hasattr(module, family.class_name):
            # Called while that module is still importing: registering now would import it half-executed.
            # Nothing is marked done, so the next call (the import hook waits for plugin's imports to finish,
            # or plugin.register() by hand) registers.
            return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for family in families.values():
        causal_lm = family.causal_lm_class()
        config = causal_lm.config_class
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, causal_lm.model_class, exist_ok=True)
        AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
    _done = True
