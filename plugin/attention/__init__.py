"""Projected attention of PcaLlama: the layer (.layer), its head groups and kernel (.heads), keys kept before
RoPE (.pre_rope), and the one hook point presses and observers use (.hooks)."""

from .heads import HeadGroup, attend, group_heads, prepare_mask
from .hooks import KVHook, KVHookPoint, KVStep
from .layer import PcaLlamaAttention

__all__ = ["HeadGroup", "KVHook", "KVHookPoint", "KVStep", "PcaLlamaAttention", "attend", "group_heads", "prepare_mask"]
