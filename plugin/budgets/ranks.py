"""Per-head rank tables: the Matryoshka grid, budgets, validation and rank files.

A rank table is ``{"key": [[r, ...] * n_kv_heads] * n_layers, "value": [...]}``. The budget of a
table is the mean of r / head_dim over every (layer, KV head, K and V) entry, which is exactly
the ratio of its cache bytes to the uncompressed GQA cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RankTable = dict[str, list[list[int]]]
KINDS = ("key", "value")


def default_step(head_dim: int) -> int:
    """The grid step used by the paper: head_dim / 8 (at least 1)."""
    return max(1, head_dim // 8)


def check_step(head_dim: int, step: int) -> int:
    if not isinstance(step, int) or step <= 0 or head_dim % step != 0:
        raise ValueError(
            f"rank step {step!r} must be a positive integer dividing head_dim={head_dim}; "
            f"use a divisor such as {default_step(head_dim)}"
        )
    return step


def rank_grid(head_dim: int, step: int | None = None) -> list[int]:
    """The Matryoshka grid {step, 2 step, ..., head_dim}."""
    step = check_step(head_dim, step or default_step(head_dim))
    return list(range(step, head_dim + 1, step))


def check_budget(budget: float | str, what: str = "budget") -> float:
    """A KV budget, the kept fraction of the cache: 0.375, '0.375' or '37.5%' -> 0.375.

    Anything else (outside (0, 1], NaN, a bool, not a number) raises one ValueError naming `what`; a
    value that reads as a percentage (1 < x <= 100) gets a hint.
    """
    percent = isinstance(budget, str) and budget.strip().endswith("%")
    try:
        if isinstance(budget, bool):
            raise TypeError  # True is not a budget of 1
        value = float(budget.strip().removesuffix("%")) / 100.0 if percent else float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {budget!r} is not a number; give a fraction in (0, 1], e.g. 0.375") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        hint = f" (did you mean {value / 100:g}, i.e. {value:g}%?)" if not percent and 1.0 < value <= 100.0 else ""
        raise ValueError(f"{what} {budget!r} is outside (0, 1]{hint}; give the kept fraction of the KV cache, "
                         "such as 0.5 or 0.375")
    return value


def parse_budgets(text: str, what: str = "--budgets", item: str = "budget", percents: bool = False) -> list[float]:
    """Comma- (or semicolon-) separated budgets, each checked by :func:`check_budget` -> fractions.

    `percents`: a bare value above 1 is a percentage ('100,62.5' -> 1, 0.625), as in MKV_BUDGETS.
    Errors name `what` (the flag or variable) and `item` (one value).
    """
    parts = [part.strip() for part in str(text).replace(";", ",").split(",") if part.strip()]
    if not parts:
        raise ValueError(f"{what} names no budget; give e.g. 1,0.5,0.375")
    budgets = []
    for part in parts:
        if percents and not part.endswith("%"):
            with contextlib.suppress(ValueError):
                part = f"{part}%" if float(part) > 1.0 else part
        try:
            budgets.append(check_budget(part, item))
        except ValueError as err:
            raise ValueError(f"{what} {text!r}: {err}") from None
    return budgets


def budget_to_rank(budget: float, head_dim: int, step: int | None = None) -> int:
    """Uniform rank for a budget: the largest grid value not above budget * head_dim, at least one step.

    The small epsilon keeps exact grid budgets (0.375 * 64 = 24) from rounding down on float error.
    """
    budget = check_budget(budget)
    step = check_step(head_dim, step or default_step(head_dim))
    rank = math.floor(budget * head_dim / step + 1e-9) * step
    return max(step, rank)


def full_ranks(n_layers: int, n_kv_heads: int, head_dim: int) -> RankTable:
    return {kind: [[head_dim] * n_kv_heads for _ in range(n_layers)] for kind in KINDS}


def uniform_ranks(n_layers: int, n_kv_heads: int, head_dim: int, budget: float, step: int | None = None) -> RankTable:
    rank = budget_to_rank(budget, head_dim, step)
    return {kind: [[rank] * n_kv_heads for _ in range(n_layers)] for kind in KINDS}


def validate_ranks(ranks: Any, n_layers: int, n_kv_heads: int, head_dim: int) -> RankTable:
    """Check shape and range of a rank table and return it as plain ints."""
    if not isinstance(ranks, dict) or set(KINDS) - set(ranks):
        raise ValueError('a rank table must be a dict with "key" and "value" entries, each [n_layers][n_kv_heads]')
    table: RankTable = {}
    for kind in KINDS:
        rows = ranks[kind]
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        if not isinstance(rows, Sequence) or len(rows) != n_layers:
            got = len(rows) if isinstance(rows, Sequence) else type(rows).__name__
            raise ValueError(
                f"{kind} ranks have {got} layers but the model has {n_layers}; "
                f"give one row per layer, each with {n_kv_heads} KV-head ranks"
            )
        table[kind] = []
        for layer, row in enumerate(rows):
            if not isinstance(row, Sequence) or len(row) != n_kv_heads:
                got = len(row) if isinstance(row, Sequence) else type(row).__name__
                raise ValueError(
                    f"{kind} ranks of layer {layer} have {got} entries but the model has "
                    f"{n_kv_heads} KV heads; give one rank per KV head"
                )
            clean = []
            for r in row:
                if isinstance(r, bool) or not float(r).is_integer():
                    raise ValueError(f"{kind} rank {r!r} in layer {layer} is not an integer")
                r = int(r)
                if not 1 <= r <= head_dim:
                    raise ValueError(
                        f"{kind} rank {r} in layer {layer} is outside [1, head_dim={head_dim}]; "
                        f"ranks count kept dimensions per head"
                    )
                clean.append(r)
            table[kind].append(clean)
    return table


def table_budget(ranks: RankTable, head_dim: int) -> float:
    entries = [r for kind in KINDS for row in ranks[kind] for r in row]
    return sum(entries) / (len(entries) * head_dim)


def read_rank_file(path: str | os.PathLike, n_layers: int, n_kv_heads: int, head_dim: int) -> RankTable:
    """Read and validate a JSON rank file (as written by `write_rank_file` or `mkv search-budget`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rank file {str(path)!r} does not exist; create one with `mkv search-budget`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"rank file {str(path)!r} is not valid JSON ({err}); regenerate it with `mkv search-budget`") from None
    if isinstance(data, dict) and "head_dim" in data and data["head_dim"] != head_dim:
        raise ValueError(f"rank file {str(path)!r} was made for head_dim={data['head_dim']}, the model has {head_dim}")
    try:
        return validate_ranks(data, n_layers, n_kv_heads, head_dim)
    except ValueError as err:
        raise ValueError(f"rank file {str(path)!r}: {err}") from None


def write_rank_file(path: str | os.PathLike, ranks: RankTable, head_dim: int, **extra: Any) -> Path:
    """Write a rank table as JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"head_dim": head_dim, "budget": round(table_budget(ranks, head_dim), 6), **extra,
               "key": ranks["key"], "value": ranks["value"]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)
    return path


def sample_ranks(
    n_layers: int,
    n_kv_heads: int,
    choices: Sequence[int],
    generator: torch.Generator | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a rank per (layer, KV head), independently for K and V, from `choices`.

    Uniform by default; `weights` gives another distribution over the choices.
    """
    options = torch.tensor(list(choices), dtype=torch.long)
    probs = torch.ones(len(options)) if weights is None else torch.tensor(list(weights), dtype=torch.float)
    draws = torch.multinomial(probs, 2 * n_layers * n_kv_heads, replacement=True, generator=generator)
    picked = options[draws].view(2, n_layers, n_kv_heads)
    return picked[0], picked[1]
