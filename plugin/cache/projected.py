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
Rebase = Callable[[str, int, torch.Tensor, int], torch.Tensor]


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
    """One decoder layer's projected keys and values, grouped by rank, in preallocated buffers.

    Buffers grow by whole chunks (capacity doubles, rounded up to `chunk` tokens), so appending a
    token writes in place: amortised O(1), not the O(length) copy of a concatenation.  With
    `max_length` the buffers are allocated once at that capacity and never move (static shapes,
    as `torch.compile` wants); exceeding it is an error.  `reserve` sizes the first allocation when
    the final length is known (`generate` passes prompt + new tokens), so decoding never
    reallocates and no doubling leaves spare capacity; the cache can still grow past it.
    Attention reads views of the filled part.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, chunk: int = 256, max_length: int | None = None, reserve: int | None = None) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"the cache chunk must be >= 1 token; got {chunk}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 token; got {max_length}")
        if reserve is not None and reserve < 0:
            raise ValueError(f"reserve must be >= 0 tokens; got {reserve}")
        self.chunk, self.max_length, self.reserve = chunk, max_length, reserve or 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._start = 0  # first live token in the buffers (a sliding window moves it; see .window)
        self._length = 0  # end of the live tokens
        self.signature: GroupSignature | None = None

    @property
    def key_groups(self) -> list[torch.Tensor]:
        return [t[..., self._start : self._length, :] for t in self._keys]

    @property
    def value_groups(self) -> list[torch.Tensor]:
        return [t[..., self._start : self._length, :] for t in self._values]

    def lazy_initialization(self, key_states: list[torch.Tensor]) -> None:
        self.dtype, self.device = key_states[0].dtype, key_states[0].device
        self.is_initialized = True

    def capacity(self) -> int:
        return self._keys[0].shape[-2] if self._keys else 0

    def _reserve(self, needed: int, like_keys: list[torch.Tensor], like_values: list[torch.Tensor]) -> None:
        """Room up to buffer index `needed`; a reallocation keeps only the live tokens (not forgotten ones)."""
        if needed <= self.capacity():
            return
        live = self._length - self._start
        wanted = live + needed - self._length
        if self.max_length is not None:
            if self._keys or wanted > self.max_length:
                raise ValueError(f"the cache holds at most max_length={self.max_length} tokens; {wanted} needed")
            capacity = self.max_length
        elif not self._keys and wanted <= self.reserve:
            capacity = self.reserve
        else:
            # Doubling (from the live tokens once some were forgotten): amortised O(1) appends.
            capacity = max(wanted, 2 * (live if self._start else self.capacity()))
            capacity = -(-capacity // self.chunk) * self.chunk

        def grown(old: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for index, sample in enumerate(like):
                buffer = sample.new_empty(*sample.shape[:-2], capacity, sample.shape[-1])
                if old:
                    buffer[..., :live, :] = old[index][..., self._start : self._length, :]
                out.append(buffer)
            return out

        self._keys, self._values = grown(self._keys, like_keys), grown(self._values, like_values)
        self._start, self._length = 0, live

    def forget(self, count: int) -> None:
        """Drop the `count` oldest live tokens; their memory is reclaimed at the next reallocation."""
        self._start = min(self._length, self._start + max(0, count))
        self._sync()

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
        elif signature != self.signature:
            raise ValueError(
                "the KV ranks changed while this cache was in use; start a new cache "
                "(past_key_values=None) after set_kv_ranks / set_kv_budget"
            )
        new = key_states[0].shape[-2]
        self._reserve(self._length + new, key_states, value_states)
        end = self._length + new
        for buffer, states in zip(self._keys, key_states):
            buffer[..., self._length : end, :] = states
        for buffer, states in zip(self._values, value_states):
            buffer[..., self._length : end, :] = states
        self._length = end
        keys, values = self.key_groups, self.value_groups
        self.keys, self.values = keys[0], values[0]
        return keys, values

    def get_seq_length(self) -> int:
        return self._length - self._start if self.is_initialized else 0

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def nbytes(self) -> int:
        """Bytes of the cached tokens (the filled part of the buffers): exactly ranks x tokens x element size."""
        return sum(t.numel() * t.element_size() for t in (*self.key_groups, *self.value_groups))

    def allocated_bytes(self) -> int:
        """Bytes of the buffers, spare capacity included."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self.get_seq_length() > max_length:
            self._length = self._start + max(0, max_length)  # the buffers keep their capacity; later writes overwrite
            self._sync()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._keys:
            self._keys = [fn(t) for t in self._keys]
            self._values = [fn(t) for t in self._values]
            self._sync()

    def _sync(self) -> None:
        if self._keys:
            self.keys, self.values = self.key_groups[0], self.value_groups[0]

    def shrink(self, signature: GroupSignature, rebase: Rebase | None = None) -> None:
        """Cut the cached states to lower ranks in place of recomputing them (nested bases).

        `signature` is the attention's new grouping ``((r_k, r_v, *heads), ...)``; every head's new
        ranks must not exceed its cached ones.  The first r dimensions of a rank-R state are the
        rank-r state, so attending afterwards equals attending at rank r from the start.  `rebase`
        (kind, head, states, new rank) -> states first moves a head held in another basis (a full-rank
        head in the model's own basis) into the nested one.
        """
        if not self.is_initialized or self.signature == signature:
            self.signature = signature if self.is_initialized else self.signature
            return
        keys, values = {}, {}
        for entry, k, v in zip(self.signature, self.key_groups, self.value_groups):
            for position, head in enumerate(entry[2:]):
                keys[head], values[head] = k[:, position], v[:, position]
        # New buffers of the same capacity: a fixed-capacity cache keeps its static shape and
        # decoding goes on without reallocating; the old, wider buffers are freed.
        capacity, live = self.capacity(), self._length - self._start
        new_keys, new_values = [], []
        for entry in signature:
            rank_k, rank_v, heads = entry[0], entry[1], entry[2:]
            for head in heads:
                if rank_k > keys[head].shape[-1] or rank_v > values[head].shape[-1]:
                    raise ValueError(
                        f"cannot shrink head {head} to ranks ({rank_k}, {rank_v}): the cache holds "
                        f"({keys[head].shape[-1]}, {values[head].shape[-1]}); a cache only shrinks"
                    )
            for kind, out, held, rank in (("key", new_keys, keys, rank_k), ("value", new_values, values, rank_v)):
                sample = held[heads[0]]
                buffer = sample.new_empty(sample.shape[0], len(heads), capacity, rank)
                states = [held[h][..., :live, :] if rebase is None else rebase(kind, h, held[h][..., :live, :], rank)
                          for h in heads]
                buffer[..., :live, :] = torch.stack([state[..., :rank] for state in states], dim=1)
                out.append(buffer)
        self._keys, self._values, self.signature = new_keys, new_values, signature
        self._length, self._start = live, 0
        self._sync()

    def reset(self) -> None:
        self._keys, self._values, self._start, self._length, self.signature = [], [], 0, 0, None
        self.keys = self.values = None
        self.is_initialized = False

    def prefetch(self) -> None:
        if self.is_initialized and self._keys and self._keys[0].device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class CompressedCache(Cache):
    """A Cache whose layers report `nbytes()` and keep the batch on dim 0 of their `keys`.

    `nested_bases`: the cache cuts states below the model's ranks by slicing (age tiers), so every head,
    full rank included, must be cached in the nested basis U rather than the model's own basis.
    """

    nested_bases = False

    def nbytes(self) -> int:
        """Bytes held by everything cached (the stored key positions of an evicted pre-RoPE cache included)."""
        held = sum(layer.nbytes() for layer in self.layers)
        return held + sum(t.numel() * t.element_size() for groups in self._key_positions().values() for t in groups)

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


