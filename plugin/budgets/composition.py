"""Tokens x ranks x bits under one byte budget at a context length: the long-context allocator.

Three axes shrink a cache: the share of a prompt's tokens each layer keeps at prefill (SnapEviction), the kept
dims of every head (ranks) and the bit widths of their codes.  For a byte budget F, a fraction of a bfloat16 full
cache holding L tokens, the allocator lists the compositions that fit: for every bit width and kept-token share,
the largest rank on the grid that fits what is left, the kept tokens spread evenly over the layers, as a pyramid
(more in the lower layers, as PyramidKV keeps) or, when asked, by each layer's own attention
(plugin.budgets.attention_spread: its curves are read while the full cache reads the calibration windows, so they
cost no forward of their own).  Per-head rank tables (the greedy descent of plugin.budgets.greedy_search,
`mkv search-budget --budget`) join as candidates of their own, each at the kept share
that fills the budget and at the bit widths of the best few uniform compositions: a uniform cut of every head may
cost more than the tokens it frees where a cut at the heads the descent found cheapest does not (measured on the
long-context projections, docs/longctx.md: they win on the calibration windows and lose on held-out ones at 4k, so
they are an option, not the default).  Keys at full rank with values cut (``value_ranks``, e.g. ``VALUE_RANKS``)
join the same way, at the bit width of the best uniform composition: a cut of values costs less than the same cut
of keys on the long-context projections; an option too (at 4k they lead on one calibration window and lose on
two, docs/longctx.md).  It scores each by the perplexity of the last ``scored`` tokens of
calibration windows of L tokens read through its cache (the long-context protocol of plugin.evaluation): every
evenly spread composition on one window, then the pyramid (and attention) spreads of the best few, then the best
few quantized ones holding their newest tokens at bfloat16 (the window transformers' QuantizedCache keeps, paid
for in the bytes) and the best few that keep every token holding as many of their newest at bfloat16 as the bytes
they leave unspent pay for, then the best few of each kind of ranks on every window; the best of those wins.  Its cost
(one window per composition) is measured and printed before the search.

Bytes are what the cache holds at L (plugin.budgets.cache_bytes): every layer's kept prompt tokens and the
``scored`` tokens read after them, coded ones at that layer's rate (codes, float16 scales and zeros), uncoded ones
at bfloat16, plus the key positions an evicted pre-RoPE cache stores; they are read from a real cache after a real
prefill, never only from the formula.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache.base import full_cache_bytes_per_token
from ..cache.quant_codec import FULL_PRECISION
from .attention_spread import AttentionCurves, attention_ratios
from .cache_bytes import ByteFrame, held_bytes, keeps_floor, positions_share
from .composition_grid import PROFILES, Composition, candidates, composition_rates, value_cut
from .rank_bits import DEFAULT_CHOICES
from .ranks import RankTable

SPREADS = (*PROFILES, "attention")  # how compose may spread evicted tokens over the layers


@dataclass
class CompositionResult:
    best: Composition
    ranks: RankTable
    bytes_fraction: float  # measured at `context`
    perplexity: float
    full_perplexity: float
    context: int
    scored: int
    group: int
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def file_fields(self, layers: int, heads: int) -> dict[str, Any]:
        """What the rank file carries besides the ranks: bits, the eviction, and the bytes it holds at `context`."""
        best = self.best
        return {
            "key_bits": [[best.key_bits] * heads for _ in range(layers)],
            "value_bits": [[best.value_bits] * heads for _ in range(layers)], "quant_group": self.group,
            "quant_residual": best.window,
            "eviction": {"layer_ratios": list(best.layer_ratios), "profile": best.profile},  # unrounded: kept counts exact
            "context": self.context, "scored": self.scored, "bytes_fraction": round(self.bytes_fraction, 6),
            "composition": best.label(), "perplexity": round(self.perplexity, 4),
            "full_perplexity": round(self.full_perplexity, 4), "candidates": self.candidates,
        }


@torch.no_grad()
def window_nll(model: Any, composition: Composition | None, window: torch.Tensor, scored: int,
               group: int) -> tuple[torch.Tensor, float]:
    """Per-token NLL of the last `scored` tokens of `window` [T] through `composition`'s cache (None: the full
    cache), and the bytes that cache held at the end, as a fraction of a bfloat16 full cache of T tokens."""
    from ..evaluation.perplexity import last_tokens_nll

    if composition is None:
        model.set_kv_budget(1.0)
        model.clear_kv_bits()
        press = None
    else:
        composition.apply(model, group)
        press = composition.press()
    cache = model.model.new_cache()
    nll = last_tokens_nll(model, window[None], cache, press(model) if press else None, scored)
    return nll, held_bytes(model, cache) / (full_cache_bytes_per_token(model, torch.bfloat16) * window.shape[-1])


def compose(model: Any, byte_budget: float, windows: torch.Tensor, scored: int = 512,
            choices: Sequence[tuple[int, int]] = DEFAULT_CHOICES, group: int = 64, finalists: int = 3,
            profiles: Sequence[str] = PROFILES, spread: float = 0.5, progress: bool = True,
            log: Callable[[str], None] = print, min_kept: float = 0.0,
            head_tables: Sequence[RankTable] = (), recent_window: int | None = None,
            value_ranks: Sequence[float] = ()) -> CompositionResult:
    """The best composition within `byte_budget` at the windows' length (`windows` [n, L], calibration text).
    `profiles`: how evicted tokens may spread over the layers, of SPREADS (the even spread is always tried; the
    attention spread only when asked: on held-out windows it ties the even one, docs/longctx.md).
    `head_tables`: per-head rank tables to try besides uniform ranks (see `candidates`). `value_ranks`: value ranks
    tried with keys at full rank, at the bit width of the best uniform composition (e.g. VALUE_RANKS; empty: none).
    `recent_window`: the newest tokens a quantized composition may hold at bfloat16 (None: `scored`, the tokens a
    decode of that length writes; 0: none).

    Every composition with eviction spread evenly is scored on the first window; the pyramid spread and the
    attention spread (plugin.budgets.attention_spread, from the full cache's prefills of the windows) of the best
    `finalists` of them join, then the best `finalists` quantized ones holding their newest `recent_window` tokens
    at bfloat16 (evicting more where that is what fits), and the best `finalists` quantized ones that keep every token
    holding the largest window of newest tokens at bfloat16 that still fits (unless `recent_window` is 0); the best
    `finalists` of each kind of ranks (uniform, split, per head) are scored on every window, and the best of those
    wins.
    """
    recent = scored if recent_window is None else recent_window
    if recent < 0:
        raise ValueError(f"the window of newest tokens held at bfloat16 must be >= 0 tokens; got {recent}")
    context = windows.shape[-1]
    options = candidates(model, byte_budget, context, scored, choices, profiles=("uniform",), group=group,
                         spread=spread, min_kept=min_kept)
    if not options:
        floor = f" keeping at least {min_kept:g} of the prompt" if min_kept else ""
        raise ValueError(f"no composition fits {byte_budget:g} of a bf16 cache at {context} tokens with "
                         f"{scored} scored tokens{floor}; give a larger budget, a longer --context or a lower "
                         "--min-kept")
    saved_ranks, saved_bits, saved_eviction = model.get_kv_ranks(), model.get_kv_bits(), model.get_kv_eviction()
    was_training = model.training
    model.eval()
    model.set_kv_eviction(None)  # each composition brings its own
    curves = AttentionCurves()
    record = curves.recording if "attention" in profiles else lambda _: contextlib.nullcontext()
    try:
        started = time.perf_counter()
        with record(model):
            full = [window_nll(model, None, windows[0], scored, group)[0]]
        per_full = time.perf_counter() - started
        probe = min(options, key=lambda o: o.rank_budget)  # low ranks run the slowest path: time one of those
        started = time.perf_counter()
        first: dict[Composition, tuple[torch.Tensor, float]] = {probe: window_nll(model, probe, windows[0], scored,
                                                                                  group)}
        per_option = time.perf_counter() - started
        rest = len(windows) - 1
        pyramids = finalists if "pyramid" in profiles else 0
        attended = finalists if "attention" in profiles else 0
        windowed = finalists if recent else 0  # each of windowed and filled: at most `finalists`
        tabled = finalists * len(head_tables)  # at most: the tables at the bit widths of the best `finalists`
        cuts = [value_cut(model, r) for r in value_ranks]
        kinds = 1 + bool(head_tables) + bool(cuts)  # each kind of ranks sends its best `finalists` to every window
        estimate = per_full * rest + per_option * (len(options) - 1 + tabled + len(cuts) + pyramids + attended
                                                   + 2 * windowed + kinds * finalists * rest)
        log(f"{len(options)} compositions fit {byte_budget:g} of the bf16 cache at {context} tokens (+{pyramids} "
            f"pyramid spreads, +{attended} attention spreads, +{windowed} with the newest {recent} tokens at bf16, + "
            f"up to {windowed} keeping every token with the newest that the bytes left pay for at bf16"
            + (f", + up to {tabled} per-head rank tables" if tabled else "")
            + (f", + up to {len(cuts)} value rank cuts" if cuts else "") + f"); about "
            f"{estimate / 60:.1f} min more ({per_option:.0f} s a window: all on 1 window, the best {finalists} on "
            f"{len(windows)})")
        with record(model):
            full += [window_nll(model, None, w, scored, group)[0] for w in windows[1:]]

        def score_first(batch: list[Composition], desc: str) -> None:
            for option in tqdm(batch, desc=desc, disable=not progress):
                nll, used = window_nll(model, option, windows[0], scored, group)
                if used > byte_budget + 1e-9:  # the real cache held more than the formula said: never chosen
                    log(f"  {option.label()} held {used:.5f} of the bf16 cache, above {byte_budget:g}: left out")
                    continue
                first[option] = (nll, used)

        score_first([o for o in options if o != probe], f"compositions at {byte_budget:g}")
        if first[probe][1] > byte_budget + 1e-9:
            del first[probe]
        if head_tables:  # each table at the bit widths of the best uniform compositions (not at every width)
            bits = list(dict.fromkeys((o.key_bits, o.value_bits)
                                      for o in sorted(first, key=lambda o: float(first[o][0].mean()))[:finalists]))
            score_first(candidates(model, byte_budget, context, scored, bits, profiles=("uniform",), group=group,
                                   spread=spread, min_kept=min_kept, head_tables=head_tables, tables_only=True),
                        "per-head rank tables")
        if cuts:  # keys at full rank, values cut, at the bit width of the best uniform composition
            best = min((o for o in first if o.head_ranks is None), key=lambda o: float(first[o][0].mean()))
            score_first(candidates(model, byte_budget, context, scored, [(best.key_bits, best.value_bits)],
                                   profiles=("uniform",), group=group, spread=spread, min_kept=min_kept,
                                   head_tables=cuts, tables_only=True), "value rank cuts")
        frame = ByteFrame(byte_budget, context, scored, group, positions_share(model), spread, min_kept)
        evicting = [o for o in sorted(first, key=lambda o: float(first[o][0].mean())) if any(o.layer_ratios)]
        if pyramids:
            spreads = [_pyramid_of(o, model, frame) for o in evicting[:pyramids]]
            score_first([o for o in spreads if o is not None], "pyramid spreads")
        if attended:
            density = curves.density()
            spreads = [_attention_of(o, model, frame, density, curves.press.window)
                       for o in [o for o in evicting if o.profile == "uniform"][:attended]]
            score_first([o for o in dict.fromkeys(spreads) if o is not None and o not in first], "attention spreads")
        if windowed:
            coded = [o for o in sorted(first, key=lambda o: float(first[o][0].mean())) if o.quantized()]
            whole = [o for o in coded if not any(o.layer_ratios) and not o.window]
            variants = dict.fromkeys([_windowed_of(o, model, frame, recent) for o in coded[:windowed]]
                                     + [_filled_of(o, model, frame) for o in whole[:windowed]])
            score_first([o for o in variants if o is not None and o not in first], "newest tokens at bf16")
        ranked = sorted(first, key=lambda o: float(first[o][0].mean()))
        scores: dict[Composition, torch.Tensor] = {}
        for option in tqdm(_finalists(ranked, finalists), desc="finalists", disable=not progress or rest == 0):
            parts = [first[option][0]] + [window_nll(model, option, w, scored, group)[0] for w in windows[1:]]
            scores[option] = torch.cat(parts)
        rows: list[dict[str, Any]] = []
        for option in ranked:
            nll = scores.get(option, first[option][0])
            rows.append({"composition": option.label(), "rank_budget": option.rank_budget,
                         "key_bits": option.key_bits, "value_bits": option.value_bits, "profile": option.profile,
                         "window": option.window,
                         "bytes_fraction": round(first[option][1], 6), "windows": len(windows) if option in scores else 1,
                         "perplexity": round(math.exp(float(nll.mean())), 4)})
        best = min(scores, key=lambda o: float(scores[o].mean()))
        best.apply(model, group)
        ranks = model.get_kv_ranks()
        return CompositionResult(best, ranks, first[best][1], math.exp(float(scores[best].mean())),
                                 math.exp(float(torch.cat(full).mean())), context, scored, group, rows)
    finally:
        model.set_kv_ranks(saved_ranks)
        model.set_kv_quant(saved_bits)
        model.set_kv_eviction(saved_eviction)
        model.train(was_training)


def _finalists(ranked: Sequence[Composition], count: int) -> list[Composition]:
    """The best `count` of each kind of ranks (uniform, keys and values split, per head) in `ranked` (best first):
    one window can favour a kind that others undo, and an optional kind must not push out of the final round what
    the search without it would have scored there."""
    chosen: list[Composition] = []
    per_kind: dict[str, int] = {}
    for option in ranked:
        kind = option.ranks_kind()
        if per_kind.get(kind, 0) < count:
            chosen.append(option)
            per_kind[kind] = per_kind.get(kind, 0) + 1
    return chosen


def _pyramid_of(option: Composition, model: Any, frame: ByteFrame) -> Composition | None:
    """The same composition with its evicted tokens spread as a pyramid (same mean share), or None where that
    spread breaks the floor or its formula bytes exceed the budget (over per-head ranks, whose layers differ in rate,
    the same mean share can hold more)."""
    layers = len(option.layer_ratios)
    ratio = sum(option.layer_ratios) / layers
    rates, full_rates = _option_rates(option, model, frame.group)
    fits = frame.spreads(ratio, rates, full_rates, option.window, ("pyramid",))
    if not fits:
        return None
    return replace(option, layer_ratios=fits[0][0], profile="pyramid")


def _attention_of(option: Composition, model: Any, frame: ByteFrame, density: torch.Tensor,
                  observed: int) -> Composition | None:
    """The same composition with as many kept tokens spread over the layers by their attention (fewer where the
    formula bytes need it), or None where none fits."""
    rates, full_rates = _option_rates(option, model, frame.group)
    ratios = attention_ratios(density, option.layer_ratios, frame, rates, full_rates, option.window, observed)
    return None if ratios is None else replace(option, layer_ratios=ratios, profile="attention")


def _windowed_of(option: Composition, model: Any, frame: ByteFrame, window: int) -> Composition | None:
    """The same ranks, bits and spread holding the newest `window` tokens at bfloat16, at the least eviction that
    fits the budget then (every token when it still fits), or None where nothing fits or it breaks the floor (or
    its spread is measured, not a profile a share sets: an attention spread)."""
    if option.profile not in PROFILES:
        return None
    rates, full_rates = _option_rates(option, model, frame.group)
    ratio = frame.least_ratio(rates, full_rates, window, option.profile)
    if ratio is None:
        return None
    layer_ratios = frame.spread_of(ratio, option.profile, len(rates)) if ratio else (0.0,) * len(rates)
    if not keeps_floor(layer_ratios, frame.min_kept):
        return None
    return replace(option, layer_ratios=layer_ratios, profile=option.profile if ratio else "uniform", window=window)


def _filled_of(option: Composition, model: Any, frame: ByteFrame) -> Composition | None:
    """A quantized composition that keeps every token, holding at bfloat16 as many of the newest tokens as the bytes
    it leaves unspent pay for (the largest window whose formula bytes fit), or None where they pay for none beyond
    the block a quantized layer holds uncoded anyway."""
    window = frame.largest_window(*_option_rates(option, model, frame.group))
    return None if window is None or window < frame.group else replace(option, window=window)


def _option_rates(option: Composition, model: Any, group: int) -> tuple[list[float], list[float]]:
    """Each layer's bytes per token of `option`, coded and at bfloat16, a fraction of bf16 full."""
    d, layers = model.config.head_dim, model.config.num_hidden_layers
    return (composition_rates(option, d, layers, group),
            composition_rates(option, d, layers, group, (FULL_PRECISION, FULL_PRECISION)))
