"""Registers `pcallama` with transformers' Auto classes (idempotent)."""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .config import PcaLlamaConfig
    from .modeling import PcaLlamaForCausalLM, PcaLlamaModel

    AutoConfig.register(PcaLlamaConfig.model_type, PcaLlamaConfig, exist_ok=True)
    AutoModel.register(PcaLlamaConfig, PcaLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(PcaLlamaConfig, PcaLlamaForCausalLM, exist_ok=True)
    _done = True
