"""Head groups and the attention kernel they share: KV heads of equal (key rank, value rank) are attended together.

`attend` broadcasts each group's keys and values over its query heads (never repeats them); `prepare_mask`
makes causality hold whatever mask transformers passed (SDPA layers may get none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadGroup:
    heads: tuple[int, ...]
    key_rank: int
    value_rank: int

    def select(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        first, last = self.heads[0], self.heads[-1]
        if last - first + 1 == len(self.heads):  # contiguous: a view, no copy
            return tensor.narrow(dim, first, len(self.heads))
        return tensor.index_select(dim, torch.tensor(self.heads, device=tensor.device))


def group_heads(key_ranks: list[int], value_ranks: list[int]) -> list[HeadGroup]:
    """Group KV heads by their (key rank, value rank) pair, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for head, pair in enumerate(zip(key_ranks, value_ranks)):
        groups.setdefault(pair, []).append(head)
    return [HeadGroup(tuple(heads), rk, rv) for (rk, rv), heads in groups.items()]


def prepare_mask(
    mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype, eager: bool
) -> tuple[torch.Tensor | None, bool]:
    """Return (mask, is_causal) so that causality always holds, whatever transformers passed.

    transformers may hand SDPA-configured layers no mask at all (it relies on is_causal); this
    rebuilds the bottom-right aligned causal mask in that case.
    """
    if mask is not None and mask.shape[-1] != kv_len:
        # Built for another layer's cache length: layers that evicted to different lengths (eviction refuses
        # padding, so every cached token is visible and only the new tokens need the causal part, below).
        mask = None
    if mask is not None:
        if mask.dtype == torch.bool:
            # Fully masked rows (left padding) would give NaN; let them attend anywhere, they are ignored.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            if eager:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask, False
    if q_len == 1:
        return None, False
    if q_len == kv_len and not eager:
        return None, True
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    if eager:
        causal = torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
    return causal, False


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    eager: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """query [B, G, n_rep, L, r_k], key [B, G, S, r_k], value [B, G, S, r_v] -> [B, G, n_rep, L, r_v].

    Keys and values are shared by the n_rep query heads of their group by broadcasting, never repeated.
    """
    batch, groups, n_rep, q_len, _ = query.shape
    if eager:
        scores = torch.matmul(query, key.unsqueeze(2).transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + (mask.unsqueeze(2) if mask.dim() == 4 else mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, value.unsqueeze(2))
    r_k, r_v = key.shape[-1], value.shape[-1]
    # SDPA's fused CPU kernel wants one head size for q, k and v, else it falls back to materialising every score
    # (pre-RoPE decode at 8k tokens, docs/data/key_space.json): zero dims change no score and no output, so pad the
    # narrower side.
    width = max(r_k, r_v)
    if r_k < width:
        query, key = F.pad(query, (0, width - r_k)), F.pad(key, (0, width - r_k))
    if r_v < width:
        value = F.pad(value, (0, width - r_v))
    out = F.scaled_dot_product_attention(
        query.reshape(batch, groups * n_rep, q_len, width),
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=n_rep > 1,
    )
    out = out.view(batch, groups, n_rep, q_len, width)
    return out if r_v == width else out[..., :r_v]
