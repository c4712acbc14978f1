"""What every cache kind shares: the tensor-map layer, the Cache that counts bytes, and the hooks that
swap transformers' default cache for a model's own.

A layer stores one tensor per group of KV heads sharing the same ranks; `GroupSignature` is that
grouping, ``((r_k, r_v, *heads), ...)``, which the attention passes with every update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

GroupSignature = tuple[tuple[int, ...], ...]


class TensorMapLayer(CacheLayerMixin):
    """Batch and length operations of a cache layer, expressed once over its `_map` of every stored tensor.

    Stored tensors keep the batch on dim 0 and the sequence on dim -2. A layer that stores head groups
    takes their grouping (`signature`) from its first update and refuses any other afterwards
    (:meth:`begin_update`): states cut to other ranks cannot be appended to the ones it holds.
    """

    is_sliding = False
    is_compileable = False
    signature: GroupSignature | None = None

    def lazy_initialization(self, key_states: torch.Tensor | list[torch.Tensor]) -> None:
        sample = key_states[0] if isinstance(key_states, (list, tuple)) else key_states
        self.dtype, self.device = sample.dtype, sample.device
        self.is_initialized = True

    def begin_update(self, key_states: list[torch.Tensor], cache_kwargs: dict[str, Any] | None) -> bool:
        """Initialise the layer at its first update (True), or check that the head grouping is the one it holds."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            return True
        if (cache_kwargs or {}).get("signature") != self.signature:
            raise ValueError(
                "the KV ranks changed while this cache was in use; start a new cache "
                "(past_key_values=None) after set_kv_ranks / set_kv_budget"
            )
        return False

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(keys attended, absolute position of the first): every cached token, then the new ones."""
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def live_nbytes(self) -> int:
        """Bytes of the cached tokens alone; a layer with preallocated buffers (`nbytes()`) holds more."""
        return self.nbytes()

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


class CompressedCache(Cache):
    """A Cache whose layers report `nbytes()` and keep the batch on dim 0 of their `keys`.

    `nested_bases`: the cache cuts states below the model's ranks by slicing (age tiers), so every head,
    full rank included, must be cached in the nested basis U rather than the model's own basis.
    """

    nested_bases = False

    def nbytes(self) -> int:
        """Bytes held by everything cached (the stored key positions of an evicted pre-RoPE cache included),
        spare capacity of preallocated buffers included."""
        return sum(layer.nbytes() for layer in self.layers) + self._position_bytes()

    def live_nbytes(self) -> int:
        """Bytes of the cached tokens alone (and their stored positions): the formula of each cache kind."""
        return sum(layer.live_nbytes() for layer in self.layers) + self._position_bytes()

    def _position_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for groups in self._key_positions().values() for t in groups)

    # -- key positions ---------------------------------------------------------------------------------------
    # A cache of pre-RoPE key coefficients rotates every key at its position when attended. Positions follow
    # from the cache's length (slots), except after token eviction: then each head keeps other tokens, and the
    # positions it kept are stored here, per layer and head group ``[batch, heads, tokens]`` (int32).
    def _key_positions(self) -> dict[int, list[torch.Tensor]]:
        return self.__dict__.setdefault("key_positions", {})

    def stored_key_positions(self, layer_idx: int) -> list[torch.Tensor] | None:
        """The positions of layer `layer_idx`'s cached keys, per head group, when they are stored (else None)."""
        return self._key_positions().get(layer_idx)

    def store_key_positions(self, layer_idx: int, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Append the positions of the tokens just cached in `layer_idx`; returns all of them."""
        held = self._key_positions().get(layer_idx)
        positions = [p.to(torch.int32) for p in positions]
        if held is not None:
            positions = [torch.cat([h, p], dim=-1) for h, p in zip(held, positions)]
        self._key_positions()[layer_idx] = positions
        return positions

    def _map_positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        store = self._key_positions()
        for layer_idx, groups in store.items():
            store[layer_idx] = [fn(t.unsqueeze(-1)).squeeze(-1) for t in groups]  # layers' convention: seq on -2

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        for layer_idx, groups in self._key_positions().items():
            self._key_positions()[layer_idx] = [t[..., : self.layers[layer_idx].get_seq_length()] for t in groups]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda t: t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self._key_positions().clear()

    def bytes_per_token(self) -> float:
        """Cached bytes per token per sequence (batch x sequence length divide out)."""
        if not self.layers or self.get_seq_length() == 0:
            return 0.0
        return self.nbytes() / (self.layers[0].keys.shape[0] * self.get_seq_length())  # keys: batch on dim 0


def full_cache_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes per token of the uncompressed (GQA) K/V cache of a Llama-family model: what every ratio divides by."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bits = torch.finfo(dtype or next(model.parameters()).dtype).bits
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * bits // 8


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
