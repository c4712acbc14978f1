"""PCA initialisation: streaming statistics of keys and of values per (layer, KV head).

Keys are read where the model's key basis sits: after RoPE (``kv_key_space="post-rope"``, the paper's)
or before it ("pre-rope"). Before RoPE no mean is subtracted from keys and the truncated score
q . R(p - m) P k moves with the key's position, so the key mean's error no longer cancels in softmax: pre-RoPE
key bases diagonalise the uncentred second moment E[k k^T] by default (see default_key_statistic).

Statistics are accumulated in float64 (sum and sum of outer products), so memory does not grow
with the number of tokens.

Keys use the covariance Cov[k] = E[k k^T] - mu_K mu_K^T by default. With P = U_K[:, :r] U_K[:, :r]^T
the truncated score of query q and key k is q P k = q k - q (I - P) mu_K - q (I - P)(k - mu_K).
The middle term is the same for every key a query attends to, so softmax removes it exactly; only
q (I - P)(k - mu_K) changes attention. Its mean square over keys, summed over an orthonormal set of
queries, is E ||(I - P)(k - mu_K)||^2, which the top r eigenvectors of Cov[k] minimise (and the
minimum is the sum of the dropped eigenvalues). So no key mean is subtracted at inference, yet the
basis is fitted to centred keys: the uncentred second moment E[k k^T] would spend rank on the mean
direction, whose loss softmax forgives. `key_statistic="second-moment"` keeps that older choice.

Values always use the covariance: mu_V is subtracted before projecting and added back after
attention (rows of attention weights sum to 1), so the value error is (I - P_V)(v - mu_V).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .modeling import PcaLlamaForCausalLM

#: Matrices a key basis can be fitted to: "covariance" (default, E[k k^T] - mu mu^T) or "second-moment" (E[k k^T]).
KEY_STATISTICS = ("covariance", "second-moment")


def default_key_statistic(key_space: str) -> str:
    """Covariance after RoPE (the dropped mean term cancels in softmax), the second moment before it (it does not)."""
    return "second-moment" if key_space == "pre-rope" else "covariance"


def check_key_statistic(key_statistic: str) -> str:
    if key_statistic not in KEY_STATISTICS:
        raise ValueError(
            f"key_statistic {key_statistic!r} is not one of {', '.join(map(repr, KEY_STATISTICS))}; "
            "use 'covariance' (the default: the per-query mean term cancels in softmax) or 'second-moment'"
        )
    return key_statistic


class KVStatistics:
    """Running sums of x and x x^T for keys and values, per (layer, KV head), in float64."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        shape = (num_layers, num_kv_heads, head_dim)
        self.key_sum = torch.zeros(shape, dtype=torch.float64)
        self.value_sum = torch.zeros(shape, dtype=torch.float64)
        self.key_outer = torch.zeros((*shape, head_dim), dtype=torch.float64)
        self.value_outer = torch.zeros((*shape, head_dim), dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.long)

    def observe(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: ``[batch, n_kv_heads, tokens, head_dim]``.

        The sums live on the device of the first keys observed: copying every layer's statistics to the host
        each batch would stall a GPU calibration on transfers.
        """
        if self.key_sum.device != key.device:
            for name in ("key_sum", "value_sum", "key_outer", "value_outer"):
                setattr(self, name, getattr(self, name).to(key.device))
        for x, total, outer in ((key, self.key_sum, self.key_outer), (value, self.value_sum, self.value_outer)):
            x = x.detach().to(torch.float64)
            total[layer] += x.sum(dim=(0, 2))
            outer[layer] += torch.einsum("bhti,bhtj->hij", x, x)
        self.count[layer] += key.shape[0] * key.shape[2]

    def moments(self) -> dict[str, torch.Tensor]:
        """Means ``[L, H, d]``; key second moment, key covariance and value covariance ``[L, H, d, d]``."""
        if int(self.count.min()) == 0:
            raise ValueError("no tokens were observed in some layer; calibrate on non-empty data")
        n = self.count.to(self.key_sum.device, torch.float64).view(-1, 1, 1)
        key_mean, value_mean = self.key_sum / n, self.value_sum / n
        key_second = self.key_outer / n.unsqueeze(-1)
        key_cov = key_second - key_mean.unsqueeze(-1) * key_mean.unsqueeze(-2)
        value_cov = self.value_outer / n.unsqueeze(-1) - value_mean.unsqueeze(-1) * value_mean.unsqueeze(-2)
        return {"key_mean": key_mean, "value_mean": value_mean, "key_second": key_second, "key_cov": key_cov,
                "value_cov": value_cov}


@dataclass
class PcaResult:
    key_bases: torch.Tensor  # [L, H, d, d], columns by decreasing eigenvalue
    value_bases: torch.Tensor
    value_means: torch.Tensor  # [L, H, d]
    key_eigenvalues: torch.Tensor  # [L, H, d], decreasing, of the matrix named by key_statistic
    value_eigenvalues: torch.Tensor
    tokens: int
    key_means: torch.Tensor | None = None  # [L, H, d]; recorded only, never subtracted at inference
    key_statistic: str = "covariance"

    def explained_variance(self) -> dict[str, torch.Tensor]:
        """Cumulative fraction of energy kept at each rank 1..d, per (layer, head)."""
        return {
            kind: eig.clamp_min(0).cumsum(-1) / eig.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-30)
            for kind, eig in (("key", self.key_eigenvalues), ("value", self.value_eigenvalues))
        }


def eigenbasis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (columns) of symmetric matrices, in float64."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.transpose(-1, -2)))
    return values.flip(-1), vectors.flip(-1)


def pca_from_statistics(stats: KVStatistics, key_statistic: str = "covariance") -> PcaResult:
    """Bases from accumulated statistics; keys from `key_statistic` ("covariance" or "second-moment")."""
    check_key_statistic(key_statistic)
    moments = stats.moments()
    key_eig, key_vec = eigenbasis(moments["key_cov" if key_statistic == "covariance" else "key_second"])
    value_eig, value_vec = eigenbasis(moments["value_cov"])
    return PcaResult(  # on the host: small, and saved from there
        key_bases=key_vec.float().cpu(),
        value_bases=value_vec.float().cpu(),
        value_means=moments["value_mean"].float().cpu(),
        key_eigenvalues=key_eig.float().cpu(),
        value_eigenvalues=value_eig.float().cpu(),
        tokens=int(stats.count[0]),
        key_means=moments["key_mean"].float().cpu(),
        key_statistic=key_statistic,
    )


@contextlib.contextmanager
def observe_kv(model: PcaLlamaForCausalLM, stats: KVStatistics) -> Iterator[KVStatistics]:
    """Feed every layer's post-RoPE keys and values to `stats` while inside; the hooks are always removed."""
    handles = []
    try:
        for attn in model.attention_layers():
            handles.append(attn.register_kv_hook(lambda _attn, step: stats.observe(step.layer_idx, step.key, step.value)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def as_pca_model(model: Any, key_space: str | None = None) -> PcaLlamaForCausalLM:
    """`model` itself when it is a PcaLlama (whose key space must match `key_space`, if given), else a wrapper."""
    if isinstance(model, PcaLlamaForCausalLM):
        if key_space is not None and key_space != model.config.kv_key_space:
            raise ValueError(f"this PcaLlama keeps its key basis {model.config.kv_key_space}; calibrate its base model "
                             f"for {key_space} keys, or leave the key space unset")
        return model
    return PcaLlamaForCausalLM.from_llama(model, key_space=key_space or "post-rope")


@torch.no_grad()
def collect_statistics(
    model: Any, windows: torch.Tensor | list[torch.Tensor], batch_size: int = 4, progress: bool = True,
    key_space: str | None = None,
) -> KVStatistics:
    """Run `model` (a Llama or PcaLlama, at full rank) over token windows and accumulate K/V statistics.

    `windows`: ``[n, length]`` or a list of such tensors of different lengths (every position range of a long
    context represented); keys are read in `key_space` (default: the PcaLlama's own, else post-RoPE).
    """
    pca_model = as_pca_model(model, key_space)
    saved_ranks = pca_model.get_kv_ranks()
    pca_model.set_kv_budget(1.0)  # statistics are of the unprojected keys/values: identity truncation
    cfg = pca_model.config
    stats = KVStatistics(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    device = next(pca_model.parameters()).device
    was_training = pca_model.training
    pca_model.eval()
    # Bases are rotations: reading keys/values before projection makes the statistics basis-free.
    sets = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    batches = [(rows, start) for rows in sets for start in range(0, rows.shape[0], batch_size)]
    with observe_kv(pca_model, stats):
        for rows, start in tqdm(batches, desc="calibrating", disable=not progress):
            pca_model(input_ids=rows[start : start + batch_size].to(device), use_cache=False)
    pca_model.train(was_training)
    pca_model.set_kv_ranks(saved_ranks)
    return stats


def calibrate(
    model: Any,
    windows: torch.Tensor | list[torch.Tensor],
    batch_size: int = 4,
    progress: bool = True,
    budget: float | None = None,
    key_statistic: str | None = None,
    key_space: str | None = None,
) -> tuple[PcaLlamaForCausalLM, PcaResult]:
    """A PcaLlama with PCA bases from `windows` (the paper's PCA initialisation and baseline).

    key_space: "post-rope" or "pre-rope" (default: the PcaLlama's own, else post-RoPE); key_statistic:
    "covariance" or "second-moment", the matrix the key bases diagonalise (default: default_key_statistic).
    """
    pca_model = as_pca_model(model, key_space)  # before any forward pass, as the check below
    key_statistic = check_key_statistic(key_statistic or default_key_statistic(pca_model.config.kv_key_space))
    result = pca_from_statistics(collect_statistics(pca_model, windows, batch_size, progress), key_statistic)
    pca_model.set_bases(result.key_bases, result.value_bases, result.value_means)
    if budget is not None:
        pca_model.set_kv_budget(budget)
    return pca_model, result
