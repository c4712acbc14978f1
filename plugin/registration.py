"""Registers every converted type (`pcallama`, `pcamistral`, `pcaqwen2`, ...) with transformers' Auto classes (idempotent)."""

from __future__ import annotations

import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from .families import FAMILIES

    families = {family.pca_type: family for family in FAMILIES.values()}
    for family in families.values():
        module = sys.modules.get(family.module)
        if module is not None and not hasattr(module, family.class_name):
            # Called while that module is still importing (the import hook, or a module importing
            # another); each of these modules calls register() once its classes exist.
            return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for family in families.values():
        causal_lm = family.causal_lm_class()
        config = causal_lm.config_class
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, causal_lm.model_class, exist_ok=True)
        AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
    _done = True
