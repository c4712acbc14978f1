"""Projected attention for one decoder layer (MatryoshkaKV).

For KV head h with ranks (r_k, r_v) and the query heads of its group:
    k' = RoPE(k) U_K[:, :r_k],  q' = RoPE(q) U_K[:, :r_k],  v' = (v - mu_V) U_V[:, :r_v]
    out = softmax(q' k'^T / sqrt(d) + mask) v' U_V[:, :r_v]^T + mu_V    -> o_proj
Only k' and v' are cached (with a plugin.eviction.SnapEviction applied, only the tokens it keeps of a
prefill). Heads with equal ranks are processed together as one group.

Four paths:
- exact full rank (the distillation teacher, `PcaLlamaForCausalLM.exact_full_rank()`): Llama's own
  attention, no projection at all, used only without a cache;
- sampled (training): full-width projections with trailing dims masked to the sampled ranks;
- truncated (training without sampling, or folding disabled): sliced bases, gradients flow;
- folded (inference): U_V and mu_V folded into v_proj and o_proj, computed once per rank change.

At inference a head kept at full rank caches its keys (or values) in the model's own basis: with an
orthogonal U that is exact, two matmuls cheaper, and what quantization wants (the per-channel outliers
of post-RoPE keys that KIVI-style quantization isolates are spread over all channels by a rotation).

With ``config.kv_key_space == "pre-rope"`` the key basis sits before RoPE (Palu, xKV, Eigen Attention):
    c = k U_K[:, :r_k] is cached (k before RoPE),  k_hat = RoPE_p(c U_K[:, :r_k]^T),  q = RoPE_m(q)
and attention compares full-width queries with keys rebuilt from the cache and rotated at their
positions (slots of the cache, or the positions an eviction kept). Exact at full rank; the cache holds
the same r_k numbers per head and token, and each step pays the rebuild (a [tokens, r_k] x [r_k, d]
matmul per head) that post-RoPE keys avoid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from .config import PcaLlamaConfig
from .projections import KVProjection
from .rope import RopeTable, rotate
from .zero import is_partitioned

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


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
    if mask is not None:
        mask = mask[..., :kv_len]
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
    out = F.scaled_dot_product_attention(
        query.reshape(batch, groups * n_rep, q_len, query.shape[-1]),
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=n_rep > 1,
    )
    return out.view(batch, groups, n_rep, q_len, value.shape[-1])


class PcaLlamaAttention(LlamaAttention):
    """LlamaAttention with per-KV-head orthogonal K/V projections truncated to per-head ranks."""

    def __init__(self, config: PcaLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.num_kv_heads = config.num_key_value_heads
        self.kv_proj = KVProjection(self.num_kv_heads, self.head_dim)
        self.key_ranks = [self.head_dim] * self.num_kv_heads
        self.value_ranks = [self.head_dim] * self.num_kv_heads
        self.groups = group_heads(self.key_ranks, self.value_ranks)
        self.sampled_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observer: Observer | None = None
        self.evictor: Any = None  # a plugin.eviction.SnapEviction while one is applied
        self.skip_projections = False  # full rank, computed as the base model does (see forward)
        self._inference: dict[str, Any] | None = None

    # -- rank control -------------------------------------------------------------------------
    def set_ranks(self, key_ranks: list[int], value_ranks: list[int]) -> None:
        self.key_ranks, self.value_ranks = list(key_ranks), list(value_ranks)
        self.groups = group_heads(self.key_ranks, self.value_ranks)
        self.invalidate()

    def set_sampled_ranks(self, key_ranks: torch.Tensor | None, value_ranks: torch.Tensor | None) -> None:
        """Mask trailing dims to these per-head ranks in the next forwards (None clears)."""
        if key_ranks is None or value_ranks is None:
            self.sampled_masks = None
            return
        dims = torch.arange(self.head_dim, device=self.k_proj.weight.device)
        self.sampled_masks = (
            (dims < key_ranks.to(dims.device)[:, None]),
            (dims < value_ranks.to(dims.device)[:, None]),
        )

    def invalidate(self) -> None:
        """Drop bases and folded weights derived for inference (after rank or weight changes)."""
        self._inference = None

    def signature(self) -> tuple[tuple[int, ...], ...]:
        return tuple((g.key_rank, g.value_rank, *g.heads) for g in self.groups)

    @torch.no_grad()
    def rebase_to_nested(self, kind: str, head: int, states: torch.Tensor, rank: int,
                         bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Cached states of one head, moved from the model's own basis (full rank) into U when cut below it.

        ``bases``: ``kv_proj()``'s output when the caller moves several heads (computed once, not per head)."""
        if states.shape[-1] != self.head_dim or rank == self.head_dim:
            return states
        key_basis, value_basis, value_mean = self.kv_proj() if bases is None else bases
        if kind == "key":
            return (states.float() @ key_basis[head]).to(states.dtype)
        return ((states.float() - value_mean[head]) @ value_basis[head]).to(states.dtype)

    # -- derived weights for inference ---------------------------------------------------------
    def folds(self) -> bool:
        """Whether inference folds U_V into v_proj / o_proj.  Not under ZeRO-3: folding reads their weights
        without calling them, and a gather inside a forward fights the engine's own prefetching."""
        return bool(self.config.kv_fold) and not is_partitioned(self.v_proj.weight)

    @torch.no_grad()
    def _inference_weights(self, dtype: torch.dtype, own_basis: bool = True) -> dict[str, Any]:
        if self._inference is not None and (self._inference["dtype"], self._inference["own_basis"]) == (dtype, own_basis):
            return self._inference
        # a module call: ZeRO-3 gathers its parameters
        per_group = self._group_bases(*self.kv_proj(), own_basis_at_full_rank=own_basis)
        weights: dict[str, Any] = {"dtype": dtype, "own_basis": own_basis, "groups": per_group}
        if self.folds():
            weights.update(self._fold(per_group, dtype))  # folded in float32, then cast
        for entry in per_group:
            for name in entry:
                if entry[name] is not None:
                    entry[name] = entry[name].to(dtype)
        self._inference = weights
        return weights

    def _group_bases(
        self, key_basis: torch.Tensor, value_basis: torch.Tensor, value_mean: torch.Tensor,
        own_basis_at_full_rank: bool = False,
    ) -> list[dict[str, torch.Tensor | None]]:
        """Per head group: U_K[:, :r_k], U_V[:, :r_v] and mu_V of its heads.

        With ``own_basis_at_full_rank`` a full-rank key (value) group gets ``None`` for its basis, meaning
        the model's own basis, and a zero mean for values: softmax rows sum to one, so (v - mu) + mu = v.
        """
        entries: list[dict[str, torch.Tensor | None]] = []
        d = self.head_dim
        for g in self.groups:
            own_key = own_basis_at_full_rank and g.key_rank == d
            own_value = own_basis_at_full_rank and g.value_rank == d
            mean = g.select(value_mean, 0)
            entries.append({
                "key": None if own_key else g.select(key_basis, 0)[..., : g.key_rank],
                "value": None if own_value else g.select(value_basis, 0)[..., : g.value_rank],
                "mean": torch.zeros_like(mean) if own_value else mean,
            })
        return entries

    @staticmethod
    def project_keys(group: HeadGroup, entry: dict[str, Any], key: torch.Tensor) -> torch.Tensor:
        """k' of this group's heads ([B, heads, L, r_k]) from post-RoPE keys of all KV heads."""
        selected = group.select(key, 1)
        return selected if entry["key"] is None else torch.matmul(selected, entry["key"])

    @staticmethod
    def rebuild_keys(entry: dict[str, Any], coefficients: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys: cached coefficients ``[B, heads, S, r_k]`` back to ``d`` dims, rotated at their positions."""
        keys = coefficients if entry["key"] is None else torch.matmul(coefficients, entry["key"].transpose(-1, -2))
        return rotate(keys, cos, sin)

    @staticmethod
    def project_values(group: HeadGroup, entry: dict[str, Any], value: torch.Tensor) -> torch.Tensor:
        """v' = (v - mu_V) U_V of this group's heads ([B, heads, L, r_v])."""
        selected = group.select(value, 1)
        if entry["value"] is None:
            return selected
        return torch.matmul(selected - entry["mean"].unsqueeze(1), entry["value"])

    @staticmethod
    def unproject_values(entry: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
        """Attention output over v' ([B, heads, n_rep, L, r_v]) back to the head dimension."""
        if entry["value"] is None:
            return out
        return torch.matmul(out, entry["value"].transpose(-1, -2).unsqueeze(1)) + entry["mean"][:, None, None, :]

    def _fold(self, per_group: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """v_proj' = U_V^T (W_v x + b_v - mu_V) per head; o_proj' = W_o U_V with bias W_o mu_V (+ b_o)."""
        n_rep, d, hidden = self.num_key_value_groups, self.head_dim, self.config.hidden_size
        w_v = self.v_proj.weight.float().view(self.num_kv_heads, d, hidden)
        b_v = self.v_proj.bias.float().view(self.num_kv_heads, d) if self.v_proj.bias is not None else None
        w_o = self.o_proj.weight.float().view(hidden, self.num_kv_heads, n_rep, d)
        v_weights, v_biases, o_weights = [], [], []
        all_means = torch.zeros(self.num_kv_heads, d, device=w_v.device)
        for group, entry in zip(self.groups, per_group):
            mean = entry["mean"]
            # the model's own basis at full rank: the identity, the heads' own rows and columns
            basis = entry["value"] if entry["value"] is not None else torch.eye(d, device=w_v.device).expand(
                len(group.heads), d, d)
            shift = -mean if b_v is None else group.select(b_v, 0) - mean
            v_weights.append(torch.einsum("hdr,hdi->hri", basis, group.select(w_v, 0)).reshape(-1, hidden))
            v_biases.append(torch.einsum("hdr,hd->hr", basis, shift).reshape(-1))
            o_weights.append(torch.einsum("ohnd,hdr->ohnr", group.select(w_o, 1), basis).reshape(hidden, -1))
            all_means[list(group.heads)] = mean
        o_bias = torch.einsum("ohnd,hd->o", w_o, all_means)
        if self.o_proj.bias is not None:
            o_bias = o_bias + self.o_proj.bias.float()
        return {
            "v_weight": torch.cat(v_weights).to(dtype),
            "v_bias": torch.cat(v_biases).to(dtype),
            "v_split": [len(g.heads) * g.value_rank for g in self.groups],
            "o_weight": torch.cat(o_weights, dim=1).to(dtype),
            "o_bias": o_bias.to(dtype),
        }

    # -- what a model family may change (plugin/families/) --------------------------------------
    def base_forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The unprojected attention of the base model's family (the exact full-rank path)."""
        return LlamaAttention.forward(self, *args, **kwargs)

    def query_key(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[B, heads, L, d]`` and keys ``[B, kv heads, L, d]`` before RoPE."""
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return query, key

    @property
    def pre_rope(self) -> bool:
        """Whether the key basis sits before RoPE (``config.kv_key_space``)."""
        return getattr(self.config, "kv_key_space", "post-rope") == "pre-rope"

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        cache_position: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        rope_table: RopeTable | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if self.skip_projections and past_key_values is None and self.observer is None:
            # U is orthogonal, so full rank is the base model's attention: running the family's own forward
            # is exact in any dtype (no U U^T = I up to 2^-8 in bf16) and four matmuls per layer cheaper.
            output, _ = self.base_forward(hidden_states, position_embeddings, attention_mask, None, cache_position,
                                          position_ids=position_ids, **kwargs)
            return output, None
        batch, q_len, _ = hidden_states.shape
        d, n_kv, n_rep = self.head_dim, self.num_kv_heads, self.num_key_value_groups
        query, key = self.query_key(hidden_states)
        cos, sin = position_embeddings
        pre_rope = self.pre_rope
        if pre_rope:
            query = rotate(query, cos.unsqueeze(1), sin.unsqueeze(1))  # keys stay before RoPE: rotated once rebuilt
        else:
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        query = query.reshape(batch, n_kv, n_rep, q_len, d)

        eager = self.config._attn_implementation == "eager"
        dropout = self.attention_dropout if self.training else 0.0
        folded = not self.training and self.sampled_masks is None and self.folds()
        value = None
        if not folded or self.observer is not None:
            value = self.v_proj(hidden_states).view(batch, q_len, n_kv, d).transpose(1, 2)
        if self.observer is not None:
            self.observer(self.layer_idx, key, value)

        if self.sampled_masks is not None:
            out = self._sampled_forward(query, key, value, attention_mask, eager, dropout,
                                        (cos, sin) if pre_rope else None)
            return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, -1)), None

        if self.training:
            bases = (t.to(query.dtype) for t in self.kv_proj())
            weights: dict[str, Any] = {"groups": self._group_bases(*bases)}
        else:
            weights = self._inference_weights(query.dtype, not getattr(past_key_values, "nested_bases", False))

        key_groups, query_groups, value_groups = [], [], []
        if folded:
            value_all = torch.nn.functional.linear(hidden_states, weights["v_weight"], weights["v_bias"])
            value_parts = value_all.split(weights["v_split"], dim=-1)
        for index, (group, entry) in enumerate(zip(self.groups, weights["groups"])):
            key_groups.append(self.project_keys(group, entry, key))
            selected_query = group.select(query, 1)
            query_groups.append(selected_query if entry["key"] is None or pre_rope
                                else torch.matmul(selected_query, entry["key"].unsqueeze(1)))
            if folded:
                part = value_parts[index].view(batch, q_len, len(group.heads), group.value_rank)
                value_groups.append(part.transpose(1, 2))
            else:
                value_groups.append(self.project_values(group, entry, value))

        if pre_rope:
            key_groups, value_groups = self._pre_rope_keys(
                weights["groups"], query_groups, key_groups, value_groups, (cos, sin), past_key_values,
                position_ids if position_ids is not None else cache_position, rope_table)
        elif past_key_values is not None:
            cache_kwargs = {"signature": self.signature()}
            if self.evictor is not None and q_len > 1 and past_key_values.get_seq_length(self.layer_idx) == 0:
                # the prefill attends to all its tokens; only the kept ones are cached
                kept_keys, kept_values, _ = self.evictor.evict(query_groups, key_groups, value_groups, self.scaling)
                past_key_values.update(kept_keys, kept_values, self.layer_idx, cache_kwargs)
            else:
                key_groups, value_groups = past_key_values.update(key_groups, value_groups, self.layer_idx,
                                                                  cache_kwargs)
        kv_len = key_groups[0].shape[-2]
        mask, is_causal = prepare_mask(attention_mask, q_len, kv_len, query.device, query.dtype, eager)
        outputs = [
            attend(q, k, v, mask, is_causal, self.scaling, eager, dropout)
            for q, k, v in zip(query_groups, key_groups, value_groups)
        ]

        if folded:
            flat = torch.cat([o.permute(0, 3, 1, 2, 4).reshape(batch, q_len, -1) for o in outputs], dim=-1)
            return torch.nn.functional.linear(flat, weights["o_weight"], weights["o_bias"]), None

        if len(self.groups) == 1 and len(self.groups[0].heads) == n_kv:
            full = self.unproject_values(weights["groups"][0], outputs[0])
        else:
            full = query.new_zeros(batch, n_kv, n_rep, q_len, d)
            for group, entry, out in zip(self.groups, weights["groups"], outputs):
                back = self.unproject_values(entry, out)
                full = full.index_copy(1, torch.tensor(group.heads, device=full.device), back)
        return self.o_proj(full.permute(0, 3, 1, 2, 4).reshape(batch, q_len, -1)), None

    def _pre_rope_keys(
        self,
        entries: list[dict[str, Any]],
        query_groups: list[torch.Tensor],
        key_groups: list[torch.Tensor],
        value_groups: list[torch.Tensor],
        rotation: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        positions: torch.Tensor | None,
        rope_table: RopeTable | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cache the pre-RoPE coefficients; return the keys attention compares with (rebuilt, rotated) and values.

        Without a cache the keys are this forward's tokens, at the queries' positions. A cache holds
        coefficients; they are rotated at slots counted from the cache's length (RoPE depends only on
        distances, so a padded row's offset cancels), or at the positions an eviction stored.
        """
        cos, sin = (t.unsqueeze(1) for t in rotation)  # [B, 1, L, d]: one rotation for every head
        if cache is None:
            return [self.rebuild_keys(e, k, cos, sin) for e, k in zip(entries, key_groups)], value_groups
        if rope_table is None:
            raise ValueError("pre-RoPE keys with a cache need the model's rope table; call the PcaLlama model, "
                             "not its attention layer alone")
        cache_kwargs = {"signature": self.signature()}
        q_len = key_groups[0].shape[-2]
        if positions is None:
            raise ValueError("pre-RoPE keys with a cache need position_ids or cache_position")
        positions = positions.view(-1, q_len) if positions.dim() > 1 else positions.view(1, q_len)
        if self.evictor is not None and q_len > 1 and cache.get_seq_length(self.layer_idx) == 0:
            # the prefill attends to all its tokens (keys rotated at their own positions); the kept ones are cached
            rotated = [self.rebuild_keys(e, k, cos, sin) for e, k in zip(entries, key_groups)]
            kept_keys, kept_values, kept = self.evictor.evict(query_groups, key_groups, value_groups, self.scaling,
                                                              scored_keys=rotated)
            cache.update(kept_keys, kept_values, self.layer_idx, cache_kwargs)
            batch = key_groups[0].shape[0]
            cache.store_key_positions(self.layer_idx, [
                positions.expand(batch, -1).unsqueeze(1).expand(-1, index.shape[1], -1).gather(2, index)
                for index in kept])
            return rotated, value_groups
        stored = cache.stored_key_positions(self.layer_idx)
        key_groups, value_groups = cache.update(key_groups, value_groups, self.layer_idx, cache_kwargs)
        if stored is not None:  # an evicted cache: every head at the positions it kept, then the new tokens'
            batch = key_groups[0].shape[0]
            held = cache.store_key_positions(self.layer_idx, [
                positions.expand(batch, -1).unsqueeze(1).expand(-1, len(g.heads), -1) for g in self.groups])
            rotations = [rope_table.at(p, coefficients.dtype) for p, coefficients in zip(held, key_groups)]
            return [self.rebuild_keys(e, k, c, s) for e, k, (c, s) in zip(entries, key_groups, rotations)], value_groups
        # Slots: the cached keys are the last S of the cache.get_seq_length() tokens seen (a sliding window forgets)
        seen, length = cache.get_seq_length(self.layer_idx), key_groups[0].shape[-2]
        slot_cos, slot_sin = rope_table.span(seen - length, length, key_groups[0].dtype)
        keys = [self.rebuild_keys(e, k, slot_cos, slot_sin) for e, k in zip(entries, key_groups)]
        # the queries, rotated at the given positions above, move to their slots too (the last q_len ones)
        if not torch.equal(positions[:, 0], torch.full_like(positions[:, 0], seen - q_len)) or \
                not torch.equal(positions[:, -1], torch.full_like(positions[:, -1], seen - 1)):
            query_cos, query_sin = slot_cos[-q_len:], slot_sin[-q_len:]
            for index, query in enumerate(query_groups):
                # undo the given rotation (R^T = rotation by the negated sine), then rotate at the slots
                raw = rotate(query, cos.unsqueeze(1), -sin.unsqueeze(1))
                query_groups[index] = rotate(raw, query_cos, query_sin)
        return keys, value_groups

    def _sampled_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        eager: bool,
        dropout: float,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Training path: full-width projections with trailing dimensions zeroed to the sampled ranks.

        ``rotation`` (cos, sin): the keys are pre-RoPE; their masked coefficients are rebuilt and rotated."""
        key_mask, value_mask = self.sampled_masks
        key_basis, value_basis, value_mean = (t.to(query.dtype) for t in self.kv_proj())
        key_p = torch.matmul(key, key_basis) * key_mask.unsqueeze(1)
        if rotation is None:
            query_p = torch.matmul(query, key_basis.unsqueeze(1))
        else:
            cos, sin = (t.unsqueeze(1) for t in rotation)
            key_p = rotate(torch.matmul(key_p, key_basis.transpose(-1, -2)), cos, sin)
            query_p = query
        value_p = torch.matmul(value - value_mean.unsqueeze(1), value_basis) * value_mask.unsqueeze(1)
        q_len, kv_len = query.shape[-2], key.shape[-2]
        mask, is_causal = prepare_mask(attention_mask, q_len, kv_len, query.device, query.dtype, eager)
        out = attend(query_p, key_p, value_p, mask, is_causal, self.scaling, eager, dropout)
        return torch.matmul(out, value_basis.transpose(-1, -2).unsqueeze(1)) + value_mean[:, None, None, :]
