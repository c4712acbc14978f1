"""Registers `pcallama`, `pcaqwen2` and `pcaqwen3` with transformers' Auto classes (idempotent)."""

from __future__ import annotations

import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    for name, cls in (("plugin.modeling", "PcaLlamaForCausalLM"), ("plugin.families.qwen2", "PcaQwen2ForCausalLM"),
                      ("plugin.families.qwen3", "PcaQwen3ForCausalLM")):
        module = sys.modules.get(name)
        if module is not None and not hasattr(module, cls):
            # Called while that module is still importing (the import hook, or a module importing
            # another); each of these modules calls register() once its classes exist.
            return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .config import PcaLlamaConfig
    from .families.qwen2 import PcaQwen2Config, PcaQwen2ForCausalLM, PcaQwen2Model
    from .families.qwen3 import PcaQwen3Config, PcaQwen3ForCausalLM, PcaQwen3Model
    from .modeling import PcaLlamaForCausalLM, PcaLlamaModel

    for config, model, causal_lm in ((PcaLlamaConfig, PcaLlamaModel, PcaLlamaForCausalLM),
                                     (PcaQwen2Config, PcaQwen2Model, PcaQwen2ForCausalLM),
                                     (PcaQwen3Config, PcaQwen3Model, PcaQwen3ForCausalLM)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
    _done = True
