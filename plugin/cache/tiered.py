"""The age-tiered projected cache: the newest tokens at the model's ranks, older ones at lower ranks.

Something only nested bases allow: the first r dimensions of a rank-R projected state *are* the
rank-r state, so a token leaving the recent window is demoted by slicing, with no recomputation.
Each layer holds two segments per head group: ``recent`` (the newest `window` tokens, at the
model's current ranks) and ``old`` (everything before, at ``min(rank, old rank)``).  For attention
the old keys and values are zero-padded to the recent width: a zero dimension adds nothing to
q'.k' and, through U_V, nothing to the output, so every token is attended exactly at its own
segment's rank.  The padded copy is transient (one layer at a time); the live bytes are

    batch x sum over heads of [(min(r_k, o_k) + min(r_v, o_v)) x old tokens + (r_k + r_v) x recent tokens]
    x element size.

Within one forward the new tokens are attended at the recent ranks (they are all recent then);
the demotion happens after the update, so a token is seen at low rank from the first query that
comes `window` tokens after it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .base import CompressedCache, GroupSignature, TensorMapLayer
from .projected import DEFAULT_CHUNK, PcaCacheLayer


def demoted(signature: GroupSignature, old_key_rank: int, old_value_rank: int) -> GroupSignature:
    """The old segment's grouping: the same head groups, each at ``min(its rank, the old rank)``."""
    return tuple((min(entry[0], old_key_rank), min(entry[1], old_value_rank), *entry[2:]) for entry in signature)


class TieredPcaCacheLayer(TensorMapLayer):
    def __init__(self, window: int, old_key_rank: int, old_value_rank: int, chunk: int = DEFAULT_CHUNK,
                 reserve: int | None = None) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"the recent window must be >= 1 token; got {window}")
        if old_key_rank < 1 or old_value_rank < 1:
            raise ValueError(f"old ranks must be >= 1; got ({old_key_rank}, {old_value_rank})")
        if reserve is not None and reserve < 0:
            raise ValueError(f"reserve must be >= 0 tokens; got {reserve}")
        self.window, self.old_ranks = window, (old_key_rank, old_value_rank)
        self.recent = PcaCacheLayer(chunk)
        # Sized for the whole sequence when its length is known: a short append to a long old segment would
        # otherwise grow it by 1/8 of what it holds (spare bytes held beyond the budget).
        self.old = PcaCacheLayer(chunk, reserve=max(0, reserve - window) if reserve else None)

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        recent_keys, recent_values = self.recent.update(key_states, value_states, cache_kwargs)
        if self.old.get_seq_length():
            keys = [torch.cat([F.pad(old, (0, new.shape[-1] - old.shape[-1])), new], dim=-2)
                    for old, new in zip(self.old.key_groups, recent_keys)]
            values = [torch.cat([F.pad(old, (0, new.shape[-1] - old.shape[-1])), new], dim=-2)
                      for old, new in zip(self.old.value_groups, recent_values)]
        else:
            keys, values = list(recent_keys), list(recent_values)
        self._demote(cache_kwargs)
        self._sync()
        return keys, values

    def _demote(self, cache_kwargs: dict[str, Any] | None) -> None:
        """Move the tokens beyond the newest `window` from the recent segment to the old one, sliced."""
        excess = self.recent.get_seq_length() - self.window
        if excess <= 0:
            return
        signature = demoted(self.recent.signature, *self.old_ranks)
        leaving_keys = [k[..., :excess, : entry[0]] for k, entry in zip(self.recent.key_groups, signature)]
        leaving_values = [v[..., :excess, : entry[1]] for v, entry in zip(self.recent.value_groups, signature)]
        self.old.update(leaving_keys, leaving_values, {"signature": signature})
        self.recent.forget(excess)

    def _sync(self) -> None:
        self.keys = self.recent.keys
        self.values = self.recent.values

    def get_seq_length(self) -> int:
        return self.old.get_seq_length() + self.recent.get_seq_length() if self.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes held: the old segment's buffers at its ranks plus the recent one's at the model's."""
        return self.old.nbytes() + self.recent.nbytes()

    def live_nbytes(self) -> int:
        """Bytes of the cached tokens alone (the formula of the module docstring)."""
        return self.old.live_nbytes() + self.recent.live_nbytes()

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if max_length < self.get_seq_length() and self.old.get_seq_length():
            raise ValueError("an age-tiered cache cannot be cropped once tokens were demoted (their high ranks are gone)")
        self.recent.crop(max_length)
        self._sync()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.recent._map(fn)
        self.old._map(fn)
        self._sync()

    def reset(self) -> None:
        self.recent.reset()
        self.old.reset()
        self.keys = self.values = None
        self.is_initialized = False


class TieredPcaCache(CompressedCache):
    """Projected cache whose tokens older than `window` are kept at ranks ``(old_key_rank, old_value_rank)``
    (capped at each head's own ranks); see the module docstring.  `reserve`: the tokens the whole sequence will
    hold, when known (as `new_cache(reserve=...)`), so that no buffer keeps spare room at that length."""

    nested_bases = True  # demotion slices: a full-rank head must be held in U too

    def __init__(self, window: int, old_key_rank: int, old_value_rank: int | None = None,
                 chunk: int = DEFAULT_CHUNK, reserve: int | None = None) -> None:
        old_value_rank = old_key_rank if old_value_rank is None else old_value_rank
        self.window, self.old_ranks, self.chunk = window, (old_key_rank, old_value_rank), chunk
        make = partial(TieredPcaCacheLayer, window, old_key_rank, old_value_rank, chunk, reserve)
        make()  # checks the arguments now, not at the first update
        super().__init__(layer_class_to_replicate=make)
