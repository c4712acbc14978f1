"""Bytes a cache holds at a context length, as a fraction of a bfloat16 full cache: what the long-context allocator
(plugin.budgets.composition) and the benchmarks count.

Per layer: its coded tokens at its rate (codes, float16 scales and zeros when quantized), the tokens a quantized
layer still holds uncoded (its window of newest tokens and the rest of a block not yet full, `tail_tokens`) at
bfloat16, and the key positions an evicted pre-RoPE cache stores.  `held_bytes` reads them from a real cache;
`formula_bytes` says them before a window is spent, and the two agree (tests/test_composition.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..cache.eviction import SnapEviction
from .rank_bits import BF16_BYTES, bytes_fraction

POSITION_BYTES = 4  # int32 position of each kept key, per KV head and layer (pre-RoPE caches that evicted)


def stores_positions(model: Any) -> bool:
    """An evicted cache of this model stores its kept keys' positions (keys cached before RoPE)."""
    return getattr(model.config, "kv_key_space", "post-rope") == "pre-rope"


def positions_share(model: Any) -> float:
    """Bytes of the position an evicted cache stores per kept token, as a fraction of a bf16 full token (0 when the
    model's keys need none)."""
    return POSITION_BYTES / (4 * model.config.head_dim) if stores_positions(model) else 0.0


def bf16_rates(model: Any) -> list[float]:
    """Bytes per token of each layer's cache at the model's ranks, unquantized, at bfloat16."""
    ranks = model.config.resolved_kv_ranks()
    return [float(sum(row_k) + sum(row_v)) * BF16_BYTES for row_k, row_v in zip(ranks["key"], ranks["value"])]


def layer_rates(model: Any) -> list[float]:
    """Bytes per token of each layer's cache at the model's ranks and bits, unquantized states counted at bfloat16."""
    spec = model.model.kv_quant
    if spec is None or spec.is_identity():
        return bf16_rates(model)
    ranks = model.config.resolved_kv_ranks()
    return [spec.layer_bytes_per_token(layer, row_k, row_v, BF16_BYTES)
            for layer, (row_k, row_v) in enumerate(zip(ranks["key"], ranks["value"]))]


def held_bytes(model: Any, cache: Any) -> float:
    """Bytes `cache` holds, counted at bfloat16 for unquantized states: per layer its coded tokens at its own rate
    (per-head ranks differ by layer) and the tokens its quantized streams still hold uncoded (the newest ones, a
    block not yet full) at bfloat16, plus the stored key positions."""
    held = 0.0
    for rate, full_rate, layer in zip(layer_rates(model), bf16_rates(model), cache.layers):
        uncoded = layer.uncoded_tokens() if hasattr(layer, "uncoded_tokens") else 0
        held += rate * (layer.get_seq_length() - uncoded) + full_rate * uncoded
    return held + (cache._position_bytes() if hasattr(cache, "_position_bytes") else 0)


def least_eviction(model: Any, byte_budget: float, context: int, scored: int) -> float:
    """The least share of a prompt of `context - scored` tokens to evict, evenly over the layers, so that the cache
    at the model's current ranks and bits holds at most `byte_budget` of a bf16 full cache of `context` tokens once
    `scored` more are read (uncoded tokens and stored positions counted); ValueError where none does."""
    spec = model.model.kv_quant
    group, window = (spec.group, spec.residual) if spec is not None else (64, 0)
    cfg = model.config
    full = 2 * cfg.num_key_value_heads * cfg.head_dim * BF16_BYTES  # one layer's bf16 bytes per full token
    rates = [rate / full for rate in layer_rates(model)]
    full_rates = [rate / full for rate in bf16_rates(model)]
    frame = ByteFrame(byte_budget, context, scored, group, positions_share(model))
    ratio = frame.least_ratio(rates, full_rates, window)
    if ratio is None:
        raise ValueError(f"{scored} tokens kept whole already make more than {byte_budget:g} of a {context}-token "
                         "cache; give more bytes or read a longer context")
    return ratio


def tail_tokens(held: int, window: int, group: int) -> int:
    """Tokens a quantized stream given `held` tokens keeps uncoded: its window of the newest `window` and the part of
    a block of `group` not yet full (plugin.cache.quantized codes whole blocks, whatever the appends were)."""
    return held if held < window + group else window + (held - window) % group


def keeps_floor(layer_ratios: Sequence[float], min_kept: float) -> bool:
    """Every layer keeps at least `min_kept` of the prompt (a needle evicted at prefill cannot be found later)."""
    return max(layer_ratios) <= 1.0 - min_kept + 1e-9


