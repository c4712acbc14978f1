"""The compositions that fit a byte budget at a context length: the points the long-context allocator scores.

A composition is uniform ranks (or a table of ranks per head, or keys and values at ranks of their own) at one pair
of bit widths, each layer's share of the prompt evicted at prefill, and the newest tokens held at bfloat16.
`candidates` lists those whose formula bytes (plugin.budgets.cache_bytes) fit: per bit width, each kept share with
the largest grid rank that fits, the least eviction at which full rank fits, and each given rank table at the least
eviction that fits it.  plugin.budgets.composition scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..cache.eviction import SnapEviction, prefill_ratio
from ..cache.quant_codec import FULL_PRECISION
from .cache_bytes import ByteFrame, positions_share, rows_rates
from .rank_bits import DEFAULT_CHOICES
from .ranks import RankTable, check_budget, full_ranks, table_budget, uniform_ranks

KEEP_SHARES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125)
VALUE_RANKS = (0.875, 0.75, 0.625)  # value ranks tried under full-rank keys (a share of head_dim)
HeadRanks = tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]  # (key rows, value rows), hashable
PROFILES = ("uniform", "pyramid")


@dataclass(frozen=True)
class Composition:
    """One point of the search: uniform ranks and bits, and each layer's share of the prompt evicted."""

    rank_budget: float
    key_bits: int
    value_bits: int
    layer_ratios: tuple[float, ...]  # evicted share of a prompt of context - scored tokens, per layer
    profile: str
    head_ranks: HeadRanks | None = None  # a per-head table (its mean is rank_budget); None: uniform ranks
    window: int = 0  # newest tokens held unquantized (the quantized cache's residual), counted at bfloat16

    def label(self) -> str:
        bits = f"{self.key_bits}" if self.key_bits == self.value_bits else f"{self.key_bits}/{self.value_bits}"
        kept = 1.0 - sum(self.layer_ratios) / len(self.layer_ratios)
        tokens = "all tokens" if not any(self.layer_ratios) else f"{kept:.3g} of the prompt ({self.profile})"
        recent = f" + the newest {self.window} at bf16" if self.window else ""
        return f"{self._ranks_label()} x {bits} bits x {tokens}{recent}"

    def ranks_kind(self) -> str:
        """"uniform", "split" (one rank for keys, one for values) or "per head"."""
        if self.head_ranks is None:
            return "uniform"
        keys, values = ({r for row in rows for r in row} for rows in self.head_ranks)
        return "split" if len(keys) == 1 and len(values) == 1 else "per head"

    def _ranks_label(self) -> str:
        kind = self.ranks_kind()
        if kind == "split":
            keys, values = self.head_ranks[0][0][0], self.head_ranks[1][0][0]
            return f"ranks {self.rank_budget:g} (keys {keys}, values {values} dims)"
        return f"ranks {self.rank_budget:g}" + (" per head" if kind == "per head" else "")

    def press(self) -> SnapEviction | None:
        return SnapEviction(max(self.layer_ratios), layer_ratios=self.layer_ratios) if any(self.layer_ratios) else None

    def apply(self, model: Any, group: int) -> None:
        """Set the model's ranks and bits (not its eviction: `press()` is entered around a prefill)."""
        if self.head_ranks is not None:
            model.set_kv_ranks({"key": [list(row) for row in self.head_ranks[0]],
                                "value": [list(row) for row in self.head_ranks[1]]})
        else:
            model.set_kv_budget(self.rank_budget)
        if (self.key_bits, self.value_bits) == (FULL_PRECISION, FULL_PRECISION):
            model.clear_kv_bits()
        else:
            model.set_kv_bits(self.key_bits, self.value_bits, group=group, residual=self.window)

    def quantized(self) -> bool:
        return (self.key_bits, self.value_bits) != (FULL_PRECISION, FULL_PRECISION)


