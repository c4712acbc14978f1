"""`PcaLlamaConfig`: a LlamaConfig plus the per-head K/V ranks of MatryoshkaKV."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from .ranks import RankTable, check_step, default_step, full_ranks, validate_ranks


class PcaLlamaConfig(LlamaConfig):
    """Llama configuration with orthogonal K/V projections truncated to per-head ranks.

    Args:
        kv_ranks: ``{"key": [[r] * n_kv_heads] * n_layers, "value": ...}``; None means full rank.
        kv_rank_step: step of the Matryoshka grid used by budgets, training and search
            (default head_dim // 8).
        kv_fold: at inference, fold U_V into v_proj and U_V^T into o_proj (fewer FLOPs per token).
        kv_quant: ``{"key_bits", "value_bits", "group", "residual"}`` of a quantized cache
            (``set_kv_bits``); None keeps the cache unquantized.
    """

    model_type = "pcallama"
    family_fields: tuple[str, ...] = ()  # fields of the base model's config a family keeps (Mistral: its window)

    def __init__(
        self,
        kv_ranks: RankTable | None = None,
        kv_rank_step: int | None = None,
        kv_fold: bool = True,
        kv_quant: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.kv_rank_step = check_step(self.head_dim, kv_rank_step or default_step(self.head_dim))
        self.kv_fold = bool(kv_fold)
        self.kv_quant = kv_quant
        self.kv_ranks = (
            None
            if kv_ranks is None
            else validate_ranks(kv_ranks, self.num_hidden_layers, self.num_key_value_heads, self.head_dim)
        )

    def resolved_kv_ranks(self) -> RankTable:
        """The rank table in force (full rank when none is set)."""
        if self.kv_ranks is None:
            return full_ranks(self.num_hidden_layers, self.num_key_value_heads, self.head_dim)
        return self.kv_ranks
