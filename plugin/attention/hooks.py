"""One hook point in attention for whatever reads or edits what a layer caches (kvpress's shape).

A press (`plugin.cache.eviction.SnapEviction`) or an observer (`plugin.model.pca.observe_kv`) registers a callable with
``handle = attn.register_kv_hook(fn)`` and removes it with ``handle.remove()`` in a ``finally``; the attention
calls every registered hook once per forward with a :class:`KVStep` and knows none of them by name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


@dataclass
class KVStep:
    """One forward's keys and values at the hook point: projected, before they enter the cache.

    ``key`` / ``value`` are every KV head's states ``[B, n_kv, L, d]`` (keys after RoPE, or before it with
    ``kv_key_space="pre-rope"``). The groups are per head group, as the cache holds them (empty on the
    sampled training path, which caches nothing). A hook that wants only some tokens of a prefill cached
    calls :meth:`keep`; the prefill itself still attends to all of them.
    """

    layer_idx: int
    key: torch.Tensor
    value: torch.Tensor
    query_groups: list[torch.Tensor] = field(default_factory=list)
    key_groups: list[torch.Tensor] = field(default_factory=list)
    value_groups: list[torch.Tensor] = field(default_factory=list)
    scale: float = 1.0
    fills_cache: bool = False  # several tokens into an empty cache: the moment a prefill press acts
    rebuild: Callable[[], list[torch.Tensor]] | None = None  # pre-RoPE: the keys rebuilt and rotated
    kept_keys: list[torch.Tensor] | None = None
    kept_values: list[torch.Tensor] | None = None
    kept: list[torch.Tensor] | None = None  # per group, the cached tokens' indices [B, heads, kept]
    _rebuilt: list[torch.Tensor] | None = field(default=None, repr=False)

    def scored_keys(self) -> list[torch.Tensor]:
        """The keys the queries are compared with: the cached ones, or pre-RoPE coefficients rebuilt and rotated."""
        if self.rebuild is None:
            return self.key_groups
        if self._rebuilt is None:
            self._rebuilt = self.rebuild()
        return self._rebuilt

    def keep(self, keys: list[torch.Tensor], values: list[torch.Tensor], kept: list[torch.Tensor]) -> None:
        """Cache these keys and values (the tokens at indices `kept` of each head group) instead of all."""
        self.kept_keys, self.kept_values, self.kept = keys, values, kept


KVHook = Callable[[Any, KVStep], None]


class KVHookPoint:
    """The registry an attention layer mixes in: hooks in registration order, each removable by its handle."""

    _kv_hooks: OrderedDict[int, KVHook]  # the layer creates it in __init__

    def register_kv_hook(self, hook: KVHook) -> RemovableHandle:
        """Call ``hook(attention, step)`` at every forward until ``handle.remove()``."""
        handle = RemovableHandle(self._kv_hooks)
        self._kv_hooks[handle.id] = hook
        return handle

    def kv_hooks(self) -> list[KVHook]:
        return list(self._kv_hooks.values())

    def run_kv_hooks(self, step: KVStep) -> KVStep:
        for hook in list(self._kv_hooks.values()):
            hook(self, step)
        return step
