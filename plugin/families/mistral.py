"""Mistral: sliding-window attention over the projected keys and values.

Each query sees the last ``sliding_window`` tokens: the mask is transformers' sliding-window
causal mask (built from the cache's kept length and offset), and the cache keeps only the last
window - 1 projected tokens (:class:`plugin.cache.WindowPcaCacheLayer`), so its bytes are the
budget times those of Mistral's own sliding-window cache.  Without a window it is Llama.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.mistral.modeling_mistral import MistralAttention

from ..attention import PcaLlamaAttention
from ..cache import CompressedCache, PcaCache, QuantSpec
from ..model.config import PcaLlamaConfig
from ..model.modeling import PcaLlamaForCausalLM, PcaLlamaModel


class PcaMistralConfig(PcaLlamaConfig):
    model_type = "pcamistral"
    family_fields = ("sliding_window",)

    def __init__(self, sliding_window: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if sliding_window is not None and int(sliding_window) < 1:
            raise ValueError(f"sliding_window must be >= 1 token or None; got {sliding_window}")
        self.sliding_window = None if sliding_window is None else int(sliding_window)


class PcaMistralAttention(PcaLlamaAttention):
    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        return MistralAttention.forward(self, *args, **kwargs)


class PcaMistralModel(PcaLlamaModel):
    config_class = PcaMistralConfig
    attention_class = PcaMistralAttention

    def new_cache(self, reserve: int | None = None) -> CompressedCache:
        if self.config.sliding_window is None:
            return super().new_cache(reserve)
        if self.kv_quant is not None and not self.kv_quant.is_identity():
            raise ValueError("quantized caches do not keep a sliding window yet; clear_kv_bits() for this model")
        return PcaCache(sliding_window=self.config.sliding_window)

    def family_inputs(self, past_key_values: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Replace a 2-D (or absent) mask by the 4-D sliding-window causal mask, which Llama's forward keeps."""
        mask = kwargs.get("attention_mask")
        if self.config.sliding_window is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            return kwargs
        if kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = self.embed_tokens(kwargs.pop("input_ids"))
        embeds = kwargs["inputs_embeds"]
        if kwargs.get("cache_position") is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            kwargs["cache_position"] = torch.arange(seen, seen + embeds.shape[1], device=embeds.device)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = kwargs["cache_position"].unsqueeze(0)
        # None back (SDPA with nothing to hide beyond causality) lets Llama's forward build its causal mask.
        kwargs["attention_mask"] = create_sliding_window_causal_mask(
            config=self.config, input_embeds=embeds, attention_mask=mask, cache_position=kwargs["cache_position"],
            past_key_values=past_key_values, position_ids=kwargs["position_ids"],
        )
        return kwargs


class PcaMistralForCausalLM(PcaLlamaForCausalLM):
    config_class = PcaMistralConfig
    model_class = PcaMistralModel

    def set_kv_quant(self, spec: QuantSpec | None) -> None:
        if spec is not None and not spec.is_identity() and self.config.sliding_window is not None:
            raise ValueError(
                f"this Mistral uses a sliding window ({self.config.sliding_window} tokens); quantized caches do "
                "not keep a window yet: use ranks alone (set_kv_budget / a rank file) for this model"
            )
        super().set_kv_quant(spec)

