"""The quantized projected cache: projected k', v' stored as packed integers (ranks x bits).

Per (layer, KV head) a key and a value bit width (2, 4, 8, or 16 = unquantized).  Each
stream (the keys or the values of the heads sharing ranks and bits) keeps a full-precision tail
of recent tokens; whenever the tail reaches ``residual + group`` tokens its oldest ``group``
tokens are quantized (keys per channel over the block, values per token, see
:mod:`plugin.cache.quant_codec`).  With ``residual = 0`` at most ``group - 1`` tokens stay in full
precision.  Attention reads the dequantized states; ``nbytes()`` counts the packed codes, the
float16 scales and zeros and the full-precision tail, i.e. everything held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import CompressedCache, TensorMapLayer
from .quant_codec import (
    FULL_PRECISION,
    check_bits,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)

BitsTable = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths per (layer, KV head) for keys and values, the key block and the full-precision window."""

    key_bits: BitsTable
    value_bits: BitsTable
    group: int = 64
    residual: int = 0

    def __post_init__(self) -> None:
        if self.group < 8 or self.group % 8:
            raise ValueError(f"the quantization group must be a positive multiple of 8 tokens; got {self.group}")
        if self.residual < 0:
            raise ValueError(f"the full-precision window must be >= 0 tokens; got {self.residual}")
        if len(self.key_bits) != len(self.value_bits) or any(
            len(k) != len(v) for k, v in zip(self.key_bits, self.value_bits)
        ):
            raise ValueError("key and value bit tables must have the same [layers][kv heads] shape")
        for name, table in (("key bits", self.key_bits), ("value bits", self.value_bits)):
            for row in table:
                for bits in row:
                    check_bits(bits, name)

    @classmethod
    def uniform(cls, layers: int, heads: int, key_bits: int, value_bits: int | None = None, group: int = 64,
                residual: int = 0) -> QuantSpec:
        value_bits = key_bits if value_bits is None else value_bits
        check_bits(key_bits, "key bits")
        check_bits(value_bits, "value bits")
        return cls(tuple((key_bits,) * heads for _ in range(layers)),
                   tuple((value_bits,) * heads for _ in range(layers)), group, residual)

    def is_identity(self) -> bool:
        return all(b == FULL_PRECISION for table in (self.key_bits, self.value_bits) for row in table for b in row)

    def bytes_per_token(self, key_ranks: Sequence[Sequence[int]], value_ranks: Sequence[Sequence[int]],
                        element_size: int) -> float:
        """Bytes per cached token once the quantized part dominates (the tail is not counted).

        Per head: codes r * bits / 8, plus float16 scale and zero: per channel per block for keys
        (4 r / group), per token for values (4); unquantized heads hold r * element_size.
        """
        return sum(self.layer_bytes_per_token(layer, layer_k, layer_v, element_size)
                   for layer, (layer_k, layer_v) in enumerate(zip(key_ranks, value_ranks)))

    def layer_bytes_per_token(self, layer: int, key_ranks: Sequence[int], value_ranks: Sequence[int],
                              element_size: int) -> float:
        """`bytes_per_token` of one layer, its heads at these ranks."""
        total = 0.0
        for rk, rv, bk, bv in zip(key_ranks, value_ranks, self.key_bits[layer], self.value_bits[layer]):
            total += rk * element_size if bk == FULL_PRECISION else rk * bk / 8 + 4 * rk / self.group
            total += rv * element_size if bv == FULL_PRECISION else rv * bv / 8 + 4
        return total

    @classmethod
    def from_rank_file(cls, data: Any, layers: int, heads: int, source: str) -> QuantSpec | None:
        """The bit widths a rank file carries (`mkv search-budget --bytes`), or None when it has none."""
        if not isinstance(data, dict) or ("key_bits" not in data and "value_bits" not in data):
            return None
        tables = []
        for name in ("key_bits", "value_bits"):
            table = data.get(name)
            if (not isinstance(table, list) or len(table) != layers
                    or any(not isinstance(row, list) or len(row) != heads for row in table)):
                raise ValueError(f"rank file {source!r}: {name} must be a [{layers}][{heads}] table of 2, 4, 8 or 16; "
                                 "regenerate it with `mkv search-budget --bytes`")
            try:
                tables.append(tuple(tuple(check_bits(b, name) for b in row) for row in table))
            except ValueError as err:
                raise ValueError(f"rank file {source!r}: {err}") from None
        group = data.get("quant_group", 64)
        if isinstance(group, bool) or not isinstance(group, int):
            raise ValueError(f"rank file {source!r}: quant_group must be a whole number of tokens, got {group!r}")  # noqa: TRY004 - a malformed file, reported as one CLI error
        try:
            return cls(tables[0], tables[1], group, int(data.get("quant_residual", 0)))
        except ValueError as err:
            raise ValueError(f"rank file {source!r}: {err}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`as_dict` (what a saved config.json holds under ``kv_quant``)."""
        return cls(tuple(map(tuple, data["key_bits"])), tuple(map(tuple, data["value_bits"])),
                   int(data.get("group", 64)), int(data.get("residual", 0)))

    def as_dict(self) -> dict[str, Any]:
        return {"key_bits": [list(r) for r in self.key_bits], "value_bits": [list(r) for r in self.value_bits],
                "group": self.group, "residual": self.residual}


class _Stream:
    """The keys (or values) of some heads: packed codes + float16 scale/zero + a full-precision tail."""

    def __init__(self, kind: str, bits: int, group: int, residual: int) -> None:
        self.kind, self.bits, self.group, self.residual = kind, bits, group, residual
        self.packed: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None
        self.quantized = 0  # tokens held as codes

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "key":
            return quantize_keys(x, self.bits, self.group)
        return quantize_values(x, self.bits)

    def append(self, x: torch.Tensor) -> None:
        tail = x if self.tail is None else torch.cat([self.tail, x], dim=-2)
        if self.bits != FULL_PRECISION and tail.shape[-2] >= self.residual + self.group:
            count = (tail.shape[-2] - self.residual) // self.group * self.group
            parts = self._quantize(tail[..., :count, :])
            if self.packed is None:
                self.packed, self.scale, self.zero = parts
            else:
                self.packed, self.scale, self.zero = (
                    torch.cat([old, new], dim=-2) for old, new in zip((self.packed, self.scale, self.zero), parts)
                )
            self.quantized += count
            tail = tail[..., count:, :]
        self.tail = tail

    def states(self) -> torch.Tensor:
        """All tokens, dequantized where quantized, in the tail's dtype."""
        if self.packed is None:
            return self.tail
        dequantize = dequantize_keys if self.kind == "key" else dequantize_values
        old = dequantize(self.packed, self.scale, self.zero, self.bits, self.tail.dtype)
        return torch.cat([old, self.tail], dim=-2) if self.tail.shape[-2] else old

    def length(self) -> int:
        return self.quantized + (0 if self.tail is None else self.tail.shape[-2])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scale, self.zero, self.tail) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.packed, self.scale, self.zero, self.tail = (
            None if t is None else fn(t) for t in (self.packed, self.scale, self.zero, self.tail)
        )

    def crop(self, length: int) -> None:
        if length >= self.quantized:
            self.tail = self.tail[..., : length - self.quantized, :]
            return
        # Cut inside the quantized part: whole blocks stay codes, the rest of the cut block returns to the tail.
        states = self.states()[..., :length, :]
        keep = length // self.group * self.group
        per_byte = 8 // self.bits
        self.packed = self.packed[..., : keep // per_byte, :] if keep else None
        if keep:
            blocks = keep // self.group if self.kind == "key" else keep
            self.scale, self.zero = self.scale[..., :blocks, :], self.zero[..., :blocks, :]
        else:
            self.scale = self.zero = None
        self.quantized = keep
        self.tail = states[..., keep:, :].contiguous()


@dataclass
class _Part:
    positions: tuple[int, ...]  # positions of these heads inside their rank group
    keys: _Stream
    values: _Stream


class QuantizedPcaCacheLayer(TensorMapLayer):
    """One decoder layer of the quantized projected cache; heads of a rank group are split by bit widths."""

    def __init__(self, key_bits: Sequence[int], value_bits: Sequence[int], group: int, residual: int) -> None:
        super().__init__()
        self.key_bits, self.value_bits = list(key_bits), list(value_bits)
        self.group, self.residual = group, residual
        self.parts: list[list[_Part]] = []
        self.orders: list[torch.Tensor | None] = []

    def _build(self, signature: Any) -> None:
        self.signature, self.parts, self.orders = signature, [], []
        for entry in signature:
            heads = entry[2:]
            by_bits: dict[tuple[int, int], list[int]] = {}
            for position, head in enumerate(heads):
                by_bits.setdefault((self.key_bits[head], self.value_bits[head]), []).append(position)
            parts = [_Part(tuple(pos), _Stream("key", kb, self.group, self.residual),
                           _Stream("value", vb, self.group, self.residual)) for (kb, vb), pos in by_bits.items()]
            order = [p for part in parts for p in part.positions]
            self.parts.append(parts)
            # Parts are concatenated in part order; this index puts heads back in group order.
            self.orders.append(None if order == list(range(len(heads))) else torch.tensor(order).argsort())

    def update(
        self,
        key_states: list[torch.Tensor],
        value_states: list[torch.Tensor],
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        signature = (cache_kwargs or {}).get("signature")
        if signature is None:
            raise ValueError("the quantized projected cache needs the attention's head groups (cache_kwargs['signature'])")
        if self.begin_update(key_states, cache_kwargs):
            self._build(signature)
        keys_out, values_out = [], []
        for parts, order, keys, values in zip(self.parts, self.orders, key_states, value_states):
            single = len(parts) == 1
            for part in parts:
                index = None if single else torch.tensor(part.positions, device=keys.device)
                part.keys.append(keys if single else keys.index_select(1, index))
                part.values.append(values if single else values.index_select(1, index))
            keys_out.append(self._assemble([p.keys.states() for p in parts], order))
            values_out.append(self._assemble([p.values.states() for p in parts], order))
        self.keys, self.values = self.parts[0][0].keys.tail, self.parts[0][0].values.tail
        return keys_out, values_out

    @staticmethod
    def _assemble(tensors: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        joined = torch.cat(tensors, dim=1)
        return joined if order is None else joined.index_select(1, order.to(joined.device))

    def streams(self) -> list[_Stream]:
        return [s for parts in self.parts for part in parts for s in (part.keys, part.values)]

    def get_seq_length(self) -> int:
        if not self.is_initialized or not self.parts:
            return 0
        return self.parts[0][0].keys.length()

    def nbytes(self) -> int:
        return sum(stream.nbytes() for stream in self.streams())

    def uncoded_tokens(self) -> int:
        """Tokens the quantized streams hold in full precision (the newest `residual` and a block not yet full),
        0 when no stream is quantized."""
        return max((stream.length() - stream.quantized for stream in self.streams() if stream.bits != FULL_PRECISION),
                   default=0)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for stream in self.streams():
            stream.map(fn)
        if self.parts:
            self.keys, self.values = self.parts[0][0].keys.tail, self.parts[0][0].values.tail

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self.get_seq_length() > max_length:
            for stream in self.streams():
                stream.crop(max_length)
            self.keys, self.values = self.parts[0][0].keys.tail, self.parts[0][0].values.tail

    def reset(self) -> None:
        self.parts, self.orders, self.signature = [], [], None
        self.keys = self.values = None
        self.is_initialized = False


class QuantizedPcaCache(CompressedCache):
    """Projected KV cache with integer codes; one :class:`QuantizedPcaCacheLayer` per decoder layer."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        layers = [QuantizedPcaCacheLayer(k, v, spec.group, spec.residual) for k, v in zip(spec.key_bits, spec.value_bits)]
        super().__init__(layers=layers)
