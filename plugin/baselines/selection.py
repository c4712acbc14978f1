"""Choosing ranks for the training-free baselines: from a budget, a fixed rank or a variance threshold."""

from __future__ import annotations

import torch

from ..budgets.ranks import check_budget


def check_choice(budget: float | None, variance: float | None, rank: int | None) -> None:
    """At most one of budget, variance and rank may be given (none means full rank)."""
    given = [name for name, value in (("budget", budget), ("variance", variance), ("rank", rank)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of budget, variance and rank, got {' and '.join(given)}")
    if budget is not None:
        check_budget(budget)
    if variance is not None and not (0.0 < float(variance) <= 1.0):
        raise ValueError(f"variance {variance!r} is outside (0, 1]; give the fraction to keep, e.g. 0.9")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank {rank!r} must be a positive integer")


def variance_count(energies: torch.Tensor, variance: float) -> int:
    """Smallest number of leading entries of ``energies`` (sorted descending) explaining ``variance``.

    The tolerance lets variance=1.0 stop at the last non-zero entry instead of failing on rounding.
    """
    total = float(energies.sum())
    if total <= 0.0:
        return 1
    explained = torch.cumsum(energies.double(), dim=0) / total
    count = int((explained < float(variance) - 1e-12).sum()) + 1
    return min(count, energies.numel())
