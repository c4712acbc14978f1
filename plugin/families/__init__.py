"""Decoder families whose attention is Llama-shaped: what converts, and into which PcaLlama class.

Llama (Llama-3.x rope scaling included) becomes ``PcaLlamaForCausalLM``; Mistral (with or
without its sliding window), Qwen2/2.5 and Qwen3 get their own registered types (``pcamistral``,
``pcaqwen2``, ``pcaqwen3``) holding only what differs (:mod:`.mistral`, :mod:`.qwen2`, :mod:`.qwen3`).  This module names the
families without importing any model code, so anything may import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    source_type: str  # the base model's config.model_type
    pca_type: str  # the converted model's config.model_type
    module: str  # where its classes live
    class_name: str

    def causal_lm_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.class_name)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "pcallama", "plugin.model.modeling", "PcaLlamaForCausalLM"),
    "mistral": Family("mistral", "pcamistral", "plugin.families.mistral", "PcaMistralForCausalLM"),
    "qwen2": Family("qwen2", "pcaqwen2", "plugin.families.qwen2", "PcaQwen2ForCausalLM"),
    "qwen3": Family("qwen3", "pcaqwen3", "plugin.families.qwen3", "PcaQwen3ForCausalLM"),
}
SOURCE_TYPES = tuple(FAMILIES)
PCA_TYPES = tuple(dict.fromkeys(family.pca_type for family in FAMILIES.values()))
SUPPORTED = "Llama (incl. Llama-3.x rope scaling), Mistral (incl. its sliding window), Qwen2/2.5, Qwen3"


def family_of(model_type: str | None) -> Family:
    """The family of a base model's ``model_type``, or one clear error naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"MatryoshkaKV converts decoders with Llama-shaped attention: {SUPPORTED}; got model_type "
            f"{model_type!r}. Other attention kinds (multi-head latent attention, sliding+global mixes, ...) "
            "are not supported"
        )
    return FAMILIES[model_type]


def check_convertible(config: Any) -> None:
    """Refuse what the shared attention does not implement: windows on some layers only, or per-layer kinds.

    Mistral's one window over every layer is supported; Qwen2's sliding window on the layers above
    ``max_window_layers`` (a sliding+global mix) is not.
    """
    model_type = getattr(config, "model_type", None)
    sliding = None
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        sliding = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if sliding or any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"this {model_type} config mixes sliding-window and full-attention layers (sliding_window={sliding}, "
            f"layer_types={sorted(set(layer_types)) or None}), which the projected attention does not implement; "
            "use a checkpoint with full attention in every layer (use_sliding_window=false), or a Mistral, "
            "whose single window is supported"
        )
