"""Registers `pcallama` with transformers' Auto classes (idempotent)."""

from __future__ import annotations

import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    modeling = sys.modules.get("plugin.modeling")
    if modeling is not None and not hasattr(modeling, "PcaLlamaForCausalLM"):
        # Called by the import hook while plugin.modeling itself is importing transformers;
        # plugin.modeling calls register() once its classes exist.
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .config import PcaLlamaConfig
    from .modeling import PcaLlamaForCausalLM, PcaLlamaModel

    AutoConfig.register(PcaLlamaConfig.model_type, PcaLlamaConfig, exist_ok=True)
    AutoModel.register(PcaLlamaConfig, PcaLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(PcaLlamaConfig, PcaLlamaForCausalLM, exist_ok=True)
    _done = True
