"""Ranks x bits under a byte budget: one allocator for the quantized projected cache.

For each candidate bit width (keys / values: 16, 8, 4, 4/2, 2 by default) the byte budget fixes how
many kept dimensions fit; the greedy KL search (plugin.budgets.greedy_search, one descent for every candidate's rank
budget) places those dimensions per (layer, KV head, K/V); each candidate (searched ranks + bits) is
then scored by KL(base || compressed) through the real quantized cache on the same windows, and the
best one within the budget wins.  Budgets are fractions of a bfloat16 full cache, counted as the
cache holds them: codes, float16 scales and zeros (keys per channel per block, values per token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache.quant_codec import FULL_PRECISION, parse_bit_pair
from .ranks import RankTable, check_step

DEFAULT_CHOICES: tuple[tuple[int, int], ...] = ((16, 16), (8, 8), (4, 4), (4, 2), (2, 2))
BF16_BYTES = 2


def parse_choices(text: str) -> list[tuple[int, int]]:
    """'16,8,4/2' -> [(16, 16), (8, 8), (4, 2)], each width checked."""
    out = [parse_bit_pair(part.strip(), "bit choice") for part in text.split(",") if part.strip()]
    if not out:
        raise ValueError("no bit choices given; e.g. 16,8,4,4/2,2")
    return out


def bytes_fraction(ranks: RankTable, key_bits: int, value_bits: int, head_dim: int, group: int) -> float:
    """Bytes per token of this allocation over those of a bfloat16 full cache."""
    total = 0.0
    for row_k, row_v in zip(ranks["key"], ranks["value"]):
        for rk, rv in zip(row_k, row_v):
            total += rk * BF16_BYTES if key_bits == FULL_PRECISION else rk * key_bits / 8 + 4 * rk / group
            total += rv * BF16_BYTES if value_bits == FULL_PRECISION else rv * value_bits / 8 + 4
    heads = sum(len(row) for row in ranks["key"])
    return total / (heads * 2 * head_dim * BF16_BYTES)


def rank_budget_for(fraction: float, key_bits: int, value_bits: int, head_dim: int, group: int) -> float:
    """The rank budget (kept fraction of dims, K and V alike) whose bytes are `fraction` of bf16 (may exceed 1)."""
    per_key = BF16_BYTES if key_bits == FULL_PRECISION else key_bits / 8 + 4 / group
    per_value = BF16_BYTES if value_bits == FULL_PRECISION else value_bits / 8
    fixed = 0 if value_bits == FULL_PRECISION else 4
    return (fraction * 2 * head_dim * BF16_BYTES - fixed) / (head_dim * (per_key + per_value))


@dataclass
class Allocation:
    ranks: RankTable
    key_bits: int
    value_bits: int
    group: int
    bytes_fraction: float
    kl: float
    candidates: list[dict[str, Any]]

    def file_fields(self, layers: int, heads: int) -> dict[str, Any]:
        """What a rank file carries besides the ranks, so that it loads wherever rank files load."""
        return {"key_bits": [[self.key_bits] * heads for _ in range(layers)],
                "value_bits": [[self.value_bits] * heads for _ in range(layers)], "quant_group": self.group,
                "bytes_fraction": round(self.bytes_fraction, 6), "kl": self.kl, "candidates": self.candidates}


@torch.no_grad()
def cache_kl(model: Any, windows: torch.Tensor, reference: torch.Tensor) -> float:
    """KL(base || model) per token, the model scored through a fresh cache (quantization acts there)."""
    logits = model(input_ids=windows, use_cache=True).logits.float()
    log_p = torch.log_softmax(reference, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _targets(byte_budget: float, choices: Sequence[tuple[int, int]], d: int, step: int,
             group: int) -> dict[tuple[int, int], list[float]]:
    """Per bit choice, the largest grid rank budget that fits `byte_budget` and the one below it."""
    if not 0.0 < byte_budget <= 1.0:
        raise ValueError(f"the byte budget must lie in (0, 1] (a fraction of the bf16 full cache); got {byte_budget}")
    grid = step / d
    targets: dict[tuple[int, int], list[float]] = {}
    for kb, vb in choices:
        budget = min(1.0, rank_budget_for(byte_budget, kb, vb, d, group))
        if budget < grid:
            continue  # not even one grid step per head fits
        top = math.floor(budget / grid + 1e-9) * grid
        targets[(kb, vb)] = [b for b in (top, top - grid) if b >= grid]  # one step lower if K/V split overshoots
    if not targets:
        raise ValueError(f"no bit choice fits {byte_budget:g} of the bf16 cache with at least {step} dims per head; "
                         "give a larger budget or lower bits")
    return targets


def allocate(
    model: Any,
    byte_budget: float,
    windows: torch.Tensor,
    choices: Sequence[tuple[int, int]] = DEFAULT_CHOICES,
    group: int = 64,
    step: int | None = None,
    mode: str = "fast",
    **search_kwargs: Any,
) -> Allocation:
    """Best (ranks, bits) with bytes <= `byte_budget` of a bf16 full cache, by KL through the cache."""
    return allocate_many(model, [byte_budget], windows, choices, group, step, mode, **search_kwargs)[0]


def allocate_many(
    model: Any,
    byte_budgets: Sequence[float],
    windows: torch.Tensor,
    choices: Sequence[tuple[int, int]] = DEFAULT_CHOICES,
    group: int = 64,
    step: int | None = None,
    mode: str = "fast",
    **search_kwargs: Any,
) -> list[Allocation]:
    """`allocate` for several byte budgets (in the order given), sharing one greedy descent."""
    from .greedy_search import run_search_many

    cfg = model.config
    d = cfg.head_dim
    step = check_step(d, step or cfg.kv_rank_step)
    per_budget = [_targets(b, choices, d, step, group) for b in byte_budgets]
    budgets = sorted({b for targets in per_budget for values in targets.values() for b in values}, reverse=True)
    searched = {round(r.target, 9): r.ranks for r in run_search_many(model, budgets, windows, step=step, mode=mode,
                                                                       **search_kwargs)}
    saved_ranks, saved_bits = model.get_kv_ranks(), model.get_kv_bits()
    with model.exact_full_rank():
        reference = model(input_ids=windows, use_cache=False).logits.float()
    results = []
    try:
        for byte_budget, targets in zip(byte_budgets, per_budget):
            candidates, best = [], None
            for (kb, vb), options in targets.items():
                for budget in options:
                    ranks = searched[round(budget, 9)]
                    used = bytes_fraction(ranks, kb, vb, d, group)
                    if used > byte_budget + 1e-9:
                        continue
                    model.set_kv_ranks(ranks)
                    if (kb, vb) == (FULL_PRECISION, FULL_PRECISION):
                        model.clear_kv_bits()
                    else:
                        model.set_kv_bits(kb, vb, group=group)
                    kl = cache_kl(model, windows, reference)
                    candidates.append({"key_bits": kb, "value_bits": vb, "rank_budget": round(budget, 6),
                                       "bytes_fraction": round(used, 6), "kl": kl})
                    if best is None or kl < best.kl:
                        best = Allocation(ranks, kb, vb, group, used, kl, candidates)
                    break  # the larger rank budget fitted: the lower one can only be worse
            if best is None:
                raise ValueError(f"no searched allocation fits {byte_budget:g} of the bf16 cache")
            best.candidates = candidates
            results.append(best)
    finally:
        model.set_kv_ranks(saved_ranks)
        model.set_kv_quant(saved_bits)
    return results
