"""Each layer's share of a prompt kept at prefill, set by how that layer's attention spreads over the prompt.

PyramidKV gives the lower layers more tokens on one fixed slope; on the long-context projections that slope ties the
even spread (docs/longctx.md).  Here the slope is measured instead: while the calibration windows are read through
the full cache, every layer's eviction scores (`SnapEviction.scores`, what its eviction ranks tokens by) are sorted
into a curve of the attention mass its best k earlier tokens catch.  A layer whose curve is still climbing at the
even share (attention spread over many tokens, as in the first layer) loses more by eviction than one whose curve
has flattened.  The kept tokens are shared out by a water-filling over all layers at once: each next token goes to
the layer where the mass it catches is largest against the mass that layer's attention misses at the even share
(weighed by 1 / the missed mass: the sum over layers of the log of what each misses falls fastest).  The mean kept
share, and so the bytes, stay those of the even spread (the most of them whose formula bytes fit).  What it wins
and where it ties: docs/longctx.md.

Curves are read at the ranks the model holds while recording (the search reads them at full rank, where every
composition it might spread this way keeps its keys).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..cache.eviction import SnapEviction
from .cache_bytes import ByteFrame


class AttentionCurves:
    """Per layer, the mean over heads and prompts of the sorted eviction scores of a prefill's earlier tokens."""

    def __init__(self, press: SnapEviction | None = None) -> None:
        self.press = press or SnapEviction(0.5)
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def on_kv(self, attention: Any, step: Any) -> None:
        """A kv hook (plugin.attention.KVStep): at a prefill into an empty cache, record the layer's sorted scores."""
        if not step.fills_cache:
            return
        scored = [self.press.scores(query, key, step.scale) for query, key in
                  zip(step.query_groups, step.scored_keys())]
        ranked = torch.cat(scored, dim=1).sort(dim=-1, descending=True).values.mean(dim=(0, 1)).cpu()
        layer = step.layer_idx
        if layer in self._sums and self._sums[layer].shape != ranked.shape:
            raise ValueError("attention curves are recorded over prompts of one length; got "
                             f"{ranked.shape[-1]} and {self._sums[layer].shape[-1]} scored tokens")
        self._sums[layer] = self._sums.get(layer, 0) + ranked
        self._counts[layer] = self._counts.get(layer, 0) + 1

    @contextlib.contextmanager
    def recording(self, model: Any) -> Iterator[AttentionCurves]:
        """Record every prefill of `model` (a PcaLlama model) while inside; the hooks are always removed after."""
        handles = []
        try:
            handles = [attn.register_kv_hook(self.on_kv) for attn in model.attention_layers()]
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def density(self) -> torch.Tensor:
        """``[layers, older]``: each layer's mean sorted score, the mass its k-th best earlier token adds."""
        if not self._sums:
            raise ValueError("no prefill was recorded: read at least one prompt inside `recording(model)`")
        layers = max(self._sums) + 1
        missing = [layer for layer in range(layers) if layer not in self._sums]
        if missing:
            raise ValueError(f"layers {missing} recorded no prefill")
        return torch.stack([self._sums[layer] / self._counts[layer] for layer in range(layers)])


def attention_order(density: torch.Tensor, kept_older: Sequence[int], floor: int = 0) -> torch.Tensor:
    """The flattened ``[layers, older]`` entries in the order the water-filling keeps them: every layer's first
    `floor`, then by mass caught / the mass each layer's attention misses at its own count of `kept_older`."""
    layers, older = density.shape
    if len(kept_older) != layers:
        raise ValueError(f"{len(kept_older)} kept counts for {layers} layers")
    if not 0 <= floor <= older:
        raise ValueError(f"a floor of {floor} tokens does not fit {older} earlier tokens")
    mass = density.clamp_min(0.0).double()
    caught = torch.stack([mass[layer, : int(kept)].sum() for layer, kept in enumerate(kept_older)])
    missed = (1.0 - caught).clamp_min(1e-6)  # the softmax's whole mass is 1, the observation window's own included
    weighed = mass / missed[:, None]  # each row non-increasing: the best `total` overall is the water-filling
    weighed[:, :floor] = float("inf")
    return weighed.flatten().argsort(descending=True, stable=True)


