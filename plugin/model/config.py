"""`PcaLlamaConfig`: a LlamaConfig plus the per-head K/V ranks of MatryoshkaKV."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from ..budgets.ranks import RankTable, check_step, default_step, full_ranks, validate_ranks

#: Where the key basis sits relative to RoPE: "post-rope" (the paper: keys and queries are projected after
#: RoPE, attention runs in the r-dim space) or "pre-rope" (the cache holds r coefficients of the key before
#: RoPE; keys are rebuilt and rotated at their positions when attended, as Palu / xKV / Eigen Attention do).
KEY_SPACES = ("post-rope", "pre-rope")


def check_key_space(key_space: str) -> str:
    if key_space not in KEY_SPACES:
        raise ValueError(f"kv_key_space {key_space!r} is not one of {', '.join(map(repr, KEY_SPACES))}; use "
                         "'pre-rope' (keys projected before RoPE) or 'post-rope' (after RoPE, the paper's)")
    return key_space


class PcaLlamaConfig(LlamaConfig):
    """Llama configuration with orthogonal K/V projections truncated to per-head ranks.

    Args:
        kv_ranks: ``{"key": [[r] * n_kv_heads] * n_layers, "value": ...}``; None means full rank.
        kv_rank_step: step of the Matryoshka grid used by budgets, training and search
            (default head_dim // 8).
        kv_fold: at inference, fold U_V into v_proj and U_V^T into o_proj (fewer FLOPs per token).
        kv_quant: ``{"key_bits", "value_bits", "group", "residual"}`` of a quantized cache
            (``set_kv_bits``); None keeps the cache unquantized.
        kv_key_space: "post-rope" (default of older checkpoints, the paper's) or "pre-rope"; see KEY_SPACES.
    """

    model_type = "pcallama"
    family_fields: tuple[str, ...] = ()  # fields of the base model's config a family keeps (Mistral: its window)

    def __init__(
        self,
        kv_ranks: RankTable | None = None,
        kv_rank_step: int | None = None,
        kv_fold: bool = True,
        kv_quant: dict[str, Any] | None = None,
        kv_key_space: str = "post-rope",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.kv_rank_step = check_step(self.head_dim, kv_rank_step or default_step(self.head_dim))
        self.kv_fold = bool(kv_fold)
        self.kv_quant = kv_quant
        self.kv_key_space = check_key_space(kv_key_space)
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
