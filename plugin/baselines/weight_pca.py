"""Weight-space PCA of k_proj / v_proj (seed 003) as bases of a `PcaLlamaForCausalLM`.

Per (layer, KV head) the rows of the head's block W_h ``[d, hidden]`` define its output space, the
space the cache lives in. Treating the input as white (E[x x^T] = I, no data), the output covariance
is W_h W_h^T, so PCA of the outputs is the eigenbasis of that d x d Gram matrix, i.e. the left singular
vectors of W_h. Uncentred on purpose: a zero-mean input gives a zero-mean output (plus the bias, which
becomes the value mean). Truncating to r columns gives U_r U_r^T W_h, the best rank-r approximation of
W_h, which is also what the seed's row-PCA reconstruction W V_r V_r^T gives without centring.

Values: U_V = that eigenbasis; PcaLlama caches (v - mu_V) U_V[:, :r] with mu_V = b_v (0 without bias).

Keys: PcaLlama projects keys after RoPE. A fixed basis truncated after RoPE only reproduces a pre-RoPE
truncation when its projector commutes with every RoPE rotation, i.e. spans whole planes (i, i + d/2)
(see `rope`). So keys keep whole planes ranked by their energy ||W_k[i]||^2 + ||W_k[i + d/2]||^2, the
best Frobenius approximation of W_k among RoPE-commuting projectors; key ranks are even.

The white-input premise is the method's weakness, not a detail: on SmolLM2 the normed input of k_proj /
v_proj carries a large constant part, which the trained weights map largely through their *weak* directions,
the ones dropped first (measured in docs/baselines.md, "Why weight-PCA fails on SmolLM2").

Shared variant (the seed's stacked K|V): one basis per (layer, KV head) for keys and values, ranked by
the energy of the stacked [W_k; W_v] per plane. It must commute with RoPE for the keys, so it is a plane
basis too; keys and values keep the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..budgets.ranks import RankTable, budget_to_rank, default_step
from ..model.modeling import PcaLlamaForCausalLM
from .rope import plane_basis, plane_energies
from .selection import check_choice, variance_count


@dataclass
class WeightPcaFit:
    """Bases ``[L, n_kv, d, d]``, value means ``[L, n_kv, d]`` and the energy spectra behind them.

    ``key_energy`` / ``value_energy`` are ``[L, n_kv, units]`` sorted descending, one entry per basis unit:
    a RoPE plane (2 columns) for plane bases, an eigenvector (1 column) otherwise.
    """

    key_bases: torch.Tensor
    value_bases: torch.Tensor
    value_means: torch.Tensor
    key_energy: torch.Tensor
    value_energy: torch.Tensor
    value_unit: int
    shared: bool

    @property
    def head_dim(self) -> int:
        return self.key_bases.shape[-1]

    def ranks(self, budget: float | None = None, variance: float | None = None,
              rank: int | None = None) -> RankTable:
        """Per-head ranks; keys (and shared values) count whole planes, so an odd rank rounds down to even."""
        check_choice(budget, variance, rank)
        d = self.head_dim
        n_layers, n_kv = self.key_bases.shape[:2]
        if variance is None:
            uniform = d if rank is None and budget is None else rank
            if budget is not None:
                uniform = budget_to_rank(budget, d, default_step(d))
            if uniform > d:
                raise ValueError(f"rank {uniform} is above head_dim={d}")
            key = [[_even(uniform)] * n_kv for _ in range(n_layers)]
            value_rank = _even(uniform) if self.shared else uniform
            return {"key": key, "value": [[value_rank] * n_kv for _ in range(n_layers)]}
        key = [[2 * variance_count(self.key_energy[l, h], variance) for h in range(n_kv)] for l in range(n_layers)]
        if self.shared:
            return {"key": key, "value": [list(row) for row in key]}
        value = [
            [self.value_unit * variance_count(self.value_energy[l, h], variance) for h in range(n_kv)]
            for l in range(n_layers)
        ]
        return {"key": key, "value": value}


def _even(rank: int) -> int:
    return max(2, rank - rank % 2)


def _head_blocks(linear: torch.nn.Linear, n_kv: int, head_dim: int) -> torch.Tensor:
    return linear.weight.detach().double().view(n_kv, head_dim, -1)


def _value_mean(linear: torch.nn.Linear, n_kv: int, head_dim: int) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(n_kv, head_dim, dtype=torch.float32, device=linear.weight.device)
    return linear.bias.detach().float().view(n_kv, head_dim)


def output_pca(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., d, hidden]`` -> (eigenbasis of W W^T ``[..., d, d]`` by descending eigenvalue, eigenvalues)."""
    gram = blocks @ blocks.transpose(-1, -2)
    values, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1).float(), values.flip(-1).clamp_min(0.0)


@torch.no_grad()
def fit_weight_pca(model: PreTrainedModel, shared: bool = False) -> WeightPcaFit:
    """Weight-PCA bases of every (layer, KV head) of a Llama-family causal LM (no data needed)."""
    config = model.config
    n_kv = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys, values, means, key_energy, value_energy = [], [], [], [], []
    for layer in model.model.layers:
        attn = layer.self_attn
        w_k, w_v = _head_blocks(attn.k_proj, n_kv, d), _head_blocks(attn.v_proj, n_kv, d)
        if shared:
            basis, energy = plane_basis(plane_energies(w_k) + plane_energies(w_v))
            keys.append(basis)
            values.append(basis.clone())
            key_energy.append(energy)
            value_energy.append(energy)
        else:
            basis, energy = plane_basis(plane_energies(w_k))
            keys.append(basis)
            key_energy.append(energy)
            v_basis, v_energy = output_pca(w_v)
            values.append(v_basis)
            value_energy.append(v_energy)
        means.append(_value_mean(attn.v_proj, n_kv, d))
    return WeightPcaFit(
        key_bases=torch.stack(keys),
        value_bases=torch.stack(values),
        value_means=torch.stack(means),
        key_energy=torch.stack(key_energy),
        value_energy=torch.stack(value_energy),
        value_unit=2 if shared else 1,
        shared=shared,
    )


def build_weight_pca(
    model: PreTrainedModel,
    shared: bool = False,
    budget: float | None = None,
    variance: float | None = None,
    rank: int | None = None,
) -> PcaLlamaForCausalLM:
    """A PcaLlama whose bases come from weight PCA; it shares the base model's weight storage."""
    fit = fit_weight_pca(model, shared=shared)
    ranks = fit.ranks(budget=budget, variance=variance, rank=rank)
    return PcaLlamaForCausalLM.from_llama(model, fit.key_bases, fit.value_bases, fit.value_means, ranks)
