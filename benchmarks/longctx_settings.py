"""The settings benchmarks.longctx measures: each way to shrink a cache, what it holds in bytes, and the prefill
eviction it enters around a window (ours or a kvpress press)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from plugin.cache.eviction import prefill_ratio


@dataclass
class Setting:
    name: str
    method: str
    model: Any
    budget: float = 1.0
    bits: tuple[int, int] | None = None
    tiered: tuple[int, int] | None = None  # (window, recent rank): the old rank depends on the length
    hf_quant: tuple[str, int] | None = None  # transformers' QuantizedCache: (backend, bits)
    press: str | None = None  # a kvpress press acting on the prefill, at the bytes of `budget`
    evict_to: float | None = None  # the project's eviction on this setting's cache, down to these bytes
    rank_file: str | None = None  # ranks, bits and per-layer eviction of `mkv search-budget --bytes --context`
    only_context: int | None = None  # the one context the rank file was allocated for

    def apply(self) -> None:
        if not hasattr(self.model, "set_kv_budget"):
            return  # a plain model: its cache says everything
        self.model.set_kv_eviction(None)
        if self.rank_file is not None:
            self.model.clear_kv_bits()
            self.model.load_rank_file(self.rank_file)  # attaches its eviction until the next apply()
            return
        self.model.set_kv_budget(self.budget)
        if self.bits is None:
            self.model.clear_kv_bits()
        else:
            self.model.set_kv_bits(*self.bits)

    def eviction_share(self, context: int, after: int) -> float | None:
        """The share of `context` prefill tokens this setting evicts (None: it does not evict); ValueError where
        the `after` tokens kept whole alone exceed its bytes."""
        if self.evict_to is not None:  # the bytes its cache holds, uncoded tokens and positions counted
            from plugin.budgets.cache_bytes import least_eviction

            return least_eviction(self.model, self.evict_to, context + after, after) or None
        if self.press is not None:
            return prefill_ratio(self.budget, context, after)
        return None

    def reading(self, context: int, after: int) -> contextlib.AbstractContextManager:
        """Entered around the prefill of `context` tokens that `after` more will follow (an eviction, if any)."""
        share = self.eviction_share(context, after)
        if share is None:
            return contextlib.nullcontext()
        if self.evict_to is not None:
            from plugin.cache.eviction import SnapEviction

            return SnapEviction(share)(self.model)
        return make_press(self.press, share)(self.model)

    def cache(self, total: int, budget: float) -> Any:
        """A fresh cache for a sequence of `total` tokens (tiered: its old rank for that length)."""
        if self.hf_quant is not None:
            from transformers import QuantizedCache

            backend, nbits = self.hf_quant  # transformers' defaults otherwise: what a user gets
            return QuantizedCache(backend, self.model.config, nbits=nbits)
        if not hasattr(self.model, "set_kv_budget"):
            from transformers import DynamicCache

            return DynamicCache()
        if self.tiered is not None:
            from plugin.cache import TieredPcaCache

            window, recent = self.tiered
            old = tiered_old_rank(budget * self.model.config.head_dim, recent, total, window)
            return TieredPcaCache(window, old, old, reserve=total)  # sized for the window: no spare room
        return self.model.model.new_cache(reserve=total)  # the length is known: no spare capacity held

    def bf16_fraction(self, cache: Any, tokens: int) -> float:
        """Cache bytes as a fraction of a bfloat16 full cache of `tokens` tokens.

        Projected and tiered caches: measured bytes over the full-rank cache's (dtype-free). Our quantized,
        evicting and rank-file caches: `held_bytes` (coded tokens at their rate, codes + float16 scales and zeros;
        the tokens a quantized layer holds uncoded at bfloat16; stored key positions). transformers': counted from
        the cache's quantized tensors and its bf16 window.
        """
        cfg = self.model.config
        full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
        import torch

        if self.rank_file is not None or self.bits is not None or self.evict_to is not None:
            from plugin.budgets.cache_bytes import held_bytes  # per layer: coded tokens at its rate, uncoded at bf16

            return held_bytes(self.model, cache) / (self.model.full_cache_bytes_per_token(torch.bfloat16) * tokens)
        if self.hf_quant is not None:  # codes, float16 scales and zeros, and the bf16 residual window it keeps
            codes, groups, elements, residual = hf_quant_counts(cache)
            return (codes + 2 * 2 * groups + 2 * residual) / (2 * (elements + residual))
        if not hasattr(self.model, "set_kv_budget"):  # a DynamicCache: its tensors, after any eviction
            held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            # a masked key and its value are counted as evicted: what a per-head cache would free (kvpress frees
            # none of it; docs/longctx.md says so beside the rows)
            held -= 2 * cfg.head_dim * masked_entries(self.model)
            return held / (full * tokens)
        return cache.nbytes() / (full * tokens * self.model.dtype.itemsize)


def hf_quant_counts(cache: Any) -> tuple[int, int, int, int]:
    """(bytes of packed codes, quantization groups, quantized elements, elements of the recent tokens it keeps
    unquantized) of a transformers QuantizedCache."""
    codes = groups = elements = residual = 0
    for layer in cache.layers:
        if hasattr(layer.keys, "numel"):  # a tensor once the layer holds any token
            residual += layer.keys.numel() + layer.values.numel()
        for q in (layer._quantized_keys, layer._quantized_values):
            if isinstance(q, tuple):  # HQQ: (packed codes, meta)
                codes += q[0].numel() * q[0].element_size()
                groups += q[1]["scale"].numel()
                elements += math.prod(q[1]["shape"])
            else:  # optimum-quanto WeightQBitsTensor
                codes += q._data._data.numel() * q._data._data.element_size()
                groups += q._scale.numel()
                elements += q.numel()
    return codes, groups, elements, residual


PRESSES = ("knorm", "snapkv", "expected-attention", "pyramidkv", "adakv")


def make_press(name: str, ratio: float) -> Any:
    """A kvpress press by short name (kvpress's own defaults otherwise: what a user gets)."""
    import kvpress

    if name == "adakv":  # AdaKV: SnapKV's scores, the layer's kept tokens shared among its heads by score
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    classes = {"knorm": "KnormPress", "snapkv": "SnapKVPress", "expected-attention": "ExpectedAttentionPress",
               "pyramidkv": "PyramidKVPress"}  # PyramidKV: SnapKV's scores, per-layer budgets shrinking with depth
    return getattr(kvpress, classes[name])(compression_ratio=ratio)


def masked_entries(model: Any) -> int:
    """Key entries (token x KV head, summed over layers) that kvpress masks instead of evicting: its per-head presses
    (AdaKV) keep every token in the cache and hide the evicted ones from attention."""
    total = 0
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        total += int(masked[0].numel()) if masked is not None else 0
    return total


def tiered_old_rank(budget_rank: float, recent_rank: int, total: int, window: int) -> int:
    """The highest old-token rank at which the tiered cache holds no more bytes than uniform `budget_rank`."""
    if total <= window:
        raise ValueError(f"the window ({window}) covers all {total} tokens: nothing would be demoted")
    rank = math.floor((budget_rank * total - recent_rank * window) / (total - window))
    if rank < 1:
        raise ValueError(f"a {window}-token window at rank {recent_rank} alone exceeds the budget at {total} tokens")
    return rank