def value_cut(model: Any, value_rank: float) -> RankTable:
    """Every head's keys at full rank and its values at `value_rank` of head_dim (the largest grid rank not above)."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    values = uniform_ranks(*shape, check_budget(value_rank, "a value rank"), cfg.kv_rank_step)
    return {"key": full_ranks(*shape)["key"], "value": values["value"]}


def head_ranks_of(table: RankTable) -> HeadRanks:
    """A rank table as nested tuples, so that a Composition holding it can key a dict."""
    return (tuple(tuple(row) for row in table["key"]), tuple(tuple(row) for row in table["value"]))


def candidates(model: Any, byte_budget: float, context: int, scored: int,
               choices: Sequence[tuple[int, int]] = DEFAULT_CHOICES, shares: Sequence[float] = KEEP_SHARES,
               profiles: Sequence[str] = PROFILES, group: int = 64, spread: float = 0.5,
               min_rank_budget: float = 0.25, min_kept: float = 0.0,
               head_tables: Sequence[RankTable] = (), tables_only: bool = False, window: int = 0) -> list[Composition]:
    """Every composition whose formula bytes at `context` fit `byte_budget`: per bit width, each kept share with
    the largest grid rank that fits, and the least eviction at which full rank fits; per bit width and per-head
    table of `head_tables`, the least eviction at which that table fits (`tables_only`: those alone). `window`:
    the newest tokens quantized caches hold at bfloat16. `min_kept` is a floor on the share of the prompt every
    layer keeps (a needle evicted at prefill cannot be retrieved later)."""
    if not 0.0 < byte_budget <= 1.0:
        raise ValueError(f"the byte budget must lie in (0, 1] (a fraction of the bf16 full cache); got {byte_budget}")
    if not 0.0 <= min_kept <= 1.0:
        raise ValueError(f"the kept-token floor must lie in [0, 1] (a share of the prompt); got {min_kept}")
    if not 0 < scored < context:
        raise ValueError(f"--context {context} must exceed the {scored} scored tokens")
    if window < 0:
        raise ValueError(f"the window of newest tokens held at bfloat16 must be >= 0 tokens; got {window}")
    cfg = model.config
    d, layers, step = cfg.head_dim, cfg.num_hidden_layers, cfg.kv_rank_step
    frame = ByteFrame(byte_budget, context, scored, group, positions_share(model), spread, min_kept)
    grid = [k * step / d for k in range(d // step, 0, -1) if k * step / d >= max(min_rank_budget, step / d) - 1e-9]
    out: list[Composition] = []
    for kb, vb in choices:
        recent = window if (kb, vb) != (FULL_PRECISION, FULL_PRECISION) else 0

        def rates(rank: float, kb: int = kb, vb: int = vb) -> tuple[list[float], list[float]]:
            rows = [[round(rank * d)]] * layers  # coded and bf16, as every other composition's rates
            return (rows_rates(rows, rows, kb, vb, d, group),
                    rows_rates(rows, rows, FULL_PRECISION, FULL_PRECISION, d, group))

        fit = None if tables_only else frame.least_ratio(*rates(1.0), recent)
        ratios = set() if tables_only else {0.0 if share >= 1.0 else prefill_ratio(share, context - scored, scored)
                                            for share in shares if share * context > scored}
        for ratio in sorted(ratios | ({fit} if fit else set())):
            for rank in grid:
                if ratio == 0.0:
                    if frame.fits(None, *rates(rank), recent):
                        out.append(Composition(rank, kb, vb, (0.0,) * layers, "uniform", window=recent))
                        break
                    continue
                fitting = frame.spreads(ratio, *rates(rank), recent, profiles)
                if not any(profile == profiles[0] for _, profile in fitting):
                    continue  # the first profile (the even spread, by default) sets the largest rank that fits
                if rank < 1.0 or ratio == fit:  # full rank at a grid share: the least eviction `fit` keeps more
                    out += [Composition(rank, kb, vb, spread_, profile, window=recent) for spread_, profile in fitting]
                break
        for table in head_tables:
            out += _table_candidates(table, kb, vb, frame, profiles, recent, d, layers)
    return out


def _table_candidates(table: RankTable, kb: int, vb: int, frame: ByteFrame, profiles: Sequence[str], window: int,
                      d: int, layers: int) -> list[Composition]:
    """A per-head rank table at bits (kb, vb): every token when it fits, else the least eviction that fits."""
    if len(table["key"]) != layers:
        raise ValueError(f"a per-head rank table has {len(table['key'])} layers, the model {layers}; search the "
                         "table on this model (`mkv search-budget --model ... --budget ...`)")
    rates = rows_rates(table["key"], table["value"], kb, vb, d, frame.group)
    full_rates = rows_rates(table["key"], table["value"], FULL_PRECISION, FULL_PRECISION, d, frame.group)
    budget = table_budget(table, d)
    heads = head_ranks_of(table)
    ratio = frame.least_ratio(rates, full_rates, window)
    if ratio is None:
        return []
    if ratio == 0.0:
        return [Composition(budget, kb, vb, (0.0,) * layers, "uniform", heads, window)]
    return [Composition(budget, kb, vb, layer_ratios, profile, heads, window)
            for layer_ratios, profile in frame.spreads(ratio, rates, full_rates, window, profiles)]


def composition_rates(option: Composition, d: int, layers: int, group: int,
                      bits: tuple[int, int] | None = None) -> list[float]:
    """Each layer's bytes per token of `option`'s ranks at its bits (or `bits`), a fraction of bf16 full."""
    kb, vb = bits or (option.key_bits, option.value_bits)
    if option.head_ranks is not None:
        return rows_rates(*option.head_ranks, kb, vb, d, group)
    rank = round(option.rank_budget * d)
    return rows_rates([[rank]] * layers, [[rank]] * layers, kb, vb, d, group)
