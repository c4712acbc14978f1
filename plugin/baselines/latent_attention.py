"""Attention over a cached low-rank latent (the svd-latent baseline, seed 002).

Per layer, W_kv = [W_k; W_v] ~ B C with C ``[r, hidden]`` (down) and B = [B_k; B_v] (up):
    c = C x                                   cached: r numbers per token, shared by every KV head
    k = RoPE_n(B_k c_n + b_k),  v = B_v c_n + b_v   rebuilt for all cached tokens n at each step
    q = RoPE_m(W_q x_m)                       the usual query, at its own position m
RoPE is applied to the rebuilt keys, which is exact. Applying it inside the latent instead (the seed's
idea) would need R_n B_k = B_k R'_n for every position, i.e. col(B_k) a union of whole RoPE planes per
head, which a generic SVD basis is not.

Positions: keys are rotated by their index in the cache and queries by their cache position. Scores
depend only on position differences, so this equals the model's own position_ids whenever those are the
cache positions plus a per-sequence constant (no cache, decoding, left padding); restarting positions
inside a sequence (packing) is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention

from ..attention import attend, prepare_mask
from ..model.rope import rotate
from .rope import RopeTable


class LatentLlamaAttention(nn.Module):
    """Replaces a LlamaAttention: keeps its q_proj / o_proj, trades k_proj / v_proj for down/up factors."""

    def __init__(
        self,
        base: LlamaAttention,
        down: torch.Tensor,
        up_key: torch.Tensor,
        up_value: torch.Tensor,
        rope: RopeTable,
        key_bias: torch.Tensor | None = None,
        value_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = base.config
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.num_key_value_groups = base.num_key_value_groups
        self.num_kv_heads = base.config.num_key_value_heads
        self.scaling = base.scaling
        self.attention_dropout = base.attention_dropout
        self.is_causal = True
        self.q_proj, self.o_proj = base.q_proj, base.o_proj
        dtype, device = base.q_proj.weight.dtype, base.q_proj.weight.device
        rank, hidden = down.shape
        self.kv_down = nn.Linear(hidden, rank, bias=False, dtype=dtype, device=device)
        self.k_up = nn.Linear(rank, up_key.shape[0], bias=key_bias is not None, dtype=dtype, device=device)
        self.v_up = nn.Linear(rank, up_value.shape[0], bias=value_bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            self.kv_down.weight.copy_(down)
            self.k_up.weight.copy_(up_key)
            self.v_up.weight.copy_(up_value)
            if key_bias is not None:
                self.k_up.bias.copy_(key_bias)
            if value_bias is not None:
                self.v_up.bias.copy_(value_bias)
        self.rope = rope

    @property
    def latent_rank(self) -> int:
        return self.kv_down.out_features

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        batch, q_len, _ = hidden_states.shape
        d, n_kv, n_rep = self.head_dim, self.num_kv_heads, self.num_key_value_groups
        latent = self.kv_down(hidden_states)
        if past_key_values is not None:
            latent, _ = past_key_values.update(latent, None, self.layer_idx)
        kv_len = latent.shape[1]

        cos, sin = self.rope.get(kv_len, hidden_states.device, hidden_states.dtype)
        key = self.k_up(latent).view(batch, kv_len, n_kv, d).transpose(1, 2)
        key = rotate(key, cos, sin)
        value = self.v_up(latent).view(batch, kv_len, n_kv, d).transpose(1, 2)
        query = self.q_proj(hidden_states).view(batch, q_len, -1, d).transpose(1, 2)
        q_cos, q_sin = cos[kv_len - q_len:], sin[kv_len - q_len:]
        query = rotate(query, q_cos, q_sin).reshape(batch, n_kv, n_rep, q_len, d)

        eager = self.config._attn_implementation == "eager"
        dropout = self.attention_dropout if self.training else 0.0
        mask, is_causal = prepare_mask(attention_mask, q_len, kv_len, query.device, query.dtype, eager)
        out = attend(query, key, value, mask, is_causal, self.scaling, eager, dropout)
        return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, -1)), None
