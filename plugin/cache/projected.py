"""The projected cache: a transformers `Cache` that keeps only the kept dimensions of every KV head.

Each layer stores one tensor per group of KV heads sharing the same (key rank, value rank):
keys ``[batch, heads_in_group, seq, r_k]`` and values ``[batch, heads_in_group, seq, r_v]``.
Nothing is padded to the largest rank, so the bytes held are exactly
sum over heads of (r_k + r_v) x tokens x element size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

GroupSignature = tuple[tuple[int, ...], ...]


class TensorMapLayer(CacheLayerMixin):
    """Batch and length operations of a cache layer, expressed once over its `_map` of every stored tensor.

    Stored tensors keep the batch on dim 0 and the sequence on dim -2.
    """

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self.get_seq_length() > max_length:
            self._map(lambda t: t[..., :max_length, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))


class PcaCacheLayer(TensorMapLayer):
    """One decoder layer's projected keys and values, grouped by rank."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.key_groups: list[torch.Tensor] = []
        self.value_groups: list[torch.Tensor] = []
        self.signature: GroupSignature | None = None

    def lazy_initialization(self, key_states: list[torch.Tensor]) -> None:
        self.dtype, self.device = key_states[0].dtype, key_states[0].device
        self.is_initialized = True

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        signature = (cache_kwargs or {}).get("signature")
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            self.signature = signature
            self.key_groups, self.value_groups = list(key_states), list(value_states)
        else:
            if signature != self.signature:
                raise ValueError(
                    "the KV ranks changed while this cache was in use; start a new cache "
                    "(past_key_values=None) after set_kv_ranks / set_kv_budget"
                )
            self.key_groups = [torch.cat([old, new], dim=-2) for old, new in zip(self.key_groups, key_states)]
            self.value_groups = [torch.cat([old, new], dim=-2) for old, new in zip(self.value_groups, value_states)]
        self.keys, self.values = self.key_groups[0], self.value_groups[0]
        return self.key_groups, self.value_groups

    def get_seq_length(self) -> int:
        if not self.is_initialized or not self.key_groups:
            return 0
        return self.key_groups[0].shape[-2]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key_groups, *self.value_groups))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.get_seq_length() > 0:
            self.key_groups = [fn(t) for t in self.key_groups]
            self.value_groups = [fn(t) for t in self.value_groups]
            self.keys, self.values = self.key_groups[0], self.value_groups[0]

    def reset(self) -> None:
        self.key_groups, self.value_groups, self.signature = [], [], None
        self.keys = self.values = None
        self.is_initialized = False


    def prefetch(self) -> None:
        if self.is_initialized and self.key_groups and self.key_groups[0].device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class CompressedCache(Cache):
    """A Cache whose layers report `nbytes()` and keep the batch on dim 0 of their `keys`."""

    def nbytes(self) -> int:
        """Bytes held by everything cached."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Cached bytes per token per sequence (batch x sequence length divide out)."""
        if not self.layers or self.get_seq_length() == 0:
            return 0.0
        return self.nbytes() / (self.layers[0].keys.shape[0] * self.get_seq_length())  # keys: batch on dim 0


class PcaCache(CompressedCache):
    """Projected KV cache for `PcaLlamaForCausalLM`; layers are created lazily on first update."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=PcaCacheLayer)


def own_cache(past_key_values: Any, use_cache: bool, cache_class: type[Cache],
              factory: Callable[[], Cache] | None = None) -> Any:
    """The cache a model with its own cache class should use for this forward.

    transformers (and `generate`) hand in None or an empty DynamicCache when nothing is cached
    yet; both are replaced by `factory()` (default `cache_class()`). A filled cache of another
    class cannot be converted.
    """
    fresh = past_key_values is None or (type(past_key_values) is DynamicCache and past_key_values.get_seq_length() == 0)
    if use_cache and fresh:
        return (factory or cache_class)()
    if past_key_values is not None and not isinstance(past_key_values, cache_class):
        raise ValueError(
            f"this model needs a {cache_class.__name__}, got {type(past_key_values).__name__}; pass "
            "past_key_values=None and the model creates one"
        )
    return past_key_values


def prepare_generation_cache(generation_config: Any, model_kwargs: dict, cache_class: type[Cache],
                             factory: Callable[[], Cache] | None = None) -> None:
    """Check `generate`'s cache settings and swap the empty DynamicCache it made for `factory()`."""
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r} is not supported; leave it "
            f"unset, the model uses its own {cache_class.__name__}"
        )
    cache = model_kwargs.get("past_key_values")
    if type(cache) is DynamicCache and cache.get_seq_length() == 0:
        model_kwargs["past_key_values"] = (factory or cache_class)()