class PcaCache(CompressedCache):
    """Projected KV cache for `PcaLlamaForCausalLM`; layers are created lazily on first update.

    `chunk`: growth granularity of the preallocated buffers; `max_length`: a fixed capacity
    allocated at the first update (static shapes); `reserve`: tokens to allocate at the first
    update when more than it writes (the expected final length; growth stays possible);
    `sliding_window`: keep only the last window - 1 tokens of every layer (Mistral), see :mod:`.window`.
    """

    def __init__(self, chunk: int = 256, max_length: int | None = None, sliding_window: int | None = None,
                 reserve: int | None = None, nested_bases: bool = False) -> None:
        if sliding_window is not None and max_length is not None:
            raise ValueError("a sliding-window cache already has a fixed size; give max_length or sliding_window")
        self.nested_bases = nested_bases
        self.chunk, self.max_length, self.sliding_window, self.reserve = chunk, max_length, sliding_window, reserve
        self._new_layer()  # checks the arguments now, not at the first update
        super().__init__(layer_class_to_replicate=PcaCacheLayer)

    def _new_layer(self) -> PcaCacheLayer:
        if self.sliding_window is not None:
            from .window import WindowPcaCacheLayer

            return WindowPcaCacheLayer(self.sliding_window, self.chunk)
        return PcaCacheLayer(self.chunk, self.max_length, self.reserve)

    def update(self, key_states: Any, value_states: Any, layer_idx: int, cache_kwargs: dict | None = None) -> Any:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


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