@dataclass(frozen=True)
class ByteFrame:
    """What every byte count of one search shares: the budget, the lengths, the key block, the spread, the floor."""

    byte_budget: float
    context: int
    scored: int
    group: int
    position_share: float
    spread: float = 0.5
    min_kept: float = 0.0

    def bytes(self, layer_ratios: Sequence[float] | None, rates: Sequence[float], full_rates: Sequence[float],
              window: int) -> float:
        press = None if layer_ratios is None else SnapEviction(max(layer_ratios), layer_ratios=tuple(layer_ratios))
        return formula_bytes(press, rates, self.position_share, self.context, self.scored, full_rates, window,
                             self.group)

    def fits(self, layer_ratios: Sequence[float] | None, rates: Sequence[float], full_rates: Sequence[float],
             window: int) -> bool:
        return self.bytes(layer_ratios, rates, full_rates, window) <= self.byte_budget + 1e-9

    def spread_of(self, ratio: float, profile: str, layers: int) -> tuple[float, ...]:
        if profile == "pyramid":
            return SnapEviction.pyramid(ratio, layers, self.spread).layer_ratios
        return (ratio,) * layers

    def least_ratio(self, rates: Sequence[float], full_rates: Sequence[float], window: int,
                    profile: str = "uniform") -> float | None:
        """The least evicted share of the prompt (spread as `profile`) whose formula bytes fit: 0.0 when every token
        fits, None when not even the scored tokens and one kept token per layer do."""
        layers = len(rates)
        if self.fits(None, rates, full_rates, window):
            return 0.0
        def fits(ratio: float) -> bool:
            return self.fits(self.spread_of(ratio, profile, layers), rates, full_rates, window)
        low, high = 0.0, 1.0 - 1e-9
        if not fits(high):
            return None
        for _ in range(40):  # kept counts are whole tokens: the bytes step down as the ratio grows
            middle = (low + high) / 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return high

    def largest_window(self, rates: Sequence[float], full_rates: Sequence[float]) -> int | None:
        """The most newest tokens a composition keeping every token may hold at bfloat16 and still fit (None when
        not even none fits); the uncoded tokens grow with the window a block of `group` at a time."""
        if not self.fits(None, rates, full_rates, 0):
            return None
        low, high = 0, self.context
        if self.fits(None, rates, full_rates, high):
            return high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.fits(None, rates, full_rates, middle) else (low, middle)
        return low

    def spreads(self, ratio: float, rates: Sequence[float], full_rates: Sequence[float], window: int,
                profiles: Sequence[str]) -> list[tuple[tuple[float, ...], str]]:
        """(layer ratios, profile) of each spread of `ratio` over the layers that keeps the floor and whose
        formula bytes fit."""
        out = []
        for profile in profiles:
            layer_ratios = self.spread_of(ratio, profile, len(rates))
            if keeps_floor(layer_ratios, self.min_kept) and self.fits(layer_ratios, rates, full_rates, window):
                out.append((layer_ratios, profile))
        return out


def formula_bytes(press: SnapEviction | None, rates: Sequence[float], position_share: float, context: int,
                  scored: int, full_rates: Sequence[float] | None = None, window: int = 0, group: int = 64) -> float:
    """Bytes a cache holds at `context` under `press` (None: it evicts nothing), as a fraction of bf16 full: per
    layer the tokens it really keeps (whole tokens, at least one) and the scored ones after them, at that layer's
    rate (`rates`, a fraction of bf16 per token), those a quantized layer still holds uncoded (`tail_tokens`) at
    its bfloat16 rate (`full_rates`; None: the layers are not quantized), and the positions an evicted cache
    stores."""
    layers = len(rates)
    full_rates = rates if full_rates is None else full_rates
    total = 0.0
    for layer in range(layers):
        held = (context if press is None else press.kept(context - scored, layer) + scored)
        uncoded = tail_tokens(held, window, group) if rates[layer] < full_rates[layer] else 0
        total += (held - uncoded) * rates[layer] + uncoded * full_rates[layer]
        total += held * position_share if press is not None else 0.0
    return total / (layers * context)


def rows_rates(key_rows: Sequence[Sequence[int]], value_rows: Sequence[Sequence[int]], kb: int, vb: int, d: int,
                group: int) -> list[float]:
    """Bytes per token of each layer whose heads hold these ranks at bits (kb, vb), a fraction of bf16 full."""
    return [bytes_fraction({"key": [list(row_k)], "value": [list(row_v)]}, kb, vb, d, group)
            for row_k, row_v in zip(key_rows, value_rows)]