def attention_spread(density: torch.Tensor, kept_older: Sequence[int], floor: int = 0) -> list[int]:
    """Earlier tokens (before the observation window) each layer keeps, ``sum(kept_older)`` in all, taken in
    `attention_order`."""
    layers, older = density.shape
    total = int(sum(kept_older))
    if not floor * layers <= total <= layers * older:
        raise ValueError(f"{total} kept tokens do not fit {layers} layers of {older} earlier tokens, {floor} "
                         "each first")
    order = attention_order(density, kept_older, floor)
    return torch.bincount(order[:total] // older, minlength=layers).tolist()


def attention_ratios(density: torch.Tensor, layer_ratios: Sequence[float], frame: ByteFrame,
                     rates: Sequence[float], full_rates: Sequence[float], window: int,
                     observed: int) -> tuple[float, ...] | None:
    """Layer ratios spread by attention (`attention_order`, weighed at the kept counts of `layer_ratios`) that keep
    the most tokens whose formula bytes fit (the bytes, not the tokens, of the spread they replace), every layer at
    least the floor of `frame`; None where none fits or a layer of `layer_ratios` keeps no more than the observation
    window. `observed` is the eviction's observation window, always kept."""
    prompt = frame.context - frame.scored
    layers = len(layer_ratios)
    older = prompt - observed
    if density.shape != (layers, older):
        raise ValueError(f"attention curves of shape {tuple(density.shape)} do not match {layers} layers of a "
                         f"{prompt}-token prompt with a {observed}-token observation window")
    kept_older = [SnapEviction(ratio).kept(prompt) - observed for ratio in layer_ratios]
    if min(kept_older) < 1:  # a layer keeping no more than its observation window has nothing to spread
        return None
    # the fewest earlier tokens whose ratio (below) keeps `min_kept` of the prompt, as keeps_floor reads it
    floor = max(0, min(older, math.ceil(frame.min_kept * prompt - observed - 0.5)))
    order = attention_order(density, _split(sum(kept_older), layers), floor) // older

    def ratios_of(counts: Sequence[int]) -> tuple[float, ...]:
        # the half token keeps int(prompt * (1 - ratio)) at exactly the count, whatever the float rounding
        return tuple(min(1.0 - 1e-9, max(0.0, 1.0 - (count + observed + 0.5) / prompt)) if count < older else 0.0
                     for count in counts)

    def counts_at(total: int) -> list[int]:
        return torch.bincount(order[:total], minlength=layers).tolist()

    def coded_only(total: int) -> bool:  # the bytes without the uncoded tail a quantized layer holds: a lower bound
        return frame.fits(ratios_of(counts_at(total)), rates, rates, window)

    low, high = floor * layers, layers * older
    if not coded_only(low):
        return None
    if not coded_only(high):
        top, bottom = high, low  # the lower bound grows with every token: bisect the most it lets through
        while top - bottom > 1:
            middle = (top + bottom) // 2
            top, bottom = (top, middle) if coded_only(middle) else (middle, bottom)
        high = bottom
    counts = counts_at(high)
    # a quantized layer holds its unfilled block at bf16, so one token fewer can hold more bytes: walk down
    for total in range(high, low - 1, -1):
        if frame.fits(ratios_of(counts), rates, full_rates, window):
            return ratios_of(counts)
        if total > low:
            counts[int(order[total - 1])] -= 1
    return None


def _split(total: int, parts: int) -> list[int]:
    """`total` as `parts` counts as even as whole numbers allow (the even share each weight is measured at)."""
    return [total // parts + (1 if part < total % parts else 0) for part in range(parts)]
