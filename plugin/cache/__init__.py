"""KV caches of PcaLlama: projected (kept dimensions only), sliding-window, age-tiered and quantized projected."""

from .base import (
    CompressedCache,
    GroupSignature,
    TensorMapLayer,
    full_cache_bytes_per_token,
    own_cache,
    prepare_generation_cache,
)
from .pca_cache import PcaCache
from .projected import PcaCacheLayer
from .quantized import QuantizedPcaCache, QuantizedPcaCacheLayer, QuantSpec
from .tiered import TieredPcaCache, TieredPcaCacheLayer
from .window import WindowPcaCacheLayer

__all__ = [
    "CompressedCache",
    "GroupSignature",
    "PcaCache",
    "PcaCacheLayer",
    "QuantSpec",
    "QuantizedPcaCache",
    "QuantizedPcaCacheLayer",
    "TensorMapLayer",
    "TieredPcaCache",
    "TieredPcaCacheLayer",
    "WindowPcaCacheLayer",
    "full_cache_bytes_per_token",
    "own_cache",
    "prepare_generation_cache",
]
