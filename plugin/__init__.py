"""matryoshka-kv core: MatryoshkaKV projections, cache and tools for Llama-family models."""

from .cache import PcaCache
from .config import PcaLlamaConfig
from .modeling import PcaLlamaForCausalLM, PcaLlamaModel
from .registration import register

register()

__all__ = ["PcaCache", "PcaLlamaConfig", "PcaLlamaForCausalLM", "PcaLlamaModel", "register"]
__version__ = "0.1.0"
