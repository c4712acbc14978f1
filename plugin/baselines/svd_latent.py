"""svd-latent (seed 002): per layer, SVD of the stacked key/value projection into a cached latent.

W_kv = [W_k; W_v] ``[2 n_kv d, hidden]`` = U S V^T; keeping r singular triplets gives the down-projection
C = V_r^T ``[r, hidden]`` whose output c = C x is cached, and the up-projection B = U_r S_r that rebuilds
keys and values (`latent_attention`). This is also the seed 003 "stacked K|V" PCA taken in input space
(uncentred), with the reconstruction turned into a cache. Equal bytes to a per-head budget b:
r = b x 2 n_kv d. Full rank is min(2 n_kv d, hidden), which reproduces W_kv exactly.

Saving: not a checkpoint format of its own; the model is rebuilt from the base model on the fly
(`build_svd_latent`, deterministic and a fraction of a second per layer).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaForCausalLM, LlamaModel, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..budgets.ranks import check_budget
from ..cache import full_cache_bytes_per_token, own_cache, prepare_generation_cache
from .latent_attention import LatentLlamaAttention
from .latent_cache import LatentCache
from .rope import RopeTable
from .selection import check_choice, variance_count


@dataclass
class LayerSvd:
    """Full SVD of one layer's stacked [W_k; W_v] (float64): W_kv = left @ diag(singular) @ right."""

    left: torch.Tensor
    singular: torch.Tensor
    right: torch.Tensor
    key_rows: int
    key_bias: torch.Tensor | None
    value_bias: torch.Tensor | None

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down ``[r, hidden]``, up_key ``[n_kv d, r]``, up_value ``[n_kv d, r]``) at rank r."""
        up = self.left[:, :rank] * self.singular[:rank]
        return self.right[:rank], up[: self.key_rows], up[self.key_rows:]


@torch.no_grad()
def fit_svd_latent(model: PreTrainedModel) -> list[LayerSvd]:
    """SVD of every layer's stacked key/value projection weights (no data needed)."""
    fits = []
    for layer in model.model.layers:
        attn = layer.self_attn
        stacked = torch.cat([attn.k_proj.weight, attn.v_proj.weight]).detach().double()
        left, singular, right = torch.linalg.svd(stacked, full_matrices=False)
        fits.append(
            LayerSvd(
                left=left,
                singular=singular,
                right=right,
                key_rows=attn.k_proj.out_features,
                key_bias=None if attn.k_proj.bias is None else attn.k_proj.bias.detach().clone(),
                value_bias=None if attn.v_proj.bias is None else attn.v_proj.bias.detach().clone(),
            )
        )
    return fits


def latent_ranks(
    fits: Sequence[LayerSvd],
    budget: float | None = None,
    variance: float | None = None,
    rank: int | Sequence[int] | None = None,
) -> list[int]:
    """Latent rank per layer: r = budget x 2 n_kv d (floor), a given rank, or the variance threshold.

    Ranks are capped at min(2 n_kv d, hidden): beyond it W_kv is already exact.
    """
    per_layer = None if rank is None or isinstance(rank, int) else list(rank)
    check_choice(budget, variance, None if per_layer is not None else rank)
    ranks = []
    for index, fit in enumerate(fits):
        full_width, ceiling = fit.left.shape[0], fit.singular.numel()
        if variance is not None:
            wanted = variance_count(fit.singular.pow(2), variance)
        elif budget is not None:
            wanted = max(1, math.floor(check_budget(budget) * full_width + 1e-9))
        elif per_layer is not None:
            if len(per_layer) != len(fits):
                raise ValueError(f"give one latent rank per layer ({len(fits)}), got {len(per_layer)}")
            wanted = per_layer[index]
        else:
            wanted = full_width if rank is None else rank
        if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= full_width:
            raise ValueError(f"latent rank {wanted!r} of layer {index} is outside [1, 2*n_kv*head_dim={full_width}]")
        ranks.append(min(wanted, ceiling))
    return ranks


class LatentLlamaModel(LlamaModel):
    """LlamaModel whose caches are `LatentCache`s."""

    def forward(self, *args: Any, past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = own_cache(past_key_values, use_cache, LatentCache)
        return super().forward(*args, past_key_values=past_key_values, use_cache=use_cache, **kwargs)


class LatentLlamaForCausalLM(LlamaForCausalLM):
    """Llama causal LM caching one SVD latent per token and layer; built with `from_llama`."""

    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config: Any) -> None:
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LatentLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    @torch.no_grad()
    def from_llama(
        cls, model: PreTrainedModel, fits: Sequence[LayerSvd], ranks: Sequence[int]
    ) -> LatentLlamaForCausalLM:
        """Swap every attention for a latent one at the given ranks; other weights share `model`'s storage."""
        config = copy.deepcopy(model.config)
        config.kv_latent_ranks = list(ranks)
        device = next(model.parameters()).device
        with torch.device("meta"):
            latent = cls(config)
        latent.load_state_dict(model.state_dict(), strict=False, assign=True)
        # Non-persistent buffers (RoPE frequencies) are not in the state dict: build them for real.
        latent.model.rotary_emb = LlamaRotaryEmbedding(config=config, device=device)
        rope = RopeTable(latent.model.rotary_emb)
        for layer, fit, rank in zip(latent.model.layers, fits, ranks):
            down, up_key, up_value = fit.factors(rank)
            layer.self_attn = LatentLlamaAttention(
                layer.self_attn, down, up_key, up_value, rope, fit.key_bias, fit.value_bias
            )
        tensors = [*latent.named_parameters(), *latent.named_buffers()]
        leftover = [name for name, t in tensors if t.device.type == "meta"]
        if leftover:
            raise RuntimeError(f"weights missing after conversion: {leftover[:5]}")
        latent.tie_weights()
        latent.train(model.training)
        return latent

    def latent_ranks(self) -> list[int]:
        return [layer.self_attn.latent_rank for layer in self.model.layers]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the cache holds per token of one sequence, all layers (sum of latent ranks)."""
        return sum(self.latent_ranks()) * torch.finfo(dtype or self.dtype).bits // 8

    def full_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes per token of the uncompressed GQA cache of the base model."""
        return full_cache_bytes_per_token(self, dtype or self.dtype)

    def kv_budget(self) -> float:
        """Cache bytes relative to the uncompressed cache."""
        return self.kv_cache_bytes_per_token(torch.float32) / self.full_cache_bytes_per_token(torch.float32)

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
    ) -> None:
        prepare_generation_cache(generation_config, model_kwargs, LatentCache)  # refuses static caches early
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        prepare_generation_cache(generation_config, model_kwargs, LatentCache)


def build_svd_latent(
    model: PreTrainedModel,
    budget: float | None = None,
    variance: float | None = None,
    rank: int | Sequence[int] | None = None,
) -> LatentLlamaForCausalLM:
    """The svd-latent model of a Llama-family causal LM at a budget, variance threshold or latent rank."""
    fits = fit_svd_latent(model)
    return LatentLlamaForCausalLM.from_llama(model, fits, latent_ranks(fits, budget, variance, rank))
