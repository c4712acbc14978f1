"""Projected attention for one decoder layer (MatryoshkaKV).

For KV head h with ranks (r_k, r_v) and the query heads of its group:
    k' = RoPE(k) U_K[:, :r_k],  q' = RoPE(q) U_K[:, :r_k],  v' = (v - mu_V) U_V[:, :r_v]
    out = softmax(q' k'^T / sqrt(d) + mask) v' U_V[:, :r_v]^T + mu_V    -> o_proj
Only k' and v' are cached (with a press such as plugin.cache.eviction.SnapEviction hooked in, only the tokens it
keeps of a prefill; see .hooks). Heads with equal ranks are processed together as one group (.heads).

Four paths:
- exact full rank (the distillation teacher, `PcaLlamaForCausalLM.exact_full_rank()`): Llama's own
  attention, no projection at all, used only without a cache;
- sampled (training): full-width projections with trailing dims masked to the sampled ranks;
- truncated (training without sampling, or folding disabled): sliced bases, gradients flow;
- folded (inference): U_V and mu_V folded into v_proj and o_proj, computed once per rank change.

At inference a head kept at full rank caches its keys (or values) in the model's own basis: with an
orthogonal U that is exact, two matmuls cheaper, and what quantization wants (the per-channel outliers
of post-RoPE keys that KIVI-style quantization isolates are spread over all channels by a rotation).

With ``config.kv_key_space == "pre-rope"`` the key basis sits before RoPE (Palu, xKV, Eigen Attention; .pre_rope)
and attention compares full-width queries with keys rebuilt from the cache and rotated at their
positions (slots of the cache, or the positions an eviction kept). Exact at full rank; the cache holds
the same r_k numbers per head and token, and each step pays the rebuild (a [tokens, r_k] x [r_k, d]
matmul per head) that post-RoPE keys avoid.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from ..model.config import PcaLlamaConfig
from ..model.projections import KVProjection
from ..model.rope import RopeTable, rotate
from ..model.zero3 import is_partitioned
from .heads import HeadGroup, attend, group_heads, prepare_mask
from .hooks import KVHook, KVHookPoint, KVStep
from .pre_rope import PreRopeKeys


class PcaLlamaAttention(KVHookPoint, PreRopeKeys, LlamaAttention):
    """LlamaAttention with per-KV-head orthogonal K/V projections truncated to per-head ranks."""

    # prepare_mask rebuilds the causal part for this layer's own cache length when eviction left layers uneven
    # (read by plugin.evaluation.perplexity, which otherwise scores such caches one token at a time).
    masks_own_cache_length = True

    def __init__(self, config: PcaLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.num_kv_heads = config.num_key_value_heads
        self.kv_proj = KVProjection(self.num_kv_heads, self.head_dim)
        self.key_ranks = [self.head_dim] * self.num_kv_heads
        self.value_ranks = [self.head_dim] * self.num_kv_heads
        self.groups = group_heads(self.key_ranks, self.value_ranks)
        self.sampled_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv_hooks: OrderedDict[int, KVHook] = OrderedDict()  # see KVHookPoint: presses and observers
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
        if self.pre_rope:
            for entry in per_group:  # [U^T | rotate_half(U^T)]: the rebuilt key and its half-rotation in one matmul
                if entry["key"] is not None:
                    entry["key_rebuild"] = self.rebuild_matrix(entry["key"])
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
        if self.skip_projections and past_key_values is None and not self._kv_hooks:
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
        if not folded or self._kv_hooks:
            value = self.v_proj(hidden_states).view(batch, q_len, n_kv, d).transpose(1, 2)

        if self.sampled_masks is not None:
            if self._kv_hooks:  # nothing is cached on this path: hooks see the states alone
                self.run_kv_hooks(KVStep(self.layer_idx, key, value, scale=self.scaling))
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

        step = None
        if self._kv_hooks:
            fills = past_key_values is not None and q_len > 1 and past_key_values.get_seq_length(self.layer_idx) == 0
            rebuild = None
            if pre_rope:
                rebuild = partial(self.rebuild_all, weights["groups"], list(key_groups), cos.unsqueeze(1), sin.unsqueeze(1))
            step = self.run_kv_hooks(KVStep(self.layer_idx, key, value, query_groups, key_groups, value_groups,
                                            self.scaling, fills, rebuild))
        if pre_rope:
            key_groups, value_groups = self._pre_rope_keys(
                weights["groups"], query_groups, key_groups, value_groups, (cos, sin), past_key_values,
                position_ids if position_ids is not None else cache_position, rope_table, step)
        elif past_key_values is not None:
            cache_kwargs = {"signature": self.signature()}
            if step is not None and step.kept is not None:
                # a hook kept some of the prefill: it attends to all its tokens, only the kept ones are cached
                past_key_values.update(step.kept_keys, step.kept_values, self.layer_idx, cache_kwargs)
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
