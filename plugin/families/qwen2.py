"""Qwen2 / Qwen2.5: biases on q, k and v (none on o).

The value bias folds with mu_V (v' = U_V^T (W_v x + b_v - mu_V)); the key bias is added before
RoPE, so the projected keys are RoPE(W_k x + b_k) U_K as for any key.  Everything else is Llama.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from ..attention import PcaLlamaAttention
from ..model.config import PcaLlamaConfig
from ..model.modeling import PcaLlamaForCausalLM, PcaLlamaModel


class PcaQwen2Config(PcaLlamaConfig):
    model_type = "pcaqwen2"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["attention_bias"] = True  # q, k, v (o_proj is rebuilt without one)
        kwargs.setdefault("mlp_bias", False)
        super().__init__(**kwargs)


class PcaQwen2Attention(PcaLlamaAttention):
    def __init__(self, config: PcaQwen2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.sliding_window = None  # read by Qwen2Attention.forward

    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        return Qwen2Attention.forward(self, *args, **kwargs)


class PcaQwen2Model(PcaLlamaModel):
    config_class = PcaQwen2Config
    attention_class = PcaQwen2Attention


class PcaQwen2ForCausalLM(PcaLlamaForCausalLM):
    config_class = PcaQwen2Config
    model_class = PcaQwen2Model

