"""The settings a user turns on a PcaLlama at inference, and the bytes they give: ranks (uniform, per head, from a
rank file), bit widths, eviction at prefill, shrinking a filled cache.  Mixed into PcaLlamaForCausalLM, whose
config, attention layers and model they act on."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..budgets.ranks import RankTable, read_rank_file, table_budget, uniform_ranks, validate_ranks
from ..cache import QuantSpec, full_cache_bytes_per_token


class KVSettings:
    """Ranks, bits and eviction of a PcaLlamaForCausalLM (``config``, ``model.kv_quant``, ``attention_layers()``)."""

    def _apply_ranks(self, ranks: RankTable) -> None:
        for attn, keys, values in zip(self.attention_layers(), ranks["key"], ranks["value"]):
            attn.set_ranks(keys, values)

    def set_kv_ranks(self, key: RankTable | list[list[int]] | torch.Tensor, value: Any = None) -> None:
        """Set per-(layer, KV head) ranks: a dict {"key", "value"} or two [L][n_kv] tables."""
        table = key if isinstance(key, dict) and value is None else {"key": key, "value": value}
        cfg = self.config
        table = validate_ranks(table, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        cfg.kv_ranks = table
        self._apply_ranks(table)

    def set_kv_budget(self, budget: float) -> None:
        """Uniform ranks: the largest multiple of kv_rank_step not above budget * head_dim (at least one step)."""
        cfg = self.config
        self.set_kv_ranks(uniform_ranks(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, budget, cfg.kv_rank_step))

    def load_rank_file(self, path: str | os.PathLike) -> None:
        """Ranks from a rank file; bit widths and per-layer eviction too when it carries them (`mkv search-budget
        --bytes`, with `--context` for eviction)."""
        import json

        from ..cache.eviction import SnapEviction

        cfg = self.config
        ranks = read_rank_file(path, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        data = json.loads(Path(path).read_text())
        # every part is checked before anything changes
        spec = QuantSpec.from_rank_file(data, cfg.num_hidden_layers, cfg.num_key_value_heads, str(path))
        press = SnapEviction.from_rank_file(data, cfg.num_hidden_layers, str(path))
        self.set_kv_ranks(ranks)
        if spec is not None:
            self.set_kv_quant(spec)
        if press is not None:
            self.set_kv_eviction(press)

    def set_kv_eviction(self, press: Any | None) -> None:
        """Evict at every prefill from now on with `press` (a plugin.cache.eviction.SnapEviction); None stops.

        The same hooks as ``with press(model):``, held until the next call instead of a ``with`` block."""
        held = self.__dict__.pop("_kv_eviction", None)
        if held is not None:
            held[1].__exit__(None, None, None)
        if press is not None:
            attached = press(self)
            attached.__enter__()
            self.__dict__["_kv_eviction"] = (press, attached)

    def get_kv_eviction(self) -> Any | None:
        """The press `set_kv_eviction` attached (None: every prompt token is cached)."""
        held = self.__dict__.get("_kv_eviction")
        return None if held is None else held[0]

    def get_kv_ranks(self) -> RankTable:
        ranks = self.config.resolved_kv_ranks()
        return {kind: [list(row) for row in rows] for kind, rows in ranks.items()}

    def kv_budget(self) -> float:
        return table_budget(self.config.resolved_kv_ranks(), self.config.head_dim)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> float:
        """Bytes the cache holds per token of one sequence, all layers, at the current ranks (and bits).

        With bits set this is the rate of the quantized part (codes, scales, zeros); the
        full-precision tail of fewer than residual + group tokens is not included.
        """
        dtype = dtype or self.dtype
        ranks = self.config.resolved_kv_ranks()
        spec = self.model.kv_quant
        if spec is not None and not spec.is_identity():
            return spec.bytes_per_token(ranks["key"], ranks["value"], torch.finfo(dtype).bits // 8)
        total = sum(sum(row) for kind in ("key", "value") for row in ranks[kind])
        return total * torch.finfo(dtype).bits // 8

    def shrink_cache(self, cache: Any, budget: float | None = None, ranks: RankTable | None = None) -> None:
        """Lower the ranks of the model *and* of a filled cache, by slicing (no recomputation).

        Give a uniform `budget` or a rank table; no head may go above its current ranks.  Decoding
        continues with the same cache at the new ranks, exactly as if they had been used throughout.
        """
        from ..cache import PcaCache

        if not isinstance(cache, PcaCache):
            raise TypeError(f"only a PcaCache can shrink (got {type(cache).__name__}); quantized caches cannot")
        if (budget is None) == (ranks is None):
            raise ValueError("give a budget or a rank table")
        cfg = self.config
        table = (uniform_ranks(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, budget, cfg.kv_rank_step)
                 if budget is not None else validate_ranks(ranks, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                           cfg.head_dim))
        current = self.get_kv_ranks()
        for kind in ("key", "value"):
            for layer, (old_row, new_row) in enumerate(zip(current[kind], table[kind])):
                if any(new > old for old, new in zip(old_row, new_row)):
                    raise ValueError(f"{kind} ranks of layer {layer} would grow ({old_row} -> {new_row}); "
                                     "a filled cache can only shrink")
        self.set_kv_ranks(table)
        for layer, attn in zip(cache.layers, self.attention_layers()):
            # full-rank heads of a cache in the model's own basis move into U before they are sliced
            rebase = None
            if not cache.nested_bases:
                with torch.no_grad():
                    rebase = partial(attn.rebase_to_nested, bases=attn.kv_proj())
            layer.shrink(attn.signature(), rebase=rebase)

    # -- bits ----------------------------------------------------------------------------------
    def set_kv_bits(self, key_bits: int | list[list[int]], value_bits: int | list[list[int]] | None = None,
                    group: int = 64, residual: int = 0) -> None:
        """Quantize the cache: bits 2, 4, 8 (16 = unquantized) for all heads or per [layer][KV head].

        Keys are quantized per channel over blocks of `group` tokens, values per token; the newest
        `residual` tokens (and at most `group - 1` more) stay in full precision.
        """
        cfg = self.config
        layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        value_bits = key_bits if value_bits is None else value_bits

        def table(bits: Any, name: str) -> tuple[tuple[int, ...], ...]:
            if isinstance(bits, int) and not isinstance(bits, bool):
                return tuple((bits,) * heads for _ in range(layers))
            rows = [list(row) for row in bits] if isinstance(bits, (list, tuple)) else None
            if rows is None or len(rows) != layers or any(len(row) != heads for row in rows):
                raise ValueError(f"{name} must be one int or a [{layers}][{heads}] table (layers x KV heads)")
            return tuple(tuple(row) for row in rows)

        self.set_kv_quant(QuantSpec(table(key_bits, "key bits"), table(value_bits, "value bits"), group, residual))

    def set_kv_quant(self, spec: QuantSpec | None) -> None:
        """Install a whole bit setting (None: unquantized); saved with the config."""
        self.model.kv_quant = spec
        self.config.kv_quant = None if spec is None else spec.as_dict()

    def clear_kv_bits(self) -> None:
        """Back to the unquantized projected cache."""
        self.set_kv_quant(None)

    def get_kv_bits(self) -> QuantSpec | None:
        return self.model.kv_quant

    def full_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes per token of the uncompressed GQA cache of the base model."""
        return full_cache_bytes_per_token(self, dtype or self.dtype)
