"""RoPE for keys rebuilt from a pre-RoPE cache: rotation of one tensor, and cos / sin at any positions.

Queries are rotated by the model's own ``position_embeddings``; keys cached before RoPE are rotated
when attended, at positions the attention knows only then (slots of the cache, or the positions an
eviction kept). :class:`RopeTable` serves those from one table per model, computed by the model's own
rotary embedding (so a key at position p gets exactly the cos / sin the base model gives p) and grown
by doubling, instead of recomputing sines for every cached token of every layer at every step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import rotate_half


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` by broadcastable ``cos`` / ``sin`` (Llama's rotate-half convention)."""
    return x * cos + rotate_half(x) * sin


class RopeTable:
    """cos / sin ``[positions, head_dim]`` of a rotary embedding, grown on demand and cast once per dtype."""

    def __init__(self, rotary: Any) -> None:
        self.rotary = rotary
        self._float: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, needed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._float is None or self._float[0].shape[0] < needed or self._float[0].device != self.rotary.inv_freq.device:
            held = 0 if self._float is None else self._float[0].shape[0]
            size = max(needed, 2 * held, 256)
            device = self.rotary.inv_freq.device
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            cos, sin = self.rotary(probe, torch.arange(size, device=device)[None])
            self._float, self._cast = (cos[0], sin[0]), {}
        if dtype not in self._cast:
            self._cast[dtype] = (self._float[0].to(dtype), self._float[1].to(dtype))
        return self._cast[dtype]

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[length, d]`` of the positions start .. start + length - 1."""
        cos, sin = self._table(start + length, dtype)
        return cos[start : start + length], sin[start : start + length]

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[*positions.shape, d]`` at integer positions of any shape."""
        cos, sin = self._table(int(positions.max()) + 1 if positions.numel() else 1, dtype)
        index = positions.long().to(cos.device)
        return cos[index], sin[index]
