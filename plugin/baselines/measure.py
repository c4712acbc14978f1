"""Cache bytes measured from a real cache object after a forward, for any of the harness's models."""

from __future__ import annotations

from typing import Any

import torch


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a cache: its own ``nbytes()`` (PcaCache, LatentCache), else every tensor its layers hold."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def measure_cache_bytes_per_token(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> float:
    """Run one forward with ``use_cache=True`` and return the cache's bytes per token of one sequence."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    out = model(input_ids=input_ids.to(device), use_cache=True, **kwargs)
    model.train(was_training)
    cache = out.past_key_values
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache with use_cache=True")
    return cache_nbytes(cache) / input_ids.numel()
