"""Small shared helpers for tests (random orthogonal bases, PcaLlama conversion)."""

from __future__ import annotations

import torch

from plugin import PcaLlamaForCausalLM


def random_bases(model: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, head_dim)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.linalg.qr(torch.randn(shape, generator=gen))[0]
    values = torch.linalg.qr(torch.randn(shape, generator=gen))[0]
    means = 0.5 * torch.randn(shape[:-1], generator=gen)
    return keys, values, means


def to_pca(model: torch.nn.Module, seed: int = 1) -> PcaLlamaForCausalLM:
    """A PcaLlama with random orthogonal bases and value means (any basis must be exact at full rank)."""
    return PcaLlamaForCausalLM.from_llama(model, *random_bases(model, seed)).eval()
