"""Training-free KV-cache baselines from the user's seeds, in the same harness as MatryoshkaKV.

- ``weight-pca``: per KV head, PCA of the k_proj / v_proj weights, separately (seed 003); a PcaLlama.
- ``weight-pca-shared``: one basis per KV head for K and V from the stacked weights (seed 003); a PcaLlama.
- ``svd-latent``: per layer, SVD of the stacked [W_k; W_v] into a cached latent and an up-projection
  (seed 002); a `LatentLlamaForCausalLM`.

Every returned model has ``kv_cache_bytes_per_token()`` and ``full_cache_bytes_per_token()``;
`measure_cache_bytes_per_token` reads the bytes back from a real cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from ..model.modeling import PcaLlamaForCausalLM

# The weight-space baselines assume bias-free, norm-free Llama attention.
BASELINE_TYPES = ("llama", "mistral")
from ..cache import full_cache_bytes_per_token
from .latent_cache import LatentCache
from .measure import cache_nbytes, measure_cache_bytes_per_token
from .svd_latent import LatentLlamaForCausalLM, build_svd_latent, fit_svd_latent
from .weight_pca import WeightPcaFit, build_weight_pca, fit_weight_pca

METHODS = ("weight-pca", "weight-pca-shared", "svd-latent")


def build(
    method: str,
    model: PreTrainedModel,
    budget: float | None = None,
    variance: float | None = None,
    rank: int | Sequence[int] | None = None,
) -> PcaLlamaForCausalLM | LatentLlamaForCausalLM:
    """Compress a Llama-family causal LM's KV cache with a training-free baseline.

    Give at most one of ``budget`` (fraction of the uncompressed cache, (0, 1]), ``variance`` (explained
    fraction of the weight spectrum, (0, 1]; ranks then vary by head or layer) and ``rank`` (per KV head
    for the weight-PCA methods, per layer for svd-latent; a list gives one per layer for svd-latent).
    None of them means full rank, which reproduces the base model. The result shares the base weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}; choose one of {', '.join(METHODS)}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BASELINE_TYPES or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ValueError(
            f"the baselines convert Llama-family causal LMs (model_type llama or mistral); got "
            f"{type(model).__name__} with model_type {model_type!r}"
        )
    if method == "svd-latent":
        return build_svd_latent(model, budget=budget, variance=variance, rank=rank)
    if rank is not None and not isinstance(rank, int):
        raise ValueError(f"{method} takes one rank for every KV head, got {rank!r}")
    return build_weight_pca(model, shared=method == "weight-pca-shared", budget=budget, variance=variance, rank=rank)


__all__ = [
    "METHODS",
    "LatentCache",
    "LatentLlamaForCausalLM",
    "WeightPcaFit",
    "build",
    "build_svd_latent",
    "build_weight_pca",
    "cache_nbytes",
    "fit_svd_latent",
    "fit_weight_pca",
    "full_cache_bytes_per_token",
    "measure_cache_bytes_per_token",
]
