"""The projected cache layer: it keeps only the kept dimensions of every KV head.

Each layer stores one tensor per group of KV heads sharing the same (key rank, value rank):
keys ``[batch, heads_in_group, seq, r_k]`` and values ``[batch, heads_in_group, seq, r_v]``.
Nothing is padded to the largest rank: the live tokens take exactly sum over heads of
(r_k + r_v) x tokens x element size (`live_nbytes()`), and the buffers (`nbytes()`) at most 1/8 of the
tokens plus one chunk more (see PcaCacheLayer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import GroupSignature, TensorMapLayer

Rebase = Callable[[str, int, torch.Tensor, int], torch.Tensor]
DEFAULT_CHUNK = 16  # tokens: the spare room a small cache may hold beyond 1/8 of its tokens


class PcaCacheLayer(TensorMapLayer):
    """One decoder layer's projected keys and values, grouped by rank, in preallocated buffers.

    The buffers hold what the layer says, within a small margin: at every length ``n`` their capacity
    is at most ``n + n // 8 + chunk`` tokens.  The first allocation holds exactly what is written (or
    `reserve`, when more: `generate` passes prompt + new tokens, so decoding never reallocates and nothing is
    spare at the end); an append of at least 1/8 of the held tokens grows the buffers to exactly what is
    needed, a smaller one to that plus 1/8 of the held tokens, rounded up to whole `chunk`s.  Appending a
    token thus writes in place, amortised O(1) (a reallocation that copies n tokens comes at least n / 8
    appends after the previous one), not the O(length) copy of a concatenation.  Forgetting at least 1/8
    of the held tokens at once leaves exactly the live ones; smaller forgets compact once over the bound.  With `max_length` the buffers are allocated once at
    that capacity and never move (static shapes, as `torch.compile` wants); exceeding it is an error.
    Attention reads views of the filled part.
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK, max_length: int | None = None, reserve: int | None = None) -> None:
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

    @property
    def key_groups(self) -> list[torch.Tensor]:
        return [t[..., self._start : self._length, :] for t in self._keys]

    @property
    def value_groups(self) -> list[torch.Tensor]:
        return [t[..., self._start : self._length, :] for t in self._values]

    def capacity(self) -> int:
        return self._keys[0].shape[-2] if self._keys else 0

    def _grown_capacity(self, live: int, wanted: int) -> int:
        """Capacity for `wanted` tokens when `live` are held: exact for a large append, else 1/8 spare."""
        if 8 * (wanted - live) >= live:
            return wanted
        return -(-(wanted + live // 8) // self.chunk) * self.chunk

    def _within_bound(self, capacity: int, held: int) -> bool:
        return capacity <= held + held // 8 + self.chunk

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
        elif not self._keys:
            capacity = max(wanted, self.reserve)
        else:
            capacity = self._grown_capacity(live, wanted)
        self._reallocate(capacity, like_keys, like_values)

    def _reallocate(self, capacity: int, like_keys: list[torch.Tensor], like_values: list[torch.Tensor]) -> None:
        """New buffers of `capacity` tokens shaped like `like_*` but for the sequence, holding the live tokens."""
        live = self._length - self._start

        def moved(old: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for index, sample in enumerate(like):
                buffer = sample.new_empty(*sample.shape[:-2], capacity, sample.shape[-1])
                if old:
                    buffer[..., :live, :] = old[index][..., self._start : self._length, :]
                out.append(buffer)
            return out

        self._keys, self._values = moved(self._keys, like_keys), moved(self._values, like_values)
        self._start, self._length = 0, live

    def forget(self, count: int) -> None:
        """Drop the `count` oldest live tokens: a large forget frees their memory at once, small ones past the bound."""
        self._start = min(self._length, self._start + max(0, count))
        live = self._length - self._start
        if count > 0 and self._keys and self.max_length is None:
            if 8 * count >= live:
                # A large forget (a window moving past a prefill, tiers demoting one) mirrors a large append:
                # the buffers then hold exactly the live tokens.
                self._reallocate(live, self._keys, self._values)
            elif not self._within_bound(self.capacity(), live):
                self._reallocate(live + live // 8, self._keys, self._values)
        self._sync()

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.begin_update(key_states, cache_kwargs):
            self.signature = (cache_kwargs or {}).get("signature")
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

    def get_max_cache_shape(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def nbytes(self) -> int:
        """Bytes of the buffers, spare capacity included: what the layer holds."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def live_nbytes(self) -> int:
        """Bytes of the cached tokens alone: exactly ranks x tokens x element size."""
        return sum(t.numel() * t.element_size() for t in (*self.key_groups, *self.value_groups))

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
