"""`PcaCache`: the projected cache of PcaLlama, whose layers are plain projected layers or, for
sliding-window attention (Mistral), window layers; the layer kind is chosen here, where layers are made."""

from __future__ import annotations

from functools import partial

from .base import CompressedCache
from .projected import DEFAULT_CHUNK, PcaCacheLayer
from .window import WindowPcaCacheLayer


class PcaCache(CompressedCache):
    """Projected KV cache for `PcaLlamaForCausalLM`; layers are created lazily on first update.

    `chunk`: growth granularity of the preallocated buffers; `max_length`: a fixed capacity
    allocated at the first update (static shapes); `reserve`: tokens to allocate at the first
    update when more than it writes (the expected final length; growth stays possible);
    `sliding_window`: keep only the last window - 1 tokens of every layer (Mistral), see :mod:`.window`.
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK, max_length: int | None = None, sliding_window: int | None = None,
                 reserve: int | None = None, nested_bases: bool = False) -> None:
        if sliding_window is not None and max_length is not None:
            raise ValueError("a sliding-window cache already has a fixed size; give max_length or sliding_window")
        self.nested_bases = nested_bases
        self.chunk, self.max_length, self.sliding_window, self.reserve = chunk, max_length, sliding_window, reserve
        # The layer kind and its settings are fixed here; Cache.update makes one per decoder layer as needed.
        if sliding_window is not None:
            make = partial(WindowPcaCacheLayer, sliding_window, chunk)
        else:
            make = partial(PcaCacheLayer, chunk, max_length, reserve)
        make()  # checks the arguments now, not at the first update
        super().__init__(layer_class_to_replicate=make)
