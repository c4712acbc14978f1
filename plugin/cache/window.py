"""A projected cache layer for sliding-window attention (Mistral): it keeps only the last window - 1 tokens.

As transformers' sliding-window layer, an update returns the kept tokens plus the new ones (what
the window attends to) and then forgets all but the newest ``window - 1``; the bytes held are
exactly ranks x min(tokens seen, window - 1) x element size.  Forgetting only moves a start index;
the buffers are compacted (copied to the front) when they run out of room, every ~`chunk` tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from .projected import PcaCacheLayer


class WindowPcaCacheLayer(PcaCacheLayer):
    is_sliding = True

    def __init__(self, window: int, chunk: int = 256) -> None:
        super().__init__(chunk)
        if window < 1:
            raise ValueError(f"the sliding window must be >= 1 token; got {window}")
        self.window = window
        self._seen = 0  # tokens ever written: positions keep counting after the window moves on

    def _reserve(self, needed: int, like_keys: list[torch.Tensor], like_values: list[torch.Tensor]) -> None:
        if needed <= self.capacity() or self._start == 0:
            super()._reserve(needed, like_keys, like_values)
            return
        kept, new = self._length - self._start, needed - self._length
        capacity = -(-max(kept + new, self.window - 1 + self.chunk) // self.chunk) * self.chunk

        def compacted(old: list[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for tensor in old:
                buffer = tensor.new_empty(*tensor.shape[:-2], capacity, tensor.shape[-1])
                buffer[..., :kept, :] = tensor[..., self._start : self._length, :]
                out.append(buffer)
            return out

        self._keys, self._values = compacted(self._keys), compacted(self._values)
        self._start, self._length = 0, kept

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = super().update(key_states, value_states, cache_kwargs)
        self._seen += key_states[0].shape[-2]
        self._start = max(self._start, self._length - (self.window - 1))
        self._sync()
        return keys, values

    def get_seq_length(self) -> int:
        return self._seen if self.is_initialized else 0

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(keys attended, absolute position of the first): the kept tokens and the new ones."""
        kept = self._length - self._start if self.is_initialized else 0
        return kept + cache_position.shape[0], max(self.get_seq_length() - self.window + 1, 0)

    def get_max_cache_shape(self) -> int:
        return self.window

    def crop(self, max_length: int) -> None:
        if self.get_seq_length() >= self.window:
            raise ValueError("a sliding-window cache that has dropped tokens cannot be cropped")
        super().crop(max_length)
        self._seen = self._length

    def reset(self) -> None:
        super().reset()
        self._seen = 0
