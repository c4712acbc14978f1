"""Token eviction at prefill on the model's own cache (SnapKV-style), composable with ranks and bits.

Low rank and quantization shrink every cached token; eviction drops whole tokens. They are different
axes, so they compose: ``with SnapEviction(0.5)(model): model.generate(...)`` keeps half the prompt's
tokens in whatever cache the model uses (projected, quantized, tiered), each at its ranks and bits.

When a forward fills an empty cache with L > 1 tokens, each layer scores the tokens before the last
``window`` by the attention the last ``window`` queries give them, computed as the layer computes it (in
the projected space, at the current ranks), averaged over the window and the KV head's query heads and
smoothed over ``kernel`` neighbours. Each KV head keeps the window and its best-scored earlier tokens,
``int(L * (1 - compression_ratio))`` in all, and only those enter the cache. The prefill's own attention
is exact; tokens read after it are all kept, at their true positions (``generate`` counts positions from
the attention mask, not from the cache's length).

``layer_ratios`` gives each layer its own share (PyramidKV's observation: lower layers spread their attention,
upper layers concentrate it); a layer at ratio 0 caches every token, exactly as without eviction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SnapEviction:
    """Evict ``compression_ratio`` of a prefill's tokens, kept by the attention of its last ``window`` queries."""

    compression_ratio: float
    window: int = 64
    kernel: int = 5
    layer_ratios: tuple[float, ...] | None = None  # per layer, replacing compression_ratio

    def __post_init__(self) -> None:
        for ratio in (self.compression_ratio, *(self.layer_ratios or ())):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"compression_ratio is the share of prefill tokens evicted, in [0, 1); got {ratio}")
        if self.layer_ratios is not None:
            object.__setattr__(self, "layer_ratios", tuple(float(r) for r in self.layer_ratios))
        if self.window < 1:
            raise ValueError(f"the observation window must be >= 1 token; got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"the pooling kernel must be a positive odd number of tokens; got {self.kernel}")

    @classmethod
    def pyramid(cls, compression_ratio: float, layers: int, spread: float = 0.5, **kwargs: Any) -> SnapEviction:
        """Kept shares falling linearly from layer 0 to the last, ``(1 +- spread)`` times the mean kept share
        (spread narrowed where the lowest layer would keep more than every token); the mean is unchanged."""
        keep = 1.0 - compression_ratio
        spread = min(spread, (1.0 - keep) / keep) if layers > 1 else 0.0
        shares = [keep * (1.0 + spread * (1.0 - 2.0 * i / max(1, layers - 1))) for i in range(layers)]
        return cls(compression_ratio, layer_ratios=tuple(min(1.0 - 1e-9, max(0.0, 1.0 - s)) for s in shares),
                   **kwargs)

    @classmethod
    def from_rank_file(cls, data: Any, layers: int, source: str) -> SnapEviction | None:
        """The ``eviction`` entry of a rank file (``{"layer_ratios": [...], "window": 64, "kernel": 5}``), checked;
        None when it has none."""
        if not isinstance(data, dict) or "eviction" not in data:
            return None
        entry = data["eviction"]
        ratios = entry.get("layer_ratios") if isinstance(entry, dict) else None
        if not isinstance(ratios, list) or len(ratios) != layers or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios):
            raise ValueError(f"{source}: 'eviction' must hold 'layer_ratios', one evicted share per layer ({layers} "
                             "numbers in [0, 1)); rewrite it with `mkv search-budget --bytes F --context L`")
        try:
            return cls(max(ratios), window=int(entry.get("window", 64)), kernel=int(entry.get("kernel", 5)),
                       layer_ratios=tuple(float(r) for r in ratios))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def ratio_at(self, layer: int) -> float:
        """The share of a prefill's tokens that layer ``layer`` evicts."""
        return self.compression_ratio if self.layer_ratios is None else self.layer_ratios[layer]

    def kept(self, length: int, layer: int | None = None) -> int:
        """Tokens a prefill of ``length`` keeps (at least one), in ``layer`` when ratios differ by layer."""
        ratio = self.compression_ratio if layer is None else self.ratio_at(layer)
        return max(1, int(length * (1.0 - ratio)))

    @torch.no_grad()
    def select(self, query: torch.Tensor, key: torch.Tensor, scale: float, keep: int | None = None) -> torch.Tensor:
        """Sorted indices ``[B, G, keep]`` of the tokens each KV head keeps (``keep``: by default ``kept(L)``).

        ``query`` [B, G, n_rep, L, r] and ``key`` [B, G, L, r] of one head group, after projection.
        """
        length = key.shape[-2]
        keep = self.kept(length) if keep is None else keep
        window = min(self.window, length)
        recent = torch.arange(length - min(keep, window), length, device=key.device)
        if keep <= window:
            return recent.expand(*key.shape[:2], keep)
        pooled = self.scores(query, key, scale)
        best = pooled.topk(keep - window, dim=-1).indices
        batch, groups = pooled.shape[:2]
        return torch.cat([best.sort(dim=-1).values, recent.expand(batch, groups, window)], dim=-1)

    @torch.no_grad()
    def scores(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, G, L - window]``: the attention the last ``window`` queries give each earlier token, averaged over
        the window and the head group's query heads and smoothed over ``kernel`` neighbours (what `select` ranks)."""
        length = key.shape[-2]
        window = min(self.window, length)
        logits = torch.matmul(query[..., -window:, :].float(), key.float().unsqueeze(2).transpose(-1, -2)) * scale
        causal = torch.ones(window, window, dtype=torch.bool, device=key.device).tril()
        logits[..., -window:] = logits[..., -window:].masked_fill(~causal, float("-inf"))
        scores = torch.softmax(logits, dim=-1)[..., : length - window].mean(dim=(2, 3))
        batch, groups, older = scores.shape
        return F.avg_pool1d(scores.reshape(batch * groups, 1, older), self.kernel, stride=1,
                            padding=self.kernel // 2, count_include_pad=False).view(batch, groups, older)

    def evict(
        self, query_groups: list[torch.Tensor], key_groups: list[torch.Tensor], value_groups: list[torch.Tensor],
        scale: float, scored_keys: list[torch.Tensor] | None = None, keep: int | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The kept keys and values of every head group (what enters the cache) and the kept indices ``[B, G, kept]``.

        ``scored_keys``: the keys the queries are compared with, where the cache holds something else (pre-RoPE
        coefficients, compared as rebuilt and rotated keys)."""
        keys, values, kept = [], [], []
        for index, (query, key, value) in enumerate(zip(query_groups, key_groups, value_groups)):
            chosen = self.select(query, key if scored_keys is None else scored_keys[index], scale, keep)
            gather = chosen.unsqueeze(-1)
            keys.append(key.gather(2, gather.expand(-1, -1, -1, key.shape[-1])))
            values.append(value.gather(2, gather.expand(-1, -1, -1, value.shape[-1])))
            kept.append(chosen)
        return keys, values, kept

    def on_kv(self, attention: Any, step: Any) -> None:
        """The attention hook (a plugin.attention.KVStep): at a prefill into an empty cache, cache only the kept tokens."""
        if step.fills_cache and self.ratio_at(step.layer_idx) > 0.0:
            keep = self.kept(step.key.shape[-2], step.layer_idx)
            step.keep(*self.evict(step.query_groups, step.key_groups, step.value_groups, step.scale,
                                  scored_keys=step.scored_keys(), keep=keep))

    @contextlib.contextmanager
    def __call__(self, model: Any) -> Iterator[Any]:
        """Evict at every prefill of ``model`` (a PcaLlamaForCausalLM) while inside; always detached after."""
        if not hasattr(model, "attention_layers"):
            raise TypeError(f"SnapEviction acts on a PcaLlama model; got {type(model).__name__} (load the model "
                            "with AutoModelForCausalLM from a PcaLlama checkpoint, or PcaLlamaForCausalLM.from_llama)")
        layers = len(model.attention_layers())
        if self.layer_ratios is not None and len(self.layer_ratios) != layers:
            raise ValueError(f"layer_ratios gives {len(self.layer_ratios)} layers' ratios for a model of {layers} "
                             "layers: give one ratio per layer")
        handles = [model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)]
        try:
            handles += [attn.register_kv_hook(self.on_kv) for attn in model.attention_layers()]
            yield model
        finally:
            for handle in handles:
                handle.remove()


def _refuse_padding(module: Any, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError("token eviction needs unpadded sequences (every sequence of a batch the same length); "
                         "run padded prompts one at a time")


def prefill_ratio(keep: float, context: int, after: int) -> float:
    """The share of a `context`-token prefill to evict so that its kept tokens and the `after` tokens read after it
    (kept whole) are `keep` of all `context + after` tokens."""
    ratio = 1.0 - (keep * (context + after) - after) / context
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{after} tokens kept whole already make more than {keep:g} of a {context + after}-token "
                         "cache; keep a larger share or read a longer context")
    return ratio
