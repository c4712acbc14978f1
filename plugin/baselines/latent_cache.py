"""A transformers `Cache` holding one shared latent vector per token and layer (the svd-latent baseline).

Layer l stores ``[batch, seq, r_l]``: the down-projected hidden state from which keys and values of
all KV heads are rebuilt at attention time. Nothing else is stored (no positions: keys are re-rotated
by their index in the cache), so the bytes held are exactly sum_l r_l x tokens x element size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..cache import CompressedCache, TensorMapLayer


class LatentCacheLayer(TensorMapLayer):
    """One decoder layer's cached latents ``[batch, seq, r]``."""

    def __init__(self) -> None:
        super().__init__()
        self.latent: torch.Tensor | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor | None = None,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Append new latents (passed as ``key_states``; values are rebuilt from them) and return all."""
        if not self.is_initialized or self.latent is None:
            self.lazy_initialization(key_states)
            self.latent = key_states
        else:
            if key_states.shape[-1] != self.latent.shape[-1]:
                raise ValueError(
                    f"latent width changed from {self.latent.shape[-1]} to {key_states.shape[-1]} while this "
                    "cache was in use; start a new cache (past_key_values=None) for a model of another rank"
                )
            self.latent = torch.cat([self.latent, key_states], dim=-2)
        # Generic transformers code reads `.keys`; there are no separate values to show.
        self.keys, self.values = self.latent, None
        return self.latent, None

    def get_seq_length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[-2]

    def nbytes(self) -> int:
        return 0 if self.latent is None else self.latent.numel() * self.latent.element_size()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.latent is not None:
            self.latent = fn(self.latent)
            self.keys = self.latent

    def reset(self) -> None:
        self.latent = self.keys = self.values = None
        self.is_initialized = False


    def prefetch(self) -> None:
        if self.latent is not None and self.latent.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class LatentCache(CompressedCache):
    """Latent KV cache for `LatentLlamaForCausalLM`; layers are created lazily on first update."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=LatentCacheLayer)
