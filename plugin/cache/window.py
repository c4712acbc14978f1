"""A projected cache layer for sliding-window attention (Mistral): it keeps only the last window - 1 tokens.

As transformers' sliding-window layer, an update returns the kept tokens plus the new ones (what
the window attends to) and then forgets all but the newest ``window - 1``; the live bytes are
exactly ranks x min(tokens seen, window - 1) x element size.  Forgetting moves a start index
(`PcaCacheLayer.forget`); a reallocation, when the buffers run out of room or hold too much for the
live tokens, keeps only those.
"""

from __future__ import annotations

from typing import Any

import torch

from .projected import DEFAULT_CHUNK, PcaCacheLayer


class WindowPcaCacheLayer(PcaCacheLayer):
    is_sliding = True

    def __init__(self, window: int, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(chunk)
        if window < 1:
            raise ValueError(f"the sliding window must be >= 1 token; got {window}")
        self.window = window
        self._seen = 0  # tokens ever written: positions keep counting after the window moves on

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = super().update(key_states, value_states, cache_kwargs)
        self._seen += key_states[0].shape[-2]
        self.forget(self.kept() - (self.window - 1))
        return keys, values

    def kept(self) -> int:
        """Tokens held (the live ones); get_seq_length counts every token seen."""
        return PcaCacheLayer.get_seq_length(self)

    def get_seq_length(self) -> int:
        return self._seen if self.is_initialized else 0

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(keys attended, absolute position of the first): the kept tokens and the new ones."""
        return self.kept() + cache_position.shape[0], max(self.get_seq_length() - self.window + 1, 0)

    def get_max_cache_shape(self) -> int:
        return self.window

    def crop(self, max_length: int) -> None:
        if self.get_seq_length() >= self.window:
            raise ValueError("a sliding-window cache that has dropped tokens cannot be cropped")
        super().crop(max_length)
        self._seen = self.kept()

    def reset(self) -> None:
        super().reset()
        self._seen = 0
