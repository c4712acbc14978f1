"""Qwen3: RMSNorm over each query and key head before RoPE (and an explicit head_dim).

The norms act before RoPE and before the projection, so k' = RoPE(norm(W_k x)) U_K: the keys the
bases see (and PCA calibrates on) are the normalised ones.  Everything else is Llama.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm

from ..attention import PcaLlamaAttention
from ..model.config import PcaLlamaConfig
from ..model.modeling import PcaLlamaForCausalLM, PcaLlamaModel


class PcaQwen3Config(PcaLlamaConfig):
    model_type = "pcaqwen3"


class PcaQwen3Attention(PcaLlamaAttention):
    def __init__(self, config: PcaQwen3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.sliding_window = None  # read by Qwen3Attention.forward

    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        return Qwen3Attention.forward(self, *args, **kwargs)

    def query_key(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, q_len, _ = hidden_states.shape
        query = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim)).transpose(1, 2)
        return query, key


class PcaQwen3Model(PcaLlamaModel):
    config_class = PcaQwen3Config
    attention_class = PcaQwen3Attention


class PcaQwen3ForCausalLM(PcaLlamaForCausalLM):
    config_class = PcaQwen3Config
    model_class = PcaQwen3Model

